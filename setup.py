"""Build of bcos_kernels and its compiled extension ``bcos_kernels._C``.

    pip install --no-build-isolation -e .

The extension holds the CPU kernels (csrc/cpu/*.cpp), the schemas of every
op (csrc/ops.cpp, csrc/cuda_schemas.cpp) and, when torch was built with CUDA
and nvcc is found (and BCOS_KERNELS_NO_CUDA is not set), the CUDA kernels
(csrc/cuda/*.cu) and their torch glue (csrc/cuda/*.cpp), compiled with
BCOS_WITH_CUDA defined (GPU architectures: TORCH_CUDA_ARCH_LIST, as torch
decides).  scripts/check_cuda.sh checks the CUDA sources on machines without
CUDA torch.
"""

import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension, include_paths

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    # setuptools wants source paths relative to setup.py.
    return sorted(glob.glob(pattern, root_dir=ROOT))


def _use_cuda():
    if os.environ.get("BCOS_KERNELS_NO_CUDA"):
        return False
    if torch.version.cuda is None or CUDA_HOME is None:
        return False
    return os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))


def _extension():
    with_cuda = _use_cuda()
    sources = ["csrc/ops.cpp", "csrc/cuda_schemas.cpp"] + _sources("csrc/cpu/*.cpp")
    # -fno-math-errno and -fno-trapping-math let sqrt and the branch-free selects of
    # csrc/common/bcos_math.h vectorise; neither changes a value.  The C++
    # standard is left to torch (it adds the one its headers need).
    cxx_flags = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-Wall", "-Wextra"]
    # torch's headers as system headers: their warnings are not ours to fix.
    cxx_flags += [f"-isystem{path}" for path in include_paths()]
    link_flags = []
    if torch.backends.openmp.is_available():
        # at::parallel_for is inline: without OpenMP enabled here it runs serially.  The
        # extension then uses the OpenMP runtime torch has loaded (libgomp.so.1), so
        # torch.set_num_threads applies to it.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    define_macros = [("BCOS_PYTHON_MODULE", None)]
    # define_macros reach both the C++ and the nvcc command lines.
    kwargs = dict(include_dirs=[os.path.join(ROOT, "csrc")], define_macros=define_macros, extra_link_args=link_flags)
    if with_cuda:
        # kernels (plain CUDA) and the glue that registers them (C++ with torch's CUDA headers)
        sources += _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
        define_macros.append(("BCOS_WITH_CUDA", None))
        # No --use_fast_math: the kernels rely on IEEE division and the accurate libm functions
        # (the same results as the CPU kernels up to fused multiply-adds).
        nvcc_flags = ["-O3", "-lineinfo"]
        return CUDAExtension(
            "bcos_kernels._C",
            sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            **kwargs,
        )
    return CppExtension("bcos_kernels._C", sources, extra_compile_args={"cxx": cxx_flags}, **kwargs)


setup(
    name="bcos_kernels",
    version="0.1.0",  # the one version string: bcos_kernels.__version__ reads it from the installed metadata
    description="Fused kernels for interpretable vision networks (B-cos, CoDA, LWTA, CSG)",
    packages=find_packages(include=["bcos_kernels", "bcos_kernels.*"]),
    python_requires=">=3.10",
    # numpy: bcos_kernels.explain builds its RGBA explanation images with it
    install_requires=["torch", "numpy"],
    # pip install bcos-kernels[viz]: the pictures of examples/train_and_explain.py
    extras_require={"viz": ["matplotlib", "pillow"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)

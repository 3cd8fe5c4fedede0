#!/usr/bin/env bash
# Checks of the CUDA backend (csrc/cuda) on a machine without a GPU or a CUDA build of torch.
#
#   1. nvcc -c of every kernel file csrc/cuda/*.cu for sm_80 and sm_90 (C++17), and once more for sm_90 with
#      C++20 (the standard torch's own build uses), with torch's nvcc defines (no implicit half conversions)
#      and warnings as errors;
#   2. a syntax-only C++20 compile of the torch glue csrc/cuda/ops_cuda.cpp against the installed torch's
#      headers (CUDA builds of torch ship the same c10/cuda headers) and the CUDA toolkit's.
# Step 2 needs a Python with torch; it is skipped, with a message, where it is missing.  Without nvcc
# everything is skipped (exit 0), with a message.  The kernels' host-side launch logic is tested by ctest
# (csrc/tests/test_launch_geometry.cpp); the kernels themselves only on a GPU (tests/test_cuda_backend.py).
#
#   scripts/check_cuda.sh      NVCC=/path/to/nvcc overrides the nvcc on PATH
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $# -ne 0 ]]; then
  echo "usage: $0" >&2
  exit 2
fi

NVCC=${NVCC:-$(command -v nvcc || true)}
if [[ -z "$NVCC" || ! -x "$NVCC" ]]; then
  echo "check_cuda: nvcc not found (set NVCC or put it on PATH): skipping the CUDA checks"
  exit 0
fi
PY=${PYTHON:-python}

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# The flags torch's CUDAExtension passes to nvcc (torch.utils.cpp_extension.COMMON_NVCC_FLAGS): the kernels
# must build without the implicit half/bfloat16 conversions.
TORCH_NVCC_FLAGS=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
                  -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr)
CHECK_FLAGS=(-O3 -I csrc "${TORCH_NVCC_FLAGS[@]}" -Xcompiler=-Wall,-Wextra --Werror all-warnings)

echo "== nvcc: $("$NVCC" --version | tail -n 1)"
status=0
for src in csrc/cuda/*.cu; do
  obj="$WORK/$(basename "$src" .cu)"
  echo "-- $src (sm_80 + sm_90, C++17; sm_90, C++20)"
  if ! "$NVCC" -c -std=c++17 -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
      "${CHECK_FLAGS[@]}" "$src" -o "$obj.17.o"; then
    status=1
  fi
  if ! "$NVCC" -c -std=c++20 -gencode arch=compute_90,code=sm_90 "${CHECK_FLAGS[@]}" "$src" -o "$obj.20.o"; then
    status=1
  fi
done
if [[ $status -ne 0 ]]; then
  echo "check_cuda: nvcc failed" >&2
  exit 1
fi

# The toolkit's include directory (cuda_runtime_api.h, cuda_fp16.h), as nvcc itself uses it.
CUDA_INCLUDE=$("$NVCC" --dryrun -c -x cu /dev/null -o "$WORK/null.o" 2>&1 | sed -n 's/^#\$ INCLUDES="-I\([^"]*\)".*/\1/p' | head -n 1)
if [[ -z "$CUDA_INCLUDE" || ! -f "$CUDA_INCLUDE/cuda_runtime_api.h" ]]; then
  echo "check_cuda: cannot locate the CUDA include directory from nvcc --dryrun" >&2
  exit 1
fi
CXX=${CXX:-g++}

TORCH_INCLUDE=$("$PY" -c "import torch.utils.cpp_extension as c; print(':'.join(c.include_paths()))" 2>/dev/null || true)
if [[ -z "$TORCH_INCLUDE" ]]; then
  echo "== torch glue: no Python with torch ($PY): skipping the syntax check of csrc/cuda/ops_cuda.cpp"
else
  echo "== torch glue: $CXX -std=c++20 -fsyntax-only csrc/cuda/ops_cuda.cpp"
  glue_includes=()
  IFS=: read -r -a torch_dirs <<< "$TORCH_INCLUDE"
  for d in "${torch_dirs[@]}"; do glue_includes+=(-isystem "$d"); done
  # C10_CUDA_NO_CMAKE_CONFIGURE_FILE: CPU builds of torch lack the generated c10/cuda/impl/cuda_cmake_macros.h
  # (it only sets export macros, which a syntax check does not need).
  "$CXX" -std=c++20 -fsyntax-only -Wall -Wextra -Werror -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE \
    -I csrc "${glue_includes[@]}" -isystem "$CUDA_INCLUDE" csrc/cuda/ops_cuda.cpp
fi


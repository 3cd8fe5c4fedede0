"""Loading the original code the references are checked against.

- The `bcos` package (PyPI 0.1.3, installed with --no-deps): its __init__ imports
  torchvision, which has no CPU build, so we register bare `bcos` and
  `bcos.models` packages whose __path__ is the installed folder and import the
  submodules we need directly.
- `bcos.models.resnet` imports `torchvision.ops.StochasticDepth` at module level but only builds it when
  stochastic_depth_prob > 0 (never in the published B-cos ResNets). Where torchvision is missing we import
  that module with a stand-in `torchvision.ops` present only during the import; the stand-in
  StochasticDepth raises if anything tries to build it, so the model code that runs is the original.
- Originals that are not packages (moboehle/B-cos v1, B-cosification) are read
  from a local git mirror when one exists (developer machines); tests that need
  them skip with the reason otherwise.
"""

import contextlib
import functools
import importlib
import importlib.util
import math
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch

from bcos_kernels.originals import import_bcos_modules

# A folder holding <owner>+<name>/repo git mirrors of the original repositories; unset: those comparisons skip.
MIRRORS = os.environ.get("BCOS_KERNELS_MIRRORS")


def bcos_installed() -> bool:
    return "bcos" in sys.modules or importlib.util.find_spec("bcos") is not None


class _StochasticDepthUnavailable:
    def __init__(self, *args, **kwargs):
        raise RuntimeError(
            "torchvision is not installed: the stand-in torchvision.ops.StochasticDepth cannot run "
            "(stochastic_depth_prob > 0 needs the real torchvision)"
        )


def _import_without_torchvision(module_name: str):
    """Import `module_name` with a stand-in `torchvision.ops` that exists only during the import."""
    stubs = {"torchvision": types.ModuleType("torchvision"), "torchvision.ops": types.ModuleType("torchvision.ops")}
    stubs["torchvision.ops"].StochasticDepth = _StochasticDepthUnavailable
    stubs["torchvision"].ops = stubs["torchvision.ops"]
    sys.modules.update(stubs)
    try:
        return importlib.import_module(module_name)
    finally:
        for key in stubs:
            sys.modules.pop(key, None)


def torchvision_installed() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def bcos_module(name: str):
    """Import `bcos.<name>` (e.g. "modules", "models.vgg", "models.resnet") without running bcos/__init__.py
    (the bare packages are registered by ``bcos_kernels.originals.import_bcos_modules``)."""
    if import_bcos_modules() is None:
        pytest.skip("the original `bcos` package is not installed (pip install --no-deps bcos==0.1.3)")
    if name == "models.resnet" and not torchvision_installed():
        return _import_without_torchvision("bcos.models.resnet")
    return importlib.import_module(f"bcos.{name}")


def mirror_source(repo: str, path: str) -> str:
    """Text of `path` in the local git mirror of `repo` (owner+name), or skip with the reason."""
    if not MIRRORS:
        pytest.skip(
            f"BCOS_KERNELS_MIRRORS is not set: the comparison with the original {repo} needs a folder holding "
            f"its git mirror as {repo}/repo"
        )
    git_dir = os.path.join(MIRRORS, repo, "repo")
    if not os.path.isdir(git_dir):
        pytest.skip(
            f"no local mirror of {repo} at {git_dir} (set BCOS_KERNELS_MIRRORS to a folder holding "
            f"{repo}/repo): this comparison with the original runs on developer machines only"
        )
    if shutil.which("git") is None:
        pytest.skip(f"git is not installed, cannot read {repo} from its mirror")
    result = subprocess.run(
        ["git", "-c", "safe.directory=*", "--git-dir", git_dir, "show", f"HEAD:{path}"], capture_output=True, text=True
    )
    if result.returncode:
        pytest.skip(f"cannot read {path} from the {repo} mirror: {result.stderr.strip()}")
    return result.stdout


def load_source(name: str, source: str, extra_globals=None):
    """Execute `source` as a fresh module called `name`."""
    module = types.ModuleType(name)
    module.__dict__.update(extra_globals or {})
    exec(compile(source, f"<original {name}>", "exec"), module.__dict__)
    return module


def bcos_resnet18_imagenet_config(num_classes: int = 10):
    """The `bcos` package's B-cos ResNet-18 configured as its ImageNet experiments build their ResNets: uncentered
    batch norm without bias, logit bias -log(K - 1), BcosConv2d with b=2 (random parameters)."""
    resnet, modules = bcos_module("models.resnet"), bcos_module("modules")
    return resnet.resnet18(
        num_classes=num_classes,
        norm_layer=modules.norms.NoBias(modules.norms.BatchNormUncentered2d),
        logit_bias=-math.log(num_classes - 1),
        conv_layer=functools.partial(modules.BcosConv2d, b=2, max_out=1),
    )


@contextlib.contextmanager
def imported_from_mirror(repo: str, paths, module_names, root):
    """Write ``paths`` of the mirror of ``repo`` under the folder ``root`` and import ``module_names`` from there;
    yields {name: module}. The originals' top-level package names (e.g. "modules") are generic, so entries of
    sys.modules under those names are set aside during the block and restored after it."""
    for path in paths:
        target = os.path.join(root, path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "w") as f:
            f.write(mirror_source(repo, path))
    tops = {name.split(".")[0] for name in list(module_names) + [os.path.splitext(p)[0].split("/")[0] for p in paths]}
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in tops}
    for k in saved:
        del sys.modules[k]
    sys.path.insert(0, str(root))
    try:
        yield {name: importlib.import_module(name) for name in module_names}
    finally:
        sys.path.remove(str(root))
        for k in [k for k in sys.modules if k.split(".")[0] in tops]:
            del sys.modules[k]
        sys.modules.update(saved)


def bcos_vit(arch: str, num_classes: int = 10):
    """A B-cos ViT of the `bcos` package (``bcos.models.vit.<arch>``, random parameters) configured as its
    ``vit_final`` experiments build them: BcosLinear / BcosConv2d with b=2, NoBias(DetachableLayerNorm), no
    activation, the 6-channel input, NoBias(DetachableGNLayerNorm2d) in the conv stem, and the LogitLayer with
    bias -log(K - 1) after it (BcosSequential)."""
    import warnings

    vit, modules = bcos_module("models.vit"), bcos_module("modules")
    centered, no_bias = modules.norms.centered_norms, modules.norms.NoBias
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "use the pretrained entrypoints": those download weights
        model = getattr(vit, arch)(
            num_classes=num_classes,
            linear_layer=functools.partial(modules.BcosLinear, b=2, max_out=1),
            conv2d_layer=functools.partial(modules.BcosConv2d, b=2, max_out=1),
            norm_layer=no_bias(centered.DetachableLayerNorm),
            act_layer=torch.nn.Identity,
            channels=6,
            norm2d_layer=no_bias(centered.DetachableGNLayerNorm2d),
        )
    return modules.BcosSequential(model, modules.LogitLayer(logit_bias=-math.log(num_classes - 1)))


SMALL_MODELS = ["resnet18", "vit_ti"]


def small_bcos_model(name: str) -> torch.nn.Module:
    """An original B-cos model for the whole-model tests (seeded random parameters): "resnet18"
    (:func:`bcos_resnet18_imagenet_config`) or "vit_ti" (``simple_vit_ti_patch16_224`` with two encoder blocks,
    which keeps a capture or a training step short)."""
    torch.manual_seed(0)
    if name == "resnet18":
        return bcos_resnet18_imagenet_config()
    model = bcos_vit("simple_vit_ti_patch16_224")
    for i in range(2, 12):
        delattr(model[0].transformer, f"encoder_{i}")
    return model


# ---------------------------------------------------------------------------------------------------------------
# B-cosification (shrebox/B-cosification): its scripts executed from the mirror on its own `bcos` modules
# ---------------------------------------------------------------------------------------------------------------
BCOSIFICATION = "shrebox+B-cosification"
# the original's B-cos layers, in import order (its BcosConv2d differs from bcos 0.1.3: tuple dilation, a bias)
BCOSIFICATION_LAYERS = [
    ("bcos.common", "bcos/common.py"),
    ("bcos.modules.common", "bcos/modules/common.py"),
    ("bcos.modules.bcosconv2d", "bcos/modules/bcosconv2d.py"),
    ("bcos.modules.bcoslinear", "bcos/modules/bcoslinear.py"),
    ("bcos.modules.logitlayer", "bcos/modules/logitlayer.py"),
    ("bcos.modules.bcosifyconv2d", "bcos/modules/bcosifyconv2d.py"),
    ("bcos.modules.bcosifylinear", "bcos/modules/bcosifylinear.py"),
]


class NormalizeStandIn(torch.nn.Module):
    """Stand-in for torchvision.transforms.Normalize on tensors (what the original wrapper applies)."""

    def __init__(self, mean, std):
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x):
        mean = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device)[:, None, None]
        std = torch.as_tensor(self.std, dtype=x.dtype, device=x.device)[:, None, None]
        return (x - mean) / std


def torchvision_stand_ins() -> dict:
    """{name: module} for the torchvision the B-cosification scripts import (transforms.Normalize, and its
    ``functional`` imported unused); {} where the real torchvision is installed (imported here, outside any
    patch of sys.modules, so that it stays imported)."""
    if importlib.util.find_spec("torchvision") is not None:
        import torchvision.transforms  # noqa: F401

        return {}
    tv = types.ModuleType("torchvision")
    tv.transforms = types.ModuleType("torchvision.transforms")
    tv.transforms.Normalize = NormalizeStandIn
    tv.transforms.functional = types.ModuleType("torchvision.transforms.functional")
    return {
        "torchvision": tv,
        "torchvision.transforms": tv.transforms,
        "torchvision.transforms.functional": tv.transforms.functional,
    }


def load_bcosification(paths, stand_ins, on_load=None) -> dict:
    """Execute ``paths`` ((module name, path in the mirror), in order) of the B-cosification mirror as modules of
    bare ``bcos``, ``bcos.modules`` and ``bcos.modules.norms`` packages, with ``stand_ins`` ({name: module}) in
    sys.modules meanwhile; ``on_load(name, module, packages)`` after each (to fill the packages' names the next
    ones import). Only the names set here are swapped in, then restored: a wholesale restore of sys.modules would
    also drop modules first imported meanwhile (numpy, ...), which must not be imported twice. Returns
    {name: module}."""
    sources = {name: mirror_source(BCOSIFICATION, path) for name, path in paths}
    packages = {}
    for pkg in ("bcos", "bcos.modules", "bcos.modules.norms"):
        packages[pkg] = types.ModuleType(pkg)
        packages[pkg].__path__ = []
    packages["bcos.modules"].norms = packages["bcos.modules.norms"]
    names = list(stand_ins) + list(packages) + list(sources)
    saved = {name: sys.modules[name] for name in names if name in sys.modules}
    loaded = {}
    try:
        sys.modules.update(stand_ins)
        sys.modules.update(packages)
        for name, source in sources.items():
            package = name.rpartition(".")[0]
            loaded[name] = sys.modules[name] = load_source(name, source, {"__package__": package})
            if on_load is not None:
                on_load(name, loaded[name], packages)
    finally:
        for name in names:
            if name in saved:
                sys.modules[name] = saved[name]
            else:
                sys.modules.pop(name, None)
    return loaded

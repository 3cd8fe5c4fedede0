"""bcos-kernels: fused kernels for the layers of inherently interpretable vision networks."""

from bcos_kernels import backends
from bcos_kernels.backends import available_backends

# Load the C++ extension (when built) before the ops so that torch.ops.bcos_kernels.* exist.
if backends.cpu_extension() is not None:
    from bcos_kernels.ops import _cpu_fake  # noqa: F401  (fake impls of the C++ ops)

from bcos_kernels import nn, ops  # noqa: E402
from bcos_kernels.bcosify import add_inverse, bcosify  # noqa: E402
from bcos_kernels.convert import convert  # noqa: E402
from bcos_kernels.explain import explain, explanation_mode, gradient_to_image  # noqa: E402
from bcos_kernels.fold import fold_batchnorm, unfold_batchnorm  # noqa: E402
from bcos_kernels.ops import (  # noqa: E402
    batch_norm_uncentered,
    bcos_conv2d,
    bcos_linear,
    class_specific_gate,
    dau_conv2d,
    lwta,
)

try:  # the one version string is setup.py's; installed, it is in the package metadata
    from importlib.metadata import version as _version

    __version__ = _version("bcos_kernels")
except ImportError:  # PackageNotFoundError: a source tree that is not installed
    __version__ = "0+unknown"
__all__ = [
    "add_inverse",
    "available_backends",
    "batch_norm_uncentered",
    "bcos_conv2d",
    "bcos_linear",
    "bcosify",
    "class_specific_gate",
    "convert",
    "dau_conv2d",
    "explain",
    "explanation_mode",
    "fold_batchnorm",
    "gradient_to_image",
    "lwta",
    "nn",
    "ops",
    "unfold_batchnorm",
]

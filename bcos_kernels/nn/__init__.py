"""Drop-in modules (same arguments and state_dict keys as the original code)."""

from bcos_kernels.nn.bcos import (
    BcosConv2d,
    BcosConv2dV1,
    BcosConv2dWithScale,
    BcosifyConv2d,
    BcosifyLinear,
    BcosLinear,
    LogitLayer,
    NormedConv2d,
    NormedLinear,
)
from bcos_kernels.nn.csg import ClassSpecificGate
from bcos_kernels.nn.dau import DAUConv2d
from bcos_kernels.nn.lwta import LWTA
from bcos_kernels.nn.norms import (
    BatchNormUncentered2d,
    DetachableGNInstanceNorm2d,
    DetachableGNLayerNorm2d,
    DetachableGroupNorm2d,
    DetachableLayerNorm,
)
from bcos_kernels.nn.vit import Attention, DetachableGELU, DetachableQuickGELU, MultiheadAttention

__all__ = [
    "Attention",
    "BatchNormUncentered2d",
    "BcosConv2d",
    "BcosConv2dV1",
    "BcosConv2dWithScale",
    "BcosLinear",
    "BcosifyConv2d",
    "BcosifyLinear",
    "ClassSpecificGate",
    "DAUConv2d",
    "DetachableGELU",
    "DetachableGNInstanceNorm2d",
    "DetachableGNLayerNorm2d",
    "DetachableGroupNorm2d",
    "DetachableLayerNorm",
    "DetachableQuickGELU",
    "LWTA",
    "LogitLayer",
    "MultiheadAttention",
    "NormedConv2d",
    "NormedLinear",
]

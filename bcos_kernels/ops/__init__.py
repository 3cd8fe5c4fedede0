"""One front door per op: argument checks, backend choice, custom op registration."""

from bcos_kernels.ops.batch_norm_uncentered import batch_norm_uncentered
from bcos_kernels.ops.bcos_conv2d import bcos_conv2d
from bcos_kernels.ops.bcos_linear import bcos_linear
from bcos_kernels.ops.class_specific_gate import class_specific_gate
from bcos_kernels.ops.dau_conv2d import dau_conv2d
from bcos_kernels.ops.detachable_norm import detachable_group_norm, detachable_layer_norm
from bcos_kernels.ops.lwta import lwta

__all__ = [
    "batch_norm_uncentered",
    "bcos_conv2d",
    "bcos_linear",
    "class_specific_gate",
    "dau_conv2d",
    "detachable_group_norm",
    "detachable_layer_norm",
    "lwta",
]

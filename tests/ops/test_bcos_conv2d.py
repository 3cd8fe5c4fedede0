"""bcos_conv2d (v1, v2, B-cosification, explanation mode, channel_scale) on every backend against the reference."""

from cases import BCOS_CONV2D

import bcos_kernels
from bcos_kernels.ops.bcos_conv2d import reference
from ops._util import op_tests

globals().update(
    op_tests(
        "bcos_conv2d",
        bcos_kernels.bcos_conv2d,
        reference.bcos_conv2d,
        BCOS_CONV2D,
        autocast_lowers=("x", "weight", "bias", "channel_scale"),
    )
)

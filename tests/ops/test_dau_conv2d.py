"""dau_conv2d (CoDA) on every backend against the reference (the original's per-pixel weights)."""

from cases import DAU_CONV2D

import bcos_kernels
from bcos_kernels.ops.dau_conv2d import reference
from ops._util import op_tests

test_reference_backend, test_backend, test_channels_last = op_tests(
    "dau_conv2d", bcos_kernels.dau_conv2d, reference.dau_conv2d_original, DAU_CONV2D
)

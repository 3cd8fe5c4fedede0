"""bcos_linear (v1, v2, B-cosification, explanation mode) on every backend against the reference."""

from cases import BCOS_LINEAR

import bcos_kernels
from bcos_kernels.ops.bcos_linear import reference
from ops._util import op_tests

globals().update(
    op_tests(
        "bcos_linear",
        bcos_kernels.bcos_linear,
        reference.bcos_linear,
        BCOS_LINEAR,
        autocast_lowers=("x", "weight", "bias"),
    )
)

"""bcos_linear (v1, v2, B-cosification, explanation mode) on every backend against the reference."""

from cases import BCOS_LINEAR

import bcos_kernels
from bcos_kernels.ops.bcos_linear import reference
from ops._util import op_tests

# no channels_last cases: its test collects nothing
test_reference_backend, test_backend, _ = op_tests(
    "bcos_linear", bcos_kernels.bcos_linear, reference.bcos_linear, BCOS_LINEAR
)

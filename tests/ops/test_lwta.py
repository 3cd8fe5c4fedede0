"""lwta (deterministic; stochastic with explicit noise) on every backend against the reference."""

from cases import LWTA

import bcos_kernels
from bcos_kernels.ops.lwta import reference
from ops._util import op_tests

test_reference_backend, test_backend, test_channels_last = op_tests("lwta", bcos_kernels.lwta, reference.lwta, LWTA)

"""lwta (deterministic; stochastic with explicit noise) on every backend against the reference."""

import torch
from cases import LWTA

import bcos_kernels
from bcos_kernels.ops.lwta import reference
from ops._util import TOLERANCE, op_tests

# The cases' noise is fp32 (as the front door draws it), so the Gumbel transform runs in fp32 on every backend,
# fp64 x included, and a fused kernel's logf may differ from torch's by an fp32 ulp: fp64 results then agree to
# about 1e-7, not to fp64 rounding.
LWTA_TOLERANCE = {**TOLERANCE, torch.float64: 1e-6}

globals().update(op_tests("lwta", bcos_kernels.lwta, reference.lwta, LWTA, LWTA_TOLERANCE))

"""class_specific_gate (training and eval) on every backend against the reference."""

import torch
from cases import CLASS_SPECIFIC_GATE

import bcos_kernels
from bcos_kernels.ops.class_specific_gate import reference
from ops._util import TOLERANCE, op_tests

# The reference's gate is fp32 whatever x is (the original's quirk), so its fp64 grad mask is summed in fp32:
# fp64 is held to the fp32 contract here.
FP64_IN_FP32 = {**TOLERANCE, torch.float64: TOLERANCE[torch.float32]}

globals().update(
    op_tests(
        "class_specific_gate",
        bcos_kernels.class_specific_gate,
        reference.class_specific_gate,
        CLASS_SPECIFIC_GATE,
        FP64_IN_FP32,
    )
)

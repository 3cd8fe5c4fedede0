"""Backend "cpu" of the class-specific gate: the extension's ``bcos_kernels::csg_gate_forward`` /
``csg_gate_backward`` (csrc/cpu/csg_cpu.cpp), the ops backend "cuda" runs on the GPU (cuda.py: this file's code).

One pass each way over x: forward x * mask[c, labels[n]]; backward grad_x and the per-sample sums of grad_out * x
in the same pass, then a sum over the samples of each class in batch order, deterministic. fp32/fp64/bf16/fp16; a
contiguous or channels_last x is read in place and the output written in that layout (any other layout is
copied, and out copied back into x's strides); the backward reads grad_out in x's layout (a copy when it comes
in the other).
"""

from __future__ import annotations

import torch

from bcos_kernels.ops._layout import is_channels_last, memory_format


def forward(x: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    out = torch.ops.bcos_kernels.csg_gate_forward(x, mask, labels)
    if not (x.is_contiguous() or is_channels_last(x)):
        # the kernel read a contiguous copy of x and wrote a contiguous out; the op returns x's strides (the fake
        # impl's empty_like)
        out = torch.empty_like(x).copy_(out)
    return out


def backward(grad_out, x, mask, labels, opts):
    """opts: GateBackwardOptions (the op's __init__)."""
    num_classes, nhwc, need_x, need_mask = opts.num_classes, opts.nhwc, opts.need_x, opts.need_mask
    # The kernels walk grad_out's layout and write grad_x in it: give them grad_out in the layout the fake
    # promises (x's), a copy only when it comes in the other one; x is read in that layout too (the extension
    # copies it if it differs).
    if grad_out.dim() == 4:
        grad_out = grad_out.contiguous(memory_format=memory_format(nhwc))
    return torch.ops.bcos_kernels.csg_gate_backward(
        grad_out, x if need_mask else None, mask if need_x else None, labels, num_classes, need_x, need_mask
    )

"""Backend "torch" of the class-specific gate: plain torch ops with a hand-written backward.

It gathers ``mask[:, labels]`` to (N, C) and broadcasts it, never building the
full-size gate the original builds (and keeps for backward), and computes

    d mask[c, k] = sum over samples n with labels[n] == k of sum_hw (g * x)[n, c]

as a one-hot matmul (deterministic on every device), accumulated in fp32 or wider.
"""

from __future__ import annotations

import torch

from bcos_kernels.ops._layout import memory_format


def _gathered(mask: torch.Tensor, labels: torch.Tensor, ndim: int) -> torch.Tensor:
    """mask[:, labels] as (N, C) broadcastable against x of rank ndim."""
    g = mask.index_select(1, labels).t()
    return g.reshape(g.shape + (1,) * (ndim - 2))


def forward(x: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    torch.mul(x, _gathered(mask, labels, x.dim()), out=out)
    return out


def backward(grad_out, x, mask, labels, opts):
    """(d x or None, d mask or None); d x channels_last if ``opts.nhwc`` else contiguous. opts:
    GateBackwardOptions (the op's __init__)."""
    num_classes, nhwc, need_x, need_mask = opts.num_classes, opts.nhwc, opts.need_x, opts.need_mask
    grad_x = grad_mask = None
    if need_x:
        grad_x = grad_out * _gathered(mask, labels, grad_out.dim())
        grad_x = grad_x.contiguous(memory_format=memory_format(nhwc))  # the layout the op's fake promises
    if need_mask:
        acc = torch.promote_types(x.dtype, torch.float32)
        per_sample = grad_out.to(acc) * x.to(acc)
        if per_sample.dim() == 4:
            per_sample = per_sample.sum((2, 3))
        # summed per class by an accumulating index_put (deterministic on every device), not a one-hot matmul,
        # whose 0 * NaN would spread a NaN of one sample into every class's column
        by_class = per_sample.new_zeros(num_classes, per_sample.shape[1])
        by_class.index_put_((labels,), per_sample, accumulate=True)
        grad_mask = by_class.t().to(x.dtype).contiguous()  # (C, K)
    return grad_x, grad_mask

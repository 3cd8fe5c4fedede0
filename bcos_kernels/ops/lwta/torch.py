"""Backend "torch" of the LWTA op: plain torch ops with a hand-written backward.

It keeps x, the uniforms u and a uint8 winner index per block for backward,
recomputing y_soft from x and u (the original keeps x, the fp32 mask, the fp32
y_soft and an int64 index per block: 4x the bytes of an fp32 x at U=2, against
2.1x here). x is kept in deterministic mode too: the backward takes the block
geometry and the compute dtype from it.

Noise: with ``noise=None`` in the stochastic mode the front door draws u with
``torch.rand(x.shape)`` in fp32, in x's logical (row-major) order: the same
numbers the original draws under the same ``torch.manual_seed`` (with the
default dtype fp32), whatever x's memory format. This backend takes no seed.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from bcos_kernels.ops._layout import is_channels_last, memory_format
from bcos_kernels.ops.lwta import reference as ref

# Whether the autograd context keeps x in deterministic mode: this backward takes the block geometry and the compute
# dtype from it.
KEEPS_X_WHEN_DETERMINISTIC = True


def draw_noise(x: torch.Tensor) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(noise, seed) of a stochastic call without explicit noise: fp32 uniforms of x's shape, no seed."""
    return torch.rand(x.shape, device=x.device, dtype=torch.float32), None


def _compute_dtype(x: torch.Tensor, noise: Optional[torch.Tensor]) -> torch.dtype:
    dt = x.dtype if noise is None else torch.promote_types(x.dtype, noise.dtype)
    return torch.promote_types(dt, torch.float32)


def _block_view(t: torch.Tensor, competitors: int) -> Tuple[torch.Tensor, int]:
    """t split into blocks along its competition dim (a view for any strides), and the block axis."""
    dim = ref.competition_dim(t)
    return t.unflatten(dim, (t.shape[dim] // competitors, competitors)), dim + 1


def _soft(xb: torch.Tensor, ub: torch.Tensor, temperature: float, axis: int, ct: torch.dtype) -> torch.Tensor:
    """y_soft = softmax((x + gumbel(u)) / T) over the block, in dtype ct (the reference's steps, in place)."""
    a = ub + ref.GUMBEL_EPS
    a.log_().neg_().add_(ref.GUMBEL_EPS).log_().neg_()  # -log(-log(u + eps) + eps), in u's dtype
    a = a.to(ct)
    return a.add_(xb).div_(temperature).softmax(axis)


def forward(x, noise, seed, opts):
    """(out, winner); noise None: deterministic."""
    competitors, temperature = opts.competitors, opts.temperature
    if seed is not None:
        raise ValueError("bcos_kernels::lwta: a seed needs backend 'triton' or 'cuda' (backend 'torch' takes noise)")
    ct = _compute_dtype(x, noise)
    xb, axis = _block_view(x, competitors)
    # the losers' outputs: x times the original's mask value 0 (a NaN or inf x gives NaN, as there), not zeros
    out = torch.empty_like(x)
    outb = _block_view(out, competitors)[0]
    if noise is None:
        torch.mul(xb, 0, out=outb)
        winner = xb.argmax(axis, keepdim=True)
        # the original's mask is exactly 1 at the winner: out = x there, 0 elsewhere
        outb.scatter_(axis, winner, xb.gather(axis, winner))
    else:
        p = _soft(xb, _block_view(noise, competitors)[0], temperature, axis, ct)
        p_win, winner = p.max(axis, keepdim=True)
        torch.mul(xb, (p_win - p_win).to(x.dtype), out=outb)  # (0 - p) + p: also NaN for a NaN softmax
        # the original's straight-through mask value at the winner: (1 - p) + p (1 up to rounding)
        outb.scatter_(axis, winner, (xb.gather(axis, winner).to(ct) * ((1.0 - p_win) + p_win)).to(x.dtype))
    winner = winner.squeeze(axis).to(torch.uint8).contiguous(memory_format=memory_format(is_channels_last(x)))
    return out, winner


def backward(grad_out, x, noise, seed, winner, opts, *, nhwc):
    """d L / d x from the saved x, u and winner (see the op's docstring), channels_last if ``nhwc`` else
    contiguous."""
    competitors, temperature = opts.competitors, opts.temperature
    ct = _compute_dtype(x, noise)
    xb, axis = _block_view(x, competitors)
    gb = _block_view(grad_out, competitors)[0].to(ct)  # may be grad_out itself: never modified
    win = winner.unsqueeze(axis).long()
    if noise is None:
        grad = torch.zeros_like(gb).scatter_(axis, win, gb.gather(axis, win))
    else:
        p = _soft(xb, _block_view(noise, competitors)[0], temperature, axis, ct)
        v = gb * xb  # d L / d mask
        dot = (v * p).sum(axis, keepdim=True)
        grad = v.sub_(dot).mul_(p).div_(temperature)  # softmax backward, through the 1/T
        p_win = p.gather(axis, win)
        grad.scatter_add_(axis, win, gb.gather(axis, win) * ((1.0 - p_win) + p_win))  # + m g at the winner
    grad = grad.flatten(axis - 1, axis).to(x.dtype)
    return grad.contiguous(memory_format=memory_format(nhwc))  # the layout the op's fake promises

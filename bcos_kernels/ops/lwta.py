"""Front door of DISCOVER's stochastic local winner-takes-all (LWTA).

Semantics: :mod:`bcos_kernels.reference.lwta`. Backend "torch" runs the
custom op ``bcos_kernels::lwta`` below: plain torch ops, a fake impl, and a
hand-written backward that keeps x, the uniforms u and a uint8 winner index per
block for backward, recomputing y_soft from x and u (the original keeps x, the
fp32 mask, the fp32 y_soft and an int64 index per block: 4x the bytes of an
fp32 x at U=2, against 2.1x here; with the seed-based re-draw of the fused
kernels it will be x + the winner index).

Straight-through gradient (stochastic mode), with p = y_soft, v = g * x, g the
incoming gradient, m the forward mask (1 at the winner, 0 elsewhere):

    d L / d x_i = m_i g_i + (1 / T) p_i (v_i - sum_j p_j v_j)     (sum over the block)

Deterministic mode: d L / d x_i = m_i g_i.

Noise: with ``noise=None`` and the stochastic mode (training or not -- the
original samples at test time too), u is drawn here in the front door with
``torch.rand(x.shape)`` in fp32, in x's logical (row-major) order: the same
numbers the original draws under the same ``torch.manual_seed`` (with the
default dtype fp32), whatever x's memory format. An explicit ``noise`` must
hold uniforms in [0, 1) (not checked: that would synchronise), have x's shape
and device, and dtype fp32 or x's dtype.

Ties: the winner is the first maximum of y_soft (deterministic: of x), as
the original's ``max``/``argmax``. Non-finite x is not supported (the
original raises OverflowError on the NaN mask it gets; here such a block
gives NaN or 0). ``competitors`` is at most 256 (uint8 winner index).

Precision: the Gumbel transform runs in the noise's dtype, the rest in
promote(x, noise) but at least fp32; the output has x's dtype (the original
returns fp32 for a half x, because its mask is fp32).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from bcos_kernels import backends
from bcos_kernels.ops._checks import check_tensor, positive_int
from bcos_kernels.reference import lwta as ref

TEST_TEMPERATURE = ref.TEST_TEMPERATURE


def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number > 0, got {temperature!r}")
    t = float(temperature)
    if not (t > 0 and t != float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return t


def lwta(x: torch.Tensor, competitors: int, *, temperature: float = ref.DEFAULT_TEMPERATURE,
         deterministic: bool = False, training: bool = True, noise: Optional[torch.Tensor] = None,
         backend: Optional[str] = None) -> torch.Tensor:
    """Local winner-takes-all over blocks of ``competitors`` consecutive channels.

    x: (N, C, H, W) (blocks along C) or (N, D) / (B, T, D) (blocks along the
    last dim). ``training=False`` uses the original's test temperature 1.67
    instead of ``temperature`` (and still samples). ``deterministic`` keeps the
    plain argmax (no noise, no temperature). ``noise``: uniforms u to use
    instead of drawing them (ignored in deterministic mode).
    """
    check_tensor("x", x, (2, 3, 4))
    positive_int("competitors", competitors)
    dim = ref.competition_dim(x)
    if x.shape[dim] % competitors:
        raise ValueError(f"competitors={competitors} must divide the channel dim of x "
                         f"(dim {dim}, size {x.shape[dim]}), shape {tuple(x.shape)}")
    if competitors > 256:
        raise ValueError(f"competitors must be at most 256 (the winner index is stored as uint8), got {competitors}")
    temperature = _check_temperature(temperature)
    deterministic = bool(deterministic)
    if noise is not None:
        check_tensor("noise", noise)
        if noise.shape != x.shape:
            raise ValueError(f"noise must have the shape of x {tuple(x.shape)}, got {tuple(noise.shape)}")
        if noise.device != x.device:
            raise ValueError(f"noise is on {noise.device} but x is on {x.device}; they must be on the same device")
        if noise.dtype not in (x.dtype, torch.float32):
            raise TypeError(f"noise must have dtype float32 or x's dtype {x.dtype}, got {noise.dtype}")
    name = backends.resolve("lwta", backend, x.device, implemented={})
    assert name == "torch", name
    if deterministic:
        noise = None
    else:
        if noise is None:
            noise = torch.rand(x.shape, device=x.device, dtype=torch.float32)
        if not training:
            temperature = TEST_TEMPERATURE
    out, _ = lwta_op(x, competitors, temperature, noise)
    return out


# ---------------------------------------------------------------------------
# backend "torch": the custom op


def _compute_dtype(x: torch.Tensor, noise: Optional[torch.Tensor]) -> torch.dtype:
    dt = x.dtype if noise is None else torch.promote_types(x.dtype, noise.dtype)
    return torch.promote_types(dt, torch.float32)


def _block_view(t: torch.Tensor, competitors: int) -> Tuple[torch.Tensor, int]:
    """t split into blocks along its competition dim (a view for any strides), and the block axis."""
    dim = ref.competition_dim(t)
    return t.unflatten(dim, (t.shape[dim] // competitors, competitors)), dim + 1


def _winner_shape(x: torch.Tensor, competitors: int):
    dim = ref.competition_dim(x)
    shape = list(x.shape)
    shape[dim] //= competitors
    return shape


def _soft(xb: torch.Tensor, ub: torch.Tensor, temperature: float, axis: int, ct: torch.dtype) -> torch.Tensor:
    """y_soft = softmax((x + gumbel(u)) / T) over the block, in dtype ct (the reference's steps, in place)."""
    a = ub + ref.GUMBEL_EPS
    a.log_().neg_().add_(ref.GUMBEL_EPS).log_().neg_()  # -log(-log(u + eps) + eps), in u's dtype
    a = a.to(ct)
    return a.add_(xb).div_(temperature).softmax(axis)


@torch.library.custom_op("bcos_kernels::lwta", mutates_args=())
def lwta_op(x: torch.Tensor, competitors: int, temperature: float,
            noise: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, winner): winner is the uint8 index of the winning unit of each block.

    noise None: deterministic (argmax of x); else the stochastic LWTA with uniforms ``noise``.
    """
    ct = _compute_dtype(x, noise)
    xb, axis = _block_view(x, competitors)
    out = torch.zeros_like(x)
    outb = _block_view(out, competitors)[0]
    if noise is None:
        winner = xb.argmax(axis, keepdim=True)
        # the original's mask is exactly 1 at the winner: out = x there, 0 elsewhere
        outb.scatter_(axis, winner, xb.gather(axis, winner))
    else:
        p = _soft(xb, _block_view(noise, competitors)[0], temperature, axis, ct)
        p_win, winner = p.max(axis, keepdim=True)
        # the original's straight-through mask value at the winner: (1 - p) + p (1 up to rounding)
        outb.scatter_(axis, winner, (xb.gather(axis, winner).to(ct) * ((1.0 - p_win) + p_win)).to(x.dtype))
    winner = winner.squeeze(axis).to(torch.uint8, memory_format=torch.contiguous_format)
    return out, winner


@lwta_op.register_fake
def _(x, competitors, temperature, noise):
    return torch.empty_like(x), x.new_empty(_winner_shape(x, competitors), dtype=torch.uint8)


def _setup_context(ctx, inputs, output):
    x, competitors, temperature, noise = inputs
    _, winner = output
    ctx.mark_non_differentiable(winner)
    ctx.save_for_backward(x, noise, winner)
    ctx.competitors = competitors
    ctx.temperature = temperature


def lwta_backward(grad_out: torch.Tensor, x: torch.Tensor, noise: Optional[torch.Tensor], winner: torch.Tensor,
                  competitors: int, temperature: float) -> torch.Tensor:
    """d L / d x from the saved x, u and winner (plain torch ops; see the module docstring)."""
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
    return grad.flatten(axis - 1, axis).to(x.dtype)


def _backward(ctx, grad_out, _grad_winner):
    x, noise, winner = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = lwta_backward(grad_out, x, noise, winner, ctx.competitors, ctx.temperature)
    return grad_x, None, None, None


lwta_op.register_autograd(_backward, setup_context=_setup_context)

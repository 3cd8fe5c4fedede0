"""Backend "cpu" of the LWTA op: the extension's ``bcos_kernels::lwta_block_forward`` / ``lwta_block_backward``
(csrc/cpu/lwta_cpu.cpp), one pass over the competition blocks each way (at::parallel_for), with the same saved
tensors as backends "triton" and "cuda" (the seed is an int64 tensor of one element). fp32/fp64/bf16/fp16 x,
computed in fp32 (fp64 for fp64). Backend "cuda" is this file's code on the extension's CUDA kernels (cuda.py).

Noise: without ``noise`` the kernels draw u from a seed, which the front door draws on the CPU generator
(``torch.randint(0, 2**63 - 1, (1,))``, a CPU tensor; ``torch.manual_seed`` seeds it): the kernels take the seed
as a host integer, read with ``.item()`` inside the op's (opaque) impl, free for a CPU tensor. Under
torch.compile the draw stays a graph op, so every call gets a new seed. The kernels' uniform of an element is
its own Philox4x32-10 stream (csrc/common/philox.h: key = seed, counter = (index / 4, offset = 0)), the same on
the CPU and on a GPU (backend "cuda"), other numbers than backend "torch"'s ``torch.rand`` and backend
"triton"'s; ``index`` is the row-major index in the tensor the kernel reads, which for a channels_last x is the
(N*H*W, C) view of its memory (read in place, see Layouts): a channels_last x and its contiguous copy get
different draws from one seed. :func:`uniforms` returns the uniforms a seed gives for an x; passed as ``noise``
they reproduce the seeded call.

Layouts: the kernels read x as (outer, C, inner) in contiguous memory, blocks along C. A channels_last
(N, C, H, W) x is given to them as its memory, the (N*H*W, C) matrix (blocks along the last dim, inner = 1): no
copy in, and out / winner / grad_x come back as channels_last views of the kernels' contiguous outputs. For any
other non-contiguous x the kernel reads a contiguous copy and out is copied once more into x's strides. The
backward takes grad_out in x's layout (a copy when it comes in another).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from bcos_kernels.ops._layout import block_shape, is_channels_last, memory_format
from bcos_kernels.ops.lwta._seed import draw_seed

# The deterministic backward reads the winner alone: the autograd context does not keep x then.
KEEPS_X_WHEN_DETERMINISTIC = False


def draw_noise(x: torch.Tensor) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(noise, seed) of a stochastic call without explicit noise: no noise, a seed on the CPU (see above)."""
    return None, draw_seed()


def _view(t: Optional[torch.Tensor], nhwc: bool) -> Optional[torch.Tensor]:
    """What the kernels are given for x-shaped t (or the winner): t itself, or with ``nhwc`` its (N*H*W, channels)
    matrix (a view for a channels_last t, else a copy into that layout)."""
    if t is None or not nhwc:
        return t
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _unview(t: torch.Tensor, shape, nhwc: bool) -> torch.Tensor:
    """The inverse of _view for a kernel output (``shape``: its logical 4-D shape when ``nhwc``)."""
    if not nhwc:
        return t
    n, c, h, w = shape
    return t.reshape(n, h, w, c).permute(0, 3, 1, 2)


def _seed_value(noise: Optional[torch.Tensor], seed: Optional[torch.Tensor]) -> int:
    """The kernels' seed argument (unused when noise is given: noise wins over a seed, as in backend "triton").
    .item() on the CPU tensor the front door draws is a host read; a CUDA seed tensor (only from a direct call of
    the op on CUDA tensors) synchronises with the device here."""
    return 0 if noise is not None or seed is None else int(seed.reshape(()).item())


def uniforms(x: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """The uniforms this backend (and backend "cuda", for a CUDA x) draws for x from ``seed`` (as
    :func:`draw_noise` gives it): fp32, x's shape (and, for a channels_last x, layout). For tests and debugging:
    passing them as ``noise`` reproduces the seeded call exactly."""
    nhwc = is_channels_last(x)
    u = torch.ops.bcos_kernels.lwta_uniform(_view(x, nhwc), _seed_value(None, seed), 0)
    return _unview(u, x.shape, nhwc)


def forward(x, noise, seed, opts):
    competitors, temperature = opts.competitors, opts.temperature
    nhwc = is_channels_last(x)
    deterministic = noise is None and seed is None
    out, winner = torch.ops.bcos_kernels.lwta_block_forward(
        _view(x, nhwc), competitors, temperature, deterministic, _view(noise, nhwc), _seed_value(noise, seed), 0
    )
    if nhwc:
        return _unview(out, x.shape, True), _unview(winner, block_shape(x, competitors), True)
    if not x.is_contiguous():
        # the kernel read a contiguous copy of x; out must have x's strides (empty_like: see the op's fake)
        out = torch.empty_like(x).copy_(out)
    return out, winner


def keeps_probabilities(x: torch.Tensor, stochastic: bool) -> bool:
    """Whether the forward keeps the softmax probabilities for the backward (the ops lwta_sample_forward /
    lwta_sample_backward): sampling on the CPU with an fp32 or fp64 x. The backward then reads them instead of
    drawing the noise again, for x's size in memory more (the original keeps y_soft, as large). Not for bf16/fp16:
    the probabilities are kept in fp32, twice x's size."""
    return stochastic and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)


def sample_forward(x, noise, seed, opts):
    """(out, probs) of the stochastic forward keeping the probabilities (see keeps_probabilities); both in x's
    layout as forward's out."""
    nhwc = is_channels_last(x)
    out, probs = torch.ops.bcos_kernels.lwta_sample_forward(
        _view(x, nhwc), opts.competitors, opts.temperature, _view(noise, nhwc), _seed_value(noise, seed), 0
    )
    if nhwc:
        return _unview(out, x.shape, True), _unview(probs, x.shape, True)
    if not x.is_contiguous():
        out = torch.empty_like(x).copy_(out)  # x's strides, as forward's out; probs stays contiguous (the fake's)
    return out, probs


def sample_backward(grad_out, x, probs, opts, *, nhwc):
    g = _view(grad_out.contiguous(memory_format=memory_format(nhwc)) if grad_out.dim() == 4 else grad_out, nhwc)
    grad = torch.ops.bcos_kernels.lwta_sample_backward(
        g, _view(x, nhwc), _view(probs, nhwc), opts.competitors, opts.temperature
    )
    return _unview(grad, grad_out.shape, nhwc)


def backward(grad_out, x, noise, seed, winner, opts, *, nhwc):
    competitors, temperature = opts.competitors, opts.temperature
    deterministic = noise is None and seed is None
    g = _view(grad_out.contiguous(memory_format=memory_format(nhwc)) if grad_out.dim() == 4 else grad_out, nhwc)
    # x is not saved in deterministic mode, nor read by the kernel then: grad_out stands in for it
    xv = g if x is None else _view(x, nhwc)
    grad = torch.ops.bcos_kernels.lwta_block_backward(
        g,
        xv,
        _view(winner, nhwc),
        competitors,
        temperature,
        deterministic,
        _view(noise, nhwc),
        _seed_value(noise, seed),
        0,
    )
    return _unview(grad, grad_out.shape, nhwc)

"""Front door of DISCOVER's stochastic local winner-takes-all (LWTA).

Semantics: :mod:`bcos_kernels.ops.lwta.reference`. Both backends run the custom
op ``bcos_kernels::lwta`` below (a fake impl, a hand-written backward):

* "torch": plain torch ops; keeps x, the uniforms u and a uint8 winner index
  per block for backward, recomputing y_soft from x and u (the original keeps
  x, the fp32 mask, the fp32 y_soft and an int64 index per block: 4x the bytes
  of an fp32 x at U=2, against 2.1x here).
* "triton" (:mod:`bcos_kernels.ops.lwta.triton`): one kernel per tile of blocks
  each way. Without ``noise`` it draws u in the kernel (Philox) from a seed
  and re-draws the same u in backward, so it keeps only x, the seed and the
  uint8 winner (1.06x the bytes of an fp32 x at U=4; deterministic mode: the
  winner alone). Its backward is the custom op ``bcos_kernels::lwta_backward``.
* "cuda" (the extension's ``bcos_kernels::lwta_block_forward`` /
  ``lwta_block_backward``, csrc/cuda/lwta_cuda.cu): one thread per block each
  way, the same custom ops and the same saved tensors as "triton" (the seed
  is an int64 tensor of one element either way).

Straight-through gradient (stochastic mode), with p = y_soft, v = g * x, g the
incoming gradient, m the forward mask (1 at the winner, 0 elsewhere):

    d L / d x_i = m_i g_i + (1 / T) p_i (v_i - sum_j p_j v_j)     (sum over the block)

Deterministic mode: d L / d x_i = m_i g_i.

Noise: with ``noise=None`` and the stochastic mode (training or not -- the
original samples at test time too), backend "torch" draws u here in the front
door with ``torch.rand(x.shape)`` in fp32, in x's logical (row-major) order:
the same numbers the original draws under the same ``torch.manual_seed`` (with
the default dtype fp32), whatever x's memory format. Backend "triton" instead
draws one seed here, ``torch.randint(0, 2**63 - 1, (1,))`` on x's device (so
``torch.manual_seed`` controls it), and passes it to the op as a 1-element
int64 *tensor*: torch.compile then keeps it a graph value (a Python int
argument would be baked into the graph as a constant, giving every call the
same noise). The kernel's u of an element is Philox(seed, its logical
row-major index): the same for a channels_last x and its contiguous copy, but
other numbers than the "torch" backend's (same distribution). An explicit
``noise`` must hold uniforms in [0, 1) (not checked: that would synchronise),
have x's shape and device, and dtype fp32 or x's dtype; every backend then
computes the same thing.

Backend "cuda" draws its seed the same way but on the CPU generator
(``torch.randint(0, 2**63 - 1, (1,))``, a CPU tensor; ``torch.manual_seed``
seeds it too, ``torch.cuda.manual_seed`` alone does not): the kernels take the
seed as a host integer, so the op reads the tensor with ``.item()`` inside its
(opaque) impl, and a CPU tensor makes that read free -- a CUDA seed tensor
would cost a device-to-host synchronisation per call, forward and backward (a
seed tensor on the GPU passed to the op directly still works, at that cost).
Under torch.compile the draw stays a graph op, so every call gets a new seed.
(A CPU tensor in the graph keeps CUDA graphs, mode="reduce-overhead", from
capturing it: inductor then runs that graph without them.) The kernels'
uniform of an element is its own Philox4x32-10 stream (csrc/common/philox.h:
key = seed, counter = (index / 4, offset = 0)), numbers different from
both other backends'; ``index`` is the row-major index in the tensor the kernel
reads, which for a channels_last x is the (N*H*W, C) view of its memory (read
in place, see Layouts): a channels_last x and its contiguous copy get
different draws from one seed. :func:`cuda_uniforms` returns the uniforms a
seed gives for an x; passed as ``noise`` they reproduce the seeded call.

Ties: the winner is the first maximum of y_soft (deterministic: of x), as
the original's ``max``/``argmax``. Non-finite x is not supported (the
original raises OverflowError on the NaN mask it gets; here such a block
gives NaN or 0). ``competitors`` is at most 256 (uint8 winner index).

Precision: the Gumbel transform runs in the noise's dtype, the rest in
promote(x, noise) but at least fp32; the output has x's dtype (the original
returns fp32 for a half x, because its mask is fp32). Backend "triton" takes
fp32/fp16/bf16 x (fp32 only under the Triton interpreter) and computes in
fp32; its exp/log are the device's, so y_soft may differ from the reference's
in the last bits: the winners agree (up to exact near-ties), the output at the
winner x * ((1 - p) + p) may differ by one ulp where that factor is not exactly 1
(never at U = 2, where p >= 1/2), the gradient is within rounding.

Backend "cuda" takes fp32/fp64/fp16/bf16 x and computes in fp32 (fp64 for fp64).

Layouts: backends "triton" and "cuda" read a contiguous or a 4-D
channels_last x in place and copy any other; out has x's strides
(``empty_like``) and the winner tensor is channels_last when x is (every
backend). "cuda" runs a channels_last x as the (N*H*W, C) matrix its memory
is (blocks along the last dim; out and the winner come back as channels_last
views, no copy); for any other non-contiguous x the kernel reads a contiguous
copy and out is copied once more into x's strides. Its backward takes
grad_out in x's layout (a copy when it comes in another).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from bcos_kernels import backends
from bcos_kernels.ops._checks import check_tensor, positive_int
from bcos_kernels.ops.lwta import reference as ref

TEST_TEMPERATURE = ref.TEST_TEMPERATURE

# Seeds are drawn uniformly in [0, SEED_HIGH): any 64-bit Philox key is as good as another.
SEED_HIGH = 2**63 - 1


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
    instead of drawing them (ignored in deterministic mode). ``backend``:
    "torch", "triton", "cuda", "auto" or None (the ``BCOS_KERNELS_BACKEND`` env var, else auto).
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
    name = backends.resolve("lwta", backend, x)
    if name == "reference":
        return ref.lwta(x, competitors, temperature=temperature, deterministic=deterministic, training=training,
                        noise=noise)
    seed = None
    if deterministic:
        noise = None
    else:
        if noise is None:
            if name == "triton":
                seed = torch.randint(0, SEED_HIGH, (1,), dtype=torch.int64, device=x.device)
            elif name == "cuda":
                seed = draw_cuda_seed()
            else:
                noise = torch.rand(x.shape, device=x.device, dtype=torch.float32)
        if not training:
            temperature = TEST_TEMPERATURE
    out, _ = lwta_op(x, competitors, temperature, noise, seed, name)
    return out


def draw_cuda_seed() -> torch.Tensor:
    """The seed of a backend "cuda" call: a 1-element int64 tensor on the CPU, from torch's default generator
    (see the module docstring for why the CPU)."""
    return torch.randint(0, SEED_HIGH, (1,), dtype=torch.int64)


# ---------------------------------------------------------------------------
# the custom op (backend "torch" in plain torch ops, backend "triton" in bcos_kernels/ops/lwta/triton.py,
# backend "cuda" in the extension: csrc/cuda/lwta_cuda.cu)


def _nhwc(x: torch.Tensor) -> bool:
    """Whether x is read as channels_last: a 4-D x that is channels_last- but not plain-contiguous. The winner
    tensor then is channels_last too (every backend and the fake impl follow this rule)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _memory_format(nhwc: bool) -> torch.memory_format:
    return torch.channels_last if nhwc else torch.contiguous_format


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


def _check_backend(backend: str, seed: Optional[torch.Tensor]) -> None:
    if backend not in ("torch", "triton", "cuda"):
        raise ValueError(f"bcos_kernels::lwta: unknown backend {backend!r} (torch, triton, cuda)")
    if seed is not None and backend == "torch":
        raise ValueError("bcos_kernels::lwta: a seed needs backend 'triton' or 'cuda' (backend 'torch' takes noise)")


# Backend "cuda": the kernels read x as (outer, C, inner) in contiguous memory, blocks along C. A channels_last
# (N, C, H, W) x is given to them as its memory, the (N*H*W, C) matrix (blocks along the last dim, inner = 1):
# no copy in, and out / winner / grad_x come back as channels_last views of the kernels' contiguous outputs.


def _cuda_view(t: Optional[torch.Tensor], nhwc: bool) -> Optional[torch.Tensor]:
    """What the CUDA kernels are given for x-shaped t (or the winner): t itself, or with ``nhwc`` its
    (N*H*W, channels) matrix (a view for a channels_last t, else a copy into that layout)."""
    if t is None or not nhwc:
        return t
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _cuda_unview(t: torch.Tensor, shape, nhwc: bool) -> torch.Tensor:
    """The inverse of _cuda_view for a kernel output (``shape``: its logical 4-D shape when ``nhwc``)."""
    if not nhwc:
        return t
    n, c, h, w = shape
    return t.reshape(n, h, w, c).permute(0, 3, 1, 2)


def _seed_value(seed: Optional[torch.Tensor]) -> int:
    """The kernels' seed argument. .item() on the CPU tensor the front door draws is a host read; a CUDA seed
    tensor (only from a direct call of the op) synchronises with the device here."""
    return 0 if seed is None else int(seed.reshape(()).item())


def cuda_uniforms(x: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """The uniforms backend "cuda" draws for x (a CUDA tensor) from ``seed`` (as :func:`draw_cuda_seed` gives
    it): fp32, x's shape (and, for a channels_last x, layout). For tests and debugging: passing them as ``noise``
    reproduces the seeded call exactly."""
    nhwc = _nhwc(x)
    u = torch.ops.bcos_kernels.lwta_uniform(_cuda_view(x, nhwc), _seed_value(seed), 0)
    return _cuda_unview(u, x.shape, nhwc)


def _cuda_forward(x: torch.Tensor, competitors: int, temperature: float, noise: Optional[torch.Tensor],
                  seed: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    nhwc = _nhwc(x)
    deterministic = noise is None and seed is None
    out, winner = torch.ops.bcos_kernels.lwta_block_forward(
        _cuda_view(x, nhwc), competitors, temperature, deterministic, _cuda_view(noise, nhwc),
        0 if noise is not None else _seed_value(seed), 0)   # noise wins over a seed, as in backend "triton"
    if nhwc:
        return _cuda_unview(out, x.shape, True), _cuda_unview(winner, _winner_shape(x, competitors), True)
    if not x.is_contiguous():
        # the kernel read a contiguous copy of x; out must have x's strides (empty_like: see the fake impl)
        out = torch.empty_like(x).copy_(out)
    return out, winner


def _cuda_backward(grad_out: torch.Tensor, x: Optional[torch.Tensor], noise: Optional[torch.Tensor],
                   seed: Optional[torch.Tensor], winner: torch.Tensor, competitors: int, temperature: float,
                   nhwc: bool) -> torch.Tensor:
    deterministic = noise is None and seed is None
    fmt = _memory_format(nhwc)
    g = _cuda_view(grad_out.contiguous(memory_format=fmt) if grad_out.dim() == 4 else grad_out, nhwc)
    # x is not saved in deterministic mode, nor read by the kernel then: grad_out stands in for it
    xv = g if x is None else _cuda_view(x, nhwc)
    grad = torch.ops.bcos_kernels.lwta_block_backward(
        g, xv, _cuda_view(winner, nhwc), competitors, temperature, deterministic, _cuda_view(noise, nhwc),
        0 if noise is not None else _seed_value(seed), 0)
    return _cuda_unview(grad, grad_out.shape, nhwc)


@torch.library.custom_op("bcos_kernels::lwta", mutates_args=())
def lwta_op(x: torch.Tensor, competitors: int, temperature: float, noise: Optional[torch.Tensor],
            seed: Optional[torch.Tensor] = None, backend: str = "torch") -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, winner): winner is the uint8 index of the winning unit of each block (channels_last if x is).

    noise given: the stochastic LWTA with uniforms ``noise``; else seed given (backend "triton", a 1-element
    int64 tensor): uniforms drawn in the kernel from it; neither: deterministic (argmax of x).
    """
    _check_backend(backend, seed)
    if backend == "triton":
        from bcos_kernels.ops.lwta import triton as kernels  # imported on first use
        return kernels.lwta_forward(x, competitors, temperature, noise, seed, _nhwc(x))
    if backend == "cuda":
        backends.check_device("lwta", "cuda", x.device)
        return _cuda_forward(x, competitors, temperature, noise, seed)
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
    winner = winner.squeeze(axis).to(torch.uint8).contiguous(memory_format=_memory_format(_nhwc(x)))
    return out, winner


@lwta_op.register_fake
def _(x, competitors, temperature, noise, seed=None, backend="torch"):
    _check_backend(backend, seed)
    winner = torch.empty(_winner_shape(x, competitors), dtype=torch.uint8, device=x.device,
                         memory_format=_memory_format(_nhwc(x)))
    return torch.empty_like(x), winner


@torch.library.custom_op("bcos_kernels::lwta_backward", mutates_args=())
def lwta_backward_op(grad_out: torch.Tensor, x: Optional[torch.Tensor], noise: Optional[torch.Tensor],
                     seed: Optional[torch.Tensor], winner: torch.Tensor, competitors: int, temperature: float,
                     nhwc: bool, backend: str) -> torch.Tensor:
    """d L / d x of a fused backend's forward (channels_last if ``nhwc`` else contiguous). x is None in
    deterministic mode (neither noise nor seed): the winner is all that gradient needs."""
    if backend == "cuda":
        backends.check_device("lwta", "cuda", grad_out.device)
        return _cuda_backward(grad_out, x, noise, seed, winner, competitors, temperature, nhwc)
    if backend != "triton":
        raise ValueError(f"bcos_kernels::lwta_backward: unknown backend {backend!r} (triton, cuda)")
    from bcos_kernels.ops.lwta import triton as kernels
    return kernels.lwta_backward(grad_out, x, noise, seed, winner, competitors, temperature, nhwc)


@lwta_backward_op.register_fake
def _(grad_out, x, noise, seed, winner, competitors, temperature, nhwc, backend):
    return torch.empty(grad_out.shape, dtype=grad_out.dtype, device=grad_out.device,
                       memory_format=_memory_format(nhwc))


def _setup_context(ctx, inputs, output):
    x, competitors, temperature, noise, seed, backend = inputs
    _, winner = output
    ctx.mark_non_differentiable(winner)
    stochastic = noise is not None or seed is not None
    # backend "torch" recomputes from x in every mode; the fused backward needs x only to recompute y_soft
    keep_x = x if backend == "torch" or stochastic else None
    ctx.save_for_backward(keep_x, noise, seed, winner)
    ctx.competitors = competitors
    ctx.temperature = temperature
    ctx.backend = backend
    ctx.nhwc = _nhwc(x)


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
    x, noise, seed, winner = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        if ctx.backend == "torch":
            grad_x = lwta_backward(grad_out, x, noise, winner, ctx.competitors, ctx.temperature)
        else:
            grad_x = lwta_backward_op(grad_out, x, noise, seed, winner, ctx.competitors, ctx.temperature,
                                      ctx.nhwc, ctx.backend)
    return grad_x, None, None, None, None, None


lwta_op.register_autograd(_backward, setup_context=_setup_context)

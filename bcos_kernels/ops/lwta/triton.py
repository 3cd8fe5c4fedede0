"""Backend "triton" of the LWTA op: one kernel each way, one tile of competition blocks per program.

Without ``noise`` it draws u in the kernel (Philox) from a seed and re-draws
the same u in backward, so it keeps only x, the seed and the uint8 winner
(1.06x the bytes of an fp32 x at U=4; deterministic mode: the winner alone).
The front door draws the seed, ``torch.randint(0, 2**63 - 1, (1,))``, on x's
device (so ``torch.manual_seed`` controls it) and passes it to the op as a
1-element int64 *tensor*: torch.compile then keeps it a graph value (a Python
int argument would be baked into the graph as a constant, giving every call
the same noise). The kernel's u of an element is Philox(seed, its logical
row-major index): the same for a channels_last x and its contiguous copy, but
other numbers than the "torch" backend's (same distribution).
:func:`draw_uniforms` returns the uniforms a seed gives.

Dtypes: fp32/fp16/bf16 x (fp32 only under the Triton interpreter), computed
in fp32; its exp/log are the device's, so y_soft may differ from the
reference's in the last bits: the winners agree (up to exact near-ties), the
output at the winner x * ((1 - p) + p) may differ by one ulp where that factor
is not exactly 1 (never at U = 2, where p >= 1/2), the gradient is within
rounding.

Layouts: a contiguous or a 4-D channels_last x is read in place, any other is
copied. Every supported layout is a dense tensor that reads, in memory order, as
[R, U, Q]: R = (outer index, block) pairs, U competitors, Q inner positions.

* [..., D] contiguous:          R = numel / U,         Q = 1 (a block is U consecutive elements)
* (N, C, H, W) contiguous:      R = N * C / U,         Q = H * W (a block is U elements H * W apart)
* (N, C, H, W) channels_last:   R = N * H * W * C / U, Q = 1 (read in place, no copy)

so one kernel indexes element (r, u, q) at (r * U + u) * Q + q and the block's
winner at r * Q + q. A program owns a [BLOCK_R, U_PAD, BLOCK_Q] tile (U_PAD:
U rounded up to a power of two, the padding lanes masked to -inf).

Noise: 10-round Philox (Triton's ``tl.philox``) keyed by the 64-bit seed. One
call gives four 32-bit outputs, so one call serves up to four competitors:
unit u of the block with *logical* row-major index b (x's winner shape) gets
output u % 4 of Philox(seed, counter = b * ceil(U / 4) + u // 4), the 64-bit
counter split into its low and high 32-bit words. At U <= 4 that is one
Philox call per block, computed once for the block (the RNG is most of the
kernel's arithmetic). The noise does not depend on the layout (a channels_last
x gets the same noise as its contiguous copy), and the backward re-draws
exactly the forward's uniforms from the seed instead of storing them. For
counters below 2^31 this is ``tl.rand4x(seed, counter)`` bit for bit; taking
the words ourselves keeps the stream the same in every Triton version
(``tl.rand`` on int64 offsets changed between releases) without 64-bit
multiplies.

Numerics: compute in fp32; explicit fp16/bf16 noise is rounded to its dtype
after every step of the Gumbel transform, as the reference computes it in the
noise's dtype. The winner is the first maximum of y_soft (deterministic: of x).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from bcos_kernels import backends
from bcos_kernels.ops._layout import block_shape, is_channels_last, memory_format
from bcos_kernels.ops.lwta._seed import draw_seed
from bcos_kernels.ops.lwta.reference import GUMBEL_EPS, competition_dim

# What the kernels do with the competition: keep the argmax of x; Gumbel noise from an explicit
# tensor of uniforms; Gumbel noise drawn from the seed.
MODE_DETERMINISTIC, MODE_NOISE, MODE_SEED = 0, 1, 2

# Elements per program: enough to keep a GPU busy per block of loads; larger under the interpreter,
# whose cost is per program rather than per element.
TILE_ELEMENTS = 1024
TILE_ELEMENTS_INTERPRETED = 8192
MAX_BLOCK_Q = 128

# The deterministic backward reads the winner alone: the autograd context does not keep x then.
KEEPS_X_WHEN_DETERMINISTIC = False


@triton.jit
def _block_uniforms(seed, block, unit, U: tl.constexpr):
    """U[0, 1) float32 of unit ``unit`` of logical block ``block`` (int64): output unit % 4 of the 10-round
    Philox of counter block * ceil(U / 4) + unit // 4 (low word, high word, 0, 0)."""
    if U <= 4:
        counter = block  # one call for the whole block, broadcast over its units below
    else:
        counter = block * ((U + 3) // 4) + unit // 4
    low = counter.to(tl.uint32)
    high = (counter >> 32).to(tl.uint32)
    zero = low * 0
    out0, out1, out2, out3 = tl.philox(seed, low, high, zero, zero)
    lane = unit % 4
    bits = tl.where(lane == 0, out0, tl.where(lane == 1, out1, tl.where(lane == 2, out2, out3)))
    return tl.uint_to_uniform_float(bits)


@triton.jit
def _in_dtype(value, like):
    """value rounded to like's dtype and back to fp32 (a no-op for fp32), to mirror a computation in that dtype."""
    return value.to(like.dtype).to(tl.float32)


@triton.jit
def _gumbel(u, EPS: tl.constexpr):
    """-log(-log(u + eps) + eps), each step rounded to u's dtype (the reference computes in the noise's dtype)."""
    a = _in_dtype(u.to(tl.float32) + EPS, u)
    a = _in_dtype(tl.log(a), u)
    a = _in_dtype(EPS - a, u)
    a = _in_dtype(tl.log(a), u)
    return -a


@triton.jit
def _tile(pid, R, Q, U: tl.constexpr, U_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_Q: tl.constexpr):
    """Indices of this program's [BLOCK_R, U_PAD, BLOCK_Q] tile, its memory offsets and masks (int64 offsets)."""
    tiles_q = tl.cdiv(Q, BLOCK_Q)
    pid_r = pid // tiles_q
    pid_q = pid % tiles_q
    r = (pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R))[:, None, None]
    unit = tl.arange(0, U_PAD)[None, :, None]
    q = (pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q))[None, None, :]
    in_range = (r < R) & (q < Q)  # [BLOCK_R, 1, BLOCK_Q]: one per block
    valid = in_range & (unit < U)
    offset = (r * U + unit) * Q + q
    winner_offset = r * Q + q
    return r, unit, q, in_range, valid, offset, winner_offset


@triton.jit
def _logical_block(r, winner_offset, G, HW, NHWC: tl.constexpr):
    """Row-major index of the block in x's winner shape (for an NHWC x, r = (n * HW + hw) * G + block)."""
    if NHWC:
        group = r % G
        pixel = r // G
        return ((pixel // HW) * G + group) * HW + pixel % HW
    else:
        return winner_offset


@triton.jit
def _soft(x, unit, offset, r, winner_offset, valid, noise_ptr, seed_ptr, temperature, G, HW, U: tl.constexpr,
          MODE: tl.constexpr, NHWC: tl.constexpr, EPS: tl.constexpr):
    """y_soft = softmax((x + gumbel(u)) / T) over the block axis (1), fp32; padding lanes give 0."""
    if MODE == 1:
        u = tl.load(noise_ptr + offset, mask=valid, other=0.5)
    else:
        seed = tl.load(seed_ptr)
        u = _block_uniforms(seed, _logical_block(r, winner_offset, G, HW, NHWC), unit, U)
    z = (x + _gumbel(u, EPS)) / temperature
    # -inf on the padding lanes only: rows past the end keep finite values, so no inf - inf
    z = tl.where(unit < U, z, float("-inf"))
    e = tl.exp(z - tl.max(z, axis=1)[:, None, :])
    return e / tl.sum(e, axis=1)[:, None, :]


@triton.jit
def _lwta_forward_kernel(x_ptr, noise_ptr, seed_ptr, out_ptr, winner_ptr, R, Q, G, HW, temperature,
                         U: tl.constexpr, U_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_Q: tl.constexpr,
                         MODE: tl.constexpr, NHWC: tl.constexpr, EPS: tl.constexpr):
    r, unit, q, in_range, valid, offset, winner_offset = _tile(tl.program_id(0), R, Q, U, U_PAD, BLOCK_R, BLOCK_Q)
    x_raw = tl.load(x_ptr + offset, mask=valid, other=0.0)
    x = x_raw.to(tl.float32)
    if MODE == 0:
        # a NaN wins (torch.argmax's maximum), then the first maximum; padding lanes never
        winner = tl.argmax(tl.where(unit < U, tl.where(x != x, float("inf"), x), float("-inf")), axis=1)
        is_winner = unit == winner[:, None, :]
        # the original's mask is exactly 1 at the winner: out = x there, x * 0 elsewhere (NaN for a NaN or inf x)
        out = tl.where(is_winner, x_raw, x_raw * 0)
    else:
        p = _soft(x, unit, offset, r, winner_offset, valid, noise_ptr, seed_ptr, temperature, G, HW, U, MODE,
                  NHWC, EPS)
        # a block's softmax is NaN everywhere or nowhere: the argmax of a NaN block is unit 0
        winner = tl.argmax(tl.where(p != p, 0.0, p), axis=1)
        is_winner = unit == winner[:, None, :]
        p_winner = tl.sum(tl.where(is_winner, p, 0.0), axis=1)[:, None, :]  # (tl.max would drop a NaN on a GPU)
        # the straight-through mask's value, (1 - p) + p at the winner (1 up to the last bit) and (0 - p) + p = 0
        # elsewhere, both as the original: NaN for a NaN block, and x * 0 is NaN for a NaN or inf x
        out = tl.where(is_winner, x * ((1.0 - p_winner) + p_winner), x * (p_winner - p_winner)).to(x_raw.dtype)
    tl.store(out_ptr + offset, out, mask=valid)
    tl.store(winner_ptr + winner_offset, winner[:, None, :].to(tl.uint8), mask=in_range)


@triton.jit
def _lwta_backward_kernel(grad_ptr, x_ptr, noise_ptr, seed_ptr, winner_ptr, grad_x_ptr, R, Q, G, HW, temperature,
                          U: tl.constexpr, U_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_Q: tl.constexpr,
                          MODE: tl.constexpr, NHWC: tl.constexpr, EPS: tl.constexpr):
    """d x_i = m_i g_i ((1 - p_w) + p_w) + p_i (v_i - sum_j p_j v_j) / T, v = g x (deterministic: m_i g_i)."""
    r, unit, q, in_range, valid, offset, winner_offset = _tile(tl.program_id(0), R, Q, U, U_PAD, BLOCK_R, BLOCK_Q)
    winner = tl.load(winner_ptr + winner_offset, mask=in_range, other=0).to(tl.int32)
    is_winner = unit == winner
    g_raw = tl.load(grad_ptr + offset, mask=valid, other=0.0)
    if MODE == 0:
        grad_x = tl.where(is_winner, g_raw, tl.zeros_like(g_raw))
    else:
        g = g_raw.to(tl.float32)
        x_raw = tl.load(x_ptr + offset, mask=valid, other=0.0)
        x = x_raw.to(tl.float32)
        p = _soft(x, unit, offset, r, winner_offset, valid, noise_ptr, seed_ptr, temperature, G, HW, U, MODE,
                  NHWC, EPS)
        v = g * x  # d L / d mask
        dot = tl.sum(p * v, axis=1)[:, None, :]
        grad = ((v - dot) * p) / temperature  # softmax backward, through the 1 / T
        p_winner = tl.sum(tl.where(is_winner, p, 0.0), axis=1)[:, None, :]
        grad = tl.where(is_winner, grad + g * ((1.0 - p_winner) + p_winner), grad)
        grad_x = grad.to(x_raw.dtype)
    tl.store(grad_x_ptr + offset, grad_x, mask=valid)


@triton.jit
def _uniforms_kernel(seed_ptr, out_ptr, R, Q, U: tl.constexpr, U_PAD: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_Q: tl.constexpr):
    """The uniforms of a contiguous x, written in its layout (for tests: see draw_uniforms)."""
    r, unit, q, in_range, valid, offset, winner_offset = _tile(tl.program_id(0), R, Q, U, U_PAD, BLOCK_R, BLOCK_Q)
    u = _block_uniforms(tl.load(seed_ptr), winner_offset, unit, U)
    tl.store(out_ptr + offset, u, mask=valid)


# ---------------------------------------------------------------------------
# host side


def draw_noise(x: torch.Tensor) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(noise, seed) of a stochastic call without explicit noise: no noise, a seed on x's device."""
    return None, draw_seed(x.device)


def _geometry(x: torch.Tensor, competitors: int, nhwc: bool) -> Tuple[int, int, int, int]:
    """(R, Q, G, HW) of the [R, U, Q] reading of x (see the module docstring)."""
    dim = competition_dim(x)
    groups = x.shape[dim] // competitors
    if nhwc:
        return x.numel() // competitors, 1, groups, x.shape[2] * x.shape[3]
    inner = 1
    for size in x.shape[dim + 1:]:
        inner *= size
    return x.numel() // (competitors * inner), inner, groups, 1


def _blocks(rows: int, inner: int, competitors: int) -> Tuple[int, int, int]:
    """(U_PAD, BLOCK_R, BLOCK_Q), powers of two."""
    tile = TILE_ELEMENTS_INTERPRETED if backends.triton_interpreting() else TILE_ELEMENTS
    u_pad = triton.next_power_of_2(competitors)
    block_q = min(triton.next_power_of_2(inner), MAX_BLOCK_Q, max(1, tile // u_pad))
    block_r = min(max(1, tile // (u_pad * block_q)), triton.next_power_of_2(rows))
    return u_pad, block_r, block_q


def _launch(kernel, tensors, x: torch.Tensor, competitors: int, temperature: float, mode: int, nhwc: bool):
    rows, inner, groups, hw = _geometry(x, competitors, nhwc)
    u_pad, block_r, block_q = _blocks(rows, inner, competitors)
    grid = (triton.cdiv(rows, block_r) * triton.cdiv(inner, block_q),)
    kernel[grid](*tensors, rows, inner, groups, hw, float(temperature), U=competitors, U_PAD=u_pad,
                 BLOCK_R=block_r, BLOCK_Q=block_q, MODE=mode, NHWC=nhwc, EPS=GUMBEL_EPS, num_warps=4)


def _mode(noise: Optional[torch.Tensor], seed: Optional[torch.Tensor]) -> int:
    if noise is not None:
        return MODE_NOISE
    return MODE_SEED if seed is not None else MODE_DETERMINISTIC


def _in_layout(t: torch.Tensor, nhwc: bool) -> torch.Tensor:
    """t dense in the kernels' reading (a copy only when its layout differs)."""
    return t.contiguous(memory_format=memory_format(nhwc))


def forward(x, noise, seed, opts):
    """(out, winner). out: like ``torch.empty_like(x)``; winner: uint8, x's shape with the channel dim divided
    by U, channels_last if x is read so (:func:`~bcos_kernels.ops._layout.is_channels_last`) else contiguous.
    noise (uniforms) wins over seed (a 1-element int64 tensor); neither: deterministic."""
    competitors, temperature = opts.competitors, opts.temperature
    nhwc = is_channels_last(x)
    layout = memory_format(nhwc)
    winner = torch.empty(block_shape(x, competitors), dtype=torch.uint8, device=x.device, memory_format=layout)
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out, winner
    x_in = _in_layout(x, nhwc)
    # empty_like keeps the strides of any dense x: write into out directly when they are the kernels' ones
    direct = out.is_contiguous(memory_format=layout)
    out_in = out if direct else torch.empty_like(x_in, memory_format=layout)
    mode = _mode(noise, seed)
    noise_in = _in_layout(noise, nhwc) if mode == MODE_NOISE else x_in  # x_in: a placeholder, never read
    seed_in = seed if mode == MODE_SEED else winner  # placeholder, never read
    _launch(_lwta_forward_kernel, (x_in, noise_in, seed_in, out_in, winner), x_in, competitors, temperature,
            mode, nhwc)
    if not direct:
        out.copy_(out_in)
    return out, winner


def backward(grad_out, x, noise, seed, winner, opts, *, nhwc):
    """d L / d x, channels_last if ``nhwc`` else contiguous, with grad_out's dtype (x's), re-drawing the
    forward's uniforms from ``seed``. x may be None in deterministic mode (neither noise nor seed)."""
    competitors, temperature = opts.competitors, opts.temperature
    layout = memory_format(nhwc)
    grad_in = _in_layout(grad_out, nhwc)
    grad_x = torch.empty_like(grad_in, memory_format=layout)
    if grad_x.numel() == 0:
        return grad_x
    mode = _mode(noise, seed)
    x_in = _in_layout(x, nhwc) if mode != MODE_DETERMINISTIC else grad_in  # placeholder, never read
    noise_in = _in_layout(noise, nhwc) if mode == MODE_NOISE else x_in
    seed_in = seed if mode == MODE_SEED else winner
    _launch(_lwta_backward_kernel, (grad_in, x_in, noise_in, seed_in, _in_layout(winner, nhwc), grad_x), grad_in,
            competitors, temperature, mode, nhwc)
    return grad_x


def draw_uniforms(seed: torch.Tensor, shape, competitors: int) -> torch.Tensor:
    """The uniforms the kernels draw from ``seed`` (a 1-element int64 tensor) for an x of ``shape`` with
    ``competitors`` units per block: fp32, contiguous, on seed's device. For tests and debugging: passing them
    as ``noise`` reproduces the seeded call exactly."""
    out = torch.empty(shape, dtype=torch.float32, device=seed.device)
    if out.numel():
        rows, inner, _, _ = _geometry(out, competitors, False)
        u_pad, block_r, block_q = _blocks(rows, inner, competitors)
        grid = (triton.cdiv(rows, block_r) * triton.cdiv(inner, block_q),)
        _uniforms_kernel[grid](seed, out, rows, inner, U=competitors, U_PAD=u_pad, BLOCK_R=block_r,
                               BLOCK_Q=block_q, num_warps=4)
    return out

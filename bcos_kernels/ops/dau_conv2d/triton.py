"""Backend "triton" of the CoDA DAU convolution (``bcos_kernels.dau_conv2d``).

Math and parameter layout: ``bcos_kernels/ops/dau_conv2d/reference.py``; the low-rank form: DESIGN.md section 3 and
``bcos_kernels/ops/dau_conv2d/lowrank.py`` (whose parameter tables and backward epilogue the host code here uses).
Fused kernels that do not build the O*r intermediate: the per-pixel products live in registers. Notation
(P = N*Ho*Wo output pixels, D = C*k*k patch entries, O units, rank r):

    x_p   = input patch of pixel p (D,), read by implicit im2col (never stored)
    z_p   = A x_p                        (r,)     A = rank_weight viewed as (r, D)
    Y_op  = E_o^T x_p                    (r,)     E_o = column block o of expand_weight: E[d*O*r + o*r + s]
    num   = z . Y_o + b_o . x_p                   w_o . x_p with w_o = E_o z + b_o
    q     = z^T G_o z + 2 h_o . z + c_o           ||w_o||^2, G_o = E_o^T E_o, h_o = E_o^T b_o, c_o = ||b_o||^2
    out   = num * inv_f(q),  inv_f = s / (1 + s^2) (squash) or 1 / s (l2), s = sqrt(max(q, 0)); 0 where s == 0

Forward: a small kernel writes z (P, r) in fp32; the main kernel, for a tile of pixels and 16 units, computes
Y for a chunk of the rank at a time with ``tl.dot`` (the O*r intermediate lives in registers only), folds it
with z into num and q, and writes only out (N, O, Ho, Wo) and s = ||w|| (P, O) -- with z, all the backward
needs (it rebuilds every O*r-sized product on the fly as well).

Backward, with dnum = g * inv_f and dq = g * out * (d inv_f / d q) / inv_f (g = grad_out; dq = 0 in
explanation mode), all per-pixel (P, O) tensors:

    dz_p   = sum_o dnum_o E_o^T x_p + 2 sum_o dq_o (G_o z_p + h_o)        kernel _rank_grad_kernel
    dx_p   = sum_o dnum_o (E_o z_p + b_o) + A^T dz_p   (then col2im)      kernel _input_grad_kernel (gather form)
    dE_o   = sum_p dnum_o x_p z_p^T + 2 (E_o M_o + b_o m_o^T)             kernels _weight_grad_kernel and
    db_o   = sum_p dnum_o x_p       + 2 (E_o m_o + b_o mu_o)              _norm_grad_kernel, a bmm in torch
    dA     = sum_p dz_p x_p^T                                             kernel _weight_grad_kernel
    M_o = sum_p dq_o z z^T,  m_o = sum_p dq_o z,  mu_o = sum_p dq_o      (with za = [z, 1]: sum_p dq_o za za^T)

The "virtual columns": the three weight tensors side by side as one (D, n_end) matrix
W = [E (D, O*r) | b (D, O) | A^T (D, r)] (the first two in their own memory order, so no re-layout), and the
matching per-pixel factor T[p, n] = dnum_o z_s | dnum_o | dz_t. Then dx_patch = T W^T and [dE | db | dA]
(first term) = X^T T, with T built tile by tile in registers from dnum, z and dz: the O*r-per-pixel product
never reaches memory.

Precision: data tiles (x patches, weights) stay in the input dtype; per-pixel factors are fp32 and are cast
to the input dtype only when they meet a data tile in a dot (fp16/bf16, as any mixed-precision GEMM). Every
accumulator is fp32. fp32 dots use "tf32x3" (three TF32 products: fp32 accuracy on tensor cores; the
interpreter computes every dot exactly). Memory offsets are int64; pixel indices are int32 (the front
door sends calls with 2^31 or more pixels to another backend).
"""
from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from bcos_kernels.ops._layout import conv_output_size
from bcos_kernels.ops.dau_conv2d import lowrank

# Every tl.dot tile dimension is >= 16 (the GPU minimum) and a power of two.
UNITS_PER_PROGRAM = 16          # units of the forward / columns of the bias dot
MIN_DOT = 16
# The big-tile kernels: 8 warps and 2 stages keep their fp32 accumulators and pipelined gather addresses in
# registers (at 4 warps / 3 stages they spill on sm_90: checked with cuobjdump --dump-resource-usage).
LAUNCH = dict(num_warps=8, num_stages=2)

OPAQUE_BACKWARD = True  # kernels autograd cannot trace: the backward runs as bcos_kernels::dau_conv2d_backward


def _pow2(n: int, lo: int = MIN_DOT, hi: int = 64) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


# ------------------------------------------------------------------------------------------------ helpers


@triton.jit
def _pixel_origin(pix, out_w, out_hw, sxn, sxh, sxw, stride_h, stride_w, pad_h, pad_w):
    """Per output pixel p = (n, ho, wo) (int32 index): the top-left input coordinate (h0, w0) of its patch and
    the int64 offset of x[n, 0, h0, w0]. Computed once per program, so that a patch tile costs one add per
    element (the divisions stay out of the loops and out of the registers of the pipelined loads)."""
    img = pix // out_hw
    rem = pix - img * out_hw
    ho = rem // out_w
    h0 = ho * stride_h - pad_h
    w0 = (rem - ho * out_w) * stride_w - pad_w
    base = img.to(tl.int64) * sxn + h0.to(tl.int64) * sxh + w0.to(tl.int64) * sxw
    return base, h0, w0


@triton.jit
def _pixels(start, end, BLOCK_P: tl.constexpr):
    """int32 pixel indices start + [0, BLOCK_P) and which of them are below end."""
    pix = start + tl.arange(0, BLOCK_P)
    return pix, pix < end


@triton.jit
def _program_pixels(num_pix, out_w, out_hw, sxn, sxh, sxw, stride_h, stride_w, pad_h, pad_w, BLOCK_P: tl.constexpr):
    """This program's tile of output pixels (grid axis 0): indices, mask, int64 rows and patch origins."""
    pix, pix_ok = _pixels(tl.program_id(0) * BLOCK_P, num_pix, BLOCK_P)
    base, h0, w0 = _pixel_origin(pix, out_w, out_hw, sxn, sxh, sxw, stride_h, stride_w, pad_h, pad_w)
    return pix, pix_ok, pix.to(tl.int64), base, h0, w0


@triton.jit
def _split_range(pix_per_split, num_pix):
    """The pixels [begin, end) of this program's split (grid axis 2) of a split-K reduction over pixels."""
    begin = tl.program_id(2) * pix_per_split
    return begin, tl.minimum(begin + pix_per_split, num_pix)


@triton.jit
def _load_patches(x_ptr, base, h0, w0, pix_ok, dd, dd_ok, height, width, sxc, sxh, sxw, KS: tl.constexpr):
    """Implicit im2col: X[p, d] (len(base), len(dd)) = x[n, c, h0 + i, w0 + j] for patch entry
    d = c*k*k + i*k + j (the conv filter order); 0 in the padding."""
    ch = dd // (KS * KS)
    tap = dd - ch * (KS * KS)
    ki = tap // KS
    kj = tap - ki * KS
    d_off = ch.to(tl.int64) * sxc + ki.to(tl.int64) * sxh + kj.to(tl.int64) * sxw
    h = h0[:, None] + ki[None, :]
    w = w0[:, None] + kj[None, :]
    mask = pix_ok[:, None] & dd_ok[None, :] & (h >= 0) & (h < height) & (w >= 0) & (w < width)
    return tl.load(x_ptr + (base[:, None] + d_off[None, :]), mask=mask, other=0.0)


@triton.jit
def _patch_dot(acc, x_ptr, base, h0, w0, pix_ok, height, width, sxc, sxh, sxw, patch_size, w_ptr, w_sd, w_sn, cols,
               cols_ok, KS: tl.constexpr, BLOCK_D: tl.constexpr, DATA_DOT: tl.constexpr):
    """acc + X W: the patches X (pixels, D) of x (implicit im2col) times W[d, n] = w_ptr[d * w_sd + cols[n] * w_sn],
    BLOCK_D patch entries at a time."""
    for d0 in range(0, patch_size, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dd_ok = dd < patch_size
        patches = _load_patches(x_ptr, base, h0, w0, pix_ok, dd, dd_ok, height, width, sxc, sxh, sxw, KS)
        w_tile = tl.load(w_ptr + dd.to(tl.int64)[:, None] * w_sd + cols.to(tl.int64)[None, :] * w_sn,
                         mask=dd_ok[:, None] & cols_ok[None, :], other=0.0)
        acc = tl.dot(patches, w_tile, acc, input_precision=DATA_DOT)
    return acc


@triton.jit
def _column_factors(scale_ptr, z_ptr, dz_ptr, pix, pix_ok, cols, num_units, rank, n_weight, n_bias_end, n_end,
                    HAS_RANK: tl.constexpr):
    """T[p, n] (fp32) of the virtual columns n (see the module docstring): scale_o * z_s for n = o*r + s < O*r,
    scale_o for the bias column n = O*r + o, dz_t for the rank column n = n_bias_end + t (HAS_RANK only);
    0 outside [0, n_end). ``scale`` is dnum (or dq for the norm terms); ``pix``: int32 pixel indices."""
    in_e = cols < n_weight
    in_b = (cols >= n_weight) & (cols < n_bias_end)
    unit = tl.where(in_e, cols // rank, tl.maximum(cols - n_weight, 0))
    row = pix.to(tl.int64)[:, None]
    scale = tl.load(scale_ptr + row * num_units + unit[None, :], mask=pix_ok[:, None] & (in_e | in_b)[None, :],
                    other=0.0)
    zval = tl.load(z_ptr + row * rank + (cols % rank)[None, :], mask=pix_ok[:, None] & in_e[None, :], other=1.0)
    t = scale * zval
    if HAS_RANK:
        in_a = (cols >= n_bias_end) & (cols < n_end)
        t += tl.load(dz_ptr + row * rank + tl.maximum(cols - n_bias_end, 0)[None, :],
                     mask=pix_ok[:, None] & in_a[None, :], other=0.0)
    return t


@triton.jit
def _column_weights(e_ptr, b_ptr, a_ptr, cols, dd, dd_ok, num_units, rank, patch_size, n_weight, n_bias_end,
                    n_end, HAS_BIAS: tl.constexpr, HAS_RANK: tl.constexpr):
    """W[d, n] of the virtual columns, returned transposed as (len(cols), len(dd)) in the weights' dtype:
    expand_weight[d*O*r + n], expand_bias[d*O + n - O*r], rank_weight[(n - n_bias_end)*D + d]."""
    d64 = dd.to(tl.int64)[None, :]
    in_e = cols < n_weight
    w = tl.load(e_ptr + d64 * n_weight + tl.minimum(cols, n_weight - 1)[:, None],
                mask=in_e[:, None] & dd_ok[None, :], other=0.0)
    if HAS_BIAS:
        in_b = (cols >= n_weight) & (cols < n_bias_end)
        w += tl.load(b_ptr + d64 * num_units + tl.maximum(cols - n_weight, 0)[:, None],
                     mask=in_b[:, None] & dd_ok[None, :], other=0.0)
    if HAS_RANK:
        in_a = (cols >= n_bias_end) & (cols < n_end)
        w += tl.load(a_ptr + tl.maximum(cols - n_bias_end, 0).to(tl.int64)[:, None] * patch_size + d64,
                     mask=in_a[:, None] & dd_ok[None, :], other=0.0)
    return w


# ------------------------------------------------------------------------------------------------ forward


@triton.jit
def _rank_kernel(x_ptr, a_ptr, z_ptr, num_pix, channels, height, width, out_w, out_hw, sxn, sxc, sxh, sxw,
                 stride_h, stride_w, pad_h, pad_w, rank,
                 KS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
                 DATA_DOT: tl.constexpr):
    """z (P, r) fp32 = conv(x, rank_weight), pixel-major."""
    pix, pix_ok, prow, base, h0, w0 = _program_pixels(num_pix, out_w, out_hw, sxn, sxh, sxw, stride_h, stride_w,
                                                      pad_h, pad_w, BLOCK_P)
    t = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    t_ok = t < rank
    patch_size = channels * KS * KS
    acc = _patch_dot(tl.zeros((BLOCK_P, BLOCK_R), tl.float32), x_ptr, base, h0, w0, pix_ok, height, width, sxc, sxh,
                     sxw, patch_size, a_ptr, 1, patch_size, t, t_ok, KS, BLOCK_D, DATA_DOT)   # A^T: (D, r)
    tl.store(z_ptr + prow[:, None] * rank + t[None, :], acc, mask=pix_ok[:, None] & t_ok[None, :])


@triton.jit
def _forward_kernel(x_ptr, e_ptr, b_ptr, z_ptr, gram_ptr, h2_ptr, c_ptr, out_ptr, norm_ptr,
                    num_pix, channels, height, width, out_w, out_hw, sxn, sxc, sxh, sxw,
                    stride_h, stride_w, pad_h, pad_w, num_units, rank,
                    KS: tl.constexpr, SQUASH: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_U: tl.constexpr, RANK_CHUNK: tl.constexpr,
                    BLOCK_T: tl.constexpr, DATA_DOT: tl.constexpr):
    """out and s = ||w|| for BLOCK_P pixels x BLOCK_U units.

    The (pixel, unit, rank) products Y are built for RANK_CHUNK ranks at a time, as a dot whose columns are
    (unit, rank-in-chunk) pairs, and reduced against z right away: they never leave registers. gram_ptr holds
    G as (r, O*r) (G_o[t, s] at [t, o*r + s]) so that the same columns index it; h2 = 2 h as (O*r,)."""
    pix, pix_ok, prow, base, h0, w0 = _program_pixels(num_pix, out_w, out_hw, sxn, sxh, sxw, stride_h, stride_w,
                                                      pad_h, pad_w, BLOCK_P)
    unit0 = tl.program_id(1) * BLOCK_U
    patch_size = channels * KS * KS
    n_weight = num_units * rank                                    # one row of expand_weight per patch entry

    cols = tl.arange(0, BLOCK_U * RANK_CHUNK)
    col_unit = unit0 + cols // RANK_CHUNK
    num = tl.zeros((BLOCK_P, BLOCK_U), tl.float32)                 # w_o . x_p
    sq = tl.zeros((BLOCK_P, BLOCK_U), tl.float32)                  # ||w_o||^2
    for q0 in range(0, rank, RANK_CHUNK):
        q = q0 + cols % RANK_CHUNK
        col_ok = (col_unit < num_units) & (q < rank)
        col_off = col_unit * rank + q
        # Y[p, (o, s)] = E_o[:, s] . x_p
        y = _patch_dot(tl.zeros((BLOCK_P, BLOCK_U * RANK_CHUNK), tl.float32), x_ptr, base, h0, w0, pix_ok, height,
                       width, sxc, sxh, sxw, patch_size, e_ptr, n_weight, 1, col_off, col_ok, KS, BLOCK_D, DATA_DOT)
        qs = q0 + tl.arange(0, RANK_CHUNK)
        z_q = tl.load(z_ptr + prow[:, None] * rank + qs[None, :], mask=pix_ok[:, None] & (qs < rank)[None, :],
                      other=0.0)[:, None, :]
        num += tl.sum(tl.reshape(y, (BLOCK_P, BLOCK_U, RANK_CHUNK)) * z_q, axis=2)
        gz = tl.zeros((BLOCK_P, BLOCK_U * RANK_CHUNK), tl.float32)  # (G_o z_p)[s] (+ 2 h_o[s])
        for t0 in range(0, rank, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            z_t = tl.load(z_ptr + prow[:, None] * rank + t[None, :], mask=pix_ok[:, None] & (t < rank)[None, :],
                          other=0.0)
            g_t = tl.load(gram_ptr + t.to(tl.int64)[:, None] * n_weight + col_off[None, :],
                          mask=(t < rank)[:, None] & col_ok[None, :], other=0.0)
            gz = tl.dot(z_t, g_t, gz, input_precision="tf32x3")
        if HAS_BIAS:
            gz += tl.load(h2_ptr + col_off, mask=col_ok, other=0.0)[None, :]
        sq += tl.sum(tl.reshape(gz, (BLOCK_P, BLOCK_U, RANK_CHUNK)) * z_q, axis=2)

    units = unit0 + tl.arange(0, BLOCK_U)
    unit_ok = units < num_units
    if HAS_BIAS:
        num += _patch_dot(tl.zeros((BLOCK_P, BLOCK_U), tl.float32), x_ptr, base, h0, w0, pix_ok, height, width,
                          sxc, sxh, sxw, patch_size, b_ptr, num_units, 1, units, unit_ok, KS, BLOCK_D,
                          DATA_DOT)                                # b_o . x_p
        sq += tl.load(c_ptr + units, mask=unit_ok, other=0.0)[None, :]

    # Rounding can push ||w||^2 slightly below 0; an exactly-zero weight gives 0 (and zero gradient). A NaN (from a
    # NaN or inf in x or the weights) stays NaN, as in the reference: the clamp propagates it (a GPU's fmax would
    # drop it) and counts as live.
    s = tl.sqrt(tl.maximum(sq, 0.0, propagate_nan=tl.PropagateNan.ALL))
    live = s != 0
    s_safe = tl.where(live, s, 1.0)
    if SQUASH:
        inv = s_safe / (1.0 + s_safe * s_safe)
    else:
        inv = 1.0 / s_safe
    out = tl.where(live, num * inv, 0.0)

    mask = pix_ok[:, None] & unit_ok[None, :]
    img = pix // out_hw
    out_offs = (img.to(tl.int64) * num_units * out_hw + (pix - img * out_hw))[:, None] + \
        units.to(tl.int64)[None, :] * out_hw
    tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(norm_ptr + prow[:, None] * num_units + units[None, :], s, mask=mask)


# ------------------------------------------------------------------------------------------------ backward


@triton.jit
def _rank_grad_kernel(x_ptr, dnum_ptr, dq_ptr, z_ptr, e_ptr, g2_ptr, dz_ptr,
                      num_pix, channels, height, width, out_w, out_hw, sxn, sxc, sxh, sxw,
                      stride_h, stride_w, pad_h, pad_w, num_units, rank, n_weight, n_bias_end,
                      KS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_N: tl.constexpr, DATA_DOT: tl.constexpr):
    """dz (P, r) fp32 = sum_o dnum_o E_o^T x_p + 2 sum_o dq_o (G_o z + h_o).

    First term: a dot over k = d*O + o (the row order of expand_weight (D*O, r)) of x_p[d] * dnum_o, built per
    tile. Second: a dot over the virtual columns [E | b] of dq_o * za_s with g2 = 2 [G_o; h_o^T] rows."""
    pix, pix_ok, prow, base, h0, w0 = _program_pixels(num_pix, out_w, out_hw, sxn, sxh, sxw, stride_h, stride_w,
                                                      pad_h, pad_w, BLOCK_P)
    t = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    t_ok = t < rank
    patch_size = channels * KS * KS
    total = patch_size * num_units
    acc = tl.zeros((BLOCK_P, BLOCK_R), tl.float32)
    for k0 in range(0, total, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < total
        patches = _load_patches(x_ptr, base, h0, w0, pix_ok, k // num_units, k_ok, height, width, sxc, sxh, sxw,
                                KS)
        dnum = tl.load(dnum_ptr + prow[:, None] * num_units + (k % num_units)[None, :],
                       mask=pix_ok[:, None] & k_ok[None, :], other=0.0)
        e_tile = tl.load(e_ptr + k.to(tl.int64)[:, None] * rank + t[None, :], mask=k_ok[:, None] & t_ok[None, :],
                         other=0.0)
        acc = tl.dot((patches.to(tl.float32) * dnum).to(e_tile.dtype), e_tile, acc, input_precision=DATA_DOT)
    for n0 in range(0, n_bias_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        tq = _column_factors(dq_ptr, z_ptr, z_ptr, pix, pix_ok, cols, num_units, rank, n_weight, n_bias_end,
                             n_bias_end, False)
        g_tile = tl.load(g2_ptr + cols.to(tl.int64)[:, None] * rank + t[None, :],
                         mask=(cols < n_bias_end)[:, None] & t_ok[None, :], other=0.0)
        acc = tl.dot(tq, g_tile, acc, input_precision="tf32x3")
    tl.store(dz_ptr + prow[:, None] * rank + t[None, :], acc, mask=pix_ok[:, None] & t_ok[None, :])


@triton.jit
def _input_grad_kernel(dnum_ptr, z_ptr, dz_ptr, e_ptr, b_ptr, a_ptr, dx_ptr,
                       batch, channels, height, width, out_h, out_w, sdn, sdc, sdh, sdw,
                       stride_h, stride_w, pad_h, pad_w, num_units, rank, n_weight, n_bias_end, n_end,
                       rows_per_class, cols_per_class,
                       KS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RANK: tl.constexpr, BLOCK_Q: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, DATA_DOT: tl.constexpr):
    """dx = col2im(T W^T) in gather form: each program owns BLOCK_Q input pixels x BLOCK_C channels and sums the
    taps that reach them, so there are no atomics and no (P, D) column buffer.

    Input pixels are grouped by residue (h mod sh, w mod sw) (grid axis 2): inside a group the taps (i, j) that
    reach a pixel, and the output pixel they come from, are the same for every pixel, so strided convs waste
    no work on taps that do not land."""
    cls = tl.program_id(2)
    res_h = cls // stride_w
    res_w = cls % stride_w
    m = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    per_img = rows_per_class * cols_per_class
    img = m // per_img
    row = (m % per_img) // cols_per_class
    col = m % cols_per_class
    h = res_h + stride_h * row
    w = res_w + stride_w * col
    q_ok = (img < batch) & (h < height) & (w < width)
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ch_ok = ch < channels
    patch_size = channels * KS * KS
    acc = tl.zeros((BLOCK_Q, BLOCK_C), tl.float32)
    # tap i reaches h = ho*sh - ph + i iff (h + ph - i) % sh == 0: i = (res_h + ph) % sh, then every sh-th.
    for i in range((res_h + pad_h) % stride_h, KS, stride_h):
        ho = row + (res_h + pad_h - i) // stride_h       # exact division: truncation = floor
        for j in range((res_w + pad_w) % stride_w, KS, stride_w):
            wo = col + (res_w + pad_w - j) // stride_w
            ok = q_ok & (ho >= 0) & (ho < out_h) & (wo >= 0) & (wo < out_w)
            pix = (img * out_h + ho) * out_w + wo
            dd = ch * (KS * KS) + i * KS + j
            for n0 in range(0, n_end, BLOCK_N):
                cols = n0 + tl.arange(0, BLOCK_N)
                t = _column_factors(dnum_ptr, z_ptr, dz_ptr, pix, ok, cols, num_units, rank, n_weight, n_bias_end,
                                    n_end, HAS_RANK)
                w_tile = _column_weights(e_ptr, b_ptr, a_ptr, cols, dd, ch_ok, num_units, rank, patch_size, n_weight,
                                         n_bias_end, n_end, HAS_BIAS, HAS_RANK)
                acc = tl.dot(t.to(w_tile.dtype), w_tile, acc, input_precision=DATA_DOT)
    offs = (img.to(tl.int64) * sdn + h.to(tl.int64) * sdh + w.to(tl.int64) * sdw)[:, None] + \
        ch.to(tl.int64)[None, :] * sdc
    tl.store(dx_ptr + offs, acc.to(dx_ptr.dtype.element_ty), mask=q_ok[:, None] & ch_ok[None, :])


@triton.jit
def _weight_grad_kernel(x_ptr, dnum_ptr, z_ptr, dz_ptr, part_ptr,
                        num_pix, channels, height, width, out_w, out_hw, sxn, sxc, sxh, sxw,
                        stride_h, stride_w, pad_h, pad_w, num_units, rank, n_weight, n_bias_end, n_end,
                        col_start, num_cols, pix_per_split, tiles_per_split,
                        KS: tl.constexpr, HAS_RANK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_P: tl.constexpr, DATA_DOT: tl.constexpr):
    """part[split, d, n - col_start] (fp32) = sum over this split's pixels of X[p, d] T[p, n], for the virtual
    columns [col_start, col_start + num_cols). Split-K over pixels (grid axis 2): the output is parameter-sized
    and the pixels are many; the splits are summed in torch (deterministic, no atomics)."""
    dd = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    patch_size = channels * KS * KS
    dd_ok = dd < patch_size
    local = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = col_start + local
    cols_ok = local < num_cols
    split = tl.program_id(2)
    p_begin, p_end = _split_range(pix_per_split, num_pix)
    acc = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    for it in range(0, tiles_per_split):
        pix, pix_ok = _pixels(p_begin + it * BLOCK_P, p_end, BLOCK_P)
        base, h0, w0 = _pixel_origin(pix, out_w, out_hw, sxn, sxh, sxw, stride_h, stride_w, pad_h, pad_w)
        patches = _load_patches(x_ptr, base, h0, w0, pix_ok, dd, dd_ok, height, width, sxc, sxh, sxw, KS)
        t = _column_factors(dnum_ptr, z_ptr, dz_ptr, pix, pix_ok, cols, num_units, rank, n_weight, n_bias_end,
                            n_end, HAS_RANK)
        acc = tl.dot(tl.trans(patches), t.to(patches.dtype), acc, input_precision=DATA_DOT)
    offs = (split.to(tl.int64) * patch_size + dd)[:, None] * num_cols + local[None, :]
    tl.store(part_ptr + offs, acc, mask=dd_ok[:, None] & cols_ok[None, :])


@triton.jit
def _norm_grad_kernel(dq_ptr, z_ptr, part_ptr, num_pix, num_units, rank, n_weight, n_bias_end, aug_rank,
                      pix_per_split, tiles_per_split,
                      HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_T: tl.constexpr):
    """part[split, n, t] (fp32) = sum over this split's pixels of dq_o za_s za_t for the virtual columns
    n = (o, s) of [E | b] (za = [z, 1] with a bias): the blocks M_o of d||w||^2 / d[E_o | b_o]."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    split = tl.program_id(2)
    p_begin, p_end = _split_range(pix_per_split, num_pix)
    acc = tl.zeros((BLOCK_N, BLOCK_T), tl.float32)
    for it in range(0, tiles_per_split):
        pix, pix_ok = _pixels(p_begin + it * BLOCK_P, p_end, BLOCK_P)
        tq = _column_factors(dq_ptr, z_ptr, z_ptr, pix, pix_ok, cols, num_units, rank, n_weight, n_bias_end,
                             n_bias_end, False)
        za = tl.load(z_ptr + pix.to(tl.int64)[:, None] * rank + t[None, :],
                     mask=pix_ok[:, None] & (t < rank)[None, :], other=0.0)
        if HAS_BIAS:
            za = tl.where(pix_ok[:, None] & (t == rank)[None, :], 1.0, za)
        acc = tl.dot(tl.trans(tq), za, acc, input_precision="tf32x3")
    offs = (split.to(tl.int64) * n_bias_end + cols)[:, None] * aug_rank + t[None, :]
    tl.store(part_ptr + offs, acc, mask=(cols < n_bias_end)[:, None] & (t < aug_rank)[None, :])


# ------------------------------------------------------------------------------------------------ launchers


def _data_dot(dtype: torch.dtype) -> str:
    # fp32 data: tf32x3 keeps fp32 accuracy on tensor cores; fp16/bf16 operands ignore the setting.
    return "tf32x3" if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _splits(x: torch.Tensor, other_programs: int, pix_tiles: int, out_numel: int) -> int:
    """How many pixel ranges a split-K reduction uses: enough programs to fill the GPU, at most 2^24 fp32
    partials in all (64 MiB); 1 under the interpreter (programs run one after another there)."""
    if x.device.type != "cuda":
        return 1
    target = 4 * _num_sms(x.device.index if x.device.index is not None else torch.cuda.current_device())
    return max(1, min(pix_tiles, -(-target // max(other_programs, 1)), (1 << 24) // max(out_numel, 1)))


def _split_k(x: torch.Tensor, num_pix: int, block_p: int, other_programs: int, shape: Tuple[int, int]):
    """(splits, tiles per split, zeroed fp32 partials (splits, *shape)) of a split-K reduction over pixels."""
    pix_tiles = max(1, triton.cdiv(num_pix, block_p))
    splits = _splits(x, other_programs, pix_tiles, shape[0] * shape[1])
    part = torch.zeros((splits, *shape), device=x.device, dtype=torch.float32)
    return splits, triton.cdiv(pix_tiles, splits), part


def _geometry(x: torch.Tensor, kernel_size: int, stride: List[int], padding: List[int]):
    ho, wo = conv_output_size(x.shape[2:], (kernel_size, kernel_size), stride, padding)
    # the arguments every im2col kernel takes after num_pix, channels
    conv = (x.shape[2], x.shape[3], wo, ho * wo, *x.stride(), stride[0], stride[1], padding[0], padding[1])
    return ho, wo, conv


def _parameter_tables(expand_weight: torch.Tensor, expand_bias: Optional[torch.Tensor], channels: int,
                      kernel_size: int):
    """fp32 rows [E_o | b_o] (O, R, D) and Gram matrices G_o (O, R, R) (lowrank.py): the r x r block is
    E_o^T E_o, with a bias column r holds h_o = E_o^T b_o and entry (r, r) c_o = ||b_o||^2. Parameter-sized."""
    filt = lowrank.filters(expand_weight.float(), None if expand_bias is None else expand_bias.float(), channels,
                           kernel_size)
    rows = filt.reshape(*filt.shape[:2], -1)
    return rows, lowrank.gram(rows)


def forward(x, rank_weight, expand_weight, expand_bias, opts):
    """(out (N, O, Ho, Wo) contiguous in x's dtype, z (P, r) fp32, s = ||w|| (P, O) fp32, None: no w kept)."""
    kernel_size, stride, padding, norm = opts.kernel_size, opts.stride, opts.padding, opts.norm
    n, c = x.shape[:2]
    rank = rank_weight.shape[0]
    patch_size = c * kernel_size * kernel_size
    units = expand_weight.shape[0] // patch_size
    ho, wo, conv = _geometry(x, kernel_size, stride, padding)
    num_pix = n * ho * wo
    out = torch.empty((n, units, ho, wo), device=x.device, dtype=x.dtype)
    z = torch.empty((num_pix, rank), device=x.device, dtype=torch.float32)
    s = torch.empty((num_pix, units), device=x.device, dtype=torch.float32)
    if num_pix == 0:
        return out, z, s, None
    a = rank_weight.contiguous()
    e = expand_weight.contiguous()
    b = None if expand_bias is None else expand_bias.contiguous()
    _, gram = _parameter_tables(e, b, c, kernel_size)
    gram_cols = gram[:, :rank, :rank].permute(1, 0, 2).reshape(rank, units * rank).contiguous()  # [t, o*r + s]
    h2 = csq = z                                                    # placeholders, never read without a bias
    if b is not None:
        h2 = (2 * gram[:, :rank, rank]).reshape(-1).contiguous()
        csq = gram[:, rank, rank].contiguous()
    data_dot = _data_dot(x.dtype)

    block_r = _pow2(rank)
    _rank_kernel[(triton.cdiv(num_pix, 64), triton.cdiv(rank, block_r))](
        x, a, z, num_pix, c, *conv, rank, KS=kernel_size, BLOCK_P=64, BLOCK_D=32, BLOCK_R=block_r,
        DATA_DOT=data_dot)
    # 64 pixels x 16 units x 8 ranks: a 64 x 128 fp32 Y tile. This and the launch settings below were chosen by
    # compiling for sm_90 and reading the register use (no or few spills); re-tune with measurements on a GPU.
    rank_chunk = min(8, triton.next_power_of_2(rank))
    block_p = 64
    grid = (triton.cdiv(num_pix, block_p), triton.cdiv(units, UNITS_PER_PROGRAM))
    _forward_kernel[grid](
        x, e, e if b is None else b, z, gram_cols, h2, csq, out, s,
        num_pix, c, *conv, units, rank,
        KS=kernel_size, SQUASH=norm == "squash", HAS_BIAS=b is not None, BLOCK_P=block_p,
        BLOCK_D=16 if x.dtype == torch.float32 else 32, BLOCK_U=UNITS_PER_PROGRAM, RANK_CHUNK=rank_chunk,
        BLOCK_T=MIN_DOT, DATA_DOT=data_dot, **LAUNCH)
    return out, z, s, None  # the low-rank form only: no per-pixel weights kept


def backward(grad_out, x, rank_weight, expand_weight, expand_bias, z, s, out, weights, opts, needs):
    """Gradients for (x, rank_weight, expand_weight, expand_bias) (None where ``needs`` is False). The kernels
    read the per-pixel fp32 dnum (P, O) and dq (P, O) (lowrank.output_grads; no dq in explanation mode: w and
    ||w|| are constants, only x gets a gradient, through x_patch)."""
    kernel_size, stride, padding, norm, detach = opts.kernel_size, opts.stride, opts.padding, opts.norm, opts.detach
    dnum, dq = lowrank.output_grads(grad_out, out, s, norm, detach)
    need_x, need_a, need_e, need_b = needs
    need_b = need_b and expand_bias is not None
    if dq is None:
        need_a = need_e = need_b = False
    need_f = need_e or need_b
    grads: List[Optional[torch.Tensor]] = [None] * 4
    n, c = x.shape[:2]
    rank = rank_weight.shape[0]
    patch_size = c * kernel_size * kernel_size
    units = expand_weight.shape[0] // patch_size
    has_bias = expand_bias is not None
    ho, wo, conv = _geometry(x, kernel_size, stride, padding)
    num_pix = n * ho * wo
    a = rank_weight.contiguous()
    e = expand_weight.contiguous()
    b = None if expand_bias is None else expand_bias.contiguous()
    dnum = dnum.contiguous()
    dq = None if dq is None else dq.contiguous()
    z = z.contiguous()
    # the virtual columns [E (O*r) | b (O) | A^T (r)]
    n_weight = units * rank
    n_bias_end = n_weight + (units if has_bias else 0)
    n_end = n_bias_end + rank
    data_dot = _data_dot(x.dtype)
    block_p = 64

    need_dz = dq is not None and (need_x or need_a)
    rows, gram = _parameter_tables(e, b, c, kernel_size) if need_dz or need_f else (None, None)
    dz = None
    if need_dz:
        g2 = gram[:, :rank, :rank].reshape(n_weight, rank)
        if has_bias:
            g2 = torch.cat([g2, gram[:, :rank, rank]])
        g2 = (2 * g2).contiguous()                                  # rows of 2 [G_o; h_o^T] per virtual column
        dz = torch.empty((num_pix, rank), device=x.device, dtype=torch.float32)
        block_r = _pow2(rank)
        if num_pix:
            _rank_grad_kernel[(triton.cdiv(num_pix, block_p), triton.cdiv(rank, block_r))](
                x, dnum, dq, z, e, g2, dz, num_pix, c, *conv, units, rank, n_weight, n_bias_end,
                KS=kernel_size, BLOCK_P=block_p, BLOCK_K=32, BLOCK_R=block_r, BLOCK_N=32, DATA_DOT=data_dot,
                **LAUNCH)

    if need_x:
        dx = torch.empty_like(x)
        sh, sw = stride
        rows_per_class, cols_per_class = triton.cdiv(x.shape[2], sh), triton.cdiv(x.shape[3], sw)
        block_c = _pow2(c)
        grid = (triton.cdiv(n * rows_per_class * cols_per_class, 64), triton.cdiv(c, block_c), sh * sw)
        if dx.numel():
            _input_grad_kernel[grid](
                dnum, z, z if dz is None else dz, e, e if b is None else b, a, dx,
                n, c, x.shape[2], x.shape[3], ho, wo, *dx.stride(), sh, sw, padding[0], padding[1],
                units, rank, n_weight, n_bias_end, n_bias_end if dz is None else n_end,
                rows_per_class, cols_per_class,
                KS=kernel_size, HAS_BIAS=has_bias, HAS_RANK=dz is not None, BLOCK_Q=64, BLOCK_C=block_c,
                BLOCK_N=32, DATA_DOT=data_dot, **LAUNCH)
        grads[0] = dx

    if need_f or need_a:
        col_start = 0 if need_f else n_bias_end
        col_end = n_end if need_a else n_bias_end
        num_cols = col_end - col_start
        block_d, block_n = 64, 64
        other = triton.cdiv(patch_size, block_d) * triton.cdiv(num_cols, block_n)
        splits, tiles_per_split, part = _split_k(x, num_pix, block_p, other, (patch_size, num_cols))
        _weight_grad_kernel[(triton.cdiv(patch_size, block_d), triton.cdiv(num_cols, block_n), splits)](
            x, dnum, z, z if dz is None else dz, part, num_pix, c, *conv, units, rank, n_weight, n_bias_end,
            n_end, col_start, num_cols, tiles_per_split * block_p, tiles_per_split,
            KS=kernel_size, HAS_RANK=need_a, BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_P=block_p,
            DATA_DOT=data_dot, **LAUNCH)
        raw = part.sum(0) if splits > 1 else part[0]              # (D, num_cols)
        if need_a:
            grads[1] = raw[:, col_end - col_start - rank:].t().reshape(a.shape).to(rank_weight.dtype)
        if need_f:
            m = _norm_grads(x, dq, z, units, rank, n_weight, n_bias_end, has_bias, block_p)
            gfilt = raw[:, :n_weight].reshape(patch_size, units, rank)     # the X^T T part, as (D, O, R)
            if has_bias:
                gfilt = torch.cat([gfilt, raw[:, n_weight:n_bias_end].unsqueeze(2)], 2)
            grads[2], grads[3] = lowrank.expand_grads(gfilt.permute(1, 2, 0), m, rows, e, b, need_e, need_b)
    # contiguous, as the fake impl of the backward op says (dA is a transposed view of the split-K sum)
    return [g if g is None or i == 0 else g.contiguous() for i, g in enumerate(grads)]


def _norm_grads(x, dq, z, units, rank, n_weight, n_bias_end, has_bias, block_p):
    """M_o = sum_p dq_o za za^T (O, R, R) from _norm_grad_kernel: the part of d||w||^2 / d[E_o | b_o]."""
    aug_rank = rank + (1 if has_bias else 0)
    num_pix = z.shape[0]
    block_n, block_t = 64, _pow2(aug_rank)
    other = triton.cdiv(n_bias_end, block_n) * triton.cdiv(aug_rank, block_t)
    splits, tiles_per_split, part = _split_k(x, num_pix, block_p, other, (n_bias_end, aug_rank))
    _norm_grad_kernel[(triton.cdiv(n_bias_end, block_n), triton.cdiv(aug_rank, block_t), splits)](
        dq, z, part, num_pix, units, rank, n_weight, n_bias_end, aug_rank, tiles_per_split * block_p,
        tiles_per_split, HAS_BIAS=has_bias, BLOCK_N=block_n, BLOCK_P=block_p, BLOCK_T=block_t, **LAUNCH)
    msum = part.sum(0) if splits > 1 else part[0]                 # (O*r [+ O], R): rows = virtual columns
    m = msum[:n_weight].reshape(units, rank, aug_rank)
    if has_bias:
        m = torch.cat([m, msum[n_weight:].unsqueeze(1)], 1)
    return m

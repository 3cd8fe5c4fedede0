"""Front door of the CoDA dynamic alignment unit (DAU) convolution.

Math and parameter layout: see ``bcos_kernels/ops/dau_conv2d/reference.py``. Backend "torch"
runs the custom op ``bcos_kernels::dau_conv2d``: the low-rank form of DESIGN.md
section 3 in plain torch ops with a hand-written backward; the per-pixel dynamic
weights (N, C*k*k, O, Ho, Wo) are never built. Backend "triton" runs the same op
with ``backend="triton"``: fused kernels (``bcos_kernels/ops/dau_conv2d/triton.py``, imported only
when it runs) that do not build the O*R-channel intermediate either; its backward is
the custom op ``bcos_kernels::dau_conv2d_backward`` (opaque to torch.compile). Backend
"cuda" runs the same two custom ops: cuDNN computes z and y (one convolution, in x's
dtype), and the CUDA epilogues of the C++ extension (``bcos_kernels::dau_combine_forward``
/ ``dau_combine_backward``, csrc/cuda/dau_cuda.cu) combine them per pixel; the O*R-channel
y is built (it is the GEMM's output) but only for a chunk of the batch at a time, and the
backward recomputes it instead of saving it (see "backend cuda" below).

Notation: D = C*k*k, R = r + 1 with a bias (z augmented by a constant 1, the bias
vector b_o becomes column r of E_o) and R = r without one. With
``filt`` (O, R, C, k, k) the columns of every [E_o | b_o] as conv filters:

    z   = conv(x, rank_weight)                  (N, r, Ho, Wo)
    y   = conv(x, filt)                         (N, O*R, Ho, Wo)     the O*r (+O) channel intermediate
    num_o = sum_q za_q y_{o,q}                  w_o . x_patch
    q_o   = za^T G_o za                         ||w_o||^2 = z^T G z + 2 h.z + c, G_o = [E_o|b_o]^T [E_o|b_o]
                                                (clamped at 0 against rounding)
    out_o = num_o * inv_f(q_o),  inv_f = s / (1 + s^2) (squash) or 1 / s (l2), s = sqrt(q)

z and y come out of one convolution with r + O*R filters.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from bcos_kernels import backends
from bcos_kernels.ops._checks import check_like, check_tensor, int_pair, positive_int
from bcos_kernels.ops.dau_conv2d.reference import (NORMS, bias_to_filters, dau_conv2d_original, default_padding,
                                                   expand_to_filters)

__all__ = ["dau_conv2d"]


def dau_conv2d(x, rank_weight, expand_weight, expand_bias=None, *, kernel_size, stride=1, padding=None,
               norm="squash", detach=False, backend=None):
    """CoDA DAU convolution. x: (N, C, H, W); rank_weight: (r, C, k, k); expand_weight: (C*k*k*O, r, 1, 1);
    expand_bias: (C*k*k*O,) or None. Returns (N, O, Ho, Wo).

    ``padding=None`` is the original's default (k - 1) // 2. ``norm`` is "squash" or "l2".
    ``detach=True`` is explanation mode: the dynamic weights (and their norms) are constants for the
    gradient, which then flows to x only through x_patch in w . x_patch.
    """
    check_tensor("x", x, 4)
    check_tensor("rank_weight", rank_weight, 4)
    check_tensor("expand_weight", expand_weight, 4)
    check_like("rank_weight", rank_weight, "x", x)
    check_like("expand_weight", expand_weight, "x", x)
    if expand_bias is not None:
        check_tensor("expand_bias", expand_bias, 1)
        check_like("expand_bias", expand_bias, "x", x)
    kernel_size = positive_int("kernel_size", kernel_size)
    stride = int_pair("stride", stride)
    padding = int_pair("padding", default_padding(kernel_size) if padding is None else padding, minimum=0)
    if not isinstance(norm, str) or norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if not isinstance(detach, bool):
        raise TypeError(f"detach must be a bool, got {type(detach).__name__}")

    channels = x.shape[1]
    rank = rank_weight.shape[0]
    d = channels * kernel_size * kernel_size
    if rank_weight.shape[1] != channels:
        raise ValueError(f"rank_weight expects {rank_weight.shape[1]} input channels but x has {channels}")
    if tuple(rank_weight.shape[2:]) != (kernel_size, kernel_size):
        raise ValueError(f"rank_weight has kernel {tuple(rank_weight.shape[2:])} but kernel_size={kernel_size}")
    if rank < 1:
        raise ValueError(f"rank_weight must have at least one filter (rank >= 1), got shape {tuple(rank_weight.shape)}")
    rows = expand_weight.shape[0]
    if tuple(expand_weight.shape[1:]) != (rank, 1, 1):
        raise ValueError(f"expand_weight must have shape (C*k*k*O, r, 1, 1) = (*, {rank}, 1, 1), "
                         f"got {tuple(expand_weight.shape)}")
    if rows == 0 or rows % d:
        raise ValueError(f"expand_weight.shape[0] = {rows} must be a positive multiple of "
                         f"C*k*k = {channels}*{kernel_size}*{kernel_size} = {d} (one row per patch entry and DAU)")
    if expand_bias is not None and expand_bias.shape[0] != rows:
        raise ValueError(f"expand_bias has {expand_bias.shape[0]} elements but expand_weight has {rows} rows")
    for i, name in enumerate(("height", "width")):
        if x.shape[2 + i] + 2 * padding[i] < kernel_size:
            raise ValueError(f"x {name} {x.shape[2 + i]} plus padding {padding[i]} is smaller than "
                             f"kernel_size {kernel_size}")

    ho, wo = _out_size(x, kernel_size, list(stride), list(padding))
    name = backends.resolve("dau_conv2d", backend, x, rank=rank,
                            pixels=max(x.shape[0] * ho * wo, x.shape[0] * x.shape[2] * x.shape[3]))
    if name == "reference":
        return dau_conv2d_original(x, rank_weight, expand_weight, expand_bias, kernel_size=kernel_size,
                                   stride=stride, padding=padding, norm=norm, detach=detach)
    out, _, _ = dau_conv2d_op(x, rank_weight, expand_weight, expand_bias, kernel_size, list(stride),
                              list(padding), norm, detach, name)
    return out


# ---------------------------------------------------------------------------------------------------------
# custom op


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _filters(expand_weight: torch.Tensor, expand_bias: Optional[torch.Tensor], channels: int,
             kernel_size: int) -> torch.Tensor:
    """[E_o | b_o] as conv filters (O, R, C, k, k)."""
    filt = expand_to_filters(expand_weight, channels, kernel_size)
    if expand_bias is not None:
        filt = torch.cat([filt, bias_to_filters(expand_bias, channels, kernel_size).unsqueeze(1)], 1)
    return filt


def _augment(z: torch.Tensor, has_bias: bool) -> torch.Tensor:
    """z (P, r) pixel-major -> za (P, R): a column of ones appended when there is a bias."""
    if not has_bias:
        return z.contiguous()
    return torch.cat([z, z.new_ones(z.shape[0], 1)], 1)


def _out_size(x: torch.Tensor, kernel_size: int, stride: List[int], padding: List[int]) -> List[int]:
    return [(x.shape[2 + i] + 2 * padding[i] - kernel_size) // stride[i] + 1 for i in range(2)]


def _pixel_major(t: torch.Tensor) -> torch.Tensor:
    """(N, K, H, W) -> (N*H*W, K); a view for channels_last tensors."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _from_pixel_major(t: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """(N*H*W, K) -> (N, K, H, W) with channels_last strides (a view)."""
    return t.reshape(n, h, w, t.shape[1]).permute(0, 3, 1, 2)


def _scales(s: torch.Tensor, norm: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """inv_f = 1 / f(s) and (d inv_f / d q) / inv_f with q = s^2, both 0 where s == 0 (an exactly-zero weight)."""
    live = s > 0
    s_safe = torch.where(live, s, torch.ones_like(s))
    q = s_safe * s_safe
    if norm == "squash":
        inv = s_safe / (1 + q)
        ratio = (1 - q) / (2 * q * (1 + q))
    else:
        inv = 1 / s_safe
        ratio = -0.5 / q
    zero = torch.zeros_like(s)
    return torch.where(live, inv, zero), torch.where(live, ratio, zero)


# Layout: x goes channels_last, so that the conv outputs are pixel-major (N*Ho*Wo, channels) and every
# per-pixel contraction over R is a batched mat-vec (bmm) that reads the O*R-channel tensor once, without an
# elementwise temporary of its size.
#
# Memory: the O*R-channel tensors (y, G za and the grads built from them) are transient. In eager mode they
# are built for a chunk of the batch at a time, at most CHUNK_ELEMENTS elements each (always at least one
# image), and the backward builds one at a time; under torch.compile the traced backward is one chunk.

CHUNK_ELEMENTS = 1 << 22   # 16 MiB of fp32 per O*R-channel transient


def _batch_chunks(n: int, per_image: int, budget: Optional[int] = None) -> List[Tuple[int, int]]:
    """[i0, i1) ranges of the batch with at most ``budget`` (default CHUNK_ELEMENTS, read at call time)
    elements per O*R-channel transient, at least one image each."""
    if torch.compiler.is_compiling():
        return [(0, n)]
    budget = CHUNK_ELEMENTS if budget is None else budget
    step = max(1, min(n, budget // max(per_image, 1)))
    return [(i, min(n, i + step)) for i in range(0, n, step)]


@torch.library.custom_op("bcos_kernels::dau_conv2d", mutates_args=())
def dau_conv2d_op(x: torch.Tensor, rank_weight: torch.Tensor, expand_weight: torch.Tensor,
                  expand_bias: Optional[torch.Tensor], kernel_size: int, stride: List[int], padding: List[int],
                  norm: str, detach: bool, backend: str = "torch") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out, z, s): out (N, O, Ho, Wo) contiguous in x's dtype; z (N*Ho*Wo, r) and s = ||w||
    (N*Ho*Wo, O), pixel-major, in the compute dtype (fp32 for half inputs): what the backward needs, not
    differentiable. ``backend``: "torch" (the torch ops below), "triton" (fused kernels) or "cuda" (cuDNN and the
    extension's CUDA epilogue)."""
    if backend == "triton":
        from bcos_kernels.ops.dau_conv2d import triton as triton_dau   # lazily: importing bcos_kernels never imports triton

        return triton_dau.dau_forward(x, rank_weight, expand_weight, expand_bias, kernel_size, stride, padding,
                                      norm)
    if backend == "cuda":
        backends.check_device("dau_conv2d", "cuda", x.device)
        return _cuda_forward(x, rank_weight, expand_weight, expand_bias, kernel_size, stride, padding, norm)
    if backend != "torch":
        raise ValueError(f"dau_conv2d_op: unknown backend {backend!r}")
    cdt = _compute_dtype(x.dtype)
    xc = x.to(cdt).contiguous(memory_format=torch.channels_last)
    a, e = rank_weight.to(cdt), expand_weight.to(cdt)
    b = None if expand_bias is None else expand_bias.to(cdt)
    n, c = x.shape[:2]
    rank = a.shape[0]
    filt = _filters(e, b, c, kernel_size)                                   # (O, R, C, k, k)
    o, big_r = filt.shape[:2]
    ho, wo = _out_size(x, kernel_size, stride, padding)
    # z and y from one convolution with r + O*R filters.
    w_all = torch.cat([a, filt.reshape(o * big_r, c, kernel_size, kernel_size)])
    e3 = filt.reshape(o, big_r, -1)                                         # (O, R, D), row q = column q of [E_o|b_o]
    gram_t = (e3 @ e3.transpose(1, 2)).reshape(o * big_r, big_r).t()        # G_o (O, R, R) is symmetric
    nums, zs, ss = [], [], []
    for i0, i1 in _batch_chunks(n, ho * wo * o * big_r):
        zy = _pixel_major(F.conv2d(xc[i0:i1], w_all, None, stride, padding))  # (p, r + O*R)
        z = zy[:, :rank].contiguous()
        za = _augment(z, b is not None)                                     # (p, R)
        nums.append(torch.bmm(zy[:, rank:].reshape(-1, o, big_r), za.unsqueeze(2)).squeeze(2))  # w_o . x_patch
        del zy
        gz = (za @ gram_t).reshape(-1, o, big_r)                            # (p, O, R): G_o za
        ss.append(torch.bmm(gz, za.unsqueeze(2)).squeeze(2))                # (p, O): ||w_o||^2 = za^T G_o za
        del gz
        zs.append(z)
    num, z, s = (t[0] if len(t) == 1 else torch.cat(t) for t in (nums, zs, ss))
    s = s.clamp_min(0).sqrt()                                               # (P, O): ||w_o||
    inv, _ = _scales(s, norm)
    out = _from_pixel_major(num * inv, n, ho, wo).to(x.dtype).contiguous()
    return out, z, s


@dau_conv2d_op.register_fake
def _(x, rank_weight, expand_weight, expand_bias, kernel_size, stride, padding, norm, detach, backend="torch"):
    cdt = _compute_dtype(x.dtype)
    ho, wo = _out_size(x, kernel_size, stride, padding)
    n, c = x.shape[:2]
    o = expand_weight.shape[0] // (c * kernel_size * kernel_size)
    return (x.new_empty((n, o, ho, wo)), x.new_empty((n * ho * wo, rank_weight.shape[0]), dtype=cdt),
            x.new_empty((n * ho * wo, o), dtype=cdt))


def _setup_context(ctx, inputs, output):
    x, rank_weight, expand_weight, expand_bias, kernel_size, stride, padding, norm, detach, backend = inputs
    out, z, s = output
    ctx.mark_non_differentiable(z, s)
    # Saved: the inputs (alive anyway), z (r channels), s (O channels) and the output (O channels, alive anyway
    # while the next layer uses it). NOT saved: the O*R-channel intermediate y = conv(x, filt), nor G_o za;
    # the backward recomputes them (one convolution, one small GEMM). Saving y would cost N*O*(r+1)*Ho*Wo
    # elements per layer -- as much as or more than the original's per-pixel weights (N*O*C*k*k*Ho*Wo) when
    # C*k*k is not much larger than r+1 (CoDA-Net CIFAR-10: layer 1 has C*k*k = 54 vs r+1 = 33, the 1x1 last
    # layer 64 vs 65) -- while recomputing it costs one GEMM of the size of the forward's.
    ctx.save_for_backward(x, rank_weight, expand_weight, expand_bias, z, s, out)
    ctx.args = (kernel_size, list(stride), list(padding), norm, detach, backend)


def _conv_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride, padding, need_x: bool,
                   need_w: bool):
    gx, gw, _ = torch.ops.aten.convolution_backward(grad, x, weight, None, stride, padding, [1, 1], False, [0, 0],
                                                    1, [need_x, need_w, False])
    return gx, gw


def _add(acc: Optional[torch.Tensor], t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t if acc is None else acc + t


def _set_expand_grads(grads: List[Optional[torch.Tensor]], dfilt: torch.Tensor, rank: int, expand_weight: torch.Tensor,
                      expand_bias: Optional[torch.Tensor], need_e: bool, need_b: bool) -> None:
    """Split dfilt (O, R, D), the gradient of the filters [E_o|b_o], into grads[2] (expand_weight's) and grads[3]
    (expand_bias's), each where asked for, in its parameter's dtype; both backward paths end with this."""
    o, d = dfilt.shape[0], dfilt.shape[-1]
    if need_e:
        grads[2] = dfilt[:, :rank].permute(2, 0, 1).reshape(d * o, rank, 1, 1).to(expand_weight.dtype)
    if need_b:
        grads[3] = dfilt[:, rank].t().reshape(d * o).to(expand_bias.dtype)


@torch.autograd.function.once_differentiable  # z, s and out are saved as constants: no double backward
def _backward(ctx, grad_out, _grad_z, _grad_s):
    x, rank_weight, expand_weight, expand_bias, z, s, out = ctx.saved_tensors
    kernel_size, stride, padding, norm, detach, backend = ctx.args
    need_x, need_a, need_e, need_b = ctx.needs_input_grad[:4]
    grads: List[Optional[torch.Tensor]] = [None] * 10
    if detach:  # explanation mode: w and ||w|| are constants; the gradient reaches x only through x_patch
        need_a = need_e = need_b = False
    if not (need_x or need_a or need_e or need_b):
        return tuple(grads)
    if backend != "torch":
        needs = [need_x, need_a, need_e, need_b]
        fused = dau_conv2d_backward_op(grad_out, x, rank_weight, expand_weight, expand_bias, z, s, out, kernel_size,
                                       stride, padding, norm, detach, backend, needs)
        grads[:4] = [g if need else None for g, need in zip(fused, needs)]
        return tuple(grads)
    need_z = need_x or need_a          # the paths through z = conv(x, rank_weight)
    need_f = need_e or need_b          # grads of the filters [E_o | b_o]

    cdt = _compute_dtype(x.dtype)
    xc = x.to(cdt).contiguous(memory_format=torch.channels_last)
    a, e = rank_weight.to(cdt), expand_weight.to(cdt)
    b = None if expand_bias is None else expand_bias.to(cdt)
    n, c = x.shape[:2]
    rank = a.shape[0]
    filt = _filters(e, b, c, kernel_size)
    o, big_r = filt.shape[:2]
    ho, wo = grad_out.shape[-2:]
    hw = ho * wo
    filt2d = filt.reshape(o * big_r, c, kernel_size, kernel_size)
    e3 = filt.reshape(o, big_r, -1)                                         # (O, R, D)
    gram_t = (e3 @ e3.transpose(1, 2)).reshape(o * big_r, big_r).t()
    inv, ratio = _scales(s, norm)
    g = _pixel_major(grad_out.to(cdt))                                      # (P, O)
    dnum_all = g * inv                                                      # d loss / d num_o
    dq_all = None if detach else g * _pixel_major(out.to(cdt)) * ratio      # d loss / d q_o,  q_o = ||w_o||^2
    za_all = _augment(z, b is not None)                                     # (P, R)

    gxs: List[torch.Tensor] = []
    ga = gfilt = m = None
    for i0, i1 in _batch_chunks(n, hw * o * big_r):
        rows = slice(i0 * hw, i1 * hw)
        xk = xc[i0:i1]
        za, dnum = za_all[rows], dnum_all[rows]
        gx = None
        if dq_all is not None:
            dq = dq_all[rows]
            if need_z:
                # d num_o / d za = y_o: recompute y (not saved, see _setup_context); d q_o / d za = 2 G_o za.
                y = _pixel_major(F.conv2d(xk, filt2d, None, stride, padding)).reshape(-1, o, big_r)
                dza = torch.bmm(dnum.unsqueeze(1), y).squeeze(1)            # (p, R)
                del y
                gz = (za @ gram_t).reshape(-1, o, big_r)
                dza = dza + 2 * torch.bmm(dq.unsqueeze(1), gz).squeeze(1)
                del gz
                dz = _from_pixel_major(dza[:, :rank], i1 - i0, ho, wo)
                gx, ga_k = _conv_backward(dz, xk, a, stride, padding, need_x, need_a)
                ga = _add(ga, ga_k)
            if need_f:
                # d q_o / d [E_o|b_o] = 2 [E_o|b_o] za za^T summed over pixels = 2 M_o e_o, M_o = sum dq_o za za^T.
                dqz = (dq.unsqueeze(2) * za.unsqueeze(1)).reshape(-1, o * big_r)  # (p, O*R)
                m = _add(m, dqz.t() @ za)
                del dqz
        if need_x or need_f:
            # d num_o / d y_{o,q} = za_q: the grad of the O*R-channel conv output.
            dy = _from_pixel_major((dnum.unsqueeze(2) * za.unsqueeze(1)).reshape(-1, o * big_r), i1 - i0, ho, wo)
            gx_k, gf_k = _conv_backward(dy, xk, filt2d, stride, padding, need_x, need_f)
            del dy
            gx = _add(gx, gx_k)
            gfilt = _add(gfilt, gf_k)
        if need_x:
            gxs.append(gx)

    if need_f:
        dfilt = torch.baddbmm(gfilt.reshape(o, big_r, -1), m.reshape(o, big_r, big_r), e3, alpha=2)  # (O, R, D)
        _set_expand_grads(grads, dfilt, rank, expand_weight, expand_bias, need_e, need_b)
    if need_a:
        grads[1] = ga.to(rank_weight.dtype)
    if need_x:
        grads[0] = (gxs[0] if len(gxs) == 1 else torch.cat(gxs)).to(x.dtype)
    return tuple(grads)


dau_conv2d_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("bcos_kernels::dau_conv2d_backward", mutates_args=())
def dau_conv2d_backward_op(grad_out: torch.Tensor, x: torch.Tensor, rank_weight: torch.Tensor,
                           expand_weight: torch.Tensor, expand_bias: Optional[torch.Tensor], z: torch.Tensor,
                           s: torch.Tensor, out: torch.Tensor, kernel_size: int, stride: List[int],
                           padding: List[int], norm: str, detach: bool, backend: str, needs: List[bool]
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for (x, rank_weight, expand_weight, expand_bias) of a fused backend's forward; an empty tensor
    where ``needs`` is False. A custom op of its own so that compiled graphs keep the kernels opaque."""
    if backend == "cuda":
        backends.check_device("dau_conv2d", "cuda", x.device)
        grads = _cuda_backward(grad_out, x, rank_weight, expand_weight, expand_bias, z, s, kernel_size, stride,
                               padding, norm, detach, list(needs))
        return tuple(x.new_empty(0) if t is None else t for t in grads)
    if backend != "triton":
        raise ValueError(f"dau_conv2d_backward: unknown backend {backend!r}")
    from bcos_kernels.ops.dau_conv2d import triton as triton_dau

    # d loss / d num_o and d loss / d ||w_o||^2 per pixel: O channels each, fp32.
    inv, ratio = _scales(s, norm)
    g = _pixel_major(grad_out.float())
    dnum = g * inv
    dq = None if detach else g * _pixel_major(out.float()) * ratio
    grads = triton_dau.dau_backward(x, rank_weight, expand_weight, expand_bias, z, dnum, dq, kernel_size, stride,
                                    padding, list(needs))
    return tuple(x.new_empty(0) if t is None else t for t in grads)


@dau_conv2d_backward_op.register_fake
def _(grad_out, x, rank_weight, expand_weight, expand_bias, z, s, out, kernel_size, stride, padding, norm, detach,
      backend, needs):
    like = (x, rank_weight, expand_weight, expand_bias)
    return tuple(torch.empty_like(t) if need and t is not None and not (detach and i > 0) else x.new_empty(0)
                 for i, (t, need) in enumerate(zip(like, needs)))


# ---------------------------------------------------------------------------------------------------------
# backend "cuda": cuDNN convolutions in x's dtype around the extension's epilogues (csrc/cuda/dau_cuda.cu).
#
# Forward, per chunk of the batch: zy = conv(x, [A; filt]) pixel-major (x goes channels_last, so the conv output
# is a (pixels, r + O*R) matrix view); dau_combine_forward(zy[:, r:], zy[:, :r], G) -> (out, s) reads both column
# ranges in place. Copies: x to channels_last (when it is not), z out of zy (r columns: saved for backward, and it
# must not keep the O*R-channel zy alive), out from pixel-major (P, O) into NCHW (the op's output is NCHW-contiguous
# for every backend).
#
# Backward, per chunk: y = conv(x, filt) recomputed (as backend "torch"; saving it would cost more memory than
# the original's per-pixel weights on small-C*k*k layers), dau_combine_backward -> (dz, dy, M), then the two
# convolution backwards; the filter gradient is gfilt + 2 M_o e_o. Copies: grad_out to pixel-major (O channels;
# a view when it is channels_last), z back to x's dtype (half inputs only: r columns), and the gradients into
# the layouts of their inputs (the fake impl says empty_like) where cuDNN returned another one.
#
# The O*R-channel transients (zy / y, dy) are built for CUDA_CHUNK_ELEMENTS elements of the batch at a time (at
# least one image): larger than backend "torch"'s chunks, since a GPU GEMM needs many pixels to fill the device.

CUDA_CHUNK_ELEMENTS = 1 << 25   # 128 MiB of fp32 per O*R-channel transient


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the CUDA kernels (and of their gram, s and M): fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cuda_tables(expand_weight: torch.Tensor, expand_bias: Optional[torch.Tensor], channels: int, kernel_size: int):
    """(filt2d (O*R, C, k, k) in the weights' dtype: the filters of y; e3 (O, R, D) and gram G_o = e3_o e3_o^T
    (O, R, R), both in the accumulation dtype, from the same (rounded) weights the convolution uses)."""
    filt = _filters(expand_weight, expand_bias, channels, kernel_size)
    o, big_r = filt.shape[:2]
    e3 = filt.reshape(o, big_r, -1).to(_acc_dtype(filt.dtype))
    return filt.reshape(o * big_r, channels, kernel_size, kernel_size), e3, torch.bmm(e3, e3.transpose(1, 2))


def _in_layout_of(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t (shape and dtype of ``like``) with the strides of ``torch.empty_like(like)``, as the fake impls promise;
    a copy only when cuDNN returned another layout (e.g. a channels_last gradient for an NCHW input)."""
    if t.is_contiguous() and like.is_contiguous():
        return t
    if t.dim() == 4 and not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last) \
            and t.is_contiguous(memory_format=torch.channels_last):
        return t
    out = torch.empty_like(like)
    out.copy_(t)
    return out


def _cuda_forward(x: torch.Tensor, rank_weight: torch.Tensor, expand_weight: torch.Tensor,
                  expand_bias: Optional[torch.Tensor], kernel_size: int, stride: List[int], padding: List[int],
                  norm: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, c = x.shape[:2]
    rank = rank_weight.shape[0]
    filt2d, _, gram = _cuda_tables(expand_weight, expand_bias, c, kernel_size)
    o, big_r = gram.shape[:2]
    ho, wo = _out_size(x, kernel_size, stride, padding)
    hw = ho * wo
    cdt = _compute_dtype(x.dtype)
    w_all = torch.cat([rank_weight, filt2d])                                # z and y from one convolution
    xc = x.contiguous(memory_format=torch.channels_last)
    out = x.new_empty((n, o, ho, wo))
    z = x.new_empty((n * hw, rank), dtype=cdt)
    ss = []
    for i0, i1 in _batch_chunks(n, hw * o * big_r, CUDA_CHUNK_ELEMENTS):
        zy = _pixel_major(F.conv2d(xc[i0:i1], w_all, None, stride, padding))  # (p, r + O*R)
        out_k, s_k = torch.ops.bcos_kernels.dau_combine_forward(zy[:, rank:], zy[:, :rank], gram, norm)
        z[i0 * hw:i1 * hw] = zy[:, :rank]
        del zy
        out[i0:i1] = _from_pixel_major(out_k, i1 - i0, ho, wo)
        ss.append(s_k)
    if len(ss) == 1:
        s = ss[0]
    else:
        s = torch.cat(ss) if ss else x.new_empty((0, o), dtype=cdt)
    return out, z, s


def _cuda_backward(grad_out: torch.Tensor, x: torch.Tensor, rank_weight: torch.Tensor, expand_weight: torch.Tensor,
                   expand_bias: Optional[torch.Tensor], z: torch.Tensor, s: torch.Tensor, kernel_size: int,
                   stride: List[int], padding: List[int], norm: str, detach: bool,
                   needs: List[bool]) -> List[Optional[torch.Tensor]]:
    need_x, need_a, need_e, need_b = needs
    need_b = need_b and expand_bias is not None
    if detach:  # explanation mode: the dynamic weights are constants; only x gets a gradient (through x_patch)
        need_a = need_e = need_b = False
    need_z = (need_x or need_a) and not detach   # the path through z = conv(x, A): d num/d z and d ||w||^2/d z
    need_f = need_e or need_b                    # grads of the filters [E_o | b_o]
    need_y = need_x or need_f                    # the path through y = conv(x, filt): d num/d y
    grads: List[Optional[torch.Tensor]] = [None] * 4
    like = (x, rank_weight, expand_weight, expand_bias)
    n, c = x.shape[:2]
    if n == 0:
        return [torch.zeros_like(t) if need else None for t, need in zip(like, (need_x, need_a, need_e, need_b))]
    if not (need_z or need_y):
        return grads
    rank = rank_weight.shape[0]
    filt2d, e3, gram = _cuda_tables(expand_weight, expand_bias, c, kernel_size)
    o, big_r = gram.shape[:2]
    ho, wo = grad_out.shape[-2:]
    hw = ho * wo
    xc = x.contiguous(memory_format=torch.channels_last)
    g = _pixel_major(grad_out.to(x.dtype))          # (P, O)
    zx = z.to(x.dtype)                              # exact: the forward rounded z from this dtype
    gxs: List[torch.Tensor] = []
    ga = gfilt = m = None
    for i0, i1 in _batch_chunks(n, hw * o * big_r, CUDA_CHUNK_ELEMENTS):
        rows = slice(i0 * hw, i1 * hw)
        xk = xc[i0:i1]
        y = _pixel_major(F.conv2d(xk, filt2d, None, stride, padding))    # recomputed (see _setup_context)
        dz, dy, m_k = torch.ops.bcos_kernels.dau_combine_backward(g[rows], y, zx[rows], s[rows], gram, norm, detach,
                                                                  need_z, need_y, need_f)
        del y
        gx = None
        if need_z:
            gx, ga_k = _conv_backward(_from_pixel_major(dz, i1 - i0, ho, wo), xk, rank_weight, stride, padding,
                                      need_x, need_a)
            ga = _add(ga, ga_k)
        if need_y:
            gx_k, gf_k = _conv_backward(_from_pixel_major(dy, i1 - i0, ho, wo), xk, filt2d, stride, padding,
                                        need_x, need_f)
            del dy
            gx = _add(gx, gx_k)
            gfilt = _add(gfilt, gf_k)
        if need_f:
            m = _add(m, m_k)
        if need_x:
            gxs.append(gx)
    if need_f:
        # d ||w_o||^2 / d [E_o|b_o] = 2 M_o e_o, added to the gradient through y
        dfilt = torch.baddbmm(gfilt.reshape(o, big_r, -1).to(e3.dtype), m, e3, alpha=2)   # (O, R, D)
        _set_expand_grads(grads, dfilt, rank, expand_weight, expand_bias, need_e, need_b)
    if need_a:
        grads[1] = ga
    if need_x:
        grads[0] = gxs[0] if len(gxs) == 1 else torch.cat(gxs)
    return [None if t is None else _in_layout_of(t, ref) for t, ref in zip(grads, like)]

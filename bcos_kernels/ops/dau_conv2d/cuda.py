"""Backend "cuda" of the DAU convolution: cuDNN convolutions in x's dtype around the C++ extension's epilogues
(``bcos_kernels::dau_combine_forward`` / ``dau_combine_backward``, csrc/cuda/dau_cuda.cu), which combine z and y
per pixel (the low-rank form: lowrank.py). The O*R-channel y is built (it is the GEMM's output), but only for a
chunk of the batch at a time, and the backward recomputes it instead of saving it.

Forward, per chunk of the batch: zy = conv(x, [A; filt]) pixel-major (x goes channels_last, so the conv output is
a (pixels, r + O*R) matrix view); dau_combine_forward(zy[:, r:], zy[:, :r], G) -> (out, s) reads both column
ranges in place. Copies: x to channels_last (when it is not), z out of zy (r columns: saved for backward, and it
must not keep the O*R-channel zy alive), out from pixel-major (P, O) into NCHW (the op's output is NCHW-contiguous
for every backend).

Backward, per chunk: y = conv(x, filt) recomputed (as backend "torch"; saving it would cost more memory than the
original's per-pixel weights on small-C*k*k layers), dau_combine_backward -> (dz, dy, M), then the two
convolution backwards; the filter gradient is gfilt + 2 M_o e_o (lowrank.expand_grads). Copies: grad_out to
pixel-major (O channels; a view when it is channels_last), z back to x's dtype (half inputs only: r columns), and
the gradients into the layouts of their inputs (the fake impl says empty_like) where cuDNN returned another one.

The O*R-channel transients (zy / y, dy) are built for CHUNK_ELEMENTS elements of the batch at a time (at least one
image): larger than backend "torch"'s chunks, since a GPU GEMM needs many pixels to fill the device.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from bcos_kernels.ops._layout import conv_output_size, memory_format_of
from bcos_kernels.ops.dau_conv2d import lowrank
from bcos_kernels.ops.dau_conv2d.lowrank import add, conv_backward, from_pixel_major, pixel_major

CHUNK_ELEMENTS = 1 << 25  # 128 MiB of fp32 per O*R-channel transient (read at call time: tests lower it)

OPAQUE_BACKWARD = True  # kernels autograd cannot trace: the backward runs as bcos_kernels::dau_conv2d_backward


def _tables(expand_weight: torch.Tensor, expand_bias: Optional[torch.Tensor], channels: int, kernel_size: int):
    """(filt2d (O*R, C, k, k) in the weights' dtype: the filters of y; rows (O, R, D) and gram G_o (O, R, R), both
    in the kernels' accumulation dtype, from the same (rounded) weights the convolution uses)."""
    filt = lowrank.filters(expand_weight, expand_bias, channels, kernel_size)
    o, big_r = filt.shape[:2]
    rows = filt.reshape(o, big_r, -1).to(lowrank.compute_dtype(filt.dtype))
    return filt.reshape(o * big_r, channels, kernel_size, kernel_size), rows, lowrank.gram(rows)


def _in_layout_of(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t (shape and dtype of ``like``) with the strides of ``torch.empty_like(like)``, as the fake impls promise;
    a copy only when cuDNN returned another layout (e.g. a channels_last gradient for an NCHW input)."""
    fmt = memory_format_of(like)
    if like.is_contiguous(memory_format=fmt) and t.is_contiguous(memory_format=fmt):
        return t
    return torch.empty_like(like).copy_(t)


def forward(x, rank_weight, expand_weight, expand_bias, opts):
    kernel_size, stride, padding, norm = opts.kernel_size, opts.stride, opts.padding, opts.norm
    n, c = x.shape[:2]
    rank = rank_weight.shape[0]
    filt2d, _, gram = _tables(expand_weight, expand_bias, c, kernel_size)
    o, big_r = gram.shape[:2]
    ho, wo = conv_output_size(x.shape[2:], (kernel_size, kernel_size), stride, padding)
    hw = ho * wo
    cdt = lowrank.compute_dtype(x.dtype)
    w_all = torch.cat([rank_weight, filt2d])  # z and y from one convolution
    xc = x.contiguous(memory_format=torch.channels_last)
    out = x.new_empty((n, o, ho, wo))
    z = x.new_empty((n * hw, rank), dtype=cdt)
    ss = []
    for i0, i1 in lowrank.batch_chunks(n, hw * o * big_r, CHUNK_ELEMENTS):
        zy = pixel_major(F.conv2d(xc[i0:i1], w_all, None, stride, padding))  # (p, r + O*R)
        out_k, s_k = torch.ops.bcos_kernels.dau_combine_forward(zy[:, rank:], zy[:, :rank], gram, norm)
        z[i0 * hw : i1 * hw] = zy[:, :rank]
        del zy
        out[i0:i1] = from_pixel_major(out_k, i1 - i0, ho, wo)
        ss.append(s_k)
    if len(ss) == 1:
        s = ss[0]
    else:
        s = torch.cat(ss) if ss else x.new_empty((0, o), dtype=cdt)
    return out, z, s, None  # the low-rank form only: no per-pixel weights kept


def backward(grad_out, x, rank_weight, expand_weight, expand_bias, z, s, out, weights, opts, needs):
    kernel_size, stride, padding, norm, detach = opts.kernel_size, opts.stride, opts.padding, opts.norm, opts.detach
    need_x, need_a, need_e, need_b = needs
    need_b = need_b and expand_bias is not None
    if detach:  # explanation mode: the dynamic weights are constants; only x gets a gradient (through x_patch)
        need_a = need_e = need_b = False
    need_z = (need_x or need_a) and not detach  # the path through z = conv(x, A): d num/d z and d ||w||^2/d z
    need_f = need_e or need_b  # grads of the filters [E_o | b_o]
    need_y = need_x or need_f  # the path through y = conv(x, filt): d num/d y
    grads: List[Optional[torch.Tensor]] = [None] * 4
    like = (x, rank_weight, expand_weight, expand_bias)
    n, c = x.shape[:2]
    if n == 0:
        return [torch.zeros_like(t) if need else None for t, need in zip(like, (need_x, need_a, need_e, need_b))]
    if not (need_z or need_y):
        return grads
    filt2d, rows, gram = _tables(expand_weight, expand_bias, c, kernel_size)
    o, big_r = gram.shape[:2]
    ho, wo = grad_out.shape[-2:]
    hw = ho * wo
    xc = x.contiguous(memory_format=torch.channels_last)
    g = pixel_major(grad_out.to(x.dtype))  # (P, O)
    zx = z.to(x.dtype)  # exact: the forward rounded z from this dtype
    gxs: List[torch.Tensor] = []
    ga = gfilt = m = None
    for i0, i1 in lowrank.batch_chunks(n, hw * o * big_r, CHUNK_ELEMENTS):
        pixels = slice(i0 * hw, i1 * hw)
        xk = xc[i0:i1]
        y = pixel_major(F.conv2d(xk, filt2d, None, stride, padding))  # recomputed (see the module docstring)
        dz, dy, m_k = torch.ops.bcos_kernels.dau_combine_backward(
            g[pixels], y, zx[pixels], s[pixels], gram, norm, detach, need_z, need_y, need_f
        )
        del y
        gx = None
        if need_z:
            gx, ga_k = conv_backward(
                from_pixel_major(dz, i1 - i0, ho, wo), xk, rank_weight, stride, padding, need_x, need_a
            )
            ga = add(ga, ga_k)
        if need_y:
            gx_k, gf_k = conv_backward(
                from_pixel_major(dy, i1 - i0, ho, wo), xk, filt2d, stride, padding, need_x, need_f
            )
            del dy
            gx = add(gx, gx_k)
            gfilt = add(gfilt, gf_k)
        if need_f:
            m = add(m, m_k)
        if need_x:
            gxs.append(gx)
    if need_f:
        grads[2], grads[3] = lowrank.expand_grads(gfilt, m, rows, expand_weight, expand_bias, need_e, need_b)
    if need_a:
        grads[1] = ga
    if need_x:
        grads[0] = gxs[0] if len(gxs) == 1 else torch.cat(gxs)
    return [None if t is None else _in_layout_of(t, ref) for t, ref in zip(grads, like)]

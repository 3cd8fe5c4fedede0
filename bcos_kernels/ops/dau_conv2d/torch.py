"""Backend "torch" of the DAU convolution, in plain torch ops with hand-written backwards, in two forms chosen per
shape by cost_model.py for the forward and the backward separately (the plan comes in the options): the
materialised form (materialised.py), and the low-rank form (lowrank.py, DESIGN.md section 3), below, which never
builds the per-pixel dynamic weights (N, C*k*k, O, Ho, Wo). z and y come out of one convolution with r + O*R
filters, in the compute dtype (fp32 for half inputs).

Layout: x goes channels_last, so that the conv outputs are pixel-major (N*Ho*Wo, channels) and every per-pixel
contraction over R is a batched mat-vec (bmm) that reads the O*R-channel tensor once, without an elementwise
temporary of its size.

Memory: the O*R-channel tensors (y, G za and the grads built from them) are transient. In eager mode they are
built for a chunk of the batch at a time, at most CHUNK_ELEMENTS elements each (always at least one image), and
the backward builds one at a time; under torch.compile the traced backward is one chunk. The backward recomputes
y instead of saving it: saving it would cost N*O*(r+1)*Ho*Wo elements per layer -- as much as or more than the
original's per-pixel weights (N*O*C*k*k*Ho*Wo) when C*k*k is not much larger than r+1 (CoDA-Net CIFAR-10: layer
1 has C*k*k = 54 vs r+1 = 33, the 1x1 last layer 64 vs 65) -- while recomputing it costs one GEMM of the size of
the forward's.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from bcos_kernels.ops._layout import conv_output_size
from bcos_kernels.ops.dau_conv2d import lowrank, materialised
from bcos_kernels.ops.dau_conv2d.lowrank import add, conv_backward, from_pixel_major, join, pixel_major

CHUNK_ELEMENTS = 1 << 22  # 16 MiB of fp32 per O*R-channel transient (read at call time: tests lower it)

OPAQUE_BACKWARD = False  # plain torch ops: autograd (and torch.compile) trace the backward directly


def _operands(
    x: torch.Tensor,
    rank_weight: torch.Tensor,
    expand_weight: torch.Tensor,
    expand_bias: Optional[torch.Tensor],
    kernel_size: int,
):
    """Everything in the compute dtype: x channels_last, rank_weight, the filters [E_o|b_o] (O*R, C, k, k) of y,
    their rows (O, R, D) and the Gram matrices transposed to (R, O*R) for the pixel-major G_o za."""
    cdt = lowrank.compute_dtype(x.dtype)
    b = None if expand_bias is None else expand_bias.to(cdt)
    c = x.shape[1]
    filt = lowrank.filters(expand_weight.to(cdt), b, c, kernel_size)  # (O, R, C, k, k)
    o, big_r = filt.shape[:2]
    rows = filt.reshape(o, big_r, -1)  # row q = column q of [E_o|b_o]
    gram_t = lowrank.gram(rows).reshape(o * big_r, big_r).t()  # G_o (O, R, R) is symmetric
    xc = x.to(cdt).contiguous(memory_format=torch.channels_last)
    return xc, rank_weight.to(cdt), filt.reshape(o * big_r, c, kernel_size, kernel_size), rows, gram_t


def forward(x, rank_weight, expand_weight, expand_bias, opts):
    """(out, z, s, w) in the plan's forward form; w (kept for a materialised backward) or None."""
    if opts.forward_form == "materialised":
        return materialised.forward(
            x, rank_weight, expand_weight, expand_bias, opts, save_weights=opts.backward_form == "materialised"
        )
    return (*_lowrank_forward(x, rank_weight, expand_weight, expand_bias, opts), None)


def backward(grad_out, x, rank_weight, expand_weight, expand_bias, z, s, out, weights, opts, needs):
    """The gradients in the plan's backward form (either reads what either forward saved)."""
    if opts.backward_form == "materialised":
        return materialised.backward(
            grad_out, x, rank_weight, expand_weight, expand_bias, z, s, out, weights, opts, needs
        )
    return _lowrank_backward(grad_out, x, rank_weight, expand_weight, expand_bias, z, s, out, opts, needs)


def _lowrank_forward(x, rank_weight, expand_weight, expand_bias, opts):
    kernel_size, stride, padding, norm = opts.kernel_size, opts.stride, opts.padding, opts.norm
    xc, a, filt2d, rows, gram_t = _operands(x, rank_weight, expand_weight, expand_bias, kernel_size)
    n = x.shape[0]
    rank = a.shape[0]
    o, big_r = rows.shape[:2]
    ho, wo = conv_output_size(x.shape[2:], (kernel_size, kernel_size), stride, padding)
    w_all = torch.cat([a, filt2d])  # z and y from one convolution
    nums, zs, ss = [], [], []
    for i0, i1 in lowrank.batch_chunks(n, ho * wo * o * big_r, CHUNK_ELEMENTS):
        zy = pixel_major(F.conv2d(xc[i0:i1], w_all, None, stride, padding))  # (p, r + O*R)
        z = zy[:, :rank].contiguous()
        za = lowrank.augment(z, expand_bias is not None)  # (p, R)
        nums.append(torch.bmm(zy[:, rank:].reshape(-1, o, big_r), za.unsqueeze(2)).squeeze(2))  # w_o . x_patch
        del zy
        gz = (za @ gram_t).reshape(-1, o, big_r)  # (p, O, R): G_o za
        ss.append(torch.bmm(gz, za.unsqueeze(2)).squeeze(2))  # (p, O): ||w_o||^2 = za^T G_o za
        del gz
        zs.append(z)
    num, z, s = join(nums), join(zs), join(ss)
    s = s.clamp_min(0).sqrt()  # (P, O): ||w_o||
    inv, _ = lowrank.inverse_norm(s, norm)
    out = from_pixel_major(num * inv, n, ho, wo).to(x.dtype).contiguous()
    return out, z, s


def _lowrank_backward(grad_out, x, rank_weight, expand_weight, expand_bias, z, s, out, opts, needs):
    kernel_size, stride, padding, norm, detach = opts.kernel_size, opts.stride, opts.padding, opts.norm, opts.detach
    need_x, need_a, need_e, need_b = needs
    need_z = need_x or need_a  # the paths through z = conv(x, rank_weight)
    need_f = need_e or need_b  # grads of the filters [E_o | b_o]
    xc, a, filt2d, rows, gram_t = _operands(x, rank_weight, expand_weight, expand_bias, kernel_size)
    n = x.shape[0]
    rank = a.shape[0]
    o, big_r = rows.shape[:2]
    ho, wo = grad_out.shape[-2:]
    hw = ho * wo
    dnum_all, dq_all = lowrank.output_grads(grad_out, out, s, norm, detach)  # (P, O) each
    za_all = lowrank.augment(z, expand_bias is not None)  # (P, R)

    gxs: List[torch.Tensor] = []
    ga = gfilt = m = None
    for i0, i1 in lowrank.batch_chunks(n, hw * o * big_r, CHUNK_ELEMENTS):
        rows_k = slice(i0 * hw, i1 * hw)
        xk = xc[i0:i1]
        za, dnum = za_all[rows_k], dnum_all[rows_k]
        gx = None
        if dq_all is not None:
            dq = dq_all[rows_k]
            if need_z:
                # d num_o / d za = y_o: recompute y (not saved, see the module docstring); d q_o / d za = 2 G_o za.
                y = pixel_major(F.conv2d(xk, filt2d, None, stride, padding)).reshape(-1, o, big_r)
                dza = torch.bmm(dnum.unsqueeze(1), y).squeeze(1)  # (p, R)
                del y
                gz = (za @ gram_t).reshape(-1, o, big_r)
                dza = dza + 2 * torch.bmm(dq.unsqueeze(1), gz).squeeze(1)
                del gz
                dz = from_pixel_major(dza[:, :rank], i1 - i0, ho, wo)
                gx, ga_k = conv_backward(dz, xk, a, stride, padding, need_x, need_a)
                ga = add(ga, ga_k)
            if need_f:
                # M_o = sum_p dq_o za za^T, for d q_o / d [E_o|b_o] (lowrank.expand_grads)
                dqz = (dq.unsqueeze(2) * za.unsqueeze(1)).reshape(-1, o * big_r)  # (p, O*R)
                m = add(m, dqz.t() @ za)
                del dqz
        if need_x or need_f:
            # d num_o / d y_{o,q} = za_q: the grad of the O*R-channel conv output.
            dy = from_pixel_major((dnum.unsqueeze(2) * za.unsqueeze(1)).reshape(-1, o * big_r), i1 - i0, ho, wo)
            gx_k, gf_k = conv_backward(dy, xk, filt2d, stride, padding, need_x, need_f)
            del dy
            gx = add(gx, gx_k)
            gfilt = add(gfilt, gf_k)
        if need_x:
            gxs.append(gx)

    grads: List[Optional[torch.Tensor]] = [None] * 4
    if need_f:
        grads[2], grads[3] = lowrank.expand_grads(gfilt, m, rows, expand_weight, expand_bias, need_e, need_b)
    if need_a:
        grads[1] = ga.to(rank_weight.dtype)
    if need_x:
        grads[0] = join(gxs).to(x.dtype)
    return grads

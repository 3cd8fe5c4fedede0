"""The DAU in its materialised form: the per-pixel dynamic weights w = E z + b are built, as in the original, but
a chunk of the batch at a time and contracted with GEMMs instead of broadcast products. Backend "torch" runs it
where the cost model (cost_model.py) says it is faster than the low-rank form (lowrank.py), e.g. at rank 256,
where the low-rank form's Gram terms (O*R^2 a pixel) cost more than the weights themselves (O*C*k*k a pixel).

Per pixel, with P the pixels of a chunk, D = C*k*k, the patch x_p (D) and w_p (D, O) (row d*O + o of the expand
conv is entry d of DAU o, reference.py):

    z   = conv(x, rank_weight)               (P, r)
    w   = z E^T + b                          (P, D*O)      one GEMM: the cost of the form
    num = x_p^T w_p,  q = sum_d w_p^2        (P, O)        batched mat-vec and one reduction
    out = num * inv_f(sqrt(q))                             (lowrank.inverse_norm: the same zero-weight rule)

Backward, with dnum, dq from lowrank.output_grads:

    dw    = x_p dnum^T + 2 w_p diag(dq)      (P, D, O)
    dz    = dw E,  dE = dw^T z,  db = sum_p dw                    (two GEMMs of the forward's size)
    dx    = fold(w_p dnum) + conv_backward(dz)                    (explanation mode: the first term only)

``w`` is kept for the backward only when the forward is told to (the plan's ``save_weights``): it is then as
large as the tensor the original keeps, N*C*k*k*O*Ho*Wo elements, and the backward skips one GEMM. Otherwise the
backward rebuilds it from the saved z.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from bcos_kernels.ops._layout import conv_output_size
from bcos_kernels.ops.dau_conv2d import lowrank
from bcos_kernels.ops.dau_conv2d.lowrank import add, conv_backward, from_pixel_major, join, pixel_major

CHUNK_ELEMENTS = 1 << 22  # 16 MiB of fp32 per (P, D*O) transient when w is not kept (read at call time)
# The squares of w summed 4 MiB (fp32) at a time: few, large ops (each op pays a thread-pool wake-up; slices of
# 1 << 16 were 1.2-5x slower at 2 threads on the benchmark layers).
NORM_SLICE_ELEMENTS = 1 << 20


def _pointwise(kernel_size: int, stride, padding) -> bool:
    """A 1x1 kernel with stride 1 and no padding: the patches are x itself."""
    return kernel_size == 1 and list(stride) == [1, 1] and list(padding) == [0, 0]


def _patches(x: torch.Tensor, kernel_size: int, stride, padding) -> torch.Tensor:
    """The input patches pixel-major (P, D) in the unfold order d = c*k*k + i*k + j (a view when _pointwise and
    x is channels_last)."""
    if _pointwise(kernel_size, stride, padding):
        return pixel_major(x)
    cols = F.unfold(x, kernel_size, padding=padding, stride=stride)  # (n, D, L)
    return cols.transpose(1, 2).reshape(cols.shape[0] * cols.shape[2], cols.shape[1])


def _fold(grad_patches: torch.Tensor, x: torch.Tensor, kernel_size: int, stride, padding) -> torch.Tensor:
    """The gradient of x (x's shape) from the gradient of its patches (P, D): the adjoint of _patches."""
    n, c, h, w = x.shape
    if _pointwise(kernel_size, stride, padding):
        return from_pixel_major(grad_patches, n, h, w)
    ho, wo = conv_output_size((h, w), (kernel_size, kernel_size), stride, padding)
    cols = grad_patches.reshape(n, ho * wo, grad_patches.shape[1]).transpose(1, 2)  # (n, D, L)
    return F.fold(cols, (h, w), kernel_size, padding=padding, stride=stride)


def _norms(w: torch.Tensor) -> torch.Tensor:
    """||w_o|| (P, O) of w (P, D, O): the squares summed over d a slice of pixels at a time, so that the temporary
    stays in cache (torch.linalg.vector_norm over the middle dim is several times slower at small O)."""
    step = max(1, NORM_SLICE_ELEMENTS // max(1, w.shape[1] * w.shape[2]))
    parts = [torch.square(w[i : i + step]).sum(1) for i in range(0, max(1, w.shape[0]), step)]
    return join(parts).sqrt_()


def _weights(z: torch.Tensor, expand_rows: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """w = z E^T + b (P, D*O)."""
    return torch.mm(z, expand_rows.t()) if bias is None else torch.addmm(bias, z, expand_rows.t())


def _operands(x, rank_weight, expand_weight, expand_bias):
    """x channels_last (so z is pixel-major as a view), rank_weight, E as (D*O, r) and b, in the compute dtype."""
    cdt = lowrank.compute_dtype(x.dtype)
    xc = x.to(cdt).contiguous(memory_format=torch.channels_last)
    rows = expand_weight.to(cdt).reshape(expand_weight.shape[0], -1)
    bias = None if expand_bias is None else expand_bias.to(cdt)
    return xc, rank_weight.to(cdt), rows, bias


def forward(x, rank_weight, expand_weight, expand_bias, opts, save_weights: bool):
    """(out, z, s, w): the low-rank forward's (out, z, s) (backend "torch"), and w (P, D*O) when
    ``save_weights`` (else None)."""
    k, stride, padding = opts.kernel_size, opts.stride, opts.padding
    xc, a, rows, bias = _operands(x, rank_weight, expand_weight, expand_bias)
    n = x.shape[0]
    ho, wo = conv_output_size(x.shape[2:], (k, k), stride, padding)
    d = x.shape[1] * k * k
    o = rows.shape[0] // d
    z = pixel_major(F.conv2d(xc, a, None, stride, padding)).contiguous()  # (P, r)
    budget = n * ho * wo * rows.shape[0] if save_weights else CHUNK_ELEMENTS
    nums, qs, ws = [], [], []
    for i0, i1 in lowrank.batch_chunks(n, ho * wo * rows.shape[0], budget):
        pix = slice(i0 * ho * wo, i1 * ho * wo)
        w = _weights(z[pix], rows, bias).view((i1 - i0) * ho * wo, d, o)
        patches = _patches(xc[i0:i1], k, stride, padding)
        nums.append(torch.bmm(patches.unsqueeze(1), w).squeeze(1))
        qs.append(_norms(w))
        if save_weights:
            ws.append(w)
        del w
    num, s = join(nums), join(qs)
    inv, _ = lowrank.inverse_norm(s, opts.norm)
    out = from_pixel_major(num * inv, n, ho, wo).to(x.dtype).contiguous()
    w_all = join(ws).view(z.shape[0], d * o) if save_weights else None
    return out, z, s, w_all


def backward(grad_out, x, rank_weight, expand_weight, expand_bias, z, s, out, weights, opts, needs):
    """Gradients of (x, rank_weight, expand_weight, expand_bias), None where not needed; ``weights`` the
    forward's w (P, D*O) or None (then rebuilt from z a chunk at a time)."""
    k, stride, padding, detach = opts.kernel_size, opts.stride, opts.padding, opts.detach
    need_x, need_a, need_e, need_b = needs
    need_z = (need_x or need_a) and not detach
    need_dw = need_z or need_e or need_b
    xc, a, rows, bias = _operands(x, rank_weight, expand_weight, expand_bias)
    n = x.shape[0]
    ho, wo = grad_out.shape[-2:]
    hw = ho * wo
    d = x.shape[1] * k * k
    o = rows.shape[0] // d
    dnum_all, dq_all = lowrank.output_grads(grad_out, out, s, opts.norm, detach)  # (P, O) each
    budget = n * hw * rows.shape[0] if weights is not None else CHUNK_ELEMENTS

    gxs: List[torch.Tensor] = []
    ga = grad_rows = grad_bias = None
    for i0, i1 in lowrank.batch_chunks(n, hw * rows.shape[0], budget):
        pix = slice(i0 * hw, i1 * hw)
        zk, dnum = z[pix], dnum_all[pix]
        w = (_weights(zk, rows, bias) if weights is None else weights[pix]).view(zk.shape[0], d, o)
        gx = None
        if need_x:  # through x_p in num = x_p^T w_p
            gx = _fold(torch.bmm(w, dnum.unsqueeze(2)).squeeze(2), xc[i0:i1], k, stride, padding)
        if need_dw:
            patches = _patches(xc[i0:i1], k, stride, padding)
            dw = w * (2 * dq_all[pix]).unsqueeze(1) if dq_all is not None else torch.zeros_like(w)
            dw.addcmul_(patches.unsqueeze(2), dnum.unsqueeze(1))
            dw = dw.view(zk.shape[0], d * o)
            del w
            if need_e:
                grad_rows = add(grad_rows, dw.t() @ zk)
            if need_b:
                grad_bias = add(grad_bias, dw.sum(0))
            if need_z:
                dz = from_pixel_major(dw @ rows, i1 - i0, ho, wo)
                gx_z, ga_k = conv_backward(dz, xc[i0:i1], a, stride, padding, need_x, need_a)
                ga = add(ga, ga_k)
                gx = add(gx, gx_z)
        if need_x:
            gxs.append(gx)

    return [
        join(gxs).to(x.dtype) if need_x else None,
        ga.to(rank_weight.dtype) if need_a and not detach else None,
        grad_rows.reshape(expand_weight.shape).to(expand_weight.dtype) if need_e else None,
        grad_bias.to(expand_bias.dtype) if need_b else None,
    ]

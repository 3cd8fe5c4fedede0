"""The low-rank algebra of the DAU (DESIGN.md section 3), written once: the reference's plain-autograd
``dau_conv2d_lowrank`` and the host code of backends "torch", "cuda" and "triton" all build on it (the kernels
themselves hold the per-pixel formulas, in Triton and in CUDA).

Notation: D = C*k*k, R = r + 1 with a bias (z augmented by a constant 1, the bias vector b_o becomes column r of
E_o) and R = r without one. With ``filt`` (O, R, C, k, k) the columns of every [E_o | b_o] as conv filters and
``rows`` (O, R, D) the same as matrices:

    z     = conv(x, rank_weight)                  (N, r, Ho, Wo);  za = [z, 1] (with a bias) or z
    y     = conv(x, filt)                         (N, O*R, Ho, Wo)     the O*r (+O) channel intermediate
    num_o = sum_q za_q y_{o,q}                    w_o . x_patch
    q_o   = za^T G_o za                           ||w_o||^2 = z^T G z + 2 h.z + c,  G_o = rows_o rows_o^T (R x R)
                                                  holds G = E^T E, h = E^T b and c = ||b||^2; clamped at 0
    out_o = num_o * inv_f(s_o),  s = sqrt(q),  inv_f = s / (1 + s^2) (squash) or 1 / s (l2); 0 where s == 0

Backward, per pixel, with g = d loss / d out (P, O):

    dnum_o = g_o inv_f                            d loss / d num_o
    dq_o   = g_o out_o (d inv_f / d q) / inv_f    d loss / d q_o  (0 in explanation mode)
    d za   = sum_o dnum_o y_o + 2 sum_o dq_o G_o za
    d rows_o = (through y) + 2 M_o rows_o,  M_o = sum_p dq_o za za^T      (expand_grads)
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from bcos_kernels.ops._dtypes import compute_dtype  # noqa: F401  (of z, s and the per-pixel factors)

# ------------------------------------------------------------------------------------------------ parameters


def expand_to_filters(expand_weight: torch.Tensor, in_channels: int, kernel_size: int) -> torch.Tensor:
    """expand_weight (D*O, r, 1, 1) -> conv filters (O, r, C, k, k): filter (o, q) is column q of E_o."""
    rows, rank = expand_weight.shape[:2]
    d = in_channels * kernel_size * kernel_size
    return (
        expand_weight.reshape(d, rows // d, rank)
        .permute(1, 2, 0)
        .reshape(rows // d, rank, in_channels, kernel_size, kernel_size)
    )


def bias_to_filters(expand_bias: torch.Tensor, in_channels: int, kernel_size: int) -> torch.Tensor:
    """expand_bias (D*O,) -> conv filters (O, C, k, k): filter o is b_o."""
    d = in_channels * kernel_size * kernel_size
    return expand_bias.reshape(d, -1).t().reshape(-1, in_channels, kernel_size, kernel_size)


def filters(
    expand_weight: torch.Tensor, expand_bias: Optional[torch.Tensor], in_channels: int, kernel_size: int
) -> torch.Tensor:
    """[E_o | b_o] as conv filters (O, R, C, k, k)."""
    filt = expand_to_filters(expand_weight, in_channels, kernel_size)
    if expand_bias is not None:
        filt = torch.cat([filt, bias_to_filters(expand_bias, in_channels, kernel_size).unsqueeze(1)], 1)
    return filt


def gram(rows: torch.Tensor) -> torch.Tensor:
    """G_o = rows_o rows_o^T (O, R, R) of ``rows`` (O, R, D): ||w_o||^2 = za^T G_o za."""
    return rows @ rows.transpose(1, 2)


def augment(z: torch.Tensor, has_bias: bool) -> torch.Tensor:
    """za: z (P, r) pixel-major or (N, r, H, W) with a channel of ones appended when there is a bias."""
    if not has_bias:
        return z.contiguous()
    return torch.cat([z, z.new_ones((z.shape[0], 1, *z.shape[2:]))], 1)


# ------------------------------------------------------------------------------------------------ the norm


def inverse_norm(s: torch.Tensor, norm: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """inv_f = 1 / f(s) and (d inv_f / d q) / inv_f with q = s^2, both 0 where s == 0 (an exactly-zero weight,
    which the original divides by)."""
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


def output_grads(
    grad_out: torch.Tensor, out: torch.Tensor, s: torch.Tensor, norm: str, detach: bool
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """dnum = d loss / d num and dq = d loss / d ||w||^2 (None in explanation mode: ||w|| is a constant), both
    (P, O) pixel-major in s's dtype, from grad_out and out (N, O, Ho, Wo) and s = ||w|| (P, O)."""
    inv, ratio = inverse_norm(s, norm)
    g = pixel_major(grad_out.to(s.dtype))
    dq = None if detach else g * pixel_major(out.to(s.dtype)) * ratio
    return g * inv, dq


def expand_grads(
    gfilt: torch.Tensor,
    m: torch.Tensor,
    rows: torch.Tensor,
    expand_weight: torch.Tensor,
    expand_bias: Optional[torch.Tensor],
    need_e: bool,
    need_b: bool,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The gradients of expand_weight and expand_bias (None where not asked for, in their dtypes) from the
    gradient gfilt (O, R, D) of the filters [E_o | b_o] through num and M = sum_p dq za za^T (O, R, R) (or
    (O*R, R)): d ||w_o||^2 / d rows_o adds 2 M_o rows_o."""
    o, big_r, d = rows.shape
    rank = expand_weight.shape[1]
    dfilt = torch.baddbmm(gfilt.reshape(o, big_r, d).to(rows.dtype), m.reshape(o, big_r, big_r), rows, alpha=2)
    grad_e = grad_b = None
    if need_e:
        grad_e = dfilt[:, :rank].permute(2, 0, 1).reshape(d * o, rank, 1, 1).to(expand_weight.dtype)
    if need_b:
        grad_b = dfilt[:, rank].t().reshape(d * o).to(expand_bias.dtype)
    return grad_e, grad_b


# ------------------------------------------------------------------------------- the conv-based backends' glue


def pixel_major(t: torch.Tensor) -> torch.Tensor:
    """(N, K, H, W) -> (N*H*W, K); a view for channels_last tensors."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def from_pixel_major(t: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """(N*H*W, K) -> (N, K, H, W) with channels_last strides (a view)."""
    return t.reshape(n, h, w, t.shape[1]).permute(0, 3, 1, 2)


def batch_chunks(n: int, per_image: int, budget: int) -> List[Tuple[int, int]]:
    """[i0, i1) ranges of the batch with at most ``budget`` elements per O*R-channel transient, at least one
    image each; one range under torch.compile (a traced loop would be unrolled) and for an empty batch (whose
    tensors are then empty, not missing)."""
    if torch.compiler.is_compiling() or n == 0:
        return [(0, n)]
    step = max(1, min(n, budget // max(per_image, 1)))
    return [(i, min(n, i + step)) for i in range(0, n, step)]


def conv_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride, padding, need_x: bool, need_w: bool
):
    """(grad x, grad weight) of conv2d(x, weight, None, stride, padding) (None where not needed)."""
    gx, gw, _ = torch.ops.aten.convolution_backward(
        grad, x, weight, None, stride, padding, [1, 1], False, [0, 0], 1, [need_x, need_w, False]
    )
    return gx, gw


def join(parts: List[torch.Tensor]) -> torch.Tensor:
    """The per-chunk results of a batch as one tensor (no copy for a single chunk)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def add(acc: Optional[torch.Tensor], t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """acc + t, where acc None is 0 (sums over the chunks of the batch)."""
    return t if acc is None else acc + t

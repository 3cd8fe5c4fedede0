"""Reference implementations of the CoDA dynamic alignment unit (DAU) convolution.

Paper: "Convolutional Dynamic Alignment Networks" (Boehle, Fritz, Schiele, CVPR 2021);
original code: github moboehle/CoDA-Nets, ``modules/DAUs.py`` (``DAUWeights``),
``modules/coda_conv.py`` (``CoDAConv2d``) and ``modules/norms.py``.

The layer
---------
For an input ``x`` (N, C, H, W), ``O`` DAUs of rank ``r`` and a square kernel ``k``
(``D = C*k*k`` is the size of one input patch):

    z      = conv2d(x, rank_weight, stride, padding)            (N, r, Ho, Wo)   no bias
    w      = conv1x1(z, expand_weight) + expand_bias             (N, D*O, Ho, Wo)
    w_o(p) = the D entries of DAU o at output pixel p
    out_o(p) = (w_o(p) . x_patch(p)) / f(||w_o(p)||)
    f(s)   = (1 + s^2) / s   for norm="squash"   (``Squashing``)
           = s               for norm="l2"       (``L2Norm(return_norm=True)``)

Parameter shapes (those of the original ``DAUWeights`` state_dict, groups=1):

    rank_weight   = weight_mod.weighting_f.0.weight   (r, C, k, k)
    expand_weight = weight_mod.weighting_f.1.weight   (D*O, r, 1, 1)
    expand_bias   = weight_mod.weighting_f.1.bias     (D*O,)          (or None: bias=False)

Channel ordering of ``expand_weight`` / ``expand_bias`` rows: the original views the
1x1-conv output (N, D*O, Ho, Wo) as (N, D, O, Ho, Wo), so row ``d*O + o`` belongs to
patch entry ``d`` of DAU ``o`` (patch-entry major, DAU minor). The patch entry index is
the ``F.unfold`` order ``d = c*k*k + i*k + j`` (channel, kernel row, kernel column),
which is also the memory order of a conv2d filter (C, k, k). Hence

    E_o = expand_weight.view(D, O, r)[:, o, :]   (D, r)      b_o = expand_bias.view(D, O)[:, o]

and the dynamic weight of DAU o is w_o = E_o z + b_o.

``padding=None`` means the original's default ``(kernel_size - 1) // 2``. The original
also has ``groups`` for the 1x1 conv; every published model uses groups=1, the only
value supported here.

Original quirks kept by ``dau_conv2d_original``: no epsilon anywhere; the squash factor
is ``(1 + norm**2) / norm`` with ``norm = torch.norm(w, 2, dim=1)``. So a DAU whose
dynamic weight is exactly zero (possible only without bias, e.g. zero input) gives
0/inf = 0 (squash, NaN gradients) or 0/0 = NaN (l2) there. The original repo's
``L2Norm()`` defaults to ``return_norm=False`` (it returns w/||w|| instead of the norm,
which does not broadcast in ``CoDAConv2d``); "l2" here is the evidently intended
``L2Norm(return_norm=True)``, i.e. f(s) = s.

The low-rank form (DESIGN.md section 3) never builds per-pixel weights; where the
dynamic weight is exactly zero it returns 0 with zero (finite) gradient.

Explanation mode (``detach=True``, the original ``CoDAConv2d.detach``): w and its norm
are constants for autograd; the gradient flows only through x_patch in w . x_patch.
The parameters then get no gradient.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

NORMS = ("squash", "l2")

IntPair = Union[int, Tuple[int, int]]


def default_padding(kernel_size: int) -> int:
    """The original's padding for padding=None."""
    return (kernel_size - 1) // 2


def _pad(kernel_size: int, padding: Optional[IntPair]) -> IntPair:
    return default_padding(kernel_size) if padding is None else padding


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def dau_conv2d_original(x: torch.Tensor, rank_weight: torch.Tensor, expand_weight: torch.Tensor,
                        expand_bias: Optional[torch.Tensor], *, kernel_size: int, stride: IntPair = 1,
                        padding: Optional[IntPair] = None, norm: str = "squash",
                        detach: bool = False) -> torch.Tensor:
    """The original computation, materialising the dynamic weights of every pixel.

    Memory: the (N, C*k*k, O, Ho, Wo) weight tensor (and autograd keeps it).
    """
    _check_norm(norm)
    padding = _pad(kernel_size, padding)
    n = x.shape[0]
    num_daus = expand_weight.shape[0] // (x.shape[1] * kernel_size * kernel_size)
    # DAUWeights.forward: the two convs of weighting_f, then view as (N, D, O, Ho, Wo).
    z = F.conv2d(x, rank_weight, None, stride, padding)
    w = F.conv2d(z, expand_weight, expand_bias)
    w = w.view(n, -1, num_daus, *w.shape[-2:])
    s = torch.norm(w, 2, dim=1, keepdim=True)
    f = (1 + s.pow(2)) / s if norm == "squash" else s
    # DAUWeights.unfold: input patches as (N, D, 1, Ho, Wo).
    patches = F.unfold(x, kernel_size, padding=padding, stride=stride).view(n, -1, 1, *w.shape[-2:])
    if detach:
        w = w.detach()
        f = f.detach()
    out = (patches * w).sum(1)
    return out / f.squeeze(1)


def expand_to_filters(expand_weight: torch.Tensor, in_channels: int, kernel_size: int) -> torch.Tensor:
    """expand_weight (D*O, r, 1, 1) -> conv filters (O, r, C, k, k): filter (o, q) is column q of E_o."""
    rows, rank = expand_weight.shape[:2]
    d = in_channels * kernel_size * kernel_size
    return expand_weight.reshape(d, rows // d, rank).permute(1, 2, 0).reshape(
        rows // d, rank, in_channels, kernel_size, kernel_size)


def bias_to_filters(expand_bias: torch.Tensor, in_channels: int, kernel_size: int) -> torch.Tensor:
    """expand_bias (D*O,) -> conv filters (O, C, k, k): filter o is b_o."""
    d = in_channels * kernel_size * kernel_size
    return expand_bias.reshape(d, -1).t().reshape(-1, in_channels, kernel_size, kernel_size)


def dau_conv2d_lowrank(x: torch.Tensor, rank_weight: torch.Tensor, expand_weight: torch.Tensor,
                       expand_bias: Optional[torch.Tensor], *, kernel_size: int, stride: IntPair = 1,
                       padding: Optional[IntPair] = None, norm: str = "squash",
                       detach: bool = False) -> torch.Tensor:
    """The same function without per-pixel weights (DESIGN.md section 3), plain autograd.

        w_o . x_patch = sum_q z_q (E_o[:, q] . x_patch) + b_o . x_patch   -> convs with O*r and O filters
        ||w_o||^2     = z^T G_o z + 2 h_o . z + c_o,   G_o = E_o^T E_o, h_o = E_o^T b_o, c_o = ||b_o||^2
    """
    _check_norm(norm)
    padding = _pad(kernel_size, padding)
    n, c = x.shape[:2]
    rank = rank_weight.shape[0]
    filt = expand_to_filters(expand_weight, c, kernel_size)          # (O, r, C, k, k)
    o = filt.shape[0]
    bfilt = None if expand_bias is None else bias_to_filters(expand_bias, c, kernel_size)  # (O, C, k, k)

    z = F.conv2d(x, rank_weight, None, stride, padding)              # (N, r, Ho, Wo)
    ho, wo = z.shape[-2:]
    ew, eb = filt, bfilt
    if detach:  # w = E z + b is a constant; x stays live inside the numerator's convs
        z = z.detach()
        ew = filt.detach()
        eb = None if bfilt is None else bfilt.detach()

    # Numerator: O*r filters combined with z, plus the O bias filters.
    y = F.conv2d(x, ew.reshape(o * rank, c, kernel_size, kernel_size), None, stride, padding)
    num = (y.view(n, o, rank, ho, wo) * z.unsqueeze(1)).sum(2)
    if eb is not None:
        num = num + F.conv2d(x, eb, None, stride, padding)

    # Squared norm of the dynamic weights from r x r Gram matrices.
    e = filt.reshape(o, rank, -1)                                    # (O, r, D): row q = E_o[:, q]
    gram = e @ e.transpose(1, 2)                                     # (O, r, r)
    q = torch.einsum("nshw,ost,nthw->nohw", z, gram, z)
    if bfilt is not None:
        bvec = bfilt.reshape(o, -1)                                  # (O, D)
        h = (e @ bvec.unsqueeze(2)).squeeze(2)                       # (O, r)
        q = q + 2 * torch.einsum("os,nshw->nohw", h, z) + bvec.square().sum(1).view(1, o, 1, 1)
    if detach:
        q = q.detach()
    q = q.clamp_min(0)
    # Exactly-zero weights: output 0 and zero gradient (the original gives NaN there).
    live = q > 0
    q_safe = torch.where(live, q, torch.ones_like(q))
    s = q_safe.sqrt()
    inv_f = s / (1 + q_safe) if norm == "squash" else 1 / s
    return torch.where(live, num * inv_f, torch.zeros_like(num))

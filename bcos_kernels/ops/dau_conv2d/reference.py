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

from bcos_kernels.ops.dau_conv2d import lowrank
from bcos_kernels.ops.dau_conv2d.lowrank import bias_to_filters, expand_to_filters  # noqa: F401  (public here too)

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


def dau_conv2d_original(
    x: torch.Tensor,
    rank_weight: torch.Tensor,
    expand_weight: torch.Tensor,
    expand_bias: Optional[torch.Tensor],
    *,
    kernel_size: int,
    stride: IntPair = 1,
    padding: Optional[IntPair] = None,
    norm: str = "squash",
    detach: bool = False,
) -> torch.Tensor:
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


def dau_conv2d_lowrank(
    x, rank_weight, expand_weight, expand_bias, *, kernel_size, stride=1, padding=None, norm="squash", detach=False
):
    """``dau_conv2d_original`` (the same arguments) without per-pixel weights (DESIGN.md section 3, the algebra
    of lowrank.py), plain autograd. With za = [z, 1] (z alone without a bias) and the filters [E_o | b_o]:

        w_o . x_patch = sum_q za_q ([E_o | b_o][:, q] . x_patch)     -> one conv with O*R filters
        ||w_o||^2     = za^T G_o za,   G_o = [E_o | b_o]^T [E_o | b_o]   (R x R)
    """
    _check_norm(norm)
    padding = _pad(kernel_size, padding)
    n, c = x.shape[:2]
    filt = lowrank.filters(expand_weight, expand_bias, c, kernel_size)  # (O, R, C, k, k)
    o, big_r = filt.shape[:2]
    z = F.conv2d(x, rank_weight, None, stride, padding)  # (N, r, Ho, Wo)
    ho, wo = z.shape[-2:]
    if detach:  # w = E z + b (and its norm) is a constant; x stays live inside the numerator's conv
        z, filt = z.detach(), filt.detach()
    za = lowrank.augment(z, expand_bias is not None)  # (N, R, Ho, Wo)
    y = F.conv2d(x, filt.reshape(o * big_r, c, kernel_size, kernel_size), None, stride, padding)
    num = (y.view(n, o, big_r, ho, wo) * za.unsqueeze(1)).sum(2)
    q = torch.einsum("nshw,ost,nthw->nohw", za, lowrank.gram(filt.reshape(o, big_r, -1)), za).clamp_min(0)
    # Exactly-zero weights: output 0 and zero gradient (the original gives NaN there); sqrt(0) is kept out of
    # the graph because its gradient is infinite.
    live = q > 0
    inv_f, _ = lowrank.inverse_norm(torch.where(live, q, torch.ones_like(q)).sqrt(), norm)
    return torch.where(live, num * inv_f, torch.zeros_like(num))

"""Exact pure-PyTorch reference of the B-cos conv2d (the specification); its math is shared with the B-cos
linear (bcos_kernels/ops/bcos_linear/reference.py).

One function covers B-cos v2 (`bcos` package 0.1.3), v1 (moboehle/B-cos: the
``scale`` divisor) and B-cosification (bias, unnormalised weights, b as a
learnable tensor). The operations follow the original code step by step, with
its epsilons, so that fp32 results agree with it to rounding:

    lin = conv2d(x, w / ||w||) (+ bias)         # ||w|| per output filter
    lin = max over the M MaxOut units            # channel o*M + m
    n   = sqrt(sum over the patch of x^2 + 1e-6) # conv;  linear: ||x|| + 1e-12
    out = (|lin| / n) * lin                      # b == 2
    out = (|lin / n| + 1e-6) ** (b - 1) * lin    # any other b (b == 1: lin)
    out = out / scale

Where the original is broken we do the mathematically right thing:
dilation > 1 (the original's norm has O*M instead of O channels with MaxOut,
and tuple dilations crash) uses the dilated taps for the patch norm.

A tensor ``b`` (B-cosification's learnable b) always takes the general
formula, so that b gets a gradient; B-cosification starts b at 1 + 1e-6 for
exactly that reason.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

Pair = Tuple[int, int]
BType = Union[float, torch.Tensor]

# The stabilising terms of the original code.
CONV_NORM_EPS = 1e-6  # added to the patch's sum of squares, inside the sqrt
COS_EPS = 1e-6  # added to |cos| before the power (general b only)


def _pair(v) -> Pair:
    return (v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


def special_b(b: BType) -> Optional[float]:
    """1.0 or 2.0 when the original takes its exact b == 1 / b == 2 branch, else None."""
    if isinstance(b, torch.Tensor):
        return None
    return float(b) if b in (1, 2) else None


def normalized_weight(weight: torch.Tensor) -> torch.Tensor:
    """w / ||w|| with one norm per output filter (dim 0), as the original NormedConv2d/NormedLinear."""
    dims = tuple(range(1, weight.dim()))
    return weight / torch.linalg.vector_norm(weight, dim=dims, keepdim=True)


def patch_norms(
    x: torch.Tensor, kernel_size: Pair, stride: Pair, padding: Pair, dilation: Pair, groups: int
) -> torch.Tensor:
    """sqrt(sum of x^2 over each conv patch + 1e-6), one value per group: (N, G, Ho, Wo).

    Without dilation this is the original's avg_pool2d(sum_c x^2) * k_h*k_w; with
    dilation (and where avg_pool2d refuses the padding) the same sum as a conv
    with a ones kernel over the dilated taps.
    """
    kh, kw = kernel_size
    squares = x**2
    n, c = x.shape[:2]
    squares = squares.unflatten(1, (groups, c // groups)).sum(2)
    pool_ok = dilation == (1, 1) and padding[0] <= kh // 2 and padding[1] <= kw // 2
    if pool_ok:
        summed = F.avg_pool2d(squares, kernel_size, stride=stride, padding=padding) * (kh * kw)
    else:
        ones = squares.new_ones(groups, 1, kh, kw)
        summed = F.conv2d(squares, ones, None, stride, padding, dilation, groups)
    return (summed + CONV_NORM_EPS).sqrt()


def dynamic_scale(lin: torch.Tensor, norm: torch.Tensor, b: BType, detach: bool) -> torch.Tensor:
    """The factor |cos|^(b-1) of the original (b != 1), computed from detached values in explanation mode."""
    if detach:
        lin, norm = lin.detach(), norm.detach()
    if special_b(b) == 2.0:
        return lin.abs() / norm
    return ((lin / norm).abs() + COS_EPS).pow(b - 1)


def max_out_reduce(lin: torch.Tensor, max_out: int, dim: int) -> torch.Tensor:
    if max_out == 1:
        return lin
    out_channels = lin.shape[dim] // max_out
    return lin.unflatten(dim, (out_channels, max_out)).max(dim=dim + 1 if dim >= 0 else dim).values


def bcos_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    b: BType = 2.0,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    max_out: int = 1,
    normalize_weight: bool = True,
    scale: float = 1.0,
    detach: bool = False,
    channel_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """B-cos conv2d. weight: (O*M, C/groups, kh, kw); returns (N, O, Ho, Wo). ``channel_scale`` (O,): a factor
    per output channel applied last (an eval-mode batch norm folded in; not part of the original layer)."""
    out = _bcos_conv2d(x, weight, bias, b, stride, padding, dilation, groups, max_out, normalize_weight, scale, detach)
    return out if channel_scale is None else out * channel_scale[None, :, None, None]


def _bcos_conv2d(x, weight, bias, b, stride, padding, dilation, groups, max_out, normalize_weight, scale, detach):
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    w = normalized_weight(weight) if normalize_weight else weight
    lin = F.conv2d(x, w, bias, stride, padding, dilation, groups)
    lin = max_out_reduce(lin, max_out, 1)
    if special_b(b) == 1.0:
        return lin / scale
    norm = patch_norms(x, tuple(weight.shape[2:]), stride, padding, dilation, groups)
    if groups > 1:
        # (N, G, Ho, Wo) -> (N, O, Ho, Wo): output channel o belongs to group o // (O/G)
        norm = norm.repeat_interleave(lin.shape[1] // groups, dim=1)
    return dynamic_scale(lin, norm, b, detach) * lin / scale

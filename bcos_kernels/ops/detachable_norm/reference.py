"""Exact reference of the B-cos ViTs' detachable norms: `bcos.modules.norms.centered_norms`
``DetachableLayerNorm`` (the transformers' norm) and ``DetachableGroupNorm2d`` (with one group:
``DetachableGNLayerNorm2d``, the conv stem's norm of the ViT-C models), operation for operation.

Out of explanation mode both are the plain ATen norms. In explanation mode (``detach``) the variance is a
constant for autograd but the mean is not: the norm stays linear in its input, ``(x - mean(x)) / std``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def layer_norm(
    x: Tensor,
    normalized_shape: Sequence[int],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    detach: bool,
) -> Tensor:
    if not detach:
        return F.layer_norm(x, tuple(normalized_shape), weight, bias, eps)
    dims = tuple(range(-len(normalized_shape), 0))
    var, mean = torch.var_mean(x, dim=dims, unbiased=False, keepdim=True)
    std = (var.detach() + eps).sqrt_()
    out = (x - mean) / std
    if weight is not None:
        out = weight * out
    if bias is not None:
        out = out + bias
    return out


def group_norm(
    x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, detach: bool
) -> Tensor:
    if not detach:
        return F.group_norm(x, num_groups, weight, bias, eps)
    n, c = x.shape[:2]
    grouped = x.reshape(n, num_groups, c // num_groups, *x.shape[2:])
    var, mean = torch.var_mean(grouped, dim=tuple(range(2, grouped.dim())), unbiased=False, keepdim=True)
    std = (var.detach() + eps).sqrt()
    out = ((grouped - mean) / std).reshape(x.shape)
    if weight is not None:
        out = weight[None, ..., None, None] * out
    if bias is not None:
        out = out + bias[None, ..., None, None]
    return out

"""Exact reference of the B-cos models' uncentered batch norm: `bcos.modules.norms.uncentered_norms`
(``batch_norm_uncentered_2d``, used by ``BatchNormUncentered2d``), operation for operation (same order, so the
same rounding).

B-cos networks must stay dynamic-linear, so the norm divides by the standard deviation without subtracting the
mean: ``out = input / sqrt(var + eps) * weight (+ bias)``, var the biased batch variance over (N, H, W) in
training (then ``running_var`` is updated in place: ``(1 - momentum) * running_var + momentum * var``) and
``running_var`` in eval. ``detach`` (explanation mode) computes the statistics of ``input.detach()``.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor


def batch_norm_uncentered_2d(
    input: Tensor,
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: float,
    eps: float,
    detach: bool,
) -> Tensor:
    if input.dim() != 4:
        raise ValueError(f"input must be (N, C, H, W), got shape {tuple(input.shape)}")
    if training:
        stats_of = input.detach() if detach else input
        var = stats_of.var(dim=(0, 2, 3), unbiased=False)
        if running_var is not None:
            running_var.copy_((1 - momentum) * running_var + momentum * var.detach())
    else:
        if running_var is None:
            raise ValueError("running_var must be tracked to evaluate the norm in eval mode")
        var = running_var
    std = (var + eps).sqrt()[None, ..., None, None]
    result = input / std
    if weight is not None:
        result = weight[None, ..., None, None] * result
    if bias is not None:
        result = result + bias[None, ..., None, None]
    return result

"""Exact pure-PyTorch reference of the B-cos linear (the specification): the B-cos conv's math
(bcos_kernels/ops/bcos_conv2d/reference.py) over the last dim, with the original's norm ||x|| + 1e-12."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from bcos_kernels.ops.bcos_conv2d import reference as ref

LINEAR_NORM_EPS = 1e-12  # added to ||x||, outside the sqrt


def bcos_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    b: ref.BType = 2.0,
    max_out: int = 1,
    normalize_weight: bool = True,
    scale: float = 1.0,
    detach: bool = False,
) -> torch.Tensor:
    """B-cos linear over the last dim. weight: (O*M, D); x: (..., D); returns (..., O)."""
    w = ref.normalized_weight(weight) if normalize_weight else weight
    lin = ref.max_out_reduce(F.linear(x, w, bias), max_out, -1)
    if ref.special_b(b) == 1.0:
        return lin / scale
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True) + LINEAR_NORM_EPS
    return ref.dynamic_scale(lin, norm, b, detach) * lin / scale

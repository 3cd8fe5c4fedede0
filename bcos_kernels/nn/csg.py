"""Drop-in replacement of CSG's ``LearnableMaskLayer`` (``VOCPart/train/resnet_std.py``)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from bcos_kernels.ops.class_specific_gate import class_specific_gate, density, density_loss
from bcos_kernels.ops.class_specific_gate import reference as ref


class ClassSpecificGate(nn.Module):
    """Class-specific channel gate: ``out[n, c] = x[n, c] * mask[c, labels[n]]`` in training, identity in eval.

    ``mask``: parameter (feature_dim, num_classes), initialised to 0.5 -- the
    original's name, shape and initialisation, so its state_dicts load
    unchanged. ``forward(x, labels)`` returns ``(out, reg)`` with ``reg`` the
    original's L1 regulariser ``relu(||mask||_1 - 0.2 * numel)`` (also in eval,
    where ``out`` is x itself and ``labels`` may be None). x: (N, C, H, W) or
    (N, C); labels: (N,) integer class indices (a list is converted).
    ``last_layer_mask`` is stored and otherwise ignored, as in the original.
    Call :meth:`clip_lmask` after each optimiser step of the mask, as the
    original training script does. ``backend``: as
    :func:`bcos_kernels.ops.class_specific_gate`.
    """

    def __init__(self, feature_dim: int, num_classes: int, backend: Optional[str] = None):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)  # unused, kept for attribute compatibility (no state)
        self.mask = nn.Parameter(torch.full((feature_dim, num_classes), 0.5))
        self.backend = backend

    def get_channel_mask(self) -> torch.Tensor:
        return self.mask

    def get_density(self) -> torch.Tensor:
        return density(self.mask)

    def loss_function(self) -> torch.Tensor:
        return density_loss(self.mask)

    def clip_lmask(self) -> None:
        ref.clip_mask_(self.mask)

    def forward(self, x: torch.Tensor, labels, last_layer_mask=None) -> Tuple[torch.Tensor, torch.Tensor]:
        if last_layer_mask is not None:
            self.last_layer_mask = last_layer_mask
        if labels is not None and not isinstance(labels, torch.Tensor):
            labels = torch.as_tensor(labels, device=x.device)
        mask = self.mask if self.mask.dtype == x.dtype else self.mask.to(x.dtype)
        out = class_specific_gate(x, mask, labels, training=self.training, backend=self.backend)
        return out, self.loss_function()

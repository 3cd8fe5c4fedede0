"""Exact pure-PyTorch reference of CSG's class-specific gate (the specification).

Source: github hyliang96/CSGCNN, ``VOCPart/train/resnet_std.py``, class
``LearnableMaskLayer`` (a mask M of shape (C, K), initialised to 0.5, that
gates the channels of the last feature map by the sample's class):

* training: ``out[n, c, ...] = x[n, c, ...] * M[c, labels[n]]``. The original
  builds a full-size gate tensor of zeros in the *default dtype* (fp32),
  copies ``M[:, label]`` into it sample by sample and multiplies it with x, so
  a float16 x gives a float32 output; this reference does the same copy in one
  vectorised step (same values, same autograd graph, same saved tensors).
  The original handles 4-D feature maps only; a 2-D x (N, C) is gated the same way.
* eval: the identity -- the original returns x itself (no copy), labels unused.
* ``labels=None``: the original ResNet skips the gate altogether; the layer
  itself, in training mode, fails iterating over None (TypeError), as here.
* regulariser (returned by the layer's forward next to the output, also in
  eval): ``relu(||M||_1 - 0.2 * numel(M))`` -- an L1 norm with a free budget of
  20 % density, no normalisation. ``get_density`` is ``||M||_1 / numel(M)``.
* ``clip_lmask`` (after each optimiser step of the CSG path): divide each row
  (channel) by its maximum over the classes, clamp to [0, 1], in place. A row
  whose maximum is 0 gives NaN/inf, as in the original.
"""

from __future__ import annotations

import torch

# The free density budget of the L1 regulariser.
DENSITY_BUDGET = 0.2


def class_specific_gate(
    x: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, *, training: bool = True
) -> torch.Tensor:
    """x: (N, C, H, W) or (N, C); mask: (C, K); labels: (N,) ints in [0, K)."""
    if not training:
        return x
    if labels is None:
        raise TypeError("class_specific_gate: labels=None cannot be iterated (the original fails here too)")
    gate = torch.zeros(x.shape, device=x.device)
    per_sample = mask[:, labels].t()  # (N, C): row n is M[:, labels[n]]
    gate[...] = per_sample.reshape(per_sample.shape + (1,) * (x.dim() - 2))
    return gate * x


def csg_density(mask: torch.Tensor) -> torch.Tensor:
    """||M||_1 / numel(M) (the original's get_density)."""
    return torch.norm(mask, p=1) / mask.numel()


def csg_density_loss(mask: torch.Tensor) -> torch.Tensor:
    """relu(||M||_1 - 0.2 * numel(M)) (the original's loss_function)."""
    return torch.relu(torch.norm(mask, p=1) - mask.numel() * DENSITY_BUDGET)


@torch.no_grad()
def clip_mask_(mask: torch.Tensor) -> torch.Tensor:
    """In place: each row divided by its max over the classes, then clamped to [0, 1] (clip_lmask)."""
    row_max = torch.max(mask, dim=1)[0].view(-1, 1)
    mask.copy_(torch.clamp(mask / row_max, min=0, max=1))
    return mask

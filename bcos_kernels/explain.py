"""Batched explanations of dynamic-linear models (B-cos, CoDA).

In explanation mode (the dynamic weights detached) such a model is, per input, a linear map W(x): the gradient
of one logit with respect to the input is that map's row, the "dynamic linear weights". The `bcos` package's
``model.explain(x)`` computes it for one image at a time. Here a whole batch takes one forward and one backward:
the gradient of the sum over samples of each sample's chosen logit, which gives every sample its own row as long
as the samples do not interact (eval mode; batch norm in training mode mixes them, as it would the
predictions).
"""

from __future__ import annotations

import warnings
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["explain", "explanation_mode", "gradient_to_image"]

Target = Union[None, int, Sequence[int], Tensor]


def gradient_to_image(
    image: Tensor, linear_mapping: Tensor, smooth: int = 15, alpha_percentile: float = 99.5
) -> np.ndarray:
    """The RGBA explanation of the B-cos papers (the `bcos` package's ``gradient_to_image``) for one image
    (C, H, W) -> (H, W, 4) or a batch (N, C, H, W) -> (N, H, W, 4), each image normalised on its own.

    The input is the 6-channel (r, g, b, 1-r, 1-g, 1-b) encoding. Colour: each pixel's weight vector scaled to a
    max |entry| of 1, negatives dropped, and each channel pair (c, 1-c) normalised to sum to 1. Alpha: the L2 norm
    of the weights where the contribution x . w is not negative, smoothed by a ``smooth`` x ``smooth`` mean and
    divided by its ``alpha_percentile`` percentile (per image), clipped to [0, 1].
    """
    single = image.dim() == 3
    if single:
        image, linear_mapping = image[None], linear_mapping[None]
    if image.dim() != 4 or image.shape != linear_mapping.shape:
        raise ValueError(
            f"image and linear_mapping must both be (C, H, W) or (N, C, H, W) with the same shape, got "
            f"{tuple(image.shape)} and {tuple(linear_mapping.shape)}"
        )
    if image.shape[1] != 6:
        raise ValueError(
            f"gradient_to_image needs the 6-channel (x, 1 - x) input encoding, got {image.shape[1]} channels"
        )
    contributions = (image * linear_mapping).sum(1, keepdim=True)
    rgb = linear_mapping / (linear_mapping.abs().amax(1, keepdim=True) + 1e-12)
    rgb = rgb.clamp(min=0)
    rgb = rgb[:, :3] / (rgb[:, :3] + rgb[:, 3:] + 1e-12)
    # the L2 norm over 6 channels as a sum of squares: ``norm(dim=1)`` reduces across strides, ~15x slower here
    alpha = linear_mapping.square().sum(1, keepdim=True).sqrt()
    alpha = torch.where(contributions < 0, 1e-12, alpha)
    if smooth:
        alpha = _box_mean(alpha, smooth)
    alpha = (alpha / _quantile_rows(alpha.flatten(1), alpha_percentile / 100)[:, None, None, None]).clip(0, 1)
    rgba = torch.cat([rgb, alpha], dim=1).permute(0, 2, 3, 1)
    out = rgba.detach().cpu().numpy()
    return out[0] if single else out


def _box_mean(alpha: Tensor, size: int) -> Tensor:
    """``F.avg_pool2d(alpha, size, stride=1, padding=(size - 1) // 2)`` (zeros padded and counted) as two 1-D means,
    ``2 size`` additions a pixel instead of ``size**2``."""
    pad = (size - 1) // 2
    rows = F.avg_pool2d(alpha, (size, 1), stride=1, padding=(pad, 0))
    return F.avg_pool2d(rows, (1, size), stride=1, padding=(0, pad))


def _quantile_rows(values: Tensor, q: float) -> Tensor:
    """``torch.quantile(values, q, dim=1)`` (linear interpolation) from the two order statistics it interpolates,
    found by ``kthvalue`` (linear time) rather than by sorting every row."""
    n = values.shape[1]
    position = q * (n - 1)
    below = int(position)
    above = min(below + 1, n - 1)
    low = values.kthvalue(below + 1, dim=1).values
    if above == below:
        return low
    high = values.kthvalue(above + 1, dim=1).values
    return torch.lerp(low, high, torch.tensor(position - below, dtype=values.dtype, device=values.device))


class explanation_mode:
    """Context manager: every layer of ``model`` with an explanation switch in explanation mode, restored to its
    previous state on exit. Switches: ``set_explanation_mode(flag)`` (the `bcos` package, B-cosification, ours) or
    ``explanation_mode(detach)`` with a ``detach`` attribute (moboehle/B-cos v1, CoDA-Nets)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.saved: List[Tuple[nn.Module, bool]] = []

    @staticmethod
    def _set(module: nn.Module, flag: bool) -> None:
        if hasattr(module, "set_explanation_mode"):
            module.set_explanation_mode(flag)
        else:
            module.explanation_mode(flag)

    def __enter__(self) -> nn.Module:
        for module in self.model.modules():
            switchable = hasattr(module, "set_explanation_mode") or (
                callable(getattr(module, "explanation_mode", None))
                and isinstance(getattr(module, "detach", None), bool)
            )
            if switchable:
                self.saved.append((module, bool(getattr(module, "detach", False))))
                self._set(module, True)
        return self.model

    def __exit__(self, *exc) -> None:
        for module, flag in self.saved:
            self._set(module, flag)
        self.saved = []


class _parameters_frozen:
    """requires_grad off on every parameter for the duration: the explanation needs the input's gradient only,
    and a custom backward is told (needs_input_grad) what requires grad, not what the call asks for, so the fused
    layers would otherwise compute every weight gradient too."""

    def __init__(self, model: nn.Module):
        self.params = [p for p in model.parameters() if p.requires_grad]

    def __enter__(self) -> None:
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc) -> None:
        for p in self.params:
            p.requires_grad_(True)


def _targets(target: Target, prediction: Tensor, classes: int) -> Tensor:
    n = prediction.shape[0]
    if target is None:
        return prediction
    if isinstance(target, (bool, float)):
        raise TypeError(f"target must be None, an int or one int per sample, got {target!r}")
    if isinstance(target, int):
        chosen = torch.full((n,), target, dtype=torch.long, device=prediction.device)
    else:
        chosen = torch.as_tensor(target, device=prediction.device)
        if chosen.dtype.is_floating_point or chosen.dtype == torch.bool or chosen.dim() != 1 or chosen.shape[0] != n:
            raise ValueError(
                f"target must be None, an int or {n} integer classes (one per sample), got a "
                f"{chosen.dtype} tensor of shape {tuple(chosen.shape)}"
            )
        chosen = chosen.long()
    if ((chosen < 0) | (chosen >= classes)).any():
        raise ValueError(f"target classes must lie in [0, {classes}), got {chosen.tolist()}")
    return chosen


def explain(
    model: nn.Module, x: Tensor, target: Target = None, *, smooth: int = 15, alpha_percentile: float = 99.5
) -> Dict[str, object]:
    """Explanations of a batch, in one forward and one backward pass of ``model`` in explanation mode.

    x: (N, C, H, W) (the caller's tensor gets no gradient). target: None (explain each sample's prediction),
    an int (the same class for all) or N classes. ``smooth`` / ``alpha_percentile``: as ``gradient_to_image``.

    Returns a dict, per sample what the `bcos` package's ``model.explain`` returns for one image:
      "prediction" (N,) the argmax logit, "explained_class" (N,), "dynamic_linear_weights" (N, C, H, W) the
      gradient of the explained logit w.r.t. the input, "contribution_map" (N, H, W) = sum over C of
      x * weights, "explanation" (N, H, W, 4) numpy RGBA (``gradient_to_image``; None unless C == 6), and
      "logits" (N, classes).
    """
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(
            f"x must be a (N, C, H, W) tensor, got {tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
        )
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if model.training:
        warnings.warn(
            "explain: the model is in training mode; its explanations differ from eval mode and the "
            "samples of the batch may interact (batch norm). Call model.eval() first.",
            stacklevel=2,
        )
    inputs = x.detach().requires_grad_(True)
    with torch.enable_grad(), explanation_mode(model), _parameters_frozen(model):
        logits = model(inputs)
        if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
            raise ValueError(
                f"explain needs a model returning (N, classes) logits, got "
                f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}"
            )
        prediction = logits.detach().max(1).indices
        explained = _targets(target, prediction, logits.shape[1])
        # each sample's logit only depends on its own input, so one backward gives all the rows
        chosen = logits.gather(1, explained[:, None]).sum()
        (weights,) = torch.autograd.grad(chosen, inputs)
    contribution_map = (x.detach() * weights).sum(1)
    explanation = gradient_to_image(x.detach(), weights, smooth, alpha_percentile) if x.shape[1] == 6 else None
    return {
        "prediction": prediction,
        "explained_class": explained,
        "dynamic_linear_weights": weights,
        "contribution_map": contribution_map,
        "explanation": explanation,
        "logits": logits.detach(),
    }

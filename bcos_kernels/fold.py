"""``fold_batchnorm(model, example_input)``: eval-mode uncentered batch norms into the B-cos conv epilogue.

In eval mode the uncentered batch norm of the B-cos models is a fixed per-channel factor
``weight / sqrt(running_var + eps)`` (plus a bias the B-cos models remove). When a B-cos conv's output goes
straight into such a norm, the conv can apply that factor in its fused epilogue, saving the norm's full pass over
the activations (forward and backward).

Which norm follows which conv is read from one forward of ``example_input`` (the norm's input is the conv's
output tensor), so any model code works, not only nn.Sequential. Folding then re-runs the example and requires
the same outputs: a conv output that also went somewhere else than its norm would be caught there, and nothing
is folded.

Training mode is untouched: a folded pair runs unfolded whenever the norm uses batch statistics, and the
running_var update stays the norm's.
"""

from __future__ import annotations

import warnings
from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn

from bcos_kernels.nn.bcos import BcosConv2d
from bcos_kernels.nn.norms import BatchNormUncentered2d

__all__ = ["fold_batchnorm", "unfold_batchnorm"]


def _is_uncentered_batch_norm(module: nn.Module) -> bool:
    # ours, or the `bcos` package's (same name and buffers; recognised by structure, it is not imported here)
    return isinstance(module, BatchNormUncentered2d) or (
        isinstance(module, nn.BatchNorm2d) and type(module).__name__ == "BatchNormUncentered2d"
    )


def _replace_children(model: nn.Module, replacements: Dict[int, nn.Module]) -> None:
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if id(child) in replacements:
                setattr(parent, name, replacements[id(child)])


def _conv_norm_pairs(model: nn.Module, example_input) -> List[Tuple[BcosConv2d, nn.Module]]:
    """(conv, norm) pairs where the norm's input, in one eval-mode forward, is the conv's output; convs and norms
    called more than once are left out (a shared module may feed different consumers)."""
    outputs: Dict[int, Tuple[BcosConv2d, Tensor]] = {}  # id(output tensor) -> (conv, tensor kept alive)
    calls: Dict[int, int] = {}
    inputs: List[Tuple[nn.Module, Tensor]] = []

    def after_conv(conv, args, output):
        calls[id(conv)] = calls.get(id(conv), 0) + 1
        outputs[id(output)] = (conv, output)

    def before_norm(norm, args):
        calls[id(norm)] = calls.get(id(norm), 0) + 1
        inputs.append((norm, args[0]))

    handles = []
    for module in model.modules():
        if isinstance(module, BcosConv2d):
            handles.append(module.register_forward_hook(after_conv))
        elif _is_uncentered_batch_norm(module):
            handles.append(module.register_forward_pre_hook(before_norm))
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
    pairs = []
    for norm, tensor in inputs:
        found = outputs.get(id(tensor))
        if found is not None and found[1] is tensor:
            conv = found[0]
            if calls[id(conv)] == 1 and calls[id(norm)] == 1:
                pairs.append((conv, norm))
    return pairs


def unfold_batchnorm(model: nn.Module) -> nn.Module:
    """Undo ``fold_batchnorm`` (the norms stay ``bcos_kernels.nn.BatchNormUncentered2d``)."""
    for module in model.modules():
        if isinstance(module, BcosConv2d) and "folded_norm" in module.__dict__:
            module.__dict__.pop("folded_norm").folded = False
    return model


def fold_batchnorm(model: nn.Module, example_input, rtol: float = 1e-4) -> nn.Module:
    """Fold, in place, each uncentered batch norm that directly follows a ``bcos_kernels.nn`` B-cos conv into
    that conv's fused epilogue (for eval mode). Run ``bcos_kernels.convert(model)`` first: original `bcos`
    convs are not folded. The `bcos` package's norms are replaced by ``bcos_kernels.nn.BatchNormUncentered2d``
    sharing their parameters and buffers (same state_dict).

    ``example_input``: any valid input (one small batch is enough); the model runs on it twice in eval mode,
    without gradients and without touching the running statistics. Raises if the folded model's output differs
    from the unfolded one by more than ``rtol`` times the output's largest magnitude. Returns the model.
    """
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            expected = model(example_input)
        pairs = _conv_norm_pairs(model, example_input)
        # the `bcos` package's norm -> ours, the same parameters and buffers
        swaps = {
            id(norm): BatchNormUncentered2d.from_module(norm)
            for _, norm in pairs
            if not isinstance(norm, BatchNormUncentered2d)
        }
        _replace_children(model, swaps)
        for conv, norm in pairs:
            new_norm = swaps.get(id(norm), norm)
            modes[new_norm] = modes.pop(norm)
            if new_norm.running_var is None:
                continue  # no fixed eval-mode scale (batch statistics in eval mode too)
            conv.fold_norm(new_norm)
        if not pairs:
            warnings.warn(
                "fold_batchnorm found no bcos_kernels B-cos conv followed by an uncentered batch norm "
                "(convert the model with bcos_kernels.convert first)",
                stacklevel=2,
            )
            return model
        with torch.no_grad():
            folded = model(example_input)
        err = (folded.double() - expected.double()).abs().max().item()
        limit = rtol * expected.double().abs().max().item()
        if not err <= limit:
            unfold_batchnorm(model)
            raise RuntimeError(
                f"fold_batchnorm: the folded model's output differs from the unfolded one by {err:.3g}"
                f" (limit {limit:.3g}); a conv output probably also feeds something other than its "
                f"norm. Nothing was folded."
            )
    finally:
        for module, training in modes.items():
            module.training = training
    return model

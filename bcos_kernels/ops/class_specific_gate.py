"""Front door of CSG's class-specific gate.

Semantics: :mod:`bcos_kernels.reference.csg`. Training:
``out[n, c, ...] = x[n, c, ...] * mask[c, labels[n]]``; eval: the identity
(x itself is returned, no copy, as the original). Backend "torch" runs the
custom op ``bcos_kernels::class_specific_gate`` below: it gathers
``mask[:, labels]`` to (N, C) and broadcasts it, never building the full-size
gate the original builds (and keeps for backward), and computes

    d mask[c, k] = sum over samples n with labels[n] == k of sum_hw (g * x)[n, c]

as a one-hot matmul (deterministic on every device), accumulated in fp32 or wider.

Unlike the original (whose gate is fp32 whatever x is), mask must have x's
dtype and the output has it too; :class:`bcos_kernels.nn.ClassSpecificGate`
casts its fp32 parameter to x's dtype (autocast) on the way in.
"""
from __future__ import annotations

from typing import Optional

import torch

from bcos_kernels import backends
from bcos_kernels.ops._checks import check_like, check_tensor


def _check_labels(labels, x: torch.Tensor, num_classes: int) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor of class indices, got {type(labels).__name__}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must be an integer tensor (int64), got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != x.shape[0]:
        raise ValueError(f"labels must have shape ({x.shape[0]},) (one label per sample of x), "
                         f"got {tuple(labels.shape)}")
    if labels.device != x.device:
        raise ValueError(f"labels is on {labels.device} but x is on {x.device}; they must be on the same device")
    # The range check reads the labels back (a GPU synchronisation); under torch.compile it is left to
    # the bounds check of the gather.
    if labels.numel() and not torch.compiler.is_compiling():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes}) (mask has {num_classes} classes), "
                             f"got values in [{lo}, {hi}]")
    return labels.long()


def class_specific_gate(x: torch.Tensor, mask: torch.Tensor, labels: Optional[torch.Tensor], *,
                        training: bool = True, backend: Optional[str] = None) -> torch.Tensor:
    """x: (N, C) or (N, C, H, W); mask: (C, K) with x's dtype; labels: (N,) integers in [0, K).

    training=False returns x itself (labels may then be None).
    """
    check_tensor("x", x, (2, 4))
    check_tensor("mask", mask, 2)
    check_like("mask", mask, "x", x)
    if mask.shape[0] != x.shape[1]:
        raise ValueError(f"mask must have shape (C, num_classes) with C = {x.shape[1]} channels of x, "
                         f"got {tuple(mask.shape)}")
    if mask.shape[1] < 1:
        raise ValueError(f"mask must have at least one class column, got shape {tuple(mask.shape)}")
    if labels is None:
        if training:
            raise ValueError("labels is None but training=True: the gate needs one class label per sample "
                             "(the original ResNet skips the gate when it gets no labels)")
    else:
        labels = _check_labels(labels, x, mask.shape[1])
    name = backends.resolve("class_specific_gate", backend, x.device, implemented={})
    assert name == "torch", name
    if not training:
        return x
    return class_specific_gate_op(x, mask, labels)


# ---------------------------------------------------------------------------
# backend "torch": the custom op


def _gathered(mask: torch.Tensor, labels: torch.Tensor, ndim: int) -> torch.Tensor:
    """mask[:, labels] as (N, C) broadcastable against x of rank ndim."""
    g = mask.index_select(1, labels).t()
    return g.reshape(g.shape + (1,) * (ndim - 2))


@torch.library.custom_op("bcos_kernels::class_specific_gate", mutates_args=())
def class_specific_gate_op(x: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """x * mask[:, labels] broadcast per sample (training mode)."""
    out = torch.empty_like(x)
    torch.mul(x, _gathered(mask, labels, x.dim()), out=out)
    return out


@class_specific_gate_op.register_fake
def _(x, mask, labels):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, mask, labels = inputs
    ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, mask if ctx.needs_input_grad[0] else None,
                          labels)
    ctx.mask_shape = mask.shape
    ctx.mask_dtype = mask.dtype


def class_specific_gate_backward(grad_out: torch.Tensor, x: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                                 labels: torch.Tensor, mask_shape, need_x: bool, need_mask: bool):
    """(d x, d mask) in plain torch ops."""
    grad_x = grad_mask = None
    if need_x:
        grad_x = grad_out * _gathered(mask, labels, grad_out.dim())
    if need_mask:
        acc = torch.promote_types(x.dtype, torch.float32)
        per_sample = grad_out.to(acc) * x.to(acc)
        if per_sample.dim() == 4:
            per_sample = per_sample.sum((2, 3))
        onehot = torch.nn.functional.one_hot(labels, mask_shape[1]).to(acc)  # (N, K)
        grad_mask = (per_sample.t() @ onehot).to(x.dtype)  # (C, K)
    return grad_x, grad_mask


def _backward(ctx, grad_out):
    x, mask, labels = ctx.saved_tensors
    need_x, need_mask = ctx.needs_input_grad[:2]
    grad_x, grad_mask = class_specific_gate_backward(grad_out, x, mask, labels, ctx.mask_shape, need_x, need_mask)
    return grad_x, grad_mask, None


class_specific_gate_op.register_autograd(_backward, setup_context=_setup_context)

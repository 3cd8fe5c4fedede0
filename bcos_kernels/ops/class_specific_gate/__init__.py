"""Front door of CSG's class-specific gate.

Semantics: :mod:`bcos_kernels.ops.class_specific_gate.reference`. Training:
``out[n, c, ...] = x[n, c, ...] * mask[c, labels[n]]``; eval: the identity
(x itself is returned, no copy, as the original). Backend "torch" runs the
custom op ``bcos_kernels::class_specific_gate`` below: it gathers
``mask[:, labels]`` to (N, C) and broadcasts it, never building the full-size
gate the original builds (and keeps for backward), and computes

    d mask[c, k] = sum over samples n with labels[n] == k of sum_hw (g * x)[n, c]

as a one-hot matmul (deterministic on every device), accumulated in fp32 or wider.

Backend "triton" (:mod:`bcos_kernels.ops.class_specific_gate.triton`) runs the
same custom op with one gather-multiply kernel forward; its backward (the
custom op ``bcos_kernels::class_specific_gate_backward``) makes one pass over
(grad_out, x) for grad_x and per-sample partial sums, then a segmented sum by
label over the label-sorted batch: deterministic, no atomics. fp32/fp16/bf16
(fp32 only under the Triton interpreter); a channels_last x is read in place.

Backend "cuda" (the extension's ``bcos_kernels::csg_gate_forward`` /
``csg_gate_backward``, csrc/cuda/csg_cuda.cu) runs the same two custom ops:
one gather-multiply kernel forward; backward one pass for grad_x and per-sample
sums, then a segmented sum by label, deterministic, no atomics. fp32/fp64/
fp16/bf16; a contiguous or channels_last x is read in place (any other layout
is copied, and out copied back into x's strides); the backward reads grad_out
in x's layout (a copy when it comes in the other).

Unlike the original (whose gate is fp32 whatever x is), mask must have x's
dtype and the output has it too; :class:`bcos_kernels.nn.ClassSpecificGate`
casts its fp32 parameter to x's dtype (autocast) on the way in.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from bcos_kernels import backends
from bcos_kernels.ops._checks import check_like, check_tensor
from bcos_kernels.ops.class_specific_gate import reference as ref


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
    name = backends.resolve("class_specific_gate", backend, x)
    if name == "reference":
        return ref.class_specific_gate(x, mask, labels, training=training)
    if not training:
        return x
    return class_specific_gate_op(x, mask, labels, name)




def _nhwc(x: torch.Tensor) -> bool:
    """Whether the fused backends read x as channels_last (4-D, channels_last- but not plain-contiguous)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _check_backend(backend: str) -> None:
    if backend not in ("torch", "triton", "cuda"):
        raise ValueError(f"bcos_kernels::class_specific_gate: unknown backend {backend!r} (torch, triton, cuda)")


# backend "cuda": the extension's ops (csrc/cuda/csg_cuda.cu) read a contiguous or a channels_last x in place and
# write their output in that layout.


def _cuda_forward(x: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    out = torch.ops.bcos_kernels.csg_gate_forward(x, mask, labels)
    if not (x.is_contiguous() or _nhwc(x)):
        # the kernel read a contiguous copy of x and wrote a contiguous out; the op returns x's strides (the fake
        # impl's empty_like)
        out = torch.empty_like(x).copy_(out)
    return out


def _cuda_backward(grad_out: torch.Tensor, x: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                   labels: torch.Tensor, num_classes: int, nhwc: bool, need_x: bool, need_mask: bool):
    # The kernels walk grad_out's layout and write grad_x in it: give them grad_out in the layout the fake
    # promises (x's), a copy only when it comes in the other one; x is read in that layout too (the extension
    # copies it if it differs).
    if grad_out.dim() == 4:
        grad_out = grad_out.contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
    grad_x, grad_mask = torch.ops.bcos_kernels.csg_gate_backward(grad_out, x if need_mask else None,
                                                                 mask if need_x else None, labels, num_classes,
                                                                 need_x, need_mask)
    return grad_x, grad_mask


# ---------------------------------------------------------------------------
# the custom op (backend "torch" in plain torch ops below)


def _gathered(mask: torch.Tensor, labels: torch.Tensor, ndim: int) -> torch.Tensor:
    """mask[:, labels] as (N, C) broadcastable against x of rank ndim."""
    g = mask.index_select(1, labels).t()
    return g.reshape(g.shape + (1,) * (ndim - 2))


@torch.library.custom_op("bcos_kernels::class_specific_gate", mutates_args=())
def class_specific_gate_op(x: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                           backend: str = "torch") -> torch.Tensor:
    """x * mask[:, labels] broadcast per sample (training mode)."""
    _check_backend(backend)
    if backend == "triton":
        from bcos_kernels.ops.class_specific_gate import triton as kernels  # imported on first use
        return kernels.gate_forward(x, mask, labels, _nhwc(x))
    if backend == "cuda":
        backends.check_device("class_specific_gate", "cuda", x.device)
        return _cuda_forward(x, mask, labels)
    out = torch.empty_like(x)
    torch.mul(x, _gathered(mask, labels, x.dim()), out=out)
    return out


@class_specific_gate_op.register_fake
def _(x, mask, labels, backend="torch"):
    _check_backend(backend)
    return torch.empty_like(x)


@torch.library.custom_op("bcos_kernels::class_specific_gate_backward", mutates_args=())
def class_specific_gate_backward_op(grad_out: torch.Tensor, x: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                                    labels: torch.Tensor, num_classes: int, nhwc: bool, need_x: bool,
                                    need_mask: bool, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(grad_x, grad_mask) of a fused backend; an empty tensor for a gradient not asked for. grad_x is
    channels_last if ``nhwc`` else contiguous; grad_mask (C, num_classes) contiguous; both in grad_out's dtype.
    x is needed for grad_mask, mask for grad_x."""
    if backend == "cuda":
        backends.check_device("class_specific_gate", "cuda", grad_out.device)
        return _cuda_backward(grad_out, x, mask, labels, num_classes, nhwc, need_x, need_mask)
    if backend != "triton":
        raise ValueError(f"bcos_kernels::class_specific_gate_backward: unknown backend {backend!r} (triton, cuda)")
    from bcos_kernels.ops.class_specific_gate import triton as kernels
    grad_x, grad_mask = kernels.gate_backward(grad_out, x, mask, labels, num_classes, nhwc, need_x, need_mask)
    empty = grad_out.new_empty(0)
    return grad_x if grad_x is not None else empty, grad_mask if grad_mask is not None else empty


@class_specific_gate_backward_op.register_fake
def _(grad_out, x, mask, labels, num_classes, nhwc, need_x, need_mask, backend):
    fmt = torch.channels_last if nhwc else torch.contiguous_format
    grad_x = torch.empty(grad_out.shape if need_x else (0,), dtype=grad_out.dtype, device=grad_out.device,
                         memory_format=fmt if need_x else torch.contiguous_format)
    grad_mask = grad_out.new_empty((grad_out.shape[1], num_classes) if need_mask else (0,))
    return grad_x, grad_mask


def _setup_context(ctx, inputs, output):
    x, mask, labels, backend = inputs
    ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, mask if ctx.needs_input_grad[0] else None,
                          labels)
    ctx.mask_shape = mask.shape
    ctx.mask_dtype = mask.dtype
    ctx.backend = backend
    ctx.nhwc = _nhwc(x)


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
    if ctx.backend == "torch":
        grad_x, grad_mask = class_specific_gate_backward(grad_out, x, mask, labels, ctx.mask_shape, need_x,
                                                         need_mask)
    else:
        grad_x, grad_mask = class_specific_gate_backward_op(grad_out, x, mask, labels, ctx.mask_shape[1], ctx.nhwc,
                                                            need_x, need_mask, ctx.backend)
        grad_x = grad_x if need_x else None
        grad_mask = grad_mask if need_mask else None
    return grad_x, grad_mask, None, None


class_specific_gate_op.register_autograd(_backward, setup_context=_setup_context)

"""Front door of CSG's class-specific gate.

Semantics: :mod:`bcos_kernels.ops.class_specific_gate.reference`. Training:
``out[n, c, ...] = x[n, c, ...] * mask[c, labels[n]]``; eval: the identity
(x itself is returned, no copy, as the original). Backend "reference" runs
reference.py (plain autograd); the other backends ("torch", "triton", "cuda":
one file each here, chosen by bcos_kernels.backends) run the custom op
``bcos_kernels::class_specific_gate`` below, which never builds the full-size
gate the original builds (and keeps for backward), with the hand-written
backward op ``bcos_kernels::class_specific_gate_backward`` (deterministic in
every backend); tensors are positional, options keyword-only.

Unlike the original (whose gate is fp32 whatever x is), mask must have x's
dtype and the output has it too; :class:`bcos_kernels.nn.ClassSpecificGate`
casts its fp32 parameter to x's dtype (autocast) on the way in.
"""

from __future__ import annotations

# The backend "torch" is this package's submodule ``torch``: importing it sets the package's global ``torch`` to it,
# so it is imported here, before the library that the code below means by ``torch``.
from bcos_kernels.ops.class_specific_gate import torch as _torch_backend  # noqa: F401

# isort: split
from typing import NamedTuple, Optional

import torch

from bcos_kernels import backends
from bcos_kernels.ops import _autocast, _eager
from bcos_kernels.ops._checks import check_like, check_tensor
from bcos_kernels.ops._layout import is_channels_last, memory_format
from bcos_kernels.ops._options import custom_op
from bcos_kernels.ops.class_specific_gate import reference as ref


def _check_labels(labels, x: torch.Tensor, num_classes: int) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor of class indices, got {type(labels).__name__}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must be an integer tensor (int64), got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != x.shape[0]:
        raise ValueError(
            f"labels must have shape ({x.shape[0]},) (one label per sample of x), got {tuple(labels.shape)}"
        )
    if labels.device != x.device:
        raise ValueError(f"labels is on {labels.device} but x is on {x.device}; they must be on the same device")
    # The range check reads the labels back (a GPU synchronisation); under torch.compile it is left to
    # the bounds check of the gather.
    if labels.numel() and not torch.compiler.is_compiling():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"labels must lie in [0, {num_classes}) (mask has {num_classes} classes), got values in [{lo}, {hi}]"
            )
    return labels.long()


def class_specific_gate(
    x: torch.Tensor,
    mask: torch.Tensor,
    labels: Optional[torch.Tensor],
    *,
    training: bool = True,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """x: (N, C) or (N, C, H, W); mask: (C, K) with x's dtype; labels: (N,) integers in [0, K).

    training=False returns x itself (labels may then be None).
    """
    check_tensor("x", x, (2, 4))
    check_tensor("mask", mask, 2)
    check_like("mask", mask, "x", x)
    if mask.shape[0] != x.shape[1]:
        raise ValueError(
            f"mask must have shape (C, num_classes) with C = {x.shape[1]} channels of x, got {tuple(mask.shape)}"
        )
    if mask.shape[1] < 1:
        raise ValueError(f"mask must have at least one class column, got shape {tuple(mask.shape)}")
    if labels is None:
        if training:
            raise ValueError(
                "labels is None but training=True: the gate needs one class label per sample "
                "(the original ResNet skips the gate when it gets no labels)"
            )
    else:
        labels = _check_labels(labels, x, mask.shape[1])
    name = backends.resolve("class_specific_gate", backend, x)
    if name == "reference":
        with _autocast.off(x):
            return ref.class_specific_gate(x, mask, labels, training=training)
    if not training:
        return x
    return _eager.call(class_specific_gate_op, x, mask, labels, backend=name)


# ---------------------------------------------------------------------------
# the layer's L1 regulariser


class _L1Norm(torch.autograd.Function):
    """sum |mask| with the gradient sign(mask) * grad, torch.norm(p=1)'s. ``abs().sum()`` is the vectorised
    pairwise sum: on the CPU torch.norm(p=1) ran 4.6x slower at (2048, 1000) and was 6.5e-4 off an fp64 sum in
    fp32 (this sum: 1e-8); the backward is one pass (autograd of abs().sum() takes two)."""

    @staticmethod
    def forward(ctx, mask):
        ctx.save_for_backward(mask)
        return mask.abs().sum()

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return torch.sgn(mask).mul_(grad)


def density(mask: torch.Tensor) -> torch.Tensor:
    """||mask||_1 / numel(mask) (the original's get_density; reference.csg_density)."""
    return _L1Norm.apply(mask) / mask.numel()


def density_loss(mask: torch.Tensor) -> torch.Tensor:
    """relu(||mask||_1 - 0.2 * numel(mask)) (the original's loss_function; reference.csg_density_loss)."""
    return torch.relu(_L1Norm.apply(mask) - mask.numel() * ref.DENSITY_BUDGET)


# ---------------------------------------------------------------------------
# the custom ops: each backend's forward and backward in its file here (bcos_kernels.backends.kernels)


def _gate(x: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, *, backend: str) -> torch.Tensor:
    """x * mask[:, labels] broadcast per sample (training mode); labels int64."""
    return backends.checked_kernels("class_specific_gate", backend, x.device).forward(x, mask, labels)


class_specific_gate_op = torch.library.custom_op("bcos_kernels::class_specific_gate", _gate, mutates_args=())
_eager.register_impl(class_specific_gate_op, _gate)


@class_specific_gate_op.register_fake
def _(x, mask, labels, *, backend):
    backends.kernels("class_specific_gate", backend)  # an unknown backend fails when traced too
    return torch.empty_like(x)


class GateBackwardOptions(NamedTuple):
    """The options of the backward op (keyword-only in its schema; its backends get them as one object)."""

    num_classes: int
    nhwc: bool  # grad_x channels_last (else contiguous)
    need_x: bool
    need_mask: bool
    backend: str


@custom_op(
    "bcos_kernels::class_specific_gate_backward",
    "Tensor grad_out, Tensor? x, Tensor? mask, Tensor labels",
    GateBackwardOptions,
    "(Tensor, Tensor)",
)
def class_specific_gate_backward_op(grad_out, x, mask, labels, **options):
    """(grad_x, grad_mask); an empty tensor for a gradient not asked for. grad_x is channels_last if ``nhwc`` else
    contiguous; grad_mask (C, num_classes) contiguous; both in grad_out's dtype. x is needed for grad_mask, mask
    for grad_x."""
    opts = GateBackwardOptions(**options)
    kernels = backends.checked_kernels("class_specific_gate", opts.backend, grad_out.device)
    grads = kernels.backward(grad_out, x, mask, labels, opts)
    return tuple(g if g is not None else grad_out.new_empty(0) for g in grads)  # a custom op cannot return None


@class_specific_gate_backward_op.register_fake
def _(grad_out, x, mask, labels, **options):
    opts = GateBackwardOptions(**options)
    grad_x = torch.empty(
        grad_out.shape if opts.need_x else (0,),
        dtype=grad_out.dtype,
        device=grad_out.device,
        memory_format=memory_format(opts.nhwc and opts.need_x),
    )
    grad_mask = grad_out.new_empty((grad_out.shape[1], opts.num_classes) if opts.need_mask else (0,))
    return grad_x, grad_mask


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    x, mask, labels = inputs
    ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, mask if ctx.needs_input_grad[0] else None, labels)
    ctx.options = dict(keyword_only_inputs, num_classes=mask.shape[1], nhwc=is_channels_last(x))


def _backward(ctx, grad_out):
    need_x, need_mask = ctx.needs_input_grad[:2]
    if not (need_x or need_mask):
        return None, None, None
    grad_x, grad_mask = _eager.call(
        class_specific_gate_backward_op, grad_out, *ctx.saved_tensors, **ctx.options, need_x=need_x, need_mask=need_mask
    )
    return grad_x if need_x else None, grad_mask if need_mask else None, None


_eager.register_autograd(class_specific_gate_op, _backward, _setup_context)

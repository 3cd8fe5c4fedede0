"""The eager fast path of this package's custom ops.

A call of a ``torch.library`` custom op in eager mode goes through the dispatcher, the custom op's Python autograd
wrapper (which re-reads the schema on every call) and its backend registration: about 50 us per forward+backward on
a 2-core CPU, as much as a whole small layer (issue 19's closing notes). Where nothing needs the op to be an op --
no torch.compile/export tracing, no dispatch or function mode, no functorch transform, no tensor subclass -- the
front doors call the op's Python implementation directly instead, inside one ``torch.autograd.Function`` built from
the same ``setup_context`` and ``backward`` functions that the op registers: the same kernels, the same saved
tensors, the same gradients, bit for bit (tests/test_eager_fast_path.py). Everywhere else the op itself runs.

``BCOS_KERNELS_EAGER_FAST_PATH=0`` (read at each call) turns the fast path off.
"""

from __future__ import annotations

import os
from typing import Callable, NamedTuple, Optional

import torch

from bcos_kernels.ops import _autocast

_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


class _Entry(NamedTuple):
    impl: Callable  # the op's Python implementation: (*tensors, **options) -> output(s)
    setup_context: Optional[Callable]  # (ctx, inputs, keyword_only_inputs, output), as register_autograd takes it
    backward: Optional[Callable]  # (ctx, *grads) -> grads of the positional inputs


_ENTRIES: dict = {}  # custom op (torch.library CustomOpDef) -> _Entry


def register_impl(op, impl: Callable) -> None:
    """Records ``impl``, the function that ``op`` (a custom op) runs, for the fast path."""
    _ENTRIES[op] = _Entry(impl, None, None)


def register_autograd(op, backward: Callable, setup_context: Callable) -> None:
    """``op.register_autograd(backward, setup_context=...)``, also for the fast path. The context does not
    materialise the gradients of outputs that got none: every op here has one differentiable output, and its others
    (saved statistics such as the B-cos conv's lin_max, as large as the output) would each get a tensor of zeros,
    filled on every backward (1.1 ms of a 13 ms 1x1 64->256 conv at 2 threads) for the backward to ignore."""

    def setup(ctx, inputs, keyword_only_inputs, output):
        ctx.set_materialize_grads(False)
        ctx.input_count = len(inputs)
        setup_context(ctx, inputs, keyword_only_inputs, output)

    def backward_of_output(ctx, grad_out, *others):
        # no gradient for the differentiable output (e.g. gradcheck's pass for another output): none for the inputs
        if grad_out is None:
            return (None,) * ctx.input_count
        with _autocast.off(grad_out):  # backward() called inside the autocast region
            return backward(ctx, grad_out, *others)

    op.register_autograd(backward_of_output, setup_context=setup)
    _ENTRIES[op] = _ENTRIES[op]._replace(setup_context=setup, backward=backward_of_output)


def enabled() -> bool:
    return os.environ.get("BCOS_KERNELS_EAGER_FAST_PATH", "1") != "0"


def _plain_eager(tensors) -> bool:
    """Whether a call on these inputs may skip the op: plain eager execution with plain tensors."""
    if torch.compiler.is_compiling() or not enabled():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    return all(t is None or type(t) in _PLAIN_TYPES for t in tensors)


class _EagerFunction(torch.autograd.Function):
    """An op's implementation with its registered autograd; inputs (*tensors, entry, options), so that
    ``ctx.needs_input_grad[i]`` is tensor i's, as in the op's own autograd. The context is set up inside forward
    (the old style): with a separate ``setup_context``, ``apply`` binds the arguments to forward's signature with
    ``inspect`` on every call, a third of this path's cost."""

    @staticmethod
    def forward(ctx, *args):
        *tensors, entry, options = args
        output = entry.impl(*tensors, **options)
        ctx.eager_entry = entry
        entry.setup_context(ctx, tuple(tensors), options, output)
        return output

    @staticmethod
    def backward(ctx, *grads):
        result = ctx.eager_entry.backward(ctx, *grads)
        return (*(result if isinstance(result, tuple) else (result,)), None, None)


def call(op, *tensors, **options):
    """``op(*tensors, **options)``, by the fast path where it may be taken (see the module docstring), with autocast
    off (_autocast.py)."""
    with _autocast.off(tensors[0]):
        return _call(op, tensors, options)


def _call(op, tensors, options):
    entry = _ENTRIES[op]
    if not _plain_eager(tensors):
        return op(*tensors, **options)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if entry.backward is None or not needs_grad:
        return entry.impl(*tensors, **options)
    return _EagerFunction.apply(*tensors, entry, options)

"""The eager fast path (bcos_kernels/ops/_eager.py): in plain eager mode the front doors run each op's
implementation inside one autograd.Function instead of calling the custom op, with the same results bit for bit;
wherever the op is needed (a dispatch or function mode, a tensor subclass, torch.compile, the switch off) the op
runs."""

from functools import partial

import pytest
import torch
from cases import OPS
from ops._util import inputs, run, skip_unless_runs
from torch.utils._python_dispatch import TorchDispatchMode

import bcos_kernels
from bcos_kernels import backends

FAST_NODE = "_EagerFunctionBackward"


CALLS = [
    pytest.param(op, backend, case, id=f"{op}-{backend}-{case.id}")
    for op, (_, cases) in OPS.items()
    for backend in backends.available_backends("cpu", op)
    if backend not in ("reference", "triton")  # triton: interpreter-only here, covered by its own tests
    for case in cases
]


def _grad_node(front, case, tensors):
    out = front(**tensors, **case.kwargs)
    return type(out.grad_fn).__name__ if out.grad_fn is not None else None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("op,backend,case", CALLS)
def test_fast_path_gives_the_op_results_bit_for_bit(op, backend, case, dtype, monkeypatch):
    front, _ = OPS[op]
    tensors = inputs(case, dtype)
    skip_unless_runs(op, backend, tensors["x"], case)
    fn = partial(front, backend=backend)
    fast = run(fn, case, tensors, dtype)
    node = _grad_node(fn, case, tensors)
    monkeypatch.setenv("BCOS_KERNELS_EAGER_FAST_PATH", "0")
    slow = run(fn, case, tensors, dtype)
    slow_node = _grad_node(fn, case, tensors)
    assert slow_node != FAST_NODE
    if slow_node is not None and slow_node.startswith("GeneratedBackwardFor_bcos_kernels"):
        assert node == FAST_NODE  # the op's own autograd ran with the switch off; the fast path ran before
    else:  # the front door called no op here (e.g. the reference for a call the backend leaves to it)
        assert node != FAST_NODE
    for name, value in slow.items():
        assert fast[name].dtype == value.dtype and torch.equal(fast[name], value), f"{op} {case.id}: {name} differs"


class _Passthrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _gate_node():
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    mask = torch.rand(4, 3, requires_grad=True)
    out = bcos_kernels.class_specific_gate(x, mask, torch.tensor([0, 2]), backend="torch")
    return type(out.grad_fn).__name__


def test_the_op_runs_under_modes_and_without_grad():
    assert _gate_node() == FAST_NODE
    with _Passthrough():
        assert _gate_node().startswith("GeneratedBackwardFor_bcos_kernels")
    with torch.device("cpu"):  # a torch function mode
        assert _gate_node().startswith("GeneratedBackwardFor_bcos_kernels")
    with torch.no_grad():  # the implementation alone: no graph
        out = bcos_kernels.class_specific_gate(torch.randn(2, 4), torch.rand(4, 3), torch.tensor([0, 1]))
        assert out.grad_fn is None


def test_compiled_graph_keeps_the_op():
    """Under torch.compile the front door calls the custom op (one node of the graph, not its implementation)."""
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    def fn(x, mask):
        return bcos_kernels.class_specific_gate(x, mask, torch.tensor([0, 2]), backend="torch")

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(torch.randn(2, 4, 3, 3), torch.rand(4, 3))
    assert any("bcos_kernels.class_specific_gate" in t for t in seen), seen


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls.append((str(func), out.numel() if isinstance(out, torch.Tensor) else 0))
        return out


@pytest.mark.skipif("cpu" not in backends.available_backends("cpu"), reason="backend 'cpu' needs the C++ extension")
@pytest.mark.parametrize("fast", [True, False], ids=["fast_path", "op"])
def test_backward_fills_no_zeros_for_the_saved_outputs(fast, monkeypatch):
    """The gradients of the outputs that only feed the backward (lin_max, as large as out) are not materialised as
    zeros: the backward runs no fill of an output-sized tensor."""
    if not fast:
        monkeypatch.setenv("BCOS_KERNELS_EAGER_FAST_PATH", "0")
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    w = torch.randn(16, 8, 1, 1, requires_grad=True)
    out = bcos_kernels.bcos_conv2d(x, w, backend="cpu")
    grad = torch.randn_like(out)
    recorder = _Recorder()
    with recorder:
        out.backward(grad)
    fills = [c for c in recorder.calls if ("fill" in c[0] or "zeros" in c[0]) and c[1] == out.numel()]
    assert not fills, fills
    assert x.grad is not None and w.grad is not None

"""Whole converted models under the compiler: ``torch.compile(fullgraph=True, dynamic=True)`` runs with no graph
break and one graph across batch sizes (dynamo's counters), forward and backward equal to eager; and
``torch.export`` of the eval-mode model gives a program whose outputs equal eager's. ``aot_eager`` is the
compile backend: what is tested is the capture (dynamo, the custom ops' fakes and autograd), not inductor's code,
which would take minutes per model on a 2-core CPU."""

import pytest
import torch
from originals import SMALL_MODELS, small_bcos_model

import bcos_kernels


def _converted(name: str) -> torch.nn.Module:
    return bcos_kernels.convert(small_bcos_model(name)).eval()


NAMES = SMALL_MODELS


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", NAMES)
def test_compile_dynamic_one_graph_no_breaks(name):
    model = _converted(name)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
    for n in (2, 3, 5):
        x = torch.rand(n, 6, 32, 32)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        got, want = compiled(xa), model(xb)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        (ga,), (gb,) = torch.autograd.grad(got.sum(), xa), torch.autograd.grad(want.sum(), xb)
        torch.testing.assert_close(ga, gb, atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", NAMES)
def test_export_eval_model_matches_eager(name):
    model = _converted(name)
    x = torch.rand(2, 6, 32, 32)
    program = torch.export.export(model, (x,))
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert any("bcos_kernels" in op for op in ops), ops  # our fused ops are in the program, not decomposed
    x2 = torch.rand(2, 6, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x2), model(x2), atol=1e-5, rtol=1e-5)

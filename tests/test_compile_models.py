"""Whole converted models under the compiler: ``torch.compile(fullgraph=True, dynamic=True)`` runs with no graph
break and one graph across batch sizes (dynamo's counters), forward and backward equal to eager; and
``torch.export`` of the eval-mode model gives a program whose outputs equal eager's. ``aot_eager`` is the
compile backend of the whole models: what is tested is the capture (dynamo, the custom ops' fakes and autograd);
inductor's code, which would take minutes per whole model on a 2-core CPU, is tested on a small converted CNN."""

import pytest
import torch
from originals import SMALL_MODELS, bcos_module, small_bcos_model

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


def _small_bcos_cnn() -> torch.nn.Module:
    modules = bcos_module("modules")
    torch.manual_seed(0)
    return torch.nn.Sequential(
        modules.BcosConv2d(6, 16, kernel_size=3, padding=1),
        modules.norms.BatchNormUncentered2d(16),
        modules.BcosConv2d(16, 16, kernel_size=3, padding=1, stride=2),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        modules.BcosLinear(16, 10),
    )


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_inductor_dynamic_one_graph_matches_eager():
    """The default backend (inductor, C++ code on the CPU), compiled before any eager call (a first call inside the
    trace must not take another path when dynamo restarts it): one graph over three batch sizes, no breaks, the
    forward and the input and parameter gradients of eager. A small converted CNN: inductor's compile of a whole
    ResNet takes minutes on 2 cores."""
    model = bcos_kernels.convert(_small_bcos_cnn())
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for n in (2, 3, 5):
        x = torch.rand(n, 6, 16, 16)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        got = compiled(xa)
        ga = torch.autograd.grad(got.square().sum(), [xa, *model.parameters()])
        want = model(xb)
        gb = torch.autograd.grad(want.square().sum(), [xb, *model.parameters()])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])

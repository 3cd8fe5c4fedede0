"""detachable_layer_norm / detachable_group_norm (the B-cos ViTs' norms) on every backend against the original's
operations (reference.py), and their modules, convert() and torch.compile."""

import copy

import pytest
import torch
from cases import DETACHABLE_NORM
from cases import detachable_norm_front as front
from originals import bcos_module

import bcos_kernels
from bcos_kernels import nn as bnn
from bcos_kernels.ops.detachable_norm import detachable_group_norm, detachable_layer_norm, reference
from ops._util import op_tests


def original(x, weight=None, bias=None, *, kind, groups, eps, detach):
    if kind == "layer":
        return reference.layer_norm(x, groups, weight, bias, eps, detach)
    return reference.group_norm(x, groups, weight, bias, eps, detach)


globals().update(op_tests("detachable_norm", front, original, DETACHABLE_NORM))


def test_explanation_mode_holds_the_variance_constant():
    """Detached, the gradient is the closed form s (g - mean(g)) with s = 1 / std (the mean's path only)."""
    x = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 10, dtype=torch.float64)
    out = detachable_layer_norm(x, 10, detach=True, backend="torch")
    (grad,) = torch.autograd.grad(out, x, g)
    s = 1 / (x.detach().var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    torch.testing.assert_close(grad, s * (g - g.mean(-1, keepdim=True)))
    (full,) = torch.autograd.grad(detachable_layer_norm(x, 10, detach=False), x, g)
    assert not torch.allclose(full, grad)  # the trained norm's gradient has the variance's term too


def _bad(call, error, match):
    return pytest.param(call, error, match, id=match)


@pytest.mark.parametrize(
    "call, error, match",
    [
        _bad(lambda x: detachable_layer_norm(x.int(), 4), TypeError, "x must"),
        _bad(lambda x: detachable_layer_norm(x, 5), ValueError, "does not end in normalized_shape"),
        _bad(lambda x: detachable_layer_norm(x, ()), ValueError, "normalized_shape must"),
        _bad(lambda x: detachable_layer_norm(x, 4, torch.ones(3)), ValueError, "weight has shape"),
        _bad(lambda x: detachable_layer_norm(x, 4, None, torch.ones(4, 1)), ValueError, "bias has shape"),
        _bad(lambda x: detachable_layer_norm(x, 4, eps=-1.0), ValueError, "eps must"),
        _bad(lambda x: detachable_layer_norm(x, 4, torch.ones(4).double(), backend="torch"), ValueError, "x's dtype"),
        _bad(lambda x: detachable_layer_norm(x, 4, backend="cpu"), ValueError, "does not implement"),
        _bad(lambda x: detachable_layer_norm(x, 4, backend="nope"), ValueError, "backend must"),
        _bad(lambda x: detachable_group_norm(x, 1), ValueError, "x must have 4 dimensions"),
        _bad(lambda x: detachable_group_norm(x.view(2, 3, 2, 2), 2), ValueError, "does not divide"),
        _bad(lambda x: detachable_group_norm(x.view(2, 3, 2, 2), 0), ValueError, "num_groups must"),
        _bad(lambda x: detachable_group_norm(x.view(2, 3, 2, 2), 1, torch.ones(4)), ValueError, "weight has shape"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(2, 3, 4))


def test_mixed_dtypes_run_the_reference_under_auto():
    x = torch.randn(2, 3, 4, dtype=torch.bfloat16)
    w = torch.rand(4)  # fp32 parameters of a bf16 activation
    with pytest.warns(RuntimeWarning, match="weight must have x's dtype"):
        out = detachable_layer_norm(x, 4, w, detach=True)
    torch.testing.assert_close(out, reference.layer_norm(x, (4,), w, None, 1e-5, True))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("kind", ["layer", "group"])
def test_opcheck(kind):
    x = torch.randn(2, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    affine = (5,) if kind == "layer" else (4,)
    w = torch.rand(affine, dtype=torch.float64, requires_grad=True)
    b = torch.randn(affine, dtype=torch.float64, requires_grad=True)
    options = dict(kind=kind, groups=2, norm_dims=1 if kind == "layer" else 3, eps=1e-5, backend="torch")
    torch.library.opcheck(torch.ops.bcos_kernels.detached_norm.default, (x, w, b), options)
    torch.library.opcheck(torch.ops.bcos_kernels.detached_norm.default, (x, None, None), options)


def _original_norms():
    norms = bcos_module("modules").norms
    return norms, norms.centered_norms


def test_modules_and_convert_share_parameters_and_match_the_original():
    norms, centered = _original_norms()
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        norms.NoBias(centered.DetachableGNLayerNorm2d)(4),
        centered.DetachableGNInstanceNorm2d(4),
        centered.DetachableGroupNorm2d(2, 4),
    )
    tokens = torch.nn.Sequential(norms.NoBias(centered.DetachableLayerNorm)(5), centered.DetachableLayerNorm((3, 5)))
    for original, x in ((model, torch.randn(2, 4, 3, 5)), (tokens, torch.randn(2, 3, 5))):
        with torch.no_grad():
            for p in original.parameters():
                p.uniform_(0.5, 1.5)
        ours = bcos_kernels.convert(copy.deepcopy(original))
        assert all(isinstance(m, (bnn.DetachableGroupNorm2d, bnn.DetachableLayerNorm)) for m in ours)
        assert ours.state_dict().keys() == original.state_dict().keys()
        original, ours, x = original.double(), ours.double(), x.double() * 2 + 1
        for detach in (False, True):
            for a, b in zip(original, ours):
                a.set_explanation_mode(detach), b.set_explanation_mode(detach)
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            want, got = original(xa), ours(xb)
            torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
            ga = torch.autograd.grad(want.square().sum(), [xa, *original.parameters()])
            gb = torch.autograd.grad(got.square().sum(), [xb, *ours.parameters()])
            for p, q in zip(ga, gb):
                torch.testing.assert_close(q, p, atol=1e-12, rtol=0)
    assert bcos_kernels.convert(copy.deepcopy(tokens), backend="reference")[0].backend == "reference"
    assert bcos_kernels.convert(copy.deepcopy(tokens), backend="cpu")[0].backend is None  # the op has no "cpu"


def test_our_modules_build_as_the_originals():
    assert bnn.DetachableGNLayerNorm2d(6).num_groups == 1
    assert bnn.DetachableGNInstanceNorm2d(6).num_groups == 6
    ln = bnn.DetachableLayerNorm(8, bias=False)
    assert ln.bias is None and ln.weight.shape == (8,) and not ln.detach


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_compile_in_explanation_mode_one_graph():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = torch.nn.Sequential(bnn.DetachableLayerNorm(6, bias=False), bnn.DetachableLayerNorm(6)).double()
    for m in model:
        m.set_explanation_mode(True)
    compiled = torch.compile(copy.deepcopy(model), dynamic=True, fullgraph=True)
    for n in (2, 3, 5):
        x = torch.randn(n, 4, 6, dtype=torch.float64, requires_grad=True)
        got, want = compiled(x), model(x)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(torch.autograd.grad(got.sum(), x)[0], torch.autograd.grad(want.sum(), x)[0])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1

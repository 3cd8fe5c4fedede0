"""batch_norm_uncentered (the B-cos models' uncentered batch norm) on every backend against the reference, and
the running-variance update, the module, convert() and torch.compile."""

import copy

import pytest
import torch
from cases import BATCH_NORM_UNCENTERED, running_var_buffer
from cases import batch_norm_front as front
from originals import bcos_module

import bcos_kernels
from bcos_kernels import nn as bnn
from bcos_kernels.ops.batch_norm_uncentered import reference
from ops._util import op_tests


def original(x, weight=None, bias=None, *, running_var, training, momentum, eps, detach):
    return reference.batch_norm_uncentered_2d(
        x, running_var_buffer(running_var, x), weight, bias, training, momentum, eps, detach
    )


globals().update(op_tests("batch_norm_uncentered", front, original, BATCH_NORM_UNCENTERED))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_running_variance_update(backend, dtype):
    x = torch.randn(4, 3, 5, 5, dtype=dtype) * 3 + 1
    want = torch.full((3,), 2.0, dtype=dtype)
    reference.batch_norm_uncentered_2d(x, want, None, None, True, 0.25, 1e-5, False)
    got = torch.full((3,), 2.0, dtype=dtype)
    bcos_kernels.batch_norm_uncentered(x, got, None, None, training=True, momentum=0.25, backend=backend)
    torch.testing.assert_close(got, want)
    assert not torch.equal(got, torch.full((3,), 2.0, dtype=dtype))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda x, v: bcos_kernels.batch_norm_uncentered(x[0], v, None, None, training=True), ValueError, "x must"),
        (lambda x, v: bcos_kernels.batch_norm_uncentered(x.int(), v, None, None, training=True), TypeError, "x must"),
        (
            lambda x, v: bcos_kernels.batch_norm_uncentered(x, v[:2], None, None, training=True),
            ValueError,
            "running_var",
        ),
        (lambda x, v: bcos_kernels.batch_norm_uncentered(x, v, v[:1], None, training=True), ValueError, "weight"),
        (lambda x, v: bcos_kernels.batch_norm_uncentered(x, None, None, None, training=False), ValueError, "eval"),
        (lambda x, v: bcos_kernels.batch_norm_uncentered(x, v, None, None, training=True, eps=-1), ValueError, "eps"),
        (
            lambda x, v: bcos_kernels.batch_norm_uncentered(x, v, v.double(), None, training=True, backend="torch"),
            ValueError,
            "weight must have x's dtype",
        ),
        (
            lambda x, v: bcos_kernels.batch_norm_uncentered(x, v, None, None, training=True, backend="cpu"),
            ValueError,
            "does not implement",
        ),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(2, 3, 4, 4), torch.ones(3))


def test_mixed_dtypes_run_the_reference_under_auto():
    x = torch.randn(2, 3, 4, 4, dtype=torch.bfloat16)
    w = torch.rand(3)  # fp32 parameters of a bf16 activation (autocast): the reference's type promotion
    with pytest.warns(RuntimeWarning, match="weight must have x's dtype"):
        out = bcos_kernels.batch_norm_uncentered(x, None, w, None, training=True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference.batch_norm_uncentered_2d(x, None, w, None, True, 0.1, 1e-5, False))


def test_module_and_convert_share_parameters_and_match_the_original():
    norms = bcos_module("modules").norms
    torch.manual_seed(0)
    model = torch.nn.Sequential(norms.NoBias(norms.BatchNormUncentered2d)(4), norms.BatchNormUncentered2d(4))
    with torch.no_grad():
        for m in model:
            m.weight.uniform_(0.5, 1.5)
    ours = bcos_kernels.convert(copy.deepcopy(model))
    assert all(isinstance(m, bnn.BatchNormUncentered2d) and m.backend is None for m in ours)
    assert ours.state_dict().keys() == model.state_dict().keys()
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64) + 1
    model, ours = model.double(), ours.double()
    for training in (True, False):
        model.train(training), ours.train(training)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        a, b = model(xa), ours(xb)
        torch.testing.assert_close(b, a)
        ga = torch.autograd.grad(a.square().sum(), [xa, *model.parameters()])
        gb = torch.autograd.grad(b.square().sum(), [xb, *ours.parameters()])
        for p, q in zip(ga, gb):
            torch.testing.assert_close(q, p)
        for p, q in zip(model.buffers(), ours.buffers()):
            torch.testing.assert_close(q, p)
    assert bcos_kernels.convert(copy.deepcopy(model), backend="reference")[0].backend == "reference"
    assert bcos_kernels.convert(copy.deepcopy(model), backend="cpu")[0].backend is None  # the op has no "cpu"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_opcheck_and_compile():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    w, b = torch.rand(3, dtype=torch.float64, requires_grad=True), torch.randn(3, dtype=torch.float64)
    for training, running in ((True, None), (False, torch.rand(3, dtype=torch.float64) + 0.5)):
        options = dict(eps=1e-5, training=training, detach=False, backend="torch")
        torch.library.opcheck(torch.ops.bcos_kernels.batch_norm_uncentered.default, (x, running, w, b), options)
    torch._dynamo.reset()
    norm = bnn.BatchNormUncentered2d(3, bias=False).double()
    compiled = torch.compile(copy.deepcopy(norm), fullgraph=True)
    for module in (norm, compiled):
        module.train()
    got, want = compiled(x), norm(x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), x)[0], torch.autograd.grad(want.sum(), x)[0])
    torch.testing.assert_close(compiled.running_var, norm.running_var)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_value_a_channel(dtype):
    """Batch 1 at 1x1: a variance of exactly 0, so out = x / sqrt(eps) and the gradient through the statistics
    vanishes (x - mean = 0) on both paths."""
    x = torch.randn(1, 4, 1, 1, dtype=dtype)
    outs = []
    for backend in ("reference", "torch"):
        xs = x.clone().requires_grad_()
        out = bcos_kernels.batch_norm_uncentered(xs, None, None, None, training=True, backend=backend)
        outs.append((out, torch.autograd.grad(out.sum(), xs)[0]))
    torch.testing.assert_close(outs[1][0], outs[0][0])
    torch.testing.assert_close(outs[1][1], outs[0][1])
    torch.testing.assert_close(outs[1][1], torch.full_like(x, 1e-5**-0.5))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_compile_dynamic_batch_sizes_one_graph():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    norm = bnn.BatchNormUncentered2d(4, bias=False).double()
    eager = copy.deepcopy(norm)
    compiled = torch.compile(norm, dynamic=True, fullgraph=True)
    for n in (2, 3, 5):
        x = torch.rand(n, 4, 6, 5, dtype=torch.float64, requires_grad=True)
        got, want = compiled(x), eager(x)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(torch.autograd.grad(got.sum(), x)[0], torch.autograd.grad(want.sum(), x)[0])
    torch.testing.assert_close(norm.running_var, eager.running_var)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1

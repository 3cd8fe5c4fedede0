"""Eval-mode folding of the uncentered batch norm into the B-cos conv epilogue (``channel_scale``).

The op: ``bcos_conv2d(..., channel_scale=s)`` equals the reference times s per channel, forward and every
gradient (s included), on every backend here. The model: ``fold_batchnorm`` on a converted B-cos ResNet equals
the unfolded original in eval mode (outputs, input and parameter gradients, norm weights included), and training
mode is untouched (same outputs, same running statistics).
"""

import copy

import pytest
import torch
from helpers import one_intra_op_thread  # noqa: F401  (autouse fixture)
from originals import bcos_resnet18_imagenet_config
from test_convert import assert_model_parity

import bcos_kernels
from bcos_kernels import nn as bnn
from bcos_kernels.ops import bcos_conv2d
from bcos_kernels.ops.bcos_conv2d import reference as ref

F64 = torch.float64
BACKENDS = bcos_kernels.available_backends("cpu", "bcos_conv2d")

# (N, C, H, W, O, k, stride, padding, groups, max_out, b): 1x1, stride 2, groups, MaxOut, b = 1 / 2 / general
CASES = [
    (2, 4, 7, 6, 5, 3, 1, 1, 1, 1, 2.0),
    (1, 6, 9, 8, 4, 3, 2, 0, 2, 1, 2.0),
    (3, 5, 4, 4, 3, 1, 1, 0, 1, 2, 1.5),
    (2, 4, 5, 5, 6, 3, 2, 1, 2, 2, 1.0),
    (2, 3, 3, 3, 7, 3, 1, 0, 1, 1, 2.0),  # 1x1 output
]


def _case(n, c, h, w, o, k, groups, max_out, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen, dtype=dtype)
    weight = torch.randn(o * max_out, c // groups, k, k, generator=gen, dtype=dtype)
    scale = torch.randn(o, generator=gen, dtype=dtype)
    scale[0] = 0.0  # a zero factor: zero output, finite gradients
    return x, weight, scale


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("detach", [False, True])
def test_channel_scale_op_matches_reference(backend, case, detach):
    n, c, h, w, o, k, stride, padding, groups, max_out, b = case
    dtype = F64 if backend in ("reference", "cpu") else torch.float32
    x, weight, scale = _case(n, c, h, w, o, k, groups, max_out, dtype)
    kw = dict(b=b, stride=stride, padding=padding, groups=groups, max_out=max_out, detach=detach)
    results = []
    for run in ("ours", "reference"):
        xi, wi, si = (t.clone().requires_grad_(True) for t in (x, weight, scale))
        if run == "ours":
            out = bcos_conv2d(xi, wi, channel_scale=si, backend=backend, **kw)
        else:
            out = ref.bcos_conv2d(xi, wi, **kw) * si[None, :, None, None]
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=dtype)
        results.append((out,) + torch.autograd.grad(out, (xi, wi, si), grad_out))
    tol = 1e-10 if dtype == F64 else 1e-4
    for name, a, e in zip(("out", "grad x", "grad weight", "grad channel_scale"), *results):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(
            a, e, rtol=tol, atol=tol * max(e.abs().max().item(), 1.0), msg=lambda m: f"{backend} {name}: {m}"
        )
    assert (results[0][0][:, 0] == 0).all()


def test_channel_scale_bad_arguments():
    x, weight, scale = _case(1, 4, 5, 5, 3, 3, 1, 1, torch.float32)
    with pytest.raises(ValueError, match="channel_scale has 2 elements but the output has 3 channels"):
        bcos_conv2d(x, weight, channel_scale=scale[:2])
    with pytest.raises(ValueError, match="channel_scale"):
        bcos_conv2d(x, weight, channel_scale=scale[None])
    with pytest.raises((ValueError, TypeError), match="channel_scale"):
        bcos_conv2d(x, weight, channel_scale=scale.double())


# ------------------------------------------------------------------------------------------ whole models
def _imagenet_resnet18(dtype):
    torch.manual_seed(0)
    model = bcos_resnet18_imagenet_config().to(dtype)
    with torch.no_grad():
        for seed in range(2):
            model(torch.rand(4, 6, 32, 32, dtype=dtype, generator=torch.Generator().manual_seed(seed)))
        for m in model.modules():  # non-trivial (and some negative) norm weights
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(-0.5, 1.5)
    return model


# The Triton interpreter would take minutes on a ResNet: it folds the small stack of the next test.
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("reference", "cpu")])
def test_folded_resnet_matches_unfolded_original(backend):
    dtype = F64 if backend in ("reference", "cpu") else torch.float32
    original = _imagenet_resnet18(dtype)
    model = bcos_kernels.convert(copy.deepcopy(original), backend=backend)
    x = torch.rand(2, 6, 32, 32, dtype=dtype, generator=torch.Generator().manual_seed(7))
    keys = model.state_dict().keys()
    assert bcos_kernels.fold_batchnorm(model, x[:1]) is model
    assert model.state_dict().keys() == keys
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 20 and all(isinstance(m, bnn.BatchNormUncentered2d) and m.folded for m in norms)
    assert all(m.training for m in model.modules())  # fold_batchnorm restores the train flags
    rtol = 1e-10 if dtype == F64 else 2e-4
    for training in (False, True):
        original.train(training)
        model.train(training)
        assert_model_parity(original, model, x, rtol=rtol)
    for a, b in zip([m for m in original.modules() if isinstance(m, torch.nn.BatchNorm2d)], norms):
        torch.testing.assert_close(b.running_var, a.running_var, rtol=rtol, atol=0)
    original.eval()
    model.eval()
    with original.explanation_mode(), model.explanation_mode():
        assert_model_parity(original, model, x, rtol=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_folded_small_stack_on_every_backend(backend):
    """conv (MaxOut, groups) -> norm -> conv (stride 2) -> norm with bias -> conv 1x1 -> norm, folded vs unfolded."""
    dtype = F64 if backend in ("reference", "cpu") else torch.float32
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        bnn.BcosConv2d(6, 8, 3, padding=1, groups=2, max_out=2, backend=backend),
        bnn.BatchNormUncentered2d(8, bias=False),
        bnn.BcosConv2d(8, 5, 3, stride=2, b=1.5, backend=backend),
        bnn.BatchNormUncentered2d(5),
        bnn.BcosConv2d(5, 4, 1, backend=backend),
        bnn.BatchNormUncentered2d(4, bias=False),
    ).to(dtype)
    with torch.no_grad():
        for norm in model[1::2]:
            norm.running_var.uniform_(0.5, 2.0)
            norm.weight.uniform_(-1.0, 2.0)
        model[3].bias.uniform_(-1, 1)
    original = copy.deepcopy(model)
    x = torch.rand(2, 6, 7, 9, dtype=dtype, generator=torch.Generator().manual_seed(2))
    bcos_kernels.fold_batchnorm(model, x)
    assert all(norm.folded for norm in model[1::2])
    rtol = 1e-10 if dtype == F64 else 1e-4
    for training in (False, True):
        original.train(training)
        model.train(training)
        assert_model_parity(original, model, x, rtol=rtol)


def test_fold_refuses_a_conv_output_that_goes_elsewhere():
    class Skip(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = bnn.BcosConv2d(4, 4, 3, padding=1, backend="reference")
            self.norm = bnn.BatchNormUncentered2d(4, bias=False)

        def forward(self, x):
            y = self.conv(x)
            return self.norm(y) + y  # y also used unnormalised: folding would change this sum

    model = Skip()
    with torch.no_grad():
        model.norm.running_var.fill_(4.0)
    with pytest.raises(RuntimeError, match="Nothing was folded"):
        bcos_kernels.fold_batchnorm(model, torch.rand(1, 4, 5, 5))
    assert not model.norm.folded and "folded_norm" not in model.conv.__dict__


def test_fold_and_unfold_roundtrip_and_warning():
    model = torch.nn.Sequential(
        bnn.BcosConv2d(6, 8, 3, backend="reference"),
        bnn.BatchNormUncentered2d(8, bias=False),
        bnn.BcosConv2d(8, 4, 1, backend="reference"),
        bnn.BatchNormUncentered2d(4),
    )
    with torch.no_grad():
        for norm in (model[1], model[3]):
            norm.running_var.uniform_(0.5, 2.0)
            norm.weight.uniform_(0.5, 2.0)
        model[3].bias.uniform_(-1, 1)  # a norm with bias: the conv scales, the norm adds its bias
    model.eval()
    x = torch.rand(2, 6, 7, 7)
    expected = model(x)
    bcos_kernels.fold_batchnorm(model, x)
    assert model[1].folded and model[3].folded
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    bcos_kernels.unfold_batchnorm(model)
    assert not model[1].folded and "folded_norm" not in model[0].__dict__
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    with pytest.warns(UserWarning, match="found no"):
        bcos_kernels.fold_batchnorm(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1)), torch.rand(1, 3, 2, 2))

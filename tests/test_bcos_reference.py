"""The B-cos references (and our drop-in modules on backend "reference") against the original code."""

import sys
import types
import warnings

import pytest
import torch
from originals import bcos_module, load_source, mirror_source

from bcos_kernels import nn as bnn
from bcos_kernels.ops.bcos_conv2d import reference as ref

DT = torch.float64


def forward_and_grads(module, x, params):
    x = x.clone().requires_grad_(True)
    out = module(x)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *params], g)
    return out, grads


def assert_same(mod_a, mod_b, x, params_a, params_b, tol=1e-10):
    torch.manual_seed(1)
    out_a, grads_a = forward_and_grads(mod_a, x, params_a)
    torch.manual_seed(1)
    out_b, grads_b = forward_and_grads(mod_b, x, params_b)
    torch.testing.assert_close(out_a, out_b, atol=tol, rtol=tol)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, atol=tol, rtol=tol)


CONV_CASES = [
    # in, out, k, stride, padding, groups, max_out, b, N, H, W
    (3, 4, 3, 1, 1, 1, 1, 2, 2, 7, 9),
    (6, 8, 3, 2, 0, 1, 2, 2, 1, 9, 8),
    (8, 8, 1, 1, 0, 1, 1, 2.5, 3, 5, 5),
    (8, 12, 3, 1, 1, 4, 1, 2, 2, 6, 7),
    (8, 8, 3, 2, 1, 8, 1, 1.5, 2, 7, 7),  # depthwise
    (4, 6, 5, 1, 2, 2, 3, 2, 1, 5, 5),
    (5, 3, 3, 1, 1, 1, 2, 1, 2, 4, 6),  # b == 1
    (6, 6, (3, 1), (2, 1), (1, 0), 3, 2, 3, 2, 7, 5),  # non-square kernel, groups + MaxOut
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("detach", [False, True])
def test_conv_matches_original_v2(case, detach):
    original = bcos_module("modules")
    cin, cout, k, s, p, g, m, b, n, h, w = case
    orig = original.BcosConv2d(cin, cout, k, s, p, groups=g, b=b, max_out=m).to(DT)
    ours = bnn.BcosConv2d(cin, cout, k, s, p, groups=g, b=b, max_out=m, backend="reference").to(DT)
    ours.load_state_dict(orig.state_dict())
    orig.set_explanation_mode(detach)
    ours.set_explanation_mode(detach)
    x = torch.randn(n, cin, h, w, dtype=DT)
    assert_same(orig, ours, x, [orig.linear.weight], [ours.linear.weight])


@pytest.mark.parametrize("b", [1, 2, 2.5])
def test_conv_with_scale_matches_original(b):
    original = bcos_module("modules")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        orig = original.BcosConv2dWithScale(6, 4, 3, 1, 1, b=b, max_out=2).to(DT)
    ours = bnn.BcosConv2dWithScale(6, 4, 3, 1, 1, b=b, max_out=2, backend="reference").to(DT)
    ours.load_state_dict(orig.state_dict())
    assert ours.scale == orig.scale
    x = torch.randn(2, 6, 5, 5, dtype=DT)
    assert_same(orig, ours, x, [orig.linear.weight], [ours.linear.weight])


@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 7), (1, 7)])
@pytest.mark.parametrize(
    "b,max_out,detach", [(2, 1, False), (2, 2, True), (1.5, 3, False), (1, 2, False), (3, 1, True)]
)
def test_linear_matches_original(shape, b, max_out, detach):
    original = bcos_module("modules")
    orig = original.BcosLinear(7, 5, b=b, max_out=max_out).to(DT)
    ours = bnn.BcosLinear(7, 5, b=b, max_out=max_out, backend="reference").to(DT)
    ours.load_state_dict(orig.state_dict())
    orig.set_explanation_mode(detach)
    ours.set_explanation_mode(detach)
    x = torch.randn(*shape, dtype=DT)
    assert_same(orig, ours, x, [orig.linear.weight], [ours.linear.weight])


def test_fp32_reference_is_bitwise_the_original():
    """In fp32 the reference runs the same operations in the same order as the original."""
    original = bcos_module("modules")
    for b in (2, 2.5):
        orig = original.BcosConv2d(16, 8, 3, 1, 1, b=b, max_out=2)
        x = torch.randn(2, 16, 9, 9)
        ours = ref.bcos_conv2d(x, orig.linear.weight, b=b, padding=1, max_out=2)
        assert torch.equal(orig(x), ours)


def test_zero_patches_are_finite():
    x = torch.zeros(1, 3, 6, 6, dtype=DT, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=DT, requires_grad=True)
    for b in (1.5, 2, 3):
        out = ref.bcos_conv2d(x, w, b=b, padding=1)
        out.sum().backward()
        assert torch.all(out == 0)
        assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


def test_dilation_patch_norm_is_the_dilated_taps():
    """The original breaks here (wrong channel count with MaxOut, tuple crashes); we use the dilated patch."""
    x = torch.randn(2, 4, 9, 9, dtype=DT)
    norm = ref.patch_norms(x, (3, 3), (1, 1), (2, 2), (2, 2), 2)
    ones = torch.ones(2, 2, 3, 3, dtype=DT)
    expected = (torch.nn.functional.conv2d(x**2, ones, None, 1, 2, 2, 2) + 1e-6).sqrt()
    torch.testing.assert_close(norm, expected)
    # brute force one position: patch centred at (4, 4), taps 2 apart, group 1 = channels 2, 3
    patch = x[1, 2:4, 2:7:2, 2:7:2]
    torch.testing.assert_close(norm[1, 1, 4, 4], (patch.pow(2).sum() + 1e-6).sqrt())
    # and the layer output uses it: out = |lin| lin / n with lin the dilated conv, MaxOut 2
    w = torch.randn(8, 2, 3, 3, dtype=DT)
    out = ref.bcos_conv2d(x, w, padding=2, dilation=(2, 2), groups=2, max_out=2)
    lin = torch.nn.functional.conv2d(x, ref.normalized_weight(w), None, 1, 2, 2, 2).unflatten(1, (4, 2)).amax(2)
    torch.testing.assert_close(out, lin.abs() * lin / norm.repeat_interleave(2, 1))


def test_vgg11_bnu_with_our_conv_matches_original():
    """The bcos package's VGG-11 (uncentered BN) built with its BcosConv2d and with ours: same outputs and
    gradients (input and feature conv weights), train and eval. fp32: the classifier alone has 120M weights."""
    vgg = bcos_module("models.vgg")
    modules = bcos_module("modules")
    norm_layer = modules.norms.NoBias(modules.norms.BatchNormUncentered2d)
    orig = vgg.vgg11_bnu(num_classes=10, norm_layer=norm_layer, conv_layer=modules.BcosConv2d)
    ours = vgg.vgg11_bnu(
        num_classes=10, norm_layer=norm_layer, conv_layer=lambda *a, **k: bnn.BcosConv2d(*a, backend="reference", **k)
    )
    ours.load_state_dict(orig.state_dict())
    # the feature convs' weights (the classifier's 120M weight gradients would take most of a minute)
    pick = lambda model: [m.linear.weight for m in model.features.modules() if hasattr(m, "linear")]  # noqa: E731
    for training in (True, False):
        orig.train(training)
        ours.train(training)
        x = torch.rand(2, 6, 32, 32)
        assert_same(orig, ours, x, pick(orig), pick(ours), tol=1e-5)


def _bcosify_original():
    """B-cosification's BcosifyConv2d / BcosifyLinear, executed from the mirror on top of bcos 0.1.3."""
    modules = bcos_module("modules")
    sys.modules.setdefault("bcos.modules.bcosconv2d", modules.bcosconv2d)
    conv = load_source("bcosifyconv2d", mirror_source("shrebox+B-cosification", "bcos/modules/bcosifyconv2d.py"))

    class BcosLinearWithDevice(modules.BcosLinear):
        # B-cosification's own BcosLinear also stores device and dtype, which BcosifyLinear reads
        def __init__(self, *args, device=None, dtype=None, **kwargs):
            super().__init__(*args, device=device, dtype=dtype, **kwargs)
            self.device, self.dtype = device, dtype

    shim = types.ModuleType("bcos.modules.bcoslinear")
    shim.BcosLinear = BcosLinearWithDevice
    saved = sys.modules.get("bcos.modules.bcoslinear")
    sys.modules["bcos.modules.bcoslinear"] = shim
    try:
        lin = load_source("bcosifylinear", mirror_source("shrebox+B-cosification", "bcos/modules/bcosifylinear.py"))
    finally:
        sys.modules["bcos.modules.bcoslinear"] = saved
    return conv.BcosifyConv2d, lin.BcosifyLinear


@pytest.mark.parametrize(
    "clamping,b_loss,detach", [(False, False, False), (True, False, False), (False, True, False), (True, False, True)]
)
def test_bcosify_matches_original(clamping, b_loss, detach):
    conv_cls, lin_cls = _bcosify_original()
    b_start = 0.3 if b_loss else 1.0 + 1e-6 + 0.4
    orig = conv_cls(4, 6, 3, 1, 1, b=2, clamping=clamping, b_loss=b_loss).to(DT)
    orig.linear.bias = torch.nn.Parameter(torch.randn(6, dtype=DT))  # what from_standard_module does
    orig.b = torch.nn.Parameter(torch.tensor(b_start, dtype=DT))
    ours = bnn.BcosifyConv2d(4, 6, 3, 1, 1, b=2, clamping=clamping, b_loss=b_loss, bias=True, backend="reference").to(
        DT
    )
    ours.b = torch.nn.Parameter(torch.tensor(b_start, dtype=DT))
    ours.load_state_dict(orig.state_dict())
    orig.set_explanation_mode(detach)
    ours.set_explanation_mode(detach)
    x = torch.randn(2, 4, 6, 5, dtype=DT)
    assert_same(
        orig, ours, x, [orig.linear.weight, orig.linear.bias, orig.b], [ours.linear.weight, ours.linear.bias, ours.b]
    )

    orig_l = lin_cls(7, 3, b=2, clamping=clamping, b_loss=b_loss).to(DT)
    orig_l.linear.bias = torch.nn.Parameter(torch.randn(3, dtype=DT))
    orig_l.b = torch.nn.Parameter(torch.tensor(b_start, dtype=DT))
    ours_l = bnn.BcosifyLinear(7, 3, bias=True, b=2, clamping=clamping, b_loss=b_loss, backend="reference").to(DT)
    ours_l.b = torch.nn.Parameter(torch.tensor(b_start, dtype=DT))
    ours_l.load_state_dict(orig_l.state_dict())
    xl = torch.randn(3, 2, 7, dtype=DT)
    assert_same(
        orig_l,
        ours_l,
        xl,
        [orig_l.linear.weight, orig_l.linear.bias, orig_l.b],
        [ours_l.linear.weight, ours_l.linear.bias, ours_l.b],
    )


@pytest.mark.parametrize(
    "b,max_out,detach", [(2, 2, False), (2, 2, True), (1.7, 2, False), (1.7, 1, True), (1, 2, False)]
)
def test_v1_matches_original(b, max_out, detach):
    v1 = load_source("bcos_v1", mirror_source("moboehle+B-cos", "modules/bcosconv2d.py"))
    orig = v1.BcosConv2d(5, 4, kernel_size=3, stride=2, padding=1, max_out=max_out, b=b).to(DT)
    ours = bnn.BcosConv2dV1(5, 4, kernel_size=3, stride=2, padding=1, max_out=max_out, b=b, backend="reference").to(DT)
    ours.load_state_dict(orig.state_dict())
    assert ours.scale == orig.scale
    orig.explanation_mode(detach)
    ours.explanation_mode(detach)
    x = torch.randn(2, 5, 7, 6, dtype=DT)
    assert_same(orig, ours, x, [orig.linear.weight], [ours.linear.weight])

"""The whole-model builders of the benchmark (benchmarks/models.py): convert() and the plain-layer swap keep the
original network's numbers, the CoDA-Net providers share their parameters, the batch search finds the boundary."""

import copy
import importlib.util
import os
import sys

import pytest
import torch
from originals import bcos_module

import bcos_kernels
from bcos_kernels import nn as bnn

BENCH_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks")
if BENCH_DIR not in sys.path:
    sys.path.append(BENCH_DIR)  # appended: benchmarks/ has generic module names (harness, shapes) ...
# ... and models.py is loaded under a name of its own, so that it shadows no other `models`
_spec = importlib.util.spec_from_file_location("benchmark_models", os.path.join(BENCH_DIR, "models.py"))
models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(models)

F64 = torch.float64
# The backends of ours that run a whole ResNet-50 here in reasonable time (the Triton interpreter does not).
OUR_BCOS_BACKENDS = [b for b in bcos_kernels.available_backends("cpu", "bcos_conv2d") if b in ("reference", "cpu")]


def assert_close_to_scale(actual, expected, rtol, name=""):
    """max |actual - expected| <= rtol * max |expected|: whole-model outputs and gradients span orders of magnitude,
    an elementwise relative tolerance would be decided by the tiny entries."""
    assert actual.shape == expected.shape, name
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= rtol * scale, f"{name}: max |diff| {err:.3g} > {rtol} * max |expected| {scale:.3g}"


def fwd_bwd(model, x, grad_out):
    """Output, input gradient and the gradient of every parameter by name."""
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    names, params = zip(*model.named_parameters())
    grads = torch.autograd.grad(out, (x, *params), grad_out)
    return out.detach(), grads[0], dict(zip(names, grads[1:]))


# ---------------------------------------------------------------------------------------------------------------
# B-cos ResNet-50
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resnet50_f64():
    """The benchmark's B-cos ResNet-50 in float64, with running statistics from one train-mode batch (so that
    eval mode does not just see the initial variance 1)."""
    torch.manual_seed(0)
    model = models.bcos_resnet50().to(F64).train()
    with torch.no_grad():
        model(torch.randn(4, 6, 32, 32, dtype=F64))
    return model


def _bcos_layers(model):
    orig = bcos_module("modules")
    return [m for m in model.modules() if isinstance(m, (orig.BcosConv2d, orig.BcosLinear))]


def test_bcos_resnet50_is_the_imagenet_config(resnet50_f64):
    assert sum(p.numel() for p in resnet50_f64.parameters()) == 25_538_880
    layers = _bcos_layers(resnet50_f64)
    assert len(layers) == 54  # stem, 16 bottlenecks x 3, 4 downsamples, the 1x1 classifier
    assert all(m.b == 2 and m.max_out == 1 for m in layers)
    norm = resnet50_f64.bn1
    assert type(norm).__name__ == "BatchNormUncentered2d" and norm.bias is None
    assert resnet50_f64.logit_layer.logit_bias == pytest.approx(-6.906754778648554)  # -log(999)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", OUR_BCOS_BACKENDS)
def test_converted_resnet50_matches_original(resnet50_f64, backend, train):
    """What the benchmark times as ours: bcos_kernels.convert of a copy of its ResNet-50."""
    original = copy.deepcopy(resnet50_f64).train(train)
    ours = bcos_kernels.convert(copy.deepcopy(original), backend)
    # the swap: none of the original's B-cos layers left, ours in their place, same keys, the original untouched
    assert not _bcos_layers(ours)
    swapped = [m for m in ours.modules() if isinstance(m, (bnn.BcosConv2d, bnn.BcosLinear))]
    assert len(swapped) == len(_bcos_layers(original)) == 54
    assert all(m.backend == backend and m.b == 2 and m.max_out == 1 for m in swapped)
    assert all(m.training == train for m in ours.modules())
    assert list(ours.state_dict()) == list(original.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), original.state_dict().values()))
    assert ours.layer2[0].conv2.linear.stride == (2, 2) and ours.conv1.linear.kernel_size == (7, 7)

    x = torch.randn(2, 6, 32, 32, dtype=F64)
    grad_out = torch.randn(2, 1000, dtype=F64)
    out, gx, grads = fwd_bwd(ours, x, grad_out)
    ref_out, ref_gx, ref_grads = fwd_bwd(original, x, grad_out)
    # Train-mode batch norm over 2 images with 1x1 maps in layer4 amplifies rounding (1e-16) by up to ~1e8.
    rtol = 1e-6 if train else 1e-10
    assert_close_to_scale(out, ref_out, rtol, "output")
    assert_close_to_scale(gx, ref_gx, rtol, "input gradient")
    assert list(grads) == list(ref_grads)
    for name in ref_grads:
        assert_close_to_scale(grads[name], ref_grads[name], rtol, name)
    if train:  # both updated their running statistics the same way
        for (name, a), b in zip(ours.state_dict().items(), original.state_dict().values()):
            assert_close_to_scale(a.double(), b.double(), rtol, name)


def test_with_plain_layers(resnet50_f64):
    original = copy.deepcopy(resnet50_f64).train()
    plain = models.with_plain_layers(original)
    assert not _bcos_layers(plain)
    assert not any(isinstance(m, (bnn.BcosConv2d, bnn.BcosLinear)) for m in plain.modules())
    convs = [m for m in plain.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 54 and all(type(m) is torch.nn.Conv2d and m.bias is None for m in convs)
    assert len(_bcos_layers(original)) == 54  # the original is left as it was
    # the same network otherwise: the norms and the logit layer are still there
    assert type(plain.bn1).__name__ == "BatchNormUncentered2d" and plain.logit_layer is not None
    x = torch.randn(2, 6, 32, 32, dtype=F64)
    out = plain(x)
    assert out.shape == original(x).shape == (2, 1000)
    out.sum().backward()
    assert all(p.grad is not None for p in plain.parameters())


# ---------------------------------------------------------------------------------------------------------------
# CoDA-Net CIFAR-10
# ---------------------------------------------------------------------------------------------------------------
def test_coda_net_reference_and_ours_share_parameters_and_agree():
    state = torch.get_rng_state()
    reference, ours = models.coda_net_cifar10("reference"), models.coda_net_cifar10("torch")
    assert torch.equal(torch.get_rng_state(), state)  # seeded without touching the global RNG
    ref_sd, our_sd = reference.state_dict(), ours.state_dict()
    assert list(ref_sd) == list(our_sd)
    assert len(ref_sd) == 27  # 9 layers x (rank weight, expansion weight, expansion bias)
    assert all(torch.equal(ref_sd[k], our_sd[k]) for k in ref_sd)
    assert not torch.equal(
        models.coda_net_cifar10("torch", seed=1).state_dict()[next(iter(ref_sd))], our_sd[next(iter(ref_sd))]
    )

    reference, ours = reference.to(F64), ours.to(F64)
    x = torch.rand(2, 3, 32, 32, dtype=F64)
    x = torch.cat([x, 1 - x], 1)  # the (x, 1 - x) input of the CoDA-Nets
    grad_out = torch.randn(2, 10, dtype=F64)
    out, gx, grads = fwd_bwd(ours, x, grad_out)
    ref_out, ref_gx, ref_grads = fwd_bwd(reference, x, grad_out)
    assert out.shape == (2, 10)
    assert_close_to_scale(out, ref_out, 1e-10, "output")
    assert_close_to_scale(gx, ref_gx, 1e-10, "input gradient")
    for name in ref_grads:
        assert_close_to_scale(grads[name], ref_grads[name], 1e-10, name)


def test_coda_net_head_is_sum_pool_then_temperature_and_bias():
    from shapes import CODA_CIFAR10_LOGIT_BIAS, CODA_CIFAR10_LOGIT_TEMPERATURE

    net = models.coda_net_cifar10("reference").to(F64)
    x = torch.randn(2, 6, 32, 32, dtype=F64)
    features = net[:9](x)
    assert features.shape == (2, 10, 8, 8)
    expected = features.sum((2, 3)) / CODA_CIFAR10_LOGIT_TEMPERATURE + CODA_CIFAR10_LOGIT_BIAS
    torch.testing.assert_close(net(x), expected)
    assert CODA_CIFAR10_LOGIT_TEMPERATURE == 1000


def test_coda_net_plain():
    net = models.coda_net_cifar10("plain")
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 9 and all(type(m) is torch.nn.Conv2d and m.bias is None for m in convs)
    assert net(torch.randn(2, 6, 32, 32)).shape == (2, 10)


# ---------------------------------------------------------------------------------------------------------------
# largest_batch, gpu_step_fits, check_parity
# ---------------------------------------------------------------------------------------------------------------
class Counted:
    def __init__(self, predicate):
        self.predicate, self.calls = predicate, []

    def __call__(self, b):
        self.calls.append(b)
        return self.predicate(b)


def test_largest_batch_finds_the_boundary():
    fits = Counted(lambda b: b <= 37)
    assert models.largest_batch(fits) == 37
    assert len(fits.calls) <= 2 * 13 and max(fits.calls) <= 4096


def test_largest_batch_none_fit():
    fits = Counted(lambda b: False)
    assert models.largest_batch(fits) == 0
    assert fits.calls == [1]


def test_largest_batch_all_fit_gives_the_limit():
    assert models.largest_batch(lambda b: True) == 4096
    fits = Counted(lambda b: True)
    assert models.largest_batch(fits, limit=100) == 100
    assert max(fits.calls) == 100


def test_largest_batch_from_a_larger_start():
    assert models.largest_batch(lambda b: b <= 37, start=5) == 37
    assert models.largest_batch(lambda b: b <= 4, start=5) == 0
    assert models.largest_batch(lambda b: b <= 5, start=5) == 5


@pytest.mark.parametrize("start", [1, 2, 3, 7])
def test_largest_batch_every_boundary(start):
    limit = 50
    for threshold in range(0, 60):
        fits = Counted(lambda b: b <= threshold)
        expected = min(threshold, limit) if threshold >= start else 0
        assert models.largest_batch(fits, start=start, limit=limit) == expected, threshold
        assert all(start <= b <= limit for b in fits.calls)


def test_largest_batch_rejects_bad_ranges():
    with pytest.raises(ValueError):
        models.largest_batch(lambda b: True, start=0)
    with pytest.raises(ValueError):
        models.largest_batch(lambda b: True, start=10, limit=5)


def test_gpu_step_fits():
    def make_workload(batch):
        if batch > 8:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate ...")
        w = torch.randn(3, requires_grad=True)
        x = torch.randn(batch, 3)
        return models.Workload(lambda: x @ w, [w])

    fits = models.gpu_step_fits(make_workload)
    assert fits(1) and fits(8) and not fits(9)
    assert models.largest_batch(fits) == 8

    def broken(batch):
        raise RuntimeError("a bug, not a lack of memory")

    with pytest.raises(RuntimeError, match="a bug"):
        models.gpu_step_fits(broken)(1)


def test_check_parity():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(6, 4, 3), torch.nn.Flatten())
    off = copy.deepcopy(model)
    with torch.no_grad():
        off[0].weight.mul_(1.01)
    x = torch.randn(2, 6, 5, 5)
    models.check_parity(model, copy.deepcopy(model), x, rtol=1e-6)
    with pytest.raises(AssertionError, match="max \\|diff\\|"):
        models.check_parity(model, off, x, rtol=1e-3)
    models.check_parity(model, off, x, rtol=0.05)

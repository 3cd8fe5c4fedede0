"""bcos_kernels.explain: one batched forward/backward against the `bcos` package's per-image ``model.explain``."""

import copy

import numpy as np
import pytest
import torch
from helpers import one_intra_op_thread  # noqa: F401  (autouse fixture)
from originals import bcos_module, bcos_resnet18_imagenet_config

import bcos_kernels
from bcos_kernels import nn as bnn

F64 = torch.float64


@pytest.fixture(scope="module")
def bcos_resnet():
    """A B-cos ResNet-18 of the ImageNet configuration (10 classes), norms warmed up, in eval mode."""
    torch.manual_seed(0)
    model = bcos_resnet18_imagenet_config().to(F64)
    with torch.no_grad():
        for seed in range(2):
            model(torch.rand(4, 6, 32, 32, dtype=F64, generator=torch.Generator().manual_seed(seed)))
    return model.eval()


def _images(n, seed=3, size=32):
    rgb = torch.rand(n, 3, size, size, dtype=F64, generator=torch.Generator().manual_seed(seed))
    return torch.cat([rgb, 1 - rgb], dim=1)


def _per_image(model, x, targets):
    results = []
    for i, target in enumerate(targets):
        xi = x[i : i + 1].clone().requires_grad_(True)
        results.append(model.explain(xi, idx=target))
    return results


def _assert_matches_per_image(batched, per_image, targets, rtol):
    for i, expected in enumerate(per_image):
        assert batched["prediction"][i].item() == expected["prediction"]
        assert batched["explained_class"][i].item() == expected["explained_class_idx"]
        weights = expected["dynamic_linear_weights"][0]
        torch.testing.assert_close(
            batched["dynamic_linear_weights"][i], weights, rtol=rtol, atol=rtol * weights.abs().max().item()
        )
        cmap = expected["contribution_map"][0]
        torch.testing.assert_close(batched["contribution_map"][i], cmap, rtol=rtol, atol=rtol * cmap.abs().max().item())
        np.testing.assert_allclose(batched["explanation"][i], expected["explanation"], rtol=0, atol=1e-6)
    assert batched["explanation"].shape == (len(per_image),) + per_image[0]["explanation"].shape


@pytest.mark.parametrize("target", [None, 3, "per-sample"])
def test_batched_equals_per_image_original(bcos_resnet, target):
    x = _images(5)
    targets = [None] * 5 if target is None else [target] * 5 if isinstance(target, int) else [7, 0, 9, 3, 3]
    per_image = _per_image(bcos_resnet, x, targets)
    arg = [7, 0, 9, 3, 3] if target == "per-sample" else target
    # the original model (batching alone) and the converted one (our layers)
    ours = bcos_kernels.convert(copy.deepcopy(bcos_resnet))
    for model in (bcos_resnet, ours):
        batched = bcos_kernels.explain(model, x, arg)
        _assert_matches_per_image(batched, per_image, targets, rtol=1e-9)
        assert batched["logits"].shape == (5, 10)
    # a tensor of targets works too
    tensor_target = bcos_kernels.explain(ours, x, torch.tensor([7, 0, 9, 3, 3]))
    assert tensor_target["explained_class"].tolist() == [7, 0, 9, 3, 3]


def test_fp32_converted_matches_per_image_original(bcos_resnet):
    model = copy.deepcopy(bcos_resnet).float()
    x = _images(3).float()
    per_image = _per_image(model, x, [None] * 3)
    batched = bcos_kernels.explain(bcos_kernels.convert(copy.deepcopy(model)), x)
    for i, expected in enumerate(per_image):
        weights = expected["dynamic_linear_weights"][0]
        torch.testing.assert_close(
            batched["dynamic_linear_weights"][i], weights, rtol=1e-4, atol=1e-4 * weights.abs().max().item()
        )
        # alpha is normalised by a percentile: compare the images loosely in fp32
        assert np.abs(batched["explanation"][i] - expected["explanation"]).mean() < 1e-3


@pytest.mark.parametrize("smooth,percentile", [(15, 99.5), (0, 90.0), (3, 50.0), (15, 100.0), (5, 0.0)])
def test_gradient_to_image_matches_original_per_image(smooth, percentile):
    common = bcos_module("common")
    gen = torch.Generator().manual_seed(0)
    images = _images(3, size=17)
    weights = torch.randn(3, 6, 17, 17, dtype=F64, generator=gen)
    batched = bcos_kernels.gradient_to_image(images, weights, smooth, percentile)
    assert batched.shape == (3, 17, 17, 4) and batched.dtype == np.float64
    for i in range(3):
        # equal up to rounding: the box mean is two 1-D means and the norm a sum of squares (fp64: ~1e-15)
        want = common.gradient_to_image(images[i], weights[i], smooth, percentile)
        np.testing.assert_allclose(batched[i], want, rtol=0, atol=1e-12)
    single = bcos_kernels.gradient_to_image(images[1], weights[1], smooth, percentile)
    np.testing.assert_array_equal(single, batched[1])
    with pytest.raises(ValueError, match="6-channel"):
        bcos_kernels.gradient_to_image(images[:, :3], weights[:, :3])
    with pytest.raises(ValueError, match="same shape"):
        bcos_kernels.gradient_to_image(images, weights[:2])


def test_caller_tensor_untouched_and_modes_restored(bcos_resnet):
    model = bcos_kernels.convert(copy.deepcopy(bcos_resnet))
    layers = [m for m in model.modules() if isinstance(m, bnn.BcosConv2d)]
    layers[0].set_explanation_mode(True)  # a layer already in explanation mode stays so
    x = _images(2)
    x_leaf = x.clone().requires_grad_(True)
    bcos_kernels.explain(model, x)
    bcos_kernels.explain(model, x_leaf)
    assert not x.requires_grad and x.grad is None and x_leaf.grad is None
    assert layers[0].detach and not any(m.detach for m in layers[1:])
    assert all(p.requires_grad for p in model.parameters())  # frozen during the call only
    with pytest.raises(ValueError, match="target classes must lie in"):
        bcos_kernels.explain(model, x, 10)
    assert layers[0].detach and not any(m.detach for m in layers[1:])  # restored after an error too


def test_explanation_mode_of_v1_and_coda_style_layers():
    """Layers switched by ``explanation_mode(detach)`` (CoDA-Nets, moboehle/B-cos) are switched too."""
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x):
            seen.append([m.detach for m in model if hasattr(m, "detach")])
            return x.flatten(1)

    model = torch.nn.Sequential(
        bnn.DAUConv2d(6, 4, 3, backend="torch"),
        bnn.BcosConv2dV1(4, 5, 1, backend="reference"),
        torch.nn.AdaptiveAvgPool2d(1),
        Spy(),
    )
    out = bcos_kernels.explain(model.eval(), _images(2, size=8).float())
    assert seen == [[True, True]] and not model[0].detach and not model[1].detach
    assert out["dynamic_linear_weights"].shape == (2, 6, 8, 8) and out["explanation"].shape == (2, 8, 8, 4)


def test_bad_arguments(bcos_resnet):
    x = _images(3)
    with pytest.raises(ValueError, match=r"3 integer classes"):
        bcos_kernels.explain(bcos_resnet, x, [1, 2])
    with pytest.raises(ValueError, match=r"3 integer classes"):
        bcos_kernels.explain(bcos_resnet, x, torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(TypeError, match="target must be"):
        bcos_kernels.explain(bcos_resnet, x, 2.0)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        bcos_kernels.explain(bcos_resnet, x[0])
    with pytest.raises(TypeError, match="floating-point"):
        bcos_kernels.explain(bcos_resnet, x.long())
    with pytest.raises(ValueError, match="logits"):
        bcos_kernels.explain(torch.nn.Identity().eval(), x)
    bcos_resnet.train()
    try:
        with pytest.warns(UserWarning, match="training mode"):
            bcos_kernels.explain(bcos_resnet, x)
    finally:
        bcos_resnet.eval()


def test_three_channel_input_has_no_rgba_image():
    model = torch.nn.Sequential(
        bnn.BcosConv2d(3, 4, 3, backend="reference"), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
    )
    out = bcos_kernels.explain(model.eval(), torch.rand(2, 3, 6, 6))
    assert out["explanation"] is None and out["contribution_map"].shape == (2, 6, 6)

"""B-cos ViTs (`bcos.models.vit`, B-cos v2) through ``convert``: the converted model matches the original on the
output, the input gradient and every parameter gradient, in training, eval and explanation mode, and batched
explanations match the original's per-image ones."""

import copy

import pytest
import torch
from originals import bcos_module, bcos_vit

import bcos_kernels
from bcos_kernels import nn as bnn

ARCHS = ["simple_vit_ti_patch16_224", "vitc_ti_patch1_14"]  # ViT-Ti/16 and ViT-C-Ti (conv stem), full depth
# 48x48 inputs: 3x3 tokens for both (the models take any size that the patch size divides)
SIZE = 48
# fp32: the largest difference relative to the tensor's largest fp64 value (DESIGN.md's fp32 contract, 1e-4)
FP32_RELATIVE = 1e-4


def _set_explanation_mode(model, flag):
    for m in model.modules():
        if hasattr(m, "set_explanation_mode"):
            m.set_explanation_mode(flag)


def _results(model, x):
    x = x.clone().requires_grad_()
    out = model(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(out.dtype)
    grads = torch.autograd.grad(out, [x, *model.parameters()], g)
    return [out.detach(), *grads]


def _pair(arch, dtype=torch.float64):
    torch.manual_seed(0)
    original = bcos_vit(arch).to(dtype)
    return original, bcos_kernels.convert(copy.deepcopy(original))


@pytest.mark.parametrize("arch", ARCHS)
def test_convert_replaces_every_interpretable_layer_and_keeps_the_state(arch):
    torch.manual_seed(0)
    original = bcos_vit(arch)
    keys, params = list(original.state_dict()), list(original.parameters())
    ours = bcos_kernels.convert(original)  # in place
    assert list(ours.state_dict()) == keys
    # the very parameters of the original (an optimiser built before the conversion still steps them)
    assert [id(p) for p in ours.parameters()] == [id(p) for p in params]
    m = bcos_module("modules")
    vit = bcos_module("models.vit")
    centered = m.norms.centered_norms
    left = [
        n
        for n, mod in ours.named_modules()
        if type(mod) in (m.BcosLinear, m.BcosConv2d, vit.Attention, centered.DetachableLayerNorm)
        or type(mod) is centered.DetachableGNLayerNorm2d
    ]
    assert left == []
    kinds = {type(mod) for mod in ours.modules()}
    assert {bnn.Attention, bnn.BcosLinear, bnn.DetachableLayerNorm} <= kinds
    if "vitc" in arch:
        assert {bnn.BcosConv2d, bnn.DetachableGroupNorm2d} <= kinds
    # the converted model holds the original's parameters themselves (an optimiser built before still works)


@pytest.mark.parametrize("mode", ["train", "eval", "explanation"])
@pytest.mark.parametrize("arch", ARCHS)
def test_converted_vit_matches_the_original_fp64(arch, mode):
    original, ours = _pair(arch)
    for model in (original, ours):
        model.train(mode == "train")
        _set_explanation_mode(model, mode == "explanation")
    x = torch.rand(2, 6, SIZE, SIZE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want, got = _results(original, x), _results(ours, x)
    names = ["out", "grad x", *(n for n, _ in original.named_parameters())]
    for name, a, b in zip(names, want, got):
        torch.testing.assert_close(b, a, atol=1e-8, rtol=0, msg=lambda msg: f"{arch} {mode}: {name}: {msg}")


@pytest.mark.parametrize("arch", ARCHS)
def test_converted_vit_matches_the_original_fp32(arch):
    original64, _ = _pair(arch)
    original, ours = _pair(arch, torch.float32)
    x = torch.rand(2, 6, SIZE, SIZE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = _results(original64, x)
    got = _results(ours, x.float())
    names = ["out", "grad x", *(n for n, _ in original.named_parameters())]
    for name, a, b in zip(names, want, got):
        error = ((b.double() - a).abs().max() / a.abs().max().clamp_min(1e-30)).item()
        assert error <= FP32_RELATIVE, f"{arch}: {name}: relative error {error:.3g}"


def test_attention_detaches_q_and_k_in_explanation_mode():
    vit = bcos_module("models.vit")
    torch.manual_seed(0)
    original = vit.Attention(12, heads=3, dim_head=4, linear_layer=torch.nn.Linear, norm_layer=torch.nn.LayerNorm)
    original = original.double()
    ours = bcos_kernels.convert(copy.deepcopy(original))
    assert isinstance(ours, bnn.Attention) and isinstance(ours.to_out, torch.nn.Linear)
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    for flag in (False, True):
        original.set_explanation_mode(flag), ours.set_explanation_mode(flag)
        want, got = _results(original, x), _results(ours, x)
        for a, b in zip(want, got):
            torch.testing.assert_close(b, a, atol=1e-12, rtol=0)
        names = [n for n, _ in ours.named_parameters()]
        qk_rows = got[2 + names.index("to_qkv.weight")][:24]  # the q and k rows get no gradient when detached
        assert (qk_rows.abs().max() == 0) == flag


def test_a_differently_built_attention_is_left_alone():
    class Attention(torch.nn.Module):  # lucidrains-style: same name, no B-cos attributes
        def __init__(self):
            super().__init__()
            self.heads, self.scale = 2, 0.5
            self.to_qkv = torch.nn.Linear(4, 12)

        def forward(self, x):
            return x

    model = torch.nn.Sequential(Attention())
    assert type(bcos_kernels.convert(model)[0]) is Attention


def test_our_attention_builds_as_the_original():
    torch.manual_seed(0)
    attention = bnn.Attention(16, heads=2, dim_head=8, linear_layer=bnn.BcosLinear, norm_layer=bnn.DetachableLayerNorm)
    vit = bcos_module("models.vit")
    modules = bcos_module("modules")
    torch.manual_seed(0)
    original = vit.Attention(
        16, heads=2, dim_head=8, linear_layer=modules.BcosLinear, norm_layer=modules.norms.DetachableLayerNorm
    )
    assert list(attention.state_dict()) == list(original.state_dict())
    with pytest.raises(ValueError, match="linear_layer"):
        bnn.Attention(16)


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_explanations_match_the_original_per_image(arch):
    original, ours = _pair(arch)
    original.eval(), ours.eval()
    x = torch.rand(3, 6, SIZE, SIZE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = bcos_kernels.explain(ours, x, target=[1, 4, 7])
    _set_explanation_mode(original, True)
    for i, target in enumerate([1, 4, 7]):
        xi = x[i : i + 1].clone().requires_grad_()
        (weights,) = torch.autograd.grad(original(xi)[0, target], xi)
        torch.testing.assert_close(got["dynamic_linear_weights"][i], weights[0], atol=1e-10, rtol=0)
        torch.testing.assert_close(got["contribution_map"][i], (x[i] * weights[0]).sum(0), atol=1e-10, rtol=0)
    assert got["explanation"].shape == (3, SIZE, SIZE, 4)
    assert not any(getattr(m, "detach", False) for m in ours.modules() if hasattr(m, "set_explanation_mode"))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_converted_vit_compiles_in_one_graph_in_both_modes():
    torch.manual_seed(0)
    original = bcos_vit("simple_vit_ti_patch16_224")
    for i in range(1, 12):  # one encoder block keeps the compile short
        delattr(original[0].transformer, f"encoder_{i}")
    ours = bcos_kernels.convert(original)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(ours, fullgraph=True)
    x = torch.rand(2, 6, 32, 32)
    for flag in (False, True):
        _set_explanation_mode(ours, flag)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        got, want = compiled(xa), ours(xb)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        ga, gb = torch.autograd.grad(got.sum(), xa), torch.autograd.grad(want.sum(), xb)
        torch.testing.assert_close(ga[0], gb[0], atol=1e-5, rtol=1e-5)
    # one graph per mode: explanation mode is a different program (q, k and the norms' variance detached)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2

"""bcos_kernels.bcosify on transformers: the `bcos` package's standard SimpleViT / ViT-C against the original
B-cosification of ViTs (shrebox/B-cosification bcosify_vit.py, executed from its mirror on its own modules), and
a CLIP-style ViT on nn.MultiheadAttention (which the original has no conversion for) against the properties the
conversion must have: with b = 1 and its biases it is the standard model, without biases it is dynamic linear."""

import copy
import functools
import warnings

import pytest
import torch
from helpers import one_intra_op_thread  # noqa: F401  (autouse: tiny tensors, one intra-op thread)
from originals import (
    BCOSIFICATION,
    BCOSIFICATION_LAYERS,
    bcos_module,
    load_bcosification,
    load_source,
    mirror_source,
    torchvision_stand_ins,
)
from torch import nn

import bcos_kernels
from bcos_kernels import nn as bnn
from bcos_kernels.bcosify import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, add_inverse, bcosify

DT = torch.float64


# ---------------------------------------------------------------------------------------------------------------
# Standard ViTs of the `bcos` package (its vit_final baseline config) and the original conversion
# ---------------------------------------------------------------------------------------------------------------
def standard_simple_vit(stem: bool) -> nn.Module:
    """A small standard SimpleViT (``stem``: ViT-C, with the conv stem) as the `bcos` package's baseline
    experiments build them: nn.Linear / nn.Conv2d, nn.LayerNorm, nn.GELU, DetachableGNLayerNorm2d in the stem,
    3 input channels; affine parameters and biases away from their defaults."""
    vit = bcos_module("models.vit")
    centered = bcos_module("modules").norms.centered_norms
    common = dict(
        num_classes=7,
        dim=24,
        depth=2,
        heads=3,
        mlp_dim=40,
        channels=3,
        linear_layer=nn.Linear,
        conv2d_layer=nn.Conv2d,
        norm_layer=nn.LayerNorm,
        act_layer=nn.GELU,
        norm2d_layer=centered.DetachableGNLayerNorm2d,
    )
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "use the pretrained entrypoints"
        if stem:
            model = vit.SimpleViT(image_size=4, patch_size=1, conv_stem=[8, 16], **common)
        else:
            model = vit.SimpleViT(image_size=12, patch_size=4, **common)
    return _pretrained_looking(model).to(DT)


@functools.lru_cache(maxsize=None)
def _original_bcosify_vit_module():
    """The original bcosify_vit.py on the original's own modules from the mirror (torchvision stood in for where
    it is missing)."""

    def on_load(name, module, packages):
        if name == "bcos.modules.logitlayer":
            packages["bcos.modules"].LogitLayer = module.LogitLayer
        if name == "bcos.modules.norms.centered_norms":
            for cls in ("DetachableLayerNorm", "DetachableGroupNorm2d"):
                setattr(packages["bcos.modules.norms"], cls, getattr(module, cls))

    paths = BCOSIFICATION_LAYERS + [
        ("bcos.modules.norms.centered_norms", "bcos/modules/norms/centered_norms.py"),
        ("bcosify_vit", "bcosify_vit.py"),
    ]
    return load_bcosification(paths, torchvision_stand_ins(), on_load)["bcosify_vit"]


def original_bcosified_vit(std: nn.Module, *, b=2.0, act_layer=True, clip=None, keep_bias=False) -> nn.Module:
    """`std` B-cosified by the original: BcosifyNetwork of bcosify_vit.py (its forward normalises the 6-channel
    input: ImageNet's, or with ``clip`` "mean" / "mean_zero" CLIP's), then what its model.py does (every bias set
    to None, unless the config's use_bias)."""
    orig = _original_bcosify_vit_module()
    config = dict(
        weights="pretrained",
        act_layer=act_layer,
        bfy_mean_zero=clip == "mean_zero",
        bcos_args=dict(b=b, max_out=1),
        bcosify_args=dict(clip_kd=clip is not None),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = orig.BcosifyNetwork(copy.deepcopy(std), config, add_channels=True, logit_layer=False)
    if not keep_bias:
        for mod in net.modules():
            if hasattr(mod, "bias") and mod.bias is not None:
                mod.bias = None
    return net.to(DT)


def _set_explanation_mode(model: nn.Module, on: bool) -> None:
    for m in model.modules():
        if hasattr(m, "set_explanation_mode"):
            m.set_explanation_mode(on)


def _results(fn, params, x, seed=1):
    x = x.clone().requires_grad_(True)
    out = fn(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return [out.detach(), *torch.autograd.grad(out, [x, *params], g, allow_unused=True)]


NORMALISATION = {
    None: dict(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    "mean": dict(mean=CLIP_MEAN, std=CLIP_STD),
    "mean_zero": dict(mean=None, std=CLIP_STD),
}


@pytest.mark.parametrize("stem", [False, True], ids=["vit", "vitc"])
@pytest.mark.parametrize(
    "config",
    [dict(), dict(clip="mean"), dict(clip="mean_zero", act_layer=False), dict(b=1.5, keep_bias=True)],
    ids=["imagenet", "clip", "clip-mean-zero-no-gelu", "b1.5-bias"],
)
@pytest.mark.parametrize("mode", ["train", "explanation"])
def test_matches_original(stem, config, mode):
    std = standard_simple_vit(stem)
    original = original_bcosified_vit(std, **config)
    ours = bcosify(
        copy.deepcopy(std),
        b=config.get("b", 2.0),
        keep_bias=config.get("keep_bias", False),
        detachable_gelu=config.get("act_layer", True),
    )
    assert ours.state_dict().keys() == original.model.state_dict().keys()
    for model in (original, ours):
        model.train(mode == "train")
        _set_explanation_mode(model, mode == "explanation")
    size = 16 if stem else 12
    rgb = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0), dtype=DT)
    normalisation = NORMALISATION[config.get("clip")]
    want = _results(original, list(original.model.parameters()), add_inverse(rgb))
    got = _results(lambda x: ours(add_inverse(x[:, :3], **normalisation)), list(ours.parameters()), add_inverse(rgb))
    names = ["out", "grad x", *(n for n, _ in ours.named_parameters())]
    # the gradient w.r.t. the encoding: ours reaches it through its first 3 channels only (add_inverse of them)
    want[1], got[1] = want[1][:, :3] - want[1][:, 3:], got[1][:, :3]
    for name, a, b in zip(names, want, got):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-10, msg=lambda m: f"{name}: {m}")


def test_layers_of_a_bcosified_simple_vit():
    ours = bcosify(standard_simple_vit(stem=False))
    types_ = {type(m) for m in ours.modules()}
    assert {bnn.Attention, bnn.BcosifyLinear, bnn.DetachableLayerNorm, bnn.DetachableGELU} <= types_
    assert not types_ & {nn.LayerNorm, nn.GELU, bcos_module("models.vit").Attention}
    attention = ours.transformer.encoder_0.attn
    assert type(attention.to_qkv) is nn.Linear  # the original keeps the qkv projection plain
    assert ours.to_patch_embedding.linear.linear.weight.shape == (24, 2 * 3 * 16)
    assert not [n for n, _ in ours.named_parameters() if n.endswith("bias")]


def test_linear_patch_embedding_reads_the_encoding_as_the_standard_one():
    """b = 1 and the biases kept: the B-cosified SimpleViT on the normalised [x, 1 - x] encoding is the standard
    model on the normalised image (GELU and layer norms are unchanged out of explanation mode)."""
    std = standard_simple_vit(stem=False)
    ours = bcosify(copy.deepcopy(std), b=1.0, keep_bias=True)
    rgb = torch.rand(2, 3, 12, 12, dtype=DT)
    z = (rgb - torch.tensor(IMAGENET_MEAN, dtype=DT)[:, None, None]) / torch.tensor(IMAGENET_STD, dtype=DT)[
        :, None, None
    ]
    torch.testing.assert_close(ours(add_inverse(rgb, mean=IMAGENET_MEAN, std=IMAGENET_STD)), std(z))


# ---------------------------------------------------------------------------------------------------------------
# A CLIP-style ViT on nn.MultiheadAttention (no original conversion exists for it)
# ---------------------------------------------------------------------------------------------------------------
class QuickGELU(nn.Module):
    """CLIP's activation, as CLIP defines it (recognised by bcosify by its name)."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Block(nn.Module):
    def __init__(self, width, heads, act, batch_first):
        super().__init__()
        self.batch_first = batch_first
        self.attn = nn.MultiheadAttention(width, heads, batch_first=batch_first)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), act(), nn.Linear(2 * width, width))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class ClipStyleViT(nn.Module):
    """CLIP's VisionTransformer layout: patch conv without bias, class token, learned positional embedding,
    ln_pre, residual attention blocks (sequence-first, QuickGELU), ln_post on the class token, a projection
    matrix. ``batch_first=True``, GELU: torchvision's layout instead."""

    def __init__(self, width=24, heads=3, layers=2, patch=4, image=12, out=10, batch_first=False, act=QuickGELU):
        super().__init__()
        self.batch_first = batch_first
        self.conv1 = nn.Conv2d(3, width, patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * 0.1)
        self.positional_embedding = nn.Parameter(torch.randn((image // patch) ** 2 + 1, width) * 0.1)
        self.ln_pre = nn.LayerNorm(width)
        self.blocks = nn.Sequential(*[Block(width, heads, act, batch_first) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, out) * width**-0.5)

    def forward(self, x):
        x = self.conv1(x).flatten(2).transpose(1, 2)  # (N, tokens, width)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)
        x = self.blocks(x if self.batch_first else x.transpose(0, 1))
        x = x if self.batch_first else x.transpose(0, 1)
        return self.ln_post(x[:, 0]) @ self.proj


def _pretrained_looking(model: nn.Module) -> nn.Module:
    """Biases and norm weights away from their defaults (embeddings left as initialised)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name:
                p.uniform_(-0.3, 0.3)
            elif p.dim() == 1 and "embedding" not in name:
                p.uniform_(0.5, 1.5)
    return model


def clip_style_vit(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return _pretrained_looking(ClipStyleViT(**kwargs)).to(DT)


LAYOUTS = [dict(), dict(batch_first=True, act=nn.GELU)]
LAYOUT_IDS = ["clip", "torchvision-like"]


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_clip_style_vit_with_b1_and_biases_is_the_standard_model(layout):
    std = clip_style_vit(**layout)
    ours = bcosify(copy.deepcopy(std), b=1.0, keep_bias=True)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in ours.modules())
    assert isinstance(ours.blocks[0].attn, bnn.MultiheadAttention)
    assert isinstance(ours.blocks[0].attn.out_proj, bnn.BcosifyLinear)
    assert ours.conv1.linear.weight.shape[1] == 6
    rgb = torch.rand(3, 3, 12, 12, dtype=DT)
    z = (rgb - torch.tensor(CLIP_MEAN, dtype=DT)[:, None, None]) / torch.tensor(CLIP_STD, dtype=DT)[:, None, None]
    x = add_inverse(rgb, mean=CLIP_MEAN, std=CLIP_STD)
    want = _results(std, list(std.parameters()), z)
    got = _results(lambda x6: ours(add_inverse(x6, mean=CLIP_MEAN, std=CLIP_STD)), list(ours.parameters()), rgb)
    torch.testing.assert_close(got[0], want[0])
    assert x.shape[1] == 6
    # the parameters they share (all but the widened patch conv) get the same gradients
    std_grads = dict(zip([n for n, _ in std.named_parameters()], want[2:]))
    for (name, _), grad in zip(ours.named_parameters(), got[2:]):
        key = name.replace(".linear.", ".")
        if key != "conv1.weight":
            torch.testing.assert_close(grad, std_grads[key], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_clip_style_vit_without_biases_is_dynamic_linear(layout):
    """No biases, no positional embedding or class token (additive terms): in explanation mode the output is
    W(x) x with W(x) the input gradient, exactly, and the explanation does not change the output."""
    std = clip_style_vit(**layout)
    with torch.no_grad():
        std.positional_embedding.zero_()
        std.class_embedding.zero_()
    ours = bcosify(std).eval()
    x = add_inverse(torch.rand(2, 3, 12, 12, dtype=DT))
    plain = ours(x)
    _set_explanation_mode(ours, True)
    for k in range(plain.shape[1]):
        xs = x.clone().requires_grad_(True)
        out = ours(xs)
        (grad,) = torch.autograd.grad(out[:, k].sum(), xs)
        torch.testing.assert_close(out.detach(), plain)
        torch.testing.assert_close((grad * x).flatten(1).sum(1), out[:, k].detach())


def test_batched_explain_of_a_bcosified_clip_style_vit_matches_per_image():
    ours = bcosify(clip_style_vit()).eval()
    x = add_inverse(torch.rand(3, 3, 12, 12, dtype=DT))
    got = bcos_kernels.explain(ours, x, target=2)
    _set_explanation_mode(ours, True)
    for i in range(3):
        xi = x[i : i + 1].clone().requires_grad_(True)
        (want,) = torch.autograd.grad(ours(xi)[0, 2], xi)
        torch.testing.assert_close(got["dynamic_linear_weights"][i], want[0])


def test_multihead_attention_options_without_a_bcos_form_are_refused():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.MultiheadAttention(8, 2, add_bias_kv=True))
    with pytest.raises(ValueError, match="bias_k"):
        bcosify(model)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.MultiheadAttention(8, 2, kdim=4))
    with pytest.raises(ValueError, match="kdim"):
        bcosify(model)
    with pytest.raises(ValueError, match="vit=True"):
        bcosify(nn.Sequential(nn.Conv2d(3, 8, 1), nn.MultiheadAttention(8, 2)), vit=False)


def test_cnn_mode_leaves_norms_and_gelus_alone():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.GELU())
    with pytest.warns(UserWarning, match="centered norms"):
        out = bcosify(model)
    assert type(out[1]) is nn.GroupNorm and type(out[2]) is nn.GELU
    vit = bcosify(nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.GELU()), vit=True)
    assert isinstance(vit[1], bnn.DetachableGroupNorm2d) and isinstance(vit[2], bnn.DetachableGELU)
    assert isinstance(
        bcosify(nn.Sequential(nn.Conv2d(3, 8, 1), nn.GELU()), vit=True, detachable_gelu=False)[1], nn.Identity
    )


def _clip_vision_transformer() -> nn.Module:
    """CLIP's own VisionTransformer (CLIP/clip/model.py of the B-cosification mirror, whose forward allows
    ``positional_embedding = None`` as B-cosification sets it), small and random, in fp32 (CLIP's LayerNorm
    computes in fp32 and refuses fp64 parameters)."""
    clip = load_source("clip_model", mirror_source(BCOSIFICATION, "CLIP/clip/model.py"))
    torch.manual_seed(0)
    return _pretrained_looking(
        clip.VisionTransformer(input_resolution=12, patch_size=4, width=24, layers=2, heads=3, output_dim=10)
    )


def test_clip_vision_transformer():
    std = _clip_vision_transformer()
    ours = bcosify(copy.deepcopy(std), b=1.0, keep_bias=True)
    assert {bnn.MultiheadAttention, bnn.DetachableQuickGELU, bnn.DetachableLayerNorm} <= {
        type(m) for m in ours.modules()
    }
    rgb = torch.rand(2, 3, 12, 12)
    z = (rgb - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    torch.testing.assert_close(ours(add_inverse(rgb, mean=CLIP_MEAN, std=CLIP_STD)), std(z), atol=1e-5, rtol=1e-4)
    # B-cosified as the original treats CLIP: no biases, no positional embedding; then dynamic linear
    std.positional_embedding = None
    with torch.no_grad():
        std.class_embedding.zero_()
    ours = bcosify(std).eval()
    _set_explanation_mode(ours, True)
    x = add_inverse(rgb).requires_grad_(True)
    out = ours(x)
    (grad,) = torch.autograd.grad(out[:, 3].sum(), x)
    torch.testing.assert_close((grad * x).flatten(1).sum(1), out[:, 3].detach(), atol=1e-5, rtol=1e-4)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_bcosified_clip_style_vit_compiles_in_one_graph():
    ours = bcosify(clip_style_vit()).float().eval()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(ours, fullgraph=True)
    x = add_inverse(torch.rand(2, 3, 12, 12))
    torch.testing.assert_close(compiled(x), ours(x), atol=1e-5, rtol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_clip_attention_pool_is_refused():
    class AttentionPool2d(nn.Module):  # CLIP's ResNet head: F.multi_head_attention_forward on its weights
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj, self.c_proj = (nn.Linear(8, 8) for _ in range(4))

    model = nn.Sequential(nn.Conv2d(3, 8, 1), AttentionPool2d())
    with pytest.raises(ValueError, match="AttentionPool2d"):
        bcosify(model)
    assert type(model[0]) is nn.Conv2d  # nothing changed


def test_logit_layer_as_the_original():
    """The original's ``logit_layer=True`` (bias -log(999)) is ``logit_bias=``: our result ends in a LogitLayer."""
    import math

    std = standard_simple_vit(stem=False)
    orig = _original_bcosify_vit_module()
    config = dict(weights="pretrained", bcos_args=dict(b=2.0, max_out=1), bcosify_args=dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        original = orig.BcosifyNetwork(copy.deepcopy(std), config, add_channels=True, logit_layer=True).to(DT)
    for mod in original.modules():
        if hasattr(mod, "bias") and mod.bias is not None:
            mod.bias = None
    ours = bcosify(copy.deepcopy(std), logit_bias=-math.log(999))
    assert isinstance(ours, nn.Sequential) and isinstance(ours[1], bnn.LogitLayer)
    rgb = torch.rand(2, 3, 12, 12, dtype=DT)
    want = original(add_inverse(rgb))
    got = ours(add_inverse(rgb, mean=IMAGENET_MEAN, std=IMAGENET_STD))
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kwargs", [dict(logit_bias=float("nan")), dict(logit_temperature=0.0), dict(logit_bias=True)])
def test_bad_logit_layer_arguments(kwargs):
    model = nn.Sequential(nn.Conv2d(3, 4, 1))
    with pytest.raises(ValueError, match="logit_"):
        bcosify(model, **kwargs)
    assert type(model[0]) is nn.Conv2d


def _kpm(n, s):
    mask = torch.rand(n, s, generator=torch.Generator().manual_seed(5)) > 0.6
    mask[:, 0] = False  # every query keeps a key
    return mask


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize(
    "call",
    [
        dict(need_weights=False),
        dict(),  # need_weights=True, averaged
        dict(average_attn_weights=False),
        dict(attn_mask="bool", need_weights=False),
        dict(attn_mask="float"),
        dict(key_padding_mask=True),
        dict(cross=True),
        dict(unbatched=True),
        dict(dropout=True),
    ],
    ids=lambda c: "-".join(c) or "weights",
)
def test_multihead_attention_matches_torch(call, batch_first):
    """Our MultiheadAttention with the module's own out_proj is nn.MultiheadAttention, option by option."""
    call = dict(call)
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(12, 3, dropout=0.3 if call.pop("dropout", False) else 0.0, batch_first=batch_first)
    mha = mha.to(DT)
    ours = bnn.MultiheadAttention.from_module(mha, mha.out_proj)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 2, 12, generator=g, dtype=DT)
    kv = torch.randn(7, 2, 12, generator=g, dtype=DT) if call.pop("cross", False) else x
    if batch_first:
        x, kv = x.transpose(0, 1), (kv.transpose(0, 1) if kv is not x else None)
        kv = x if kv is None else kv
    if call.pop("unbatched", False):
        x = kv = x[0] if batch_first else x[:, 0]
    s = kv.shape[-2] if batch_first or kv.dim() == 2 else kv.shape[0]
    if call.get("attn_mask") == "bool":
        call["attn_mask"] = torch.rand(x.shape[-2] if batch_first or x.dim() == 2 else x.shape[0], s, generator=g) > 0.7
        call["attn_mask"][:, 0] = False
    elif call.get("attn_mask") == "float":
        call["attn_mask"] = torch.randn(x.shape[-2] if batch_first else x.shape[0], s, generator=g, dtype=DT)
    if call.pop("key_padding_mask", False):
        call["key_padding_mask"] = _kpm(2, s)
    torch.manual_seed(2)
    want = mha(x, kv, kv, **call)
    torch.manual_seed(2)
    got = ours(x, kv, kv, **call)
    torch.testing.assert_close(got[0], want[0], atol=1e-12, rtol=0)
    assert (got[1] is None) == (want[1] is None)
    if want[1] is not None:
        torch.testing.assert_close(got[1], want[1], atol=1e-12, rtol=0)

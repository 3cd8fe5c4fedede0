"""The benchmark suite's shapes (benchmarks/shapes.py) are the real models' shapes.

- B-cos ResNet-50 / DenseNet-121 / ViT-B/16: the original `bcos` models, built as the bcos experiment configs
  build them, run on the meta device with forward hooks on every BcosConv2d / BcosLinear; the traced multiset of
  layer shapes must equal the generated cases (counts included).
- CoDA-Nets: the layer cases follow the conv arithmetic of a plain nn.Conv2d stack with the same (k, s, p).
- LWTA / CSG: the activation shapes are those of a traced ResNet-18 / ResNet-152.
- Every mode (GPU, CPU, CPU with BCOS_BENCH_ALL_SHAPES=1, smoke) selects what it should, with unique names.
"""

import collections
import dataclasses
import functools
import importlib.util
import math
import os
import sys
import types
import warnings

import pytest
import torch
from originals import bcos_module

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
if BENCH_DIR not in sys.path:
    sys.path.append(BENCH_DIR)  # appended: benchmarks/ holds generic names (models.py) that must not shadow others

import shapes  # noqa: E402

MODES = {  # name: (gpu, smoke, all_shapes)
    "gpu": (True, False, False),
    "cpu": (False, False, False),
    "cpu-all-shapes": (False, False, True),
    "smoke": (False, True, False),
}


def load_shapes(monkeypatch, mode):
    """A fresh copy of benchmarks/shapes.py as it loads on a machine in `mode` (a stand-in harness)."""
    gpu, smoke, all_shapes = MODES[mode]
    harness = types.ModuleType("harness")
    harness.DEVICE = torch.device("cuda" if gpu else "cpu")
    harness.SMOKE = smoke
    monkeypatch.setitem(sys.modules, "harness", harness)
    if all_shapes:
        monkeypatch.setenv("BCOS_BENCH_ALL_SHAPES", "1")
    else:
        monkeypatch.delenv("BCOS_BENCH_ALL_SHAPES", raising=False)
    name = f"_shapes_{mode.replace('-', '_')}"
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH_DIR, "shapes.py"))
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up in sys.modules
    spec.loader.exec_module(module)
    return module


def trace(model, layer_type, x, record):
    """record(path, module, input) of every `layer_type` module the forward runs, in order."""
    paths = {m: path for path, m in model.named_modules() if isinstance(m, layer_type)}
    seen = []
    # one global hook (torch.nn.modules.module) that records only the layers of this model
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda mod, inp, out: seen.append(record(paths[mod], mod, inp[0])) if mod in paths else None
    )
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    assert len(seen) == len(paths), "every layer runs exactly once"
    return seen


def build(fn, **kwargs):
    with torch.device("meta"):
        model = fn(**kwargs)
    return model.eval()


def bcos_cnn_kwargs(modules):
    """bcos/experiments/ImageNet/bcos_final/experiment_parameters.py + model.py."""
    return dict(
        num_classes=1000,
        norm_layer=modules.norms.NoBias(modules.norms.BatchNormUncentered2d),
        logit_bias=-math.log(999),
        conv_layer=functools.partial(modules.BcosConv2d, b=2, max_out=1),
    )


# --- B-cos convolutions ---------------------------------------------------------------------------------------


def conv_record(path, mod, x):
    lin = mod.linear  # the NormedConv2d inside: its attributes are normalised to pairs
    assert mod.groups == 1 and lin.groups == 1, path
    assert tuple(lin.dilation) == (1, 1), path
    (k, k2), (s, s2), (p, p2) = lin.kernel_size, lin.stride, lin.padding
    assert k == k2 and s == s2 and p == p2, f"{path}: non-square conv"
    n, c, h, w = x.shape
    assert c == mod.in_channels and h == w, path
    return path, (mod.in_channels, mod.out_channels, k, s, p, h)


def case_key(c):
    return c.cin, c.cout, c.k, c.stride, c.padding, c.hw


@pytest.mark.parametrize(
    "model_name, module, builder",
    [("resnet50", "models.resnet", "resnet50"), ("densenet121", "models.densenet", "densenet121")],
)
def test_bcos_convs_are_the_models(model_name, module, builder):
    modules = bcos_module("modules")
    fn = getattr(bcos_module(module), builder)
    model = build(fn, **bcos_cnn_kwargs(modules))
    traced = trace(model, modules.BcosConv2d, torch.zeros(1, 6, 224, 224, device="meta"), conv_record)

    cases = [c for c in shapes.ALL_BCOS_CONVS if c.model == model_name]
    want = collections.Counter(key for _, key in traced)
    got = collections.Counter({case_key(c): c.count for c in cases})
    assert len(cases) == len(got), "one case per distinct shape"
    assert got == want, f"missing: {dict(want - got)}; extra: {dict(got - want)}"
    # each case is named after the first layer of its shape (the real module path) and shows the shape
    first = {}
    for path, key in traced:
        first.setdefault(key, path)
    for c in cases:
        words = c.name.split()
        assert words[0] == model_name and words[1] == first[case_key(c)], c.name
        assert f"{c.k}x{c.k} {c.cin}->{c.cout}" in c.name and words[-1] == f"@{c.hw}", c.name
        assert ("s2" in words) == (c.stride == 2), c.name


def test_all_bcos_convs_are_the_two_models():
    assert {c.model for c in shapes.ALL_BCOS_CONVS} == {"resnet50", "densenet121"}
    keys = [(c.model,) + case_key(c) for c in shapes.ALL_BCOS_CONVS]
    assert len(keys) == len(set(keys))
    counts = collections.Counter()
    for c in shapes.ALL_BCOS_CONVS:
        counts[c.model] += c.count
    assert counts == {"resnet50": 54, "densenet121": 121}  # 16 bottlenecks * 3 + 3 downsamples + stem + fc; 121


# --- B-cos linears --------------------------------------------------------------------------------------------


def test_bcos_linears_are_vit_b16():
    modules = bcos_module("modules")
    if importlib.util.find_spec("einops") is None:
        pytest.skip(
            "bcos.models.vit imports einops (rearrange, einops.layers.torch.Rearrange), which is not "
            "installed here: the ViT-B/16 BcosLinear shapes cannot be traced"
        )
    vit = bcos_module("models.vit")
    norms = modules.norms
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "use the entrypoints from bcos.models.pretrained": same constructor
        # bcos/experiments/ImageNet/vit_final: experiment_parameters.py (bcos_simple_vit_b_patch16_224) + model.py
        model = build(
            vit.simple_vit_b_patch16_224,
            num_classes=1000,
            channels=6,
            linear_layer=functools.partial(modules.BcosLinear, b=2, max_out=1),
            conv2d_layer=functools.partial(modules.BcosConv2d, b=2, max_out=1),
            norm_layer=norms.NoBias(norms.DetachableLayerNorm),
            act_layer=torch.nn.Identity,
            norm2d_layer=norms.NoBias(modules.DetachableGNLayerNorm2d),
        )

    def record(path, mod, x):
        assert x.shape[-1] == mod.in_features, path
        return path, (mod.in_features, mod.out_features, math.prod(x.shape[1:-1]))

    traced = trace(model, modules.BcosLinear, torch.zeros(1, 6, 224, 224, device="meta"), record)
    assert {rows for _, (_, _, rows) in traced} == {shapes.VIT_B16_PATCH_TOKENS, 1}
    assert shapes.VIT_B16_PATCH_TOKENS == (224 // 16) ** 2
    # the cases use the task's 197 tokens for the model's 196 patch tokens (one row per image more)
    want = collections.Counter(
        (cin, cout, shapes.VIT_B16_TOKENS if rows == shapes.VIT_B16_PATCH_TOKENS else rows)
        for _, (cin, cout, rows) in traced
    )
    got = collections.Counter({(c.cin, c.cout, c.rows): c.count for c in shapes.ALL_BCOS_LINEARS})
    assert len(shapes.ALL_BCOS_LINEARS) == len(got)
    assert got == want, f"missing: {dict(want - got)}; extra: {dict(got - want)}"
    # to_qkv is a plain nn.Linear in the B-cos SimpleViT: not a case
    qkv = [m for path, m in model.named_modules() if path.endswith("attn.to_qkv")]
    assert len(qkv) == 12 and all(type(m) is torch.nn.Linear for m in qkv)
    assert all(c.cout != 3 * 768 for c in shapes.ALL_BCOS_LINEARS)


def test_vit_linear_generator():
    """Without einops the trace skips; the generated layers still have the SimpleViT-B/16 structure."""
    got = {(c.cin, c.cout, c.rows): c.count for c in shapes.ALL_BCOS_LINEARS}
    tokens = shapes.VIT_B16_TOKENS
    assert got == {
        (6 * 16 * 16, 768, tokens): 1,
        (768, 768, tokens): 12,
        (768, 3072, tokens): 12,
        (3072, 768, tokens): 12,
        (768, 1000, 1): 1,
    }


# --- CoDA -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("net, classes, final_hw", [("CIFAR10", 10, 8), ("IMAGENET100", 100, 20)])
def test_coda_layers_follow_the_conv_arithmetic(net, classes, final_hw):
    """Each layer's input size is what a plain Conv2d stack with the arch's (k, s, p) gives; the maps before the
    sum pool are 8x8 (CIFAR-10, 32x32 input) and 20x20 (ImageNet-100, 240x240 input)."""
    arch = getattr(shapes, f"CODA_{net}_ARCH")
    image = getattr(shapes, f"CODA_{net}_IMAGE")
    cases = shapes._coda_layer_cases("m", arch, image, 1)
    assert len(cases) == len(arch) == 9
    x = torch.zeros(1, arch[0][0], image, image)
    for case, (cin, cout, k, s, p, rank) in zip(cases, arch):
        assert (case.cin, case.cout, case.k, case.stride, case.padding, case.rank) == (cin, cout, k, s, p, rank)
        assert tuple(x.shape[1:]) == (cin, case.hw, case.hw), case.name
        x = torch.nn.Conv2d(cin, cout, k, s, p, bias=False)(x)
    assert tuple(x.shape[1:]) == (classes, final_hw, final_hw)

    listed = getattr(shapes, f"CODA_{net}_LAYERS")
    key = lambda c: (c.cin, c.cout, c.k, c.stride, c.padding, c.rank, c.hw)  # noqa: E731
    # every distinct layer once, named after the layers that share it
    shared, distinct = {"CIFAR10": ((" L4,L5 ", " L7,L8 "), 7), "IMAGENET100": ((" L5,L6 ",), 8)}[net]
    assert {key(c) for c in listed} == {key(c) for c in cases}
    assert len({key(c) for c in listed}) == len(listed) == distinct
    for label in shared:
        assert any(label in c.name for c in listed), label


def test_dau_cases_are_coda_layers():
    layers = {
        (c.model, c.cin, c.cout, c.k, c.stride, c.padding, c.rank, c.hw)
        for c in shapes.CODA_CIFAR10_LAYERS + shapes.CODA_IMAGENET100_LAYERS
    }
    for c in shapes.DAU_CASES:
        if c.model != "smoke":
            assert (c.model, c.cin, c.cout, c.k, c.stride, c.padding, c.rank, c.hw) in layers, c.name


# --- LWTA and CSG ---------------------------------------------------------------------------------------------


def norm_outputs(model, image):
    """(path, C, H, W) of every BatchNorm2d output: the places a ReLU (DISCOVER: LWTA) follows in a ResNet."""
    seen = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, path=path: seen.append((path,) + tuple(out.shape[1:])))
        for path, m in model.named_modules()
        if isinstance(m, torch.nn.BatchNorm2d)
    ]
    with torch.no_grad():
        model(torch.zeros(1, 6, image, image, device="meta"))
    for h in hooks:
        h.remove()
    return seen


def test_lwta_resnet18_shapes(monkeypatch):
    """DISCOVER's models/ResNet/resnet.py is torchvision's ResNet-18 with LWTA for each ReLU: after the stem's bn1
    and after bn1 and the residual add of each BasicBlock (the add has the bn2 shape). bcos.models.resnet.resnet18
    has the same layout (AvgPool for MaxPool, same sizes): trace its norms at 224x224."""
    resnet = bcos_module("models.resnet")
    model = build(resnet.resnet18, num_classes=1000, norm_layer=torch.nn.BatchNorm2d)
    relu_sites = {tuple(s[1:]) for s in norm_outputs(model, 224) if s[0] == "bn1" or s[0].endswith((".bn1", ".bn2"))}
    assert relu_sites == {(64, 112, 112), (64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)}

    for mode in ("gpu", "cpu", "cpu-all-shapes"):
        cases = load_shapes(monkeypatch, mode).LWTA_CASES
        conv = [c for c in cases if c.name.startswith("resnet18 ")]
        assert {c.shape[1:] for c in conv} <= relu_sites, mode
        if mode != "cpu":  # every ReLU shape at U=2, plus U=8 on one of them
            assert {c.shape[1:] for c in conv if c.U == 2} == relu_sites, mode
            assert any(c.U == 8 for c in conv), mode
        deit = [c for c in cases if c.name.startswith("deit-s ")]
        assert [(c.shape[1:], c.U) for c in deit] == [(((224 // 16) ** 2 + 1, 4 * 384), 12)], mode  # 197 tokens


def test_lwta_groups_divide():
    for c in shapes.LWTA_CASES:
        channels = c.shape[1] if len(c.shape) == 4 else c.shape[-1]
        assert channels % c.U == 0, c.name


def test_csg_resnet152_layer4():
    """CSG gates ResNet-152's layer4 output: 2048 x 4 x 4 on VOC-Part's 128x128 crops, 2048 x 7 x 7 at 224."""
    resnet = bcos_module("models.resnet")
    model = build(resnet.resnet152, num_classes=1000, norm_layer=torch.nn.BatchNorm2d)
    for image, hw in ((128, 4), (224, 7)):
        with torch.no_grad():
            out = model.forward_features(torch.zeros(1, 6, image, image, device="meta"))
        assert tuple(out.shape[1:]) == (2048, hw, hw)
        if not shapes.SMOKE:
            assert any(c.shape[1:] == (2048, hw, hw) for c in shapes.CSG_CASES)
    if not shapes.SMOKE:
        assert {(c.shape[1:], c.classes) for c in shapes.CSG_CASES} == {((2048, 4, 4), 6), ((2048, 7, 7), 1000)}


# --- selections per mode --------------------------------------------------------------------------------------

LISTS = (
    "BCOS_CONVS",
    "ALL_BCOS_CONVS",
    "BCOS_LINEARS",
    "ALL_BCOS_LINEARS",
    "DAU_CASES",
    "CODA_CIFAR10_LAYERS",
    "CODA_IMAGENET100_LAYERS",
    "LWTA_CASES",
    "CSG_CASES",
)


@pytest.mark.parametrize("mode", MODES)
def test_lists_named_and_nonempty(monkeypatch, mode):
    s = load_shapes(monkeypatch, mode)
    for name in LISTS:
        cases = getattr(s, name)
        assert cases, name
        names = [c.name for c in cases]
        assert len(set(names)) == len(names), f"{name}: duplicate names"
        for c in cases:
            assert dataclasses.is_dataclass(c) and type(c).__dataclass_params__.frozen, name
    for c in s.LWTA_CASES:
        assert f"[{','.join(map(str, c.shape))}] U={c.U}" in c.name
    for c in s.CSG_CASES:
        assert f"[{','.join(map(str, c.shape))}] K={c.classes}" in c.name


def test_gpu_runs_everything_at_real_batches(monkeypatch):
    s = load_shapes(monkeypatch, "gpu")
    assert s.GPU and s.BCOS_CONVS == s.ALL_BCOS_CONVS and len(s.BCOS_CONVS) == 24 + 67
    assert s.BCOS_LINEARS == s.ALL_BCOS_LINEARS
    assert (s.BCOS_CONV_BATCH, s.BCOS_LINEAR_BATCH, s.RESNET50_MODEL_BATCH, s.CODA_CIFAR10_MODEL_BATCH) == (64,) * 4
    assert s.RESNET50_MODEL_IMAGE == 224
    assert [c.batch for c in s.DAU_CASES] == [64] * 7 + [16] * 8
    assert all(c.shape[0] == 64 for c in s.LWTA_CASES) and len(s.LWTA_CASES) == 7
    assert {c.shape for c in s.CSG_CASES} == {(32, 2048, 4, 4), (64, 2048, 7, 7)}


def test_cpu_subsets(monkeypatch):
    s = load_shapes(monkeypatch, "cpu")
    convs = s.BCOS_CONVS
    assert 6 <= len(convs) <= 8 and set(convs) <= set(s.ALL_BCOS_CONVS)
    assert any(c.k == 7 and c.hw == 224 for c in convs), "the stem"
    assert any(c.stride == 2 for c in convs)
    for model in ("resnet50", "densenet121"):
        mine = [c for c in convs if c.model == model]
        assert {c.k for c in mine} >= {1, 3} and {c.hw for c in mine} >= {56, 7}, model  # early and late, 1x1, 3x3
    assert (
        s.BCOS_CONV_BATCH,
        s.BCOS_LINEAR_BATCH,
        s.RESNET50_MODEL_BATCH,
        s.RESNET50_MODEL_IMAGE,
        s.CODA_CIFAR10_MODEL_BATCH,
    ) == (4, 2, 2, 224, 8)
    cifar = [c for c in s.DAU_CASES if c.model == "coda_cifar10"]
    imagenet = [c for c in s.DAU_CASES if c.model == "coda_imagenet100"]
    assert len(cifar) == 7 and all(c.batch == 8 for c in cifar)
    assert 2 <= len(imagenet) <= 3 and all(c.batch == 1 for c in imagenet)
    for c in imagenet:  # the reference's per-pixel weights (N, C*k*k, O, Ho, Wo); fwd+bwd peaks at ~4.3x that
        out_hw = (c.hw + 2 * c.padding - c.k) // c.stride + 1
        assert 4 * c.batch * c.cin * c.k * c.k * c.cout * out_hw**2 <= 2**28, c.name
    assert 3 <= len(s.LWTA_CASES) <= 4
    assert all(c.shape[0] == (4 if c.name.startswith("deit") else 8) for c in s.LWTA_CASES)
    assert all(c.shape[0] < 64 for c in s.CSG_CASES if c.classes == 1000)


def test_cpu_all_shapes(monkeypatch):
    s = load_shapes(monkeypatch, "cpu-all-shapes")
    assert s.BCOS_CONVS == s.ALL_BCOS_CONVS and s.BCOS_CONV_BATCH == 4
    assert len(s.DAU_CASES) == 7 + 8 and len(s.LWTA_CASES) == 7


def test_smoke_is_tiny(monkeypatch):
    s = load_shapes(monkeypatch, "smoke")
    for name in ("BCOS_CONVS", "BCOS_LINEARS", "DAU_CASES", "LWTA_CASES", "CSG_CASES"):
        assert len(getattr(s, name)) == 1, name
    c = s.BCOS_CONVS[0]
    assert c.cin * c.cout * c.hw**2 <= 2**14
    assert (s.RESNET50_MODEL_BATCH, s.RESNET50_MODEL_IMAGE, s.CODA_CIFAR10_MODEL_BATCH) == (1, 32, 2)
    assert math.prod(s.LWTA_CASES[0].shape) <= 2**10 and math.prod(s.CSG_CASES[0].shape) <= 2**10
    assert s.ALL_BCOS_CONVS and len(s.ALL_BCOS_CONVS) == 91  # the full list stays available

"""Every layer shape the benchmark suite runs: the real models' shapes.

GPU sizes are the real batch sizes; CPU sizes are reduced (a subset of the layers, smaller batches) so the suite
finishes in minutes on a 2-core machine; SMOKE sizes only prove the suite runs (one tiny case per list).
On CPU, BCOS_BENCH_ALL_SHAPES=1 runs every layer (at the CPU batch sizes) instead of the subset.

The case lists are generated from the architectures by small generator functions below; each selection is a
function of (gpu, smoke, all_shapes) so tests/test_benchmark_shapes.py can check every mode on any machine, and
checks the generated layers against the original models (traced with forward hooks).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Sequence, Tuple

from harness import DEVICE, SMOKE

GPU = DEVICE.type == "cuda"
ALL_SHAPES = os.environ.get("BCOS_BENCH_ALL_SHAPES") == "1"


def _out_hw(hw: int, k: int, stride: int, padding: int) -> int:
    """Output size of a convolution / pooling window along one spatial dimension."""
    return (hw + 2 * padding - k) // stride + 1


def _stride_tag(stride: int) -> str:
    return f" s{stride}" if stride != 1 else ""


def _group(layers: Iterable[tuple]) -> Dict[tuple, Tuple[str, int]]:
    """(path, *shape) layers in forward order -> {shape: (path of its first layer, number of layers)}."""
    groups: Dict[tuple, Tuple[str, int]] = {}
    for path, *shape in layers:
        first, count = groups.get(tuple(shape), (path, 0))
        groups[tuple(shape)] = (first, count + 1)
    return groups


def _by_name(cases: Sequence, names: Iterable[str]) -> list:
    """The cases called `names`, in that order (KeyError naming the missing one: a renamed layer fails loudly)."""
    index = {c.name: c for c in cases}
    missing = [n for n in names if n not in index]
    if missing:
        raise KeyError(f"no benchmark case named {missing}; known: {sorted(index)}")
    return [index[n] for n in names]


# ---------------------------------------------------------------------------------------------------------------
# B-cos convolutions: the B-cos v2 ImageNet ResNet-50 and DenseNet-121 (B-cos/B-cos-v2, pip package `bcos` 0.1.3:
# bcos/models/resnet.py, bcos/models/densenet.py, built by bcos/experiments/ImageNet/bcos_final/model.py with
# conv_layer=BcosConv2d(b=2, max_out=1)); 224x224 crops with 6 channels [x, 1-x].
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerCase:
    """A convolution-like layer of a model (the B-cos and CoDA cases add their own fields)."""

    model: str
    name: str
    cin: int
    cout: int
    k: int
    stride: int
    padding: int


@dataclass(frozen=True)
class ConvCase(LayerCase):
    """One distinct BcosConv2d of a model; `count` = how many of the model's layers have exactly this shape."""

    hw: int  # H = W of the layer's input
    count: int


# (module path, cin, cout, kernel, stride, padding, input H=W), in forward order
ConvLayer = Tuple[str, int, int, int, int, int, int]


def _resnet50_convs(
    image: int = 224,
    in_chans: int = 6,
    blocks: Sequence[int] = (3, 4, 6, 3),
    width: int = 64,
    expansion: int = 4,
    classes: int = 1000,
) -> Iterator[ConvLayer]:
    """BcosResNet(Bottleneck, [3, 4, 6, 3]) of bcos/models/resnet.py, every BcosConv2d in forward order."""
    hw = image
    yield "conv1", in_chans, width, 7, 2, 3, hw  # stem: 7x7 s2 p3 (small_inputs=False)
    hw = _out_hw(_out_hw(hw, 7, 2, 3), 3, 2, 1)  # then AvgPool2d(3, 2, 1): 224 -> 112 -> 56
    cin = width
    for stage, n_blocks in enumerate(blocks):
        planes = width * 2**stage
        cout = planes * expansion
        for b in range(n_blocks):
            stride = 2 if stage > 0 and b == 0 else 1  # v1.5 / B-cos v2: the stride sits on the 3x3 conv
            path = f"layer{stage + 1}.{b}"
            out_hw = _out_hw(hw, 3, stride, 1)
            yield f"{path}.conv1", cin, planes, 1, 1, 0, hw
            yield f"{path}.conv2", planes, planes, 3, stride, 1, hw
            yield f"{path}.conv3", planes, cout, 1, 1, 0, out_hw
            if b == 0 and (stride != 1 or cin != cout):  # Bottleneck.forward runs the downsample after conv3
                yield f"{path}.downsample.0", cin, cout, 1, stride, 0, hw
            cin, hw = cout, out_hw
    yield "fc", cin, classes, 1, 1, 0, hw  # classifier: a 1x1 BcosConv2d on the 7x7 map, before the avg pool


def _densenet121_convs(
    image: int = 224,
    in_chans: int = 6,
    blocks: Sequence[int] = (6, 12, 24, 16),
    growth: int = 32,
    bn_size: int = 4,
    init_features: int = 64,
    classes: int = 1000,
) -> Iterator[ConvLayer]:
    """BcosDenseNet(32, (6, 12, 24, 16), 64) of bcos/models/densenet.py, every BcosConv2d in forward order."""
    hw = image
    yield "features.conv0", in_chans, init_features, 7, 2, 3, hw
    hw = _out_hw(_out_hw(hw, 7, 2, 3), 3, 2, 1)  # pool0 = AvgPool2d(3, 2, 1): 224 -> 112 -> 56
    channels = init_features
    for i, n_layers in enumerate(blocks):
        for j in range(n_layers):
            path = f"features.denseblock{i + 1}.denselayer{j + 1}"
            yield f"{path}.conv1", channels + j * growth, bn_size * growth, 1, 1, 0, hw
            yield f"{path}.conv2", bn_size * growth, growth, 3, 1, 1, hw
        channels += n_layers * growth
        if i < len(blocks) - 1:
            yield f"features.transition{i + 1}.conv", channels, channels // 2, 1, 1, 0, hw
            channels, hw = channels // 2, _out_hw(hw, 2, 2, 0)  # transition pool: AvgPool2d(2, 2)
    yield "classifier", channels, classes, 1, 1, 0, hw  # 1x1 BcosConv2d on the 7x7 map


def _conv_name(model: str, path: str, cin: int, cout: int, k: int, stride: int, hw: int) -> str:
    return f"{model} {path} {k}x{k} {cin}->{cout}{_stride_tag(stride)} @{hw}"


def _distinct_convs(model: str, layers: Iterable[ConvLayer]) -> List[ConvCase]:
    """One case per distinct (cin, cout, k, stride, padding, hw), named after its first layer, with the count."""
    cases = []
    for (cin, cout, k, stride, padding, hw), (path, count) in _group(layers).items():
        cases.append(
            ConvCase(model, _conv_name(model, path, cin, cout, k, stride, hw), cin, cout, k, stride, padding, hw, count)
        )
    return cases


RESNET50_CONVS = _distinct_convs("resnet50", _resnet50_convs())
DENSENET121_CONVS = _distinct_convs("densenet121", _densenet121_convs())
ALL_BCOS_CONVS = RESNET50_CONVS + DENSENET121_CONVS

# CPU subset: the stem (DenseNet-121's conv0 has the same shape), a 3x3 and a 1x1 of an early and a late stage
# of ResNet-50, its first stride-2 3x3, and an early 3x3 and a late 1x1 of DenseNet-121.
CPU_BCOS_CONV_NAMES = (
    "resnet50 conv1 7x7 6->64 s2 @224",
    "resnet50 layer1.0.conv2 3x3 64->64 @56",
    "resnet50 layer1.0.conv3 1x1 64->256 @56",
    "resnet50 layer2.0.conv2 3x3 128->128 s2 @56",
    "resnet50 layer4.1.conv2 3x3 512->512 @7",
    "resnet50 layer4.1.conv1 1x1 2048->512 @7",
    "densenet121 features.denseblock1.denselayer1.conv2 3x3 128->32 @56",
    "densenet121 features.denseblock4.denselayer16.conv1 1x1 992->128 @7",
)
SMOKE_CONV = ConvCase("smoke", "smoke 3x3 8->8 @8", 8, 8, 3, 1, 1, 8, 1)


def select_bcos_convs(gpu: bool, smoke: bool, all_shapes: bool) -> List[ConvCase]:
    if smoke:
        return [SMOKE_CONV]
    if gpu or all_shapes:
        return list(ALL_BCOS_CONVS)
    return _by_name(ALL_BCOS_CONVS, CPU_BCOS_CONV_NAMES)


BCOS_CONVS = select_bcos_convs(GPU, SMOKE, ALL_SHAPES)
BCOS_CONV_BATCH = 2 if SMOKE else (64 if GPU else 4)


# ---------------------------------------------------------------------------------------------------------------
# B-cos linears: B-cos ViT-B/16 (`bcos` 0.1.3: bcos/models/vit.py simple_vit_b_patch16_224, built by
# bcos/experiments/ImageNet/vit_final/model.py with linear_layer=BcosLinear(b=2, max_out=1)): dim 768, depth 12,
# 12 heads, MLP 3072, patch_dim 6*16*16 = 1536. BcosLinear: the patch embedding, attention `to_out`, the two MLP
# linears, the head. Attention `to_qkv` is a plain nn.Linear there, not a BcosLinear, so it is not a case.
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinearCase:
    """One distinct BcosLinear; `rows` = rows per image (tokens, or 1 for the head), `count` = layers of the shape."""

    model: str
    name: str
    cin: int
    cout: int
    rows: int
    count: int


# The task's token count. The B-cos SimpleViT actually has 196 patch tokens (14x14 patches, no class token: it
# mean-pools the tokens before the head); one row more per image does not change the comparison.
VIT_B16_TOKENS = 197
VIT_B16_PATCH_TOKENS = 196  # what the real model runs (tests/test_benchmark_shapes.py maps 196 -> 197)

# (module path, cin, cout, rows per image), in forward order
LinearLayer = Tuple[str, int, int, int]


def _simple_vit_linears(
    image: int = 224,
    patch: int = 16,
    channels: int = 6,
    dim: int = 768,
    depth: int = 12,
    mlp_dim: int = 3072,
    classes: int = 1000,
    tokens: int = VIT_B16_TOKENS,
) -> Iterator[LinearLayer]:
    """SimpleViT of bcos/models/vit.py, every BcosLinear in forward order."""
    yield "to_patch_embedding.linear", channels * patch * patch, dim, tokens
    for i in range(depth):
        path = f"transformer.encoder_{i}"
        yield f"{path}.attn.to_out", dim, dim, tokens  # inner_dim = heads * (dim // heads) = dim
        yield f"{path}.ff.net.linear1", dim, mlp_dim, tokens
        yield f"{path}.ff.net.linear2", mlp_dim, dim, tokens
    yield "linear_head.linear", dim, classes, 1  # after the mean over tokens


def _distinct_linears(model: str, layers: Iterable[LinearLayer]) -> List[LinearCase]:
    cases = []
    for (cin, cout, rows), (path, count) in _group(layers).items():
        per_image = f"{rows} rows/img" if rows != 1 else "1 row/img"
        cases.append(LinearCase(model, f"{model} {path} {cin}->{cout} ({per_image})", cin, cout, rows, count))
    return cases


ALL_BCOS_LINEARS = _distinct_linears("vit_b16", _simple_vit_linears())
SMOKE_LINEAR = LinearCase("smoke", "smoke 32->48 (5 rows/img)", 32, 48, 5, 1)
BCOS_LINEARS = [SMOKE_LINEAR] if SMOKE else list(ALL_BCOS_LINEARS)
BCOS_LINEAR_BATCH = 2 if SMOKE else (64 if GPU else 2)


# ---------------------------------------------------------------------------------------------------------------
# Whole-model benchmarks (benchmarks/models.py): the B-cos ResNet-50 above at ImageNet size (the bcos_final
# config, bcos/experiments/ImageNet/bcos_final/experiment_parameters.py, trains at 64 images per GPU) and the
# CoDA-Net CIFAR-10 below (64 on GPU: see the CoDA batches).
# ---------------------------------------------------------------------------------------------------------------
RESNET50_MODEL_BATCH = 1 if SMOKE else (64 if GPU else 2)
RESNET50_MODEL_IMAGE = 32 if SMOKE else 224
# the B-cos ViT-Ti/16 and ViT-S/16 train steps (benchmarks/test_bench_models.py), at the ResNet's image size
VIT_MODEL_BATCH = 1 if SMOKE else (64 if GPU else 4)
VIT_S_MODEL_BATCH = 1 if SMOKE else (64 if GPU else 2)
CODA_CIFAR10_MODEL_BATCH = 2 if SMOKE else (64 if GPU else 8)


# ---------------------------------------------------------------------------------------------------------------
# CoDA-Net architectures (moboehle/CoDA-Nets experiments/*/final/experiment_parameters.py, built by
# models/simple_coda.make_coda_net: CoDAConv2d layers, then AdaptiveSumPool2d and FinalLayer
# (logits / temperature + bias)). Per layer: (in, out, kernel, stride, padding, rank).
# ---------------------------------------------------------------------------------------------------------------
def _coda_arch(in_channels, out_channels, kernels, strides, paddings, ranks):
    layers, cin = [], in_channels
    for cout, k, s, p, r in zip(out_channels, kernels, strides, paddings, ranks):
        layers.append((cin, cout, k, s, p, r))
        cin = cout
    return layers


# "9L-S-CoDA-SQ-1000": 6-channel (x, 1-x) 32x32 input, squash norm, logit temperature 1000.
CODA_CIFAR10_ARCH = _coda_arch(
    6,
    [16] * 2 + [32] * 3 + [64] * 3 + [10],
    [3] * 8 + [1],
    [1, 1, 2, 1, 1, 2, 1, 1, 1],
    [1] * 8 + [0],
    [32] * 2 + [64] * 3 + [64] * 4,
)
CODA_CIFAR10_IMAGE = 32
CODA_CIFAR10_LOGIT_TEMPERATURE = 1000
CODA_CIFAR10_LOGIT_BIAS = -2.1972245773362196  # log(.1 / .9)
# "9L-L-CoDA-SQ-100000" (ImageNet-100): 240x240 crops, logit temperature 1e5.
CODA_IMAGENET100_ARCH = _coda_arch(
    6,
    [16] + [32] * 2 + [64] * 5 + [100],
    [7] + [3] * 8,
    [3, 1, 1, 2, 1, 1, 2, 1, 1],
    [3] + [1] * 8,
    [64] * 3 + [128] * 3 + [256] * 3,
)
CODA_IMAGENET100_IMAGE = 240


@dataclass(frozen=True)
class DAUCase(LayerCase):
    """One CoDA layer (DAUConv2d) with the batch it is benchmarked at."""

    rank: int
    hw: int  # H = W of the layer's input
    batch: int


def _coda_layer_cases(model, arch, image, batch) -> List[DAUCase]:
    """Every layer of a CoDA-Net, in order, with the H = W of its input."""
    cases, hw = [], image
    for i, (cin, cout, k, s, p, r) in enumerate(arch):
        cases.append(
            DAUCase(
                model,
                f"{model} L{i + 1} {k}x{k} {cin}->{cout} r{r}{_stride_tag(s)} @{hw}",
                cin,
                cout,
                k,
                s,
                p,
                r,
                hw,
                batch,
            )
        )
        hw = _out_hw(hw, k, s, p)
    return cases


def _distinct_dau(cases: Sequence[DAUCase]) -> List[DAUCase]:
    """One case per distinct layer shape; a shape several layers share is named after all of them ("L5,L6")."""
    groups: Dict[tuple, List[DAUCase]] = {}
    for c in cases:
        groups.setdefault((c.cin, c.cout, c.k, c.stride, c.padding, c.rank, c.hw), []).append(c)
    out = []
    for same in groups.values():
        c = same[0]
        labels = ",".join(s.name.split()[1] for s in same)
        out.append(
            DAUCase(
                c.model,
                " ".join([c.model, labels] + c.name.split()[2:]),
                c.cin,
                c.cout,
                c.k,
                c.stride,
                c.padding,
                c.rank,
                c.hw,
                c.batch,
            )
        )
    return out


def _coda_batches(gpu: bool, smoke: bool) -> Tuple[int, int]:
    """(CIFAR-10 batch, ImageNet-100 batch)."""
    if smoke:
        return 2, 2
    return (64, 16) if gpu else (8, 1)


# Batches on GPU: 64 for CIFAR-10 (the task's common benchmark batch), 16 for ImageNet-100 (below: at 64 the
# reference alone would need ~60 GB for one layer). The originals train smaller steps with
# gradient accumulation: CIFAR-10 batch_size 8 / virtual 16 (experiments/CIFAR10/final/experiment_parameters.py),
# ImageNet-100 batch_size 4 / virtual 64 (experiments/Imagenet/final/experiment_parameters.py). The reference
# (bcos_kernels.ops.dau_conv2d.reference.dau_conv2d_original) materialises N * O*C*k*k * Ho*Wo floats and its
# fwd+bwd peaks at ~4.3x that (measured on CPU at batch 1: L1 0.5 GB, L3 and L5 0.96 GB, L4 0.5 GB, L9 0.4 GB), so
# at batch 64 L3/L5 need ~60 GB.
CODA_CIFAR10_BATCH, CODA_IMAGENET100_BATCH = _coda_batches(GPU, SMOKE)


def coda_layers(gpu: bool, smoke: bool) -> Tuple[List[DAUCase], List[DAUCase]]:
    """(CIFAR-10 layers, ImageNet-100 layers): distinct shapes only, each named after the layers that have it
    (CIFAR-10 layers 4 and 5, and 7 and 8, share a shape ("L4,L5"), as do ImageNet-100's layers 5 and 6)."""
    cifar_batch, imagenet_batch = _coda_batches(gpu, smoke)
    return (
        _distinct_dau(_coda_layer_cases("coda_cifar10", CODA_CIFAR10_ARCH, CODA_CIFAR10_IMAGE, cifar_batch)),
        _distinct_dau(
            _coda_layer_cases("coda_imagenet100", CODA_IMAGENET100_ARCH, CODA_IMAGENET100_IMAGE, imagenet_batch)
        ),
    )


CODA_CIFAR10_LAYERS, CODA_IMAGENET100_LAYERS = coda_layers(GPU, SMOKE)
# CPU: two ImageNet-100 layers at batch 1 whose reference peaks at ~0.5 GB or less: the 7x7 s3 first layer on the
# 240x240 input and the last layer (rank 256, 100 outputs). (The CPU run must stay under 15 minutes on 2 cores.)
CPU_DAU_IMAGENET100_NAMES = (
    "coda_imagenet100 L1 7x7 6->16 r64 s3 @240",
    "coda_imagenet100 L9 3x3 64->100 r256 @20",
)
SMOKE_DAU = DAUCase("smoke", "smoke 3x3 6->4 r3 @6", 6, 4, 3, 1, 1, 3, 6, 2)


def select_dau_cases(gpu: bool, smoke: bool, all_shapes: bool) -> List[DAUCase]:
    """Every CIFAR-10 layer and every distinct ImageNet-100 layer (CPU: two of them), batches attached."""
    if smoke:
        return [SMOKE_DAU]
    cifar, imagenet = coda_layers(gpu, smoke)
    if not (gpu or all_shapes):
        imagenet = _by_name(imagenet, CPU_DAU_IMAGENET100_NAMES)
    return cifar + imagenet


DAU_CASES = select_dau_cases(GPU, SMOKE, ALL_SHAPES)


# ---------------------------------------------------------------------------------------------------------------
# LWTA (konpanousis/DISCOVER): models/ResNet/resnet.py replaces every ReLU of ResNet-18 (224x224 input) by
# LWTA(U): after the stem's bn1 and twice in each BasicBlock; the paper trains U = 2, 4, 8 competitors.
# DeiT: the timm MLP activation (timm/models/vision_transformer.py act_layer=LWTA, models/DeiT/main.py), DeiT-S
# hidden size 1536 over 197 tokens with U=12, one of the repo's DeiT-S runs (deit-small-{2,12,16}; the README's
# DeiT-Small/12 example).
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShapeCase:
    """A case whose input is one tensor of ``shape`` (the LWTA and gate cases add their one parameter)."""

    name: str
    shape: Tuple[int, ...]


@dataclass(frozen=True)
class LWTACase(ShapeCase):
    U: int


def _shape_str(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def _lwta_cases(conv_batch: int, deit_batch: int) -> List[LWTACase]:
    resnet18 = [
        ("stem", (64, 112, 112)),
        ("layer1", (64, 56, 56)),
        ("layer2", (128, 28, 28)),
        ("layer3", (256, 14, 14)),
        ("layer4", (512, 7, 7)),
    ]
    runs = [(f"resnet18 {role}", (conv_batch,) + chw, 2) for role, chw in resnet18]
    runs.append(("resnet18 layer1", (conv_batch, 64, 56, 56), 8))
    runs.append(("deit-s mlp", (deit_batch, 197, 1536), 12))
    return [LWTACase(f"{label} {_shape_str(shape)} U={u}", shape, u) for label, shape, u in runs]


CPU_LWTA_NAMES = (
    "resnet18 stem [8,64,112,112] U=2",
    "resnet18 layer3 [8,256,14,14] U=2",
    "resnet18 layer1 [8,64,56,56] U=8",
    "deit-s mlp [4,197,1536] U=12",
)
SMOKE_LWTA = LWTACase("smoke [2,8,4,4] U=2", (2, 8, 4, 4), 2)


def select_lwta_cases(gpu: bool, smoke: bool, all_shapes: bool) -> List[LWTACase]:
    if smoke:
        return [SMOKE_LWTA]
    if gpu:
        return _lwta_cases(64, 64)
    cases = _lwta_cases(8, 4)
    return cases if all_shapes else _by_name(cases, CPU_LWTA_NAMES)


LWTA_CASES = select_lwta_cases(GPU, SMOKE, ALL_SHAPES)


# ---------------------------------------------------------------------------------------------------------------
# Class-specific gate (hyliang96/CSGCNN): gates the ResNet-152 layer4 output (2048 channels). VOC-Part: 128x128
# crops -> 4x4 maps, batch 32, 6 classes (VOCPart/train/run.py, VOCPart/VOC/VOCPart.py); and the same gate on
# 224x224 ImageNet (7x7 maps, 1000 classes).
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CSGCase(ShapeCase):
    classes: int


def _csg_case(label: str, shape: Tuple[int, ...], classes: int) -> CSGCase:
    return CSGCase(f"{label} {_shape_str(shape)} K={classes}", shape, classes)


SMOKE_CSG = CSGCase("smoke [4,16,2,2] K=3", (4, 16, 2, 2), 3)


def select_csg_cases(gpu: bool, smoke: bool, all_shapes: bool) -> List[CSGCase]:
    if smoke:
        return [SMOKE_CSG]
    # CPU: the VOC-Part case keeps its real batch (1 M elements); the ImageNet case runs 8 images.
    return [
        _csg_case("resnet152 layer4 voc-part", (32, 2048, 4, 4), 6),
        _csg_case("resnet152 layer4 imagenet", (64 if gpu else 8, 2048, 7, 7), 1000),
    ]


CSG_CASES = select_csg_cases(GPU, SMOKE, ALL_SHAPES)

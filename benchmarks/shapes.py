"""Layer shapes of the real models the benchmarks run at.

GPU sizes are the real batch sizes; CPU sizes are reduced so the suite finishes
in minutes on a 2-core machine; SMOKE sizes only prove the suite runs.
"""
from harness import DEVICE, SMOKE

GPU = DEVICE.type == "cuda"

# B-cos ResNet-50 convolutions (B-cos v2: b=2, no MaxOut):
# (name, in, out, kernel, stride, padding, H=W of the input)
RESNET50_CONVS = [
    ("layer1 3x3 64->64 @56", 64, 64, 3, 1, 1, 56),
    ("layer1 1x1 256->64 @56", 256, 64, 1, 1, 0, 56),
    ("layer2 3x3 128->128 @28", 128, 128, 3, 1, 1, 28),
    ("layer3 3x3 256->256 s2 @28", 256, 256, 3, 2, 1, 28),
    ("layer4 3x3 512->512 @7", 512, 512, 3, 1, 1, 7),
]
RESNET50_BATCH = 64 if GPU else 8

# B-cos ViT-B/16 linears: (name, in, out); 197 tokens
VIT_B16_LINEARS = [
    ("qkv 768->2304", 768, 2304),
    ("mlp fc1 768->3072", 768, 3072),
    ("mlp fc2 3072->768", 3072, 768),
]
VIT_TOKENS = 197
VIT_BATCH = 64 if GPU else 2

if SMOKE:
    RESNET50_CONVS = [("smoke 3x3 8->8 @8", 8, 8, 3, 1, 1, 8)]
    RESNET50_BATCH = 2
    VIT_B16_LINEARS = [("smoke 32->48", 32, 48)]
    VIT_TOKENS, VIT_BATCH = 5, 2

# LWTA (DISCOVER) activations: (name, shape); U competitors per block
LWTA_CASES = [
    ("resnet18 stem [N,64,112,112]", (64, 64, 112, 112), 2),
    ("resnet18 layer1 [N,64,56,56]", (64, 64, 56, 56), 2),
    ("resnet18 layer3 [N,256,14,14]", (64, 256, 14, 14), 4),
    ("deit-s mlp [N,197,1536]", (64, 197, 1536), 8),
] if GPU else [
    ("resnet18 layer1 [8,64,56,56]", (8, 64, 56, 56), 2),
    ("resnet18 layer3 [8,256,14,14]", (8, 256, 14, 14), 4),
    ("deit-s mlp [4,197,1536]", (4, 197, 1536), 8),
]

# CSG gate: (name, x shape, classes)
CSG_CASES = [
    ("resnet152 layer4 [32,2048,4,4] K=6", (32, 2048, 4, 4), 6),
    ("[64,512,7,7] K=1000", (64, 512, 7, 7), 1000),
]

if SMOKE:
    LWTA_CASES = [("smoke [2,8,4,4]", (2, 8, 4, 4), 2)]
    CSG_CASES = [("smoke [4,16,2,2] K=3", (4, 16, 2, 2), 3)]

# CoDA-Net CIFAR-10 9-layer net (6-channel 32x32 input): (name, in, out, kernel, stride, rank, H=W of the input)
def _coda_cifar10():
    kernels = [3] * 8 + [1]
    strides = [1, 1, 2, 1, 1, 2, 1, 1, 1]
    channels = [16, 16, 32, 32, 32, 64, 64, 64, 10]
    ranks = [32, 32] + [64] * 7
    layers, cin, hw = [], 6, 32
    for i, (k, s, c, r) in enumerate(zip(kernels, strides, channels, ranks)):
        layers.append((f"cifar10 L{i + 1} {k}x{k} {cin}->{c} r{r} s{s} @{hw}", cin, c, k, s, r, hw))
        cin, hw = c, (hw + 2 * ((k - 1) // 2) - k) // s + 1
    return layers


CODA_CIFAR10_LAYERS = _coda_cifar10()
CODA_BATCH = 64 if GPU else 16
if SMOKE:
    CODA_CIFAR10_LAYERS = [("smoke 3x3 6->4 r3 @6", 6, 4, 3, 1, 3, 6)]
    CODA_BATCH = 2

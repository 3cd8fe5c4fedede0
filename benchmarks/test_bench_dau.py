"""CoDA dynamic alignment units. The original CoDA code is not an installable package, so the baseline is
our exact reference of it (it materialises the per-pixel dynamic weights like the original), labelled
"reference"."""
import pytest
import torch

import bcos_kernels
from bcos_kernels import nn as bnn
from bcos_kernels.reference import dau as dau_ref
from harness import DEVICE, MODES, SMOKE, Fn, bench
from shapes import CODA_BATCH, CODA_CIFAR10_LAYERS

PROVIDERS = ["reference"] + bcos_kernels.available_backends(DEVICE, "dau_conv2d")
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
ROUNDS = 3 if SMOKE else (20 if DEVICE.type == "cuda" else 3)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", CODA_CIFAR10_LAYERS, ids=lambda c: c[0])
def test_dau_conv2d(benchmark, case, dtype, provider, mode):
    name, cin, cout, k, s, rank, hw = case

    def build(pr):
        layer = bnn.DAUConv2d(cin, cout, rank, kernel_size=k, stride=s, backend=None if pr == "reference" else pr)
        if pr != "reference":
            return layer
        w = layer.weight_mod.weighting_f
        return Fn(lambda x: dau_ref.dau_conv2d_original(x, w[0].weight, w[1].weight, w[1].bias, kernel_size=k,
                                                        stride=s, padding=None, norm="squash", detach=False),
                  w[0].weight, w[1].weight, w[1].bias)

    x = torch.randn(CODA_BATCH, cin, hw, hw, device=DEVICE, dtype=dtype)
    bench(benchmark, "dau_conv2d", name, dtype, mode, provider, build, [x], f"x={list(x.shape)} k={k} s={s} r={rank}",
          ROUNDS)

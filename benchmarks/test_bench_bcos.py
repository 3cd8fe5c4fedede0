"""B-cos conv2d and linear: the original `bcos` modules, torch.compile of them, each backend of ours and a
plain conv2d/linear of the same shape (the limit a B-cos layer cannot beat)."""
import os
import sys

import pytest
import torch

import bcos_kernels
from bcos_kernels import nn as bnn
from harness import DEVICE, MODES, SMOKE, bench
from shapes import RESNET50_BATCH, RESNET50_CONVS, VIT_B16_LINEARS, VIT_BATCH, VIT_TOKENS

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from originals import bcos_module  # noqa: E402

DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
BASELINES = ["original"] + ([] if SMOKE else ["original_compiled"])
CONV_PROVIDERS = BASELINES + bcos_kernels.available_backends(DEVICE, "bcos_conv2d") + ["plain"]
LINEAR_PROVIDERS = BASELINES + bcos_kernels.available_backends(DEVICE, "bcos_linear") + ["plain"]
ROUNDS = 3 if SMOKE else (20 if DEVICE.type == "cuda" else 7)

def _conv_module(provider, cin, cout, k, s, p):
    if provider == "plain":
        return torch.nn.Conv2d(cin, cout, k, s, p, bias=False)
    if provider.startswith("original"):
        return bcos_module("modules").BcosConv2d(cin, cout, k, s, p)
    return bnn.BcosConv2d(cin, cout, k, s, p, backend=provider)


def _linear_module(provider, cin, cout):
    if provider == "plain":
        return torch.nn.Linear(cin, cout, bias=False)
    if provider.startswith("original"):
        return bcos_module("modules").BcosLinear(cin, cout)
    return bnn.BcosLinear(cin, cout, backend=provider)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", CONV_PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", RESNET50_CONVS, ids=lambda c: c[0])
def test_bcos_conv2d(benchmark, case, dtype, provider, mode):
    name, cin, cout, k, s, p, hw = case
    x = torch.randn(RESNET50_BATCH, cin, hw, hw, device=DEVICE, dtype=dtype)
    bench(benchmark, "bcos_conv2d", name, dtype, mode, provider, lambda pr: _conv_module(pr, cin, cout, k, s, p), [x],
          f"x={list(x.shape)} k={k} s={s} p={p}", ROUNDS)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", LINEAR_PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", VIT_B16_LINEARS, ids=lambda c: c[0])
def test_bcos_linear(benchmark, case, dtype, provider, mode):
    name, cin, cout = case
    x = torch.randn(VIT_BATCH, VIT_TOKENS, cin, device=DEVICE, dtype=dtype)
    bench(benchmark, "bcos_linear", name, dtype, mode, provider, lambda pr: _linear_module(pr, cin, cout), [x],
          f"x={list(x.shape)} out={cout}", ROUNDS)

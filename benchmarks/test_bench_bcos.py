"""B-cos conv2d and linear at every distinct layer shape of B-cos ResNet-50, DenseNet-121 and ViT-B/16: the
original `bcos` modules (else our reference, labelled so), torch.compile of them, each backend of ours and a plain
conv2d/linear of the same shape (the limit a B-cos layer cannot beat). The convs run in both layouts: NCHW, and
"<provider>_channels_last" (module and input channels_last, what a channels_last network runs) for the original,
backend "cpu" and the plain conv; the report takes the faster layout of each (torch.compile: NCHW only)."""

import pytest
import torch
from harness import DEVICE, DTYPES, MODES, baseline_providers, bench, our_providers, reference_backend
from originals import bcos_module
from shapes import BCOS_CONV_BATCH, BCOS_CONVS, BCOS_LINEAR_BATCH, BCOS_LINEARS

from bcos_kernels import nn as bnn

CHANNELS_LAST = "_channels_last"
CONV_PROVIDERS = (
    baseline_providers("bcos_conv2d")
    + ["original" + CHANNELS_LAST]
    + our_providers("bcos_conv2d")
    + ["cpu" + CHANNELS_LAST for p in our_providers("bcos_conv2d") if p == "cpu"]
    + ["plain", "plain" + CHANNELS_LAST]
)
LINEAR_PROVIDERS = baseline_providers("bcos_linear") + our_providers("bcos_linear") + ["plain"]


def _conv_module(provider, c):
    if provider == "plain":
        return torch.nn.Conv2d(c.cin, c.cout, c.k, c.stride, c.padding, bias=False)
    if provider.endswith(CHANNELS_LAST):
        return _conv_module(provider.removesuffix(CHANNELS_LAST), c).to(memory_format=torch.channels_last)
    if provider == "original":
        return bcos_module("modules").BcosConv2d(c.cin, c.cout, c.k, c.stride, c.padding)
    backend = reference_backend("bcos_conv2d") if provider == "reference" else provider
    return bnn.BcosConv2d(c.cin, c.cout, c.k, c.stride, c.padding, backend=backend)


def _linear_module(provider, c):
    if provider == "plain":
        return torch.nn.Linear(c.cin, c.cout, bias=False)
    if provider == "original":
        return bcos_module("modules").BcosLinear(c.cin, c.cout)
    backend = reference_backend("bcos_linear") if provider == "reference" else provider
    return bnn.BcosLinear(c.cin, c.cout, backend=backend)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", CONV_PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", BCOS_CONVS, ids=lambda c: c.name)
def test_bcos_conv2d(case, dtype, provider, mode):
    x = torch.randn(BCOS_CONV_BATCH, case.cin, case.hw, case.hw, device=DEVICE, dtype=dtype)
    if provider.endswith(CHANNELS_LAST):
        x = x.contiguous(memory_format=torch.channels_last)
    bench(
        "bcos_conv2d",
        case.name,
        dtype,
        mode,
        provider,
        lambda pr: _conv_module(pr, case),
        [x],
        f"x={list(x.shape)} out={case.cout} k={case.k} s={case.stride} p={case.padding} x{case.count} in model",
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", LINEAR_PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", BCOS_LINEARS, ids=lambda c: c.name)
def test_bcos_linear(case, dtype, provider, mode):
    x = torch.randn(BCOS_LINEAR_BATCH, case.rows, case.cin, device=DEVICE, dtype=dtype)
    bench(
        "bcos_linear",
        case.name,
        dtype,
        mode,
        provider,
        lambda pr: _linear_module(pr, case),
        [x],
        f"x={list(x.shape)} out={case.cout} x{case.count} in model",
    )

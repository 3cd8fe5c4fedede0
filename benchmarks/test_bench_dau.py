"""CoDA dynamic alignment units at the layers of CoDA-Net CIFAR-10 (9L) and ImageNet-100. The original CoDA code
is not an installable package, so the baseline is our exact reference of it (it materialises the per-pixel dynamic
weights like the original), labelled "reference". "plain" is a conv2d of the same shape: the limit."""

import pytest
import torch
from harness import DEVICE, DTYPES, MODES, baseline_providers, bench, our_providers
from shapes import DAU_CASES

from bcos_kernels import nn as bnn

PROVIDERS = baseline_providers("dau_conv2d") + our_providers("dau_conv2d") + ["plain"]


def _dau_module(provider, c):
    if provider == "plain":
        return torch.nn.Conv2d(c.cin, c.cout, c.k, c.stride, c.padding, bias=False)
    # backend "reference" runs the exact reference of the original (dau_conv2d_original)
    return bnn.DAUConv2d(c.cin, c.cout, c.rank, kernel_size=c.k, stride=c.stride, padding=c.padding, backend=provider)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", DAU_CASES, ids=lambda c: c.name)
def test_dau_conv2d(case, dtype, provider, mode):
    x = torch.randn(case.batch, case.cin, case.hw, case.hw, device=DEVICE, dtype=dtype)
    bench(
        "dau_conv2d",
        case.name,
        dtype,
        mode,
        provider,
        lambda pr: _dau_module(pr, case),
        [x],
        f"x={list(x.shape)} out={case.cout} k={case.k} s={case.stride} p={case.padding} r={case.rank}",
    )

"""DISCOVER's LWTA and CSG's class-specific gate. The originals are not installable packages, so the baseline is
our exact reference of them, labelled "reference". "plain" is the cheapest op touching the same memory: the ReLU
that LWTA replaces in DISCOVER's networks, and for the gate a multiply by a per-(sample, channel) factor."""

import pytest
import torch
from harness import DEVICE, DTYPES, MODES, Fn, baseline_providers, bench, our_providers
from shapes import CSG_CASES, LWTA_CASES

from bcos_kernels import nn as bnn
from bcos_kernels.ops.class_specific_gate import class_specific_gate
from bcos_kernels.ops.class_specific_gate import reference as csg_ref
from bcos_kernels.ops.lwta import reference as lwta_ref


def _lwta_module(provider, u, deterministic):
    if provider == "plain":
        return torch.nn.ReLU()
    if provider == "reference":
        return Fn(lambda x: lwta_ref.lwta(x, u, deterministic=deterministic))
    return bnn.LWTA(U=u, deterministic=deterministic, backend=provider)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", baseline_providers("lwta") + our_providers("lwta") + ["plain"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("deterministic", [False, True], ids=["stochastic", "deterministic"])
@pytest.mark.parametrize("case", LWTA_CASES, ids=lambda c: c.name)
def test_lwta(case, deterministic, dtype, provider, mode):
    """DISCOVER's stochastic LWTA (training; its test-time sampling too) and the deterministic argmax variant."""
    x = torch.randn(case.shape, device=DEVICE, dtype=dtype)
    bench(
        "lwta",
        case.name + (" deterministic" if deterministic else ""),
        dtype,
        mode,
        provider,
        lambda pr: _lwta_module(pr, case.U, deterministic),
        [x],
        f"x={list(case.shape)} U={case.U}" + (" deterministic" if deterministic else ""),
    )


def _gate_module(provider, shape, classes):
    """The gate alone for every provider (the layer's L1 regulariser is not in the rows: plain has none)."""
    if provider == "plain":
        factor = torch.nn.Parameter(torch.rand(shape[0], shape[1], *([1] * (len(shape) - 2))))
        return Fn(lambda x, labels: x * factor, factor)
    mask = bnn.ClassSpecificGate(shape[1], classes).mask
    if provider == "reference":
        return Fn(lambda x, labels: csg_ref.class_specific_gate(x, mask, labels), mask)
    return Fn(lambda x, labels: class_specific_gate(x, mask, labels, backend=provider), mask)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "provider", baseline_providers("class_specific_gate") + our_providers("class_specific_gate") + ["plain"]
)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", CSG_CASES, ids=lambda c: c.name)
def test_class_specific_gate(case, dtype, provider, mode):
    x = torch.randn(case.shape, device=DEVICE, dtype=dtype)
    labels = torch.randint(0, case.classes, (case.shape[0],), device=DEVICE)
    bench(
        "class_specific_gate",
        case.name,
        dtype,
        mode,
        provider,
        lambda pr: _gate_module(pr, case.shape, case.classes),
        [x, labels],
        f"x={list(case.shape)} K={case.classes}",
    )

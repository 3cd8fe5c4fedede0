"""DISCOVER's LWTA and CSG's class-specific gate. The originals are not installable packages, so the
baseline is our exact reference of them, labelled "reference"."""
import pytest
import torch

import bcos_kernels
from bcos_kernels import nn as bnn
from bcos_kernels.reference import csg as csg_ref
from bcos_kernels.reference import lwta as lwta_ref
from harness import DEVICE, MODES, SMOKE, Fn, bench
from shapes import CSG_CASES, LWTA_CASES

DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
ROUNDS = 3 if SMOKE else (20 if DEVICE.type == "cuda" else 7)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", ["reference"] + bcos_kernels.available_backends(DEVICE, "lwta"))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", LWTA_CASES, ids=lambda c: c[0])
def test_lwta(benchmark, case, dtype, provider, mode):
    name, shape, u = case

    def build(pr):
        if pr == "reference":
            return Fn(lambda x: lwta_ref.lwta(x, u))
        return bnn.LWTA(U=u, backend=pr)

    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    bench(benchmark, "lwta", name, dtype, mode, provider, build, [x], f"x={list(shape)} U={u}", ROUNDS)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", ["reference"] + bcos_kernels.available_backends(DEVICE, "class_specific_gate"))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", CSG_CASES, ids=lambda c: c[0])
def test_class_specific_gate(benchmark, case, dtype, provider, mode):
    name, shape, classes = case

    def build(pr):
        gate = bnn.ClassSpecificGate(shape[1], classes, backend=None if pr == "reference" else pr)
        if pr == "reference":
            return Fn(lambda x, labels: csg_ref.class_specific_gate(x, gate.mask, labels), gate.mask)
        return Fn(lambda x, labels: gate(x, labels)[0], gate.mask)

    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    labels = torch.randint(0, classes, (shape[0],), device=DEVICE)
    bench(benchmark, "class_specific_gate", name, dtype, mode, provider, build, [x, labels],
          f"x={list(shape)} K={classes}", ROUNDS)

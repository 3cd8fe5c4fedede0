#!/usr/bin/env bash
# Install as users do (issue 21): a non-editable wheel, built with `pip wheel`, installed into a fresh venv, imports
# from that venv (not from this checkout), has the C++ CPU backend and passes a smoke test (a B-cos conv on backend
# "cpu" against backend "reference", forward and gradients; a converted module).
# The venv sees the system site-packages for torch only: this machine's torch is the one the wheel was built against
# (the extension is ABI-bound to it), and any other torch would be a download of gigabytes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
out=build/wheel
rm -rf "$out" && mkdir -p "$out"
"$PY" -m pip wheel -q --no-build-isolation --no-deps . -w "$out/dist"
wheel=$(ls "$out"/dist/bcos_kernels-*.whl)
echo "built $wheel"
"$PY" -m venv --system-site-packages "$out/venv"
"$out/venv/bin/python" -m pip install -q --no-deps --force-reinstall "$wheel"
cd "$out"  # away from the checkout, whose bcos_kernels/ would shadow the installed one
venv/bin/python - <<'PY'
import os
import sys

import torch

import bcos_kernels

where = os.path.dirname(bcos_kernels.__file__)
assert where.startswith(sys.prefix), f"bcos_kernels imported from {where}, not from the venv {sys.prefix}"
assert "cpu" in bcos_kernels.available_backends(), bcos_kernels.available_backends()
torch.manual_seed(0)
x = torch.randn(2, 5, 9, 7, dtype=torch.float64, requires_grad=True)
w = torch.randn(6, 5, 3, 3, dtype=torch.float64, requires_grad=True)
results = {}
for backend in ("cpu", "reference"):
    out = bcos_kernels.bcos_conv2d(x, w, padding=1, stride=2, backend=backend)
    results[backend] = (out, *torch.autograd.grad(out.square().sum(), [x, w]))
for got, want in zip(results["cpu"], results["reference"]):
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
layer = bcos_kernels.nn.BcosConv2d(5, 6, kernel_size=3, padding=1)
assert layer(x.float()).shape == (2, 6, 9, 7)
print(f"wheel smoke test passed: bcos_kernels {bcos_kernels.__version__} from {where}, backends "
      f"{bcos_kernels.available_backends()}")
PY

#!/usr/bin/env bash
# Installs everything bcos-kernels needs into the current Python and builds the extension.
# Safe to run again: what is already installed is kept.
#  - torch: kept if importable (e.g. a CUDA build on a GPU machine); otherwise pinned to the CPU wheel 2.13.0
#    (any unpinned spec would pull several GB of CUDA packages).
#  - the original `bcos` package (0.1.3) with --no-deps: its models need torchvision, which has no CPU build;
#    the tests import only its modules.
#  - the extension is built against the installed torch, hence --no-build-isolation.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q triton numpy einops pytest hypothesis ninja "setuptools>=64" wheel
"$PY" -m pip install -q --no-deps "bcos==0.1.3"
# [viz]: matplotlib and Pillow, for examples/train_and_explain.py and its test
"$PY" -m pip install -q --no-build-isolation -e ".[viz]"
"$PY" -c "import bcos_kernels; print('bcos_kernels backends here:', bcos_kernels.available_backends())"

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from originals import imported_from_mirror  # noqa: E402  (tests/ is on sys.path from here on)

# Without a GPU the Triton kernels run in Triton's interpreter (tiny shapes, fp32). It must be switched on before
# any kernel module is imported: @triton.jit reads it when the kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# The files of moboehle/CoDA-Nets that its layers need (modules/ imports project_utils).
CODA_FILES = (
    "modules/__init__.py",
    "modules/DAUs.py",
    "modules/coda_conv.py",
    "modules/norms.py",
    "modules/utils.py",
    "project_utils.py",
)


@pytest.fixture(scope="module")
def coda_original(tmp_path_factory):
    """The original CoDA-Nets ``modules`` (DAUs, coda_conv, norms), imported from files extracted from the git
    mirror; they stay in sys.modules while the test module runs (convert recognises the layers by class)."""
    names = [f"modules.{name}" for name in ("DAUs", "coda_conv", "norms")]
    with imported_from_mirror("moboehle+CoDA-Nets", CODA_FILES, names, tmp_path_factory.mktemp("coda")) as mods:
        yield {name.split(".")[1]: module for name, module in mods.items()}

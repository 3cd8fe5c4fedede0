"""Import the original `bcos` package's layers without torchvision.

``bcos/__init__.py`` (PyPI ``bcos``) imports torchvision and every model, although its layers
(``bcos.modules``) and ``bcos.common.BcosUtilMixin`` need neither, and torchvision has no build for every
torch (e.g. not for the CPU wheel this project is tested on). :func:`import_bcos_modules` makes
``bcos.modules`` importable anyway, which is what the example ``examples/train_and_explain.py`` and the
tests' comparisons with the original code use; users on CPU machines without torchvision can use it
the same way (``pip install --no-deps bcos``, then ``import_bcos_modules().BcosConv2d``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from typing import Optional

__all__ = ["import_bcos_modules"]


def import_bcos_modules() -> Optional[types.ModuleType]:
    """The `bcos` package's ``bcos.modules`` (layers, norms, LogitLayer), or None when `bcos` is not installed.

    Unless `bcos` is already imported, a bare package named ``bcos`` whose ``__path__`` is the installed
    folder is registered first: its submodules then import as usual without running ``bcos/__init__.py``.
    Likewise a bare ``bcos.models``, so that a later ``import bcos.models.vgg`` in the same process skips
    ``bcos/models/__init__.py`` (every model, torchvision again) too.
    """
    if "bcos" not in sys.modules:
        spec = importlib.util.find_spec("bcos")
        if spec is None or not spec.submodule_search_locations:
            return None
        root = spec.submodule_search_locations[0]
        for name, path in (("bcos", root), ("bcos.models", os.path.join(root, "models"))):
            package = types.ModuleType(name)
            package.__path__ = [path]
            sys.modules[name] = package
    return importlib.import_module("bcos.modules")

"""Loading the original code the references are checked against.

- The `bcos` package (PyPI 0.1.3, installed with --no-deps): its __init__ imports
  torchvision, which has no CPU build, so we register bare `bcos` and
  `bcos.models` packages whose __path__ is the installed folder and import the
  submodules we need directly.
- Originals that are not packages (moboehle/B-cos v1, B-cosification) are read
  from a local git mirror when one exists (developer machines); tests that need
  them skip with the reason otherwise.
"""
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import types

import pytest

MIRRORS = os.environ.get("BCOS_KERNELS_MIRRORS", "/work/.mirror")


def _bare_package(name: str, path: str) -> None:
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = [path]
        sys.modules[name] = pkg


def bcos_module(name: str):
    """Import `bcos.<name>` (e.g. "modules", "models.vgg") without running bcos/__init__.py."""
    spec = importlib.util.find_spec("bcos") if "bcos" not in sys.modules else None
    if "bcos" not in sys.modules:
        if spec is None or not spec.submodule_search_locations:
            pytest.skip("the original `bcos` package is not installed (pip install --no-deps bcos==0.1.3)")
        root = spec.submodule_search_locations[0]
        _bare_package("bcos", root)
        _bare_package("bcos.models", os.path.join(root, "models"))
    return importlib.import_module(f"bcos.{name}")


def mirror_source(repo: str, path: str) -> str:
    """Text of `path` in the local git mirror of `repo` (owner+name), or skip with the reason."""
    git_dir = os.path.join(MIRRORS, repo, "repo")
    if not os.path.isdir(git_dir):
        pytest.skip(f"no local mirror of {repo} at {git_dir} (set BCOS_KERNELS_MIRRORS to a folder holding "
                    f"{repo}/repo): this comparison with the original runs on developer machines only")
    if shutil.which("git") is None:
        pytest.skip(f"git is not installed, cannot read {repo} from its mirror")
    result = subprocess.run(["git", "-c", "safe.directory=*", "--git-dir", git_dir, "show", f"HEAD:{path}"],
                            capture_output=True, text=True)
    if result.returncode:
        pytest.skip(f"cannot read {path} from the {repo} mirror: {result.stderr.strip()}")
    return result.stdout


def load_source(name: str, source: str, extra_globals=None):
    """Execute `source` as a fresh module called `name`."""
    module = types.ModuleType(name)
    module.__dict__.update(extra_globals or {})
    exec(compile(source, f"<original {name}>", "exec"), module.__dict__)
    return module

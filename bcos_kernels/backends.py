"""Backend selection, shared by every op.

Order of precedence: the ``backend=`` argument, then the ``BCOS_KERNELS_BACKEND``
environment variable, then "auto". An explicitly requested backend that cannot
run the call raises ``ValueError`` saying why; "auto" never fails: it picks the
fastest backend that can run the call and, when it has to fall back, warns once
per (op, reason).
"""
from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from typing import Callable, Dict, Optional

import torch

BACKENDS = ("torch", "cpu", "triton", "cuda")
ENV_VAR = "BCOS_KERNELS_BACKEND"

# The fused backends each op has (besides "torch", which every op has).
OP_BACKENDS = {
    "bcos_conv2d": ("cpu", "triton", "cuda"),
    "bcos_linear": ("cpu", "triton", "cuda"),
    "dau_conv2d": ("triton", "cuda"),
    "lwta": ("triton", "cuda"),
    "class_specific_gate": ("triton", "cuda"),
}

# For each device type, the order in which "auto" tries the fused backends.
# "torch" (the reference) is always the last resort.
AUTO_ORDER = {
    "cpu": ("cpu",),
    "cuda": ("triton", "cuda"),
}


@functools.lru_cache(maxsize=None)
def cpu_extension():
    """The compiled extension module ``bcos_kernels._C``, or None if it is not built."""
    try:
        from bcos_kernels import _C  # noqa: F401  (registers torch.ops.bcos_kernels.*)
    except ImportError:
        return None
    return _C


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Looked up once, without importing triton (a plain constant also keeps torch.compile from tracing a cache).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_importable() -> bool:
    return _TRITON_INSTALLED


def device_reason(backend: str, device: torch.device) -> Optional[str]:
    """Why ``backend`` cannot run on ``device`` here (None if it can)."""
    if backend == "torch":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"backend 'cpu' needs CPU tensors, got device {device}"
        if cpu_extension() is None:
            return "the C++ extension bcos_kernels._C is not built (pip install --no-build-isolation -e .)"
        return None
    if backend == "triton":
        if not triton_importable():
            return "triton is not installed"
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreting()):
            return None
        return f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU), got device {device}"
    if backend == "cuda":
        if device.type != "cuda":
            return f"backend 'cuda' needs CUDA tensors, got device {device}"
        ext = cpu_extension()
        if ext is None or not getattr(ext, "WITH_CUDA", False):
            return "the extension was built without CUDA"
        return None
    raise AssertionError(backend)


def available_backends(device: Optional[torch.device | str] = None, op: Optional[str] = None) -> list:
    """Backends usable on ``device`` (default: CUDA if present, else CPU) in this process; with ``op``, only
    those that implement that op."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    names = BACKENDS if op is None else ("torch",) + OP_BACKENDS[op]
    return [b for b in names if device_reason(b, device) is None]


_warned: set = set()


def _warn_once(op: str, reason: str) -> None:
    key = (op, reason)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"bcos_kernels.{op}: falling back to backend 'torch': {reason}", RuntimeWarning, stacklevel=4)


def resolve(
    op: str,
    requested: Optional[str],
    device: torch.device,
    implemented: Dict[str, Callable[[], Optional[str]]],
) -> str:
    """Pick the backend that runs one call of ``op``.

    ``implemented`` maps each fused backend the op has to a function that
    returns None when that backend supports this call's options, or a reason
    it does not. "torch" needs no entry: it supports everything.
    """
    name = requested if requested is not None else os.environ.get(ENV_VAR) or "auto"
    if not isinstance(name, str) or (name != "auto" and name not in BACKENDS):
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS} or None, got {name!r}")
    if name == "torch":
        return "torch"
    if name != "auto":
        if name not in implemented:
            raise ValueError(f"bcos_kernels.{op}: backend {name!r} does not implement this op "
                             f"(implemented: {['torch'] + sorted(implemented)})")
        reason = device_reason(name, device) or implemented[name]()
        if reason is not None:
            raise ValueError(f"bcos_kernels.{op}: backend {name!r} cannot run this call: {reason}")
        return name
    reasons = []
    for candidate in AUTO_ORDER.get(device.type, ()):
        if candidate not in implemented:
            continue
        reason = device_reason(candidate, device) or implemented[candidate]()
        if reason is None:
            return candidate
        reasons.append(f"{candidate}: {reason}")
    if reasons:
        _warn_once(op, "; ".join(reasons))
    return "torch"

"""The backend registry: the one list of backends, where each can run, why it cannot, and what each op supports.

Order of precedence for a call: the ``backend=`` argument, then the ``BCOS_KERNELS_BACKEND`` environment
variable, then "auto". An explicitly requested backend that cannot run the call raises ``ValueError`` saying
why; "auto" never fails: it takes the first backend of ``AUTO_ORDER`` that can run the call and that the op's
``Support.auto`` does not pass over for it (a backend measured slower on some calls), and, when it passed over
one that cannot run the call, warns once per (op, reason).

A backend of an op is the module ``bcos_kernels.ops.<op>.<backend>`` (imported on first use, so that importing
bcos_kernels never imports triton); :func:`kernels` returns it. The custom ops dispatch through it, so no other
file switches on backend names.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

ENV_VAR = "BCOS_KERNELS_BACKEND"

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The Triton interpreter (CPU tensors, tests only) has no bf16 arithmetic.
TRITON_INTERPRETER_DTYPES = (torch.float32,)
CUDA_DTYPES = FLOAT_DTYPES


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


def _everywhere(device: torch.device) -> Optional[str]:
    return None


def _cpu_unavailable(device: torch.device) -> Optional[str]:
    if device.type != "cpu":
        return f"backend 'cpu' needs CPU tensors, got device {device}"
    if cpu_extension() is None:
        return "the C++ extension bcos_kernels._C is not built (pip install --no-build-isolation -e .)"
    return None


def _triton_unavailable(device: torch.device) -> Optional[str]:
    if not triton_importable():
        return "triton is not installed"
    if device.type == "cuda" or (device.type == "cpu" and triton_interpreting()):
        return None
    return f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU), got device {device}"


def _cuda_unavailable(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return f"backend 'cuda' needs CUDA tensors, got device {device}"
    ext = cpu_extension()
    if ext is None or not getattr(ext, "WITH_CUDA", False):
        return "the extension was built without CUDA"
    return None


@dataclass(frozen=True)
class Backend:
    name: str
    what: str
    unavailable: Callable[[torch.device], Optional[str]]  # why it cannot run on a device here (None: it can)


BACKENDS: Dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("reference", "the exact pure-PyTorch reference of the original code, plain autograd", _everywhere),
        Backend("torch", "an optimised pure-PyTorch path with a hand-written backward", _everywhere),
        Backend("cpu", "ATen conv/GEMM + the C++ extension's fused passes", _cpu_unavailable),
        Backend("triton", "fully fused Triton kernels", _triton_unavailable),
        Backend("cuda", "cuDNN/cuBLAS + the extension's fused CUDA kernels", _cuda_unavailable),
    )
}

# For each device type, the order in which "auto" tries the backends ("reference" runs everything).
AUTO_ORDER = {
    "cpu": ("cpu", "torch", "reference"),
    "cuda": ("triton", "cuda", "torch", "reference"),
}


def _dau_triton_limits(pixels: int = 0, **_) -> Optional[str]:
    # the DAU kernels index pixels in int32 (memory offsets are int64)
    return "more than 2**31 - 1 pixels (N*H*W) in one call" if pixels >= 2**31 else None


# the DAU kernels' per-pixel shared-memory tiles hold rank + 1 entries (kDauMaxRank in csrc/cuda/kernels.h)
DAU_CUDA_MAX_RANK = 511


def _dau_cuda_limits(rank: int = 0, **_) -> Optional[str]:
    if rank > DAU_CUDA_MAX_RANK:
        return (
            f"rank {rank} is larger than {DAU_CUDA_MAX_RANK} (the CUDA kernels' per-pixel tiles hold rank + 1 entries)"
        )
    return None


@dataclass(frozen=True)
class Support:
    """What one backend supports for one op: the dtypes, and the limits of a call (keyword facts -> a reason)."""

    dtypes: Tuple[torch.dtype, ...] = FLOAT_DTYPES
    limits: Optional[Callable[..., Optional[str]]] = None
    # whether its outputs keep a channels_last input's layout (False: NCHW-contiguous; None: not promised, as the
    # ATen ops of a reference decide case by case)
    keeps_channels_last: Optional[bool] = False
    # whether "auto" picks it for a call (keyword facts -> bool), for a backend measured slower than the next one
    # in AUTO_ORDER on some calls (benchmarks/results); None: for every call it can run
    auto: Optional[Callable[..., bool]] = None
    # the forms it can compute an op in, where an op has several (the DAU: ops/dau_conv2d/cost_model.py)
    forms: Tuple[str, ...] = ("lowrank",)


def _same_dtypes(mixed_dtypes=(), **_) -> Optional[str]:
    if mixed_dtypes:
        return f"{', '.join(mixed_dtypes)} must have x's dtype (mixed dtypes run the reference)"
    return None


def _lwta_cpu_auto(deterministic: bool = False, keeps_probabilities: bool = False, **_) -> bool:
    # LWTA's C++ kernels (backend "cpu") beat the reference 3-5x in the deterministic mode, and 1.6-3x sampling an
    # fp32/fp64 x, whose softmax probabilities they keep for the backward (issue 19's closing notes). Sampling a
    # bf16/fp16 x they draw the noise again in the backward, about as slow as the reference: "auto" leaves those
    # calls to the next backend.
    return deterministic or keeps_probabilities


_BCOS = {
    "reference": Support(keeps_channels_last=None),
    "cpu": Support(CPU_DTYPES),
    "triton": Support(TRITON_DTYPES, keeps_channels_last=True),
    "cuda": Support(CUDA_DTYPES),
}
# elementwise ops: every fast backend writes its output with x's strides
_ELEMENTWISE = {
    "torch": Support(keeps_channels_last=True),
    "triton": Support(TRITON_DTYPES, keeps_channels_last=True),
    "cuda": Support(CUDA_DTYPES, keeps_channels_last=True),
}

# Which backends implement each op, and what they support.
OPS: Dict[str, Dict[str, Support]] = {
    # backend "cpu" keeps a channels_last x's layout in the conv (ops/bcos_conv2d/cpu.py), not "cuda" (cuDNN's
    # NCHW scale pass)
    "bcos_conv2d": {**_BCOS, "cpu": Support(CPU_DTYPES, keeps_channels_last=True)},
    "bcos_linear": _BCOS,
    "dau_conv2d": {
        "reference": Support(),
        "torch": Support(forms=("lowrank", "materialised")),
        "triton": Support(TRITON_DTYPES, _dau_triton_limits),
        "cuda": Support(CUDA_DTYPES, _dau_cuda_limits),
    },
    # the LWTA reference's x * mask keeps x's layout; the gate's reference does only in eval (it returns x)
    "lwta": {
        "reference": Support(keeps_channels_last=True),
        "cpu": Support(keeps_channels_last=True, auto=_lwta_cpu_auto),
        **_ELEMENTWISE,
    },
    "batch_norm_uncentered": {
        "reference": Support(keeps_channels_last=True),
        "torch": Support(keeps_channels_last=True, limits=_same_dtypes),
    },
    # out of explanation mode every backend is ATen's norm; in it, "torch" needs parameters in x's dtype
    "detachable_norm": {
        "reference": Support(keeps_channels_last=None),
        "torch": Support(keeps_channels_last=None, limits=_same_dtypes),
    },
    "class_specific_gate": {
        "reference": Support(keeps_channels_last=None),
        "cpu": Support(keeps_channels_last=True),
        **_ELEMENTWISE,
    },
}


def kernels(op: str, backend: str):
    """The module of ``backend``'s implementation of ``op`` (``bcos_kernels.ops.<op>.<backend>``)."""
    if backend not in OPS[op]:
        raise ValueError(f"bcos_kernels.{op}: unknown backend {backend!r} (implemented: {list(OPS[op])})")
    return importlib.import_module(f"bcos_kernels.ops.{op}.{backend}")


def check_device(op: str, backend: str, device: torch.device) -> None:
    """Raise the reason ``backend`` cannot run on ``device`` (a direct call of a custom op with a backend the
    tensors cannot use would otherwise fail inside a kernel, or with torch's "no kernel for CPU")."""
    reason = BACKENDS[backend].unavailable(device)
    if reason is not None:
        raise ValueError(f"bcos_kernels.{op}: backend {backend!r} cannot run here: {reason}")


def checked_kernels(op: str, backend: str, device: torch.device):
    """``kernels(op, backend)`` once ``backend`` is known to implement ``op`` and to run on ``device``: what the
    implementation of a custom op calls."""
    module = kernels(op, backend)  # first: it names an unknown backend
    check_device(op, backend, device)
    return module


def device_reason(backend: str, device: torch.device) -> Optional[str]:
    """Why ``backend`` cannot run on ``device`` here (None if it can)."""
    return BACKENDS[backend].unavailable(torch.device(device))


def call_reason(op: str, backend: str, x: torch.Tensor, **facts) -> Optional[str]:
    """Why ``backend`` cannot run this call of ``op`` on x (None if it can). ``facts``: the call's sizes that
    a backend's limits read (e.g. ``rank``, ``pixels``)."""
    support = OPS[op].get(backend)
    if support is None:
        return f"backend {backend!r} does not implement {op}"
    reason = BACKENDS[backend].unavailable(x.device)
    if reason is not None:
        return reason
    if x.dtype not in support.dtypes:
        return f"dtype {x.dtype} is not supported by backend {backend!r} (supported: {list(support.dtypes)})"
    if backend == "triton" and x.device.type == "cpu" and x.dtype not in TRITON_INTERPRETER_DTYPES:
        return f"the Triton interpreter (CPU tensors) runs float32 only, got {x.dtype}"
    return support.limits(**facts) if support.limits is not None else None


def available_backends(device: Optional[torch.device | str] = None, op: Optional[str] = None) -> list:
    """Backends usable on ``device`` (default: CUDA if present, else CPU) in this process; with ``op``, only
    those that implement that op."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    names = BACKENDS if op is None else OPS[op]
    return [b for b in BACKENDS if b in names and BACKENDS[b].unavailable(device) is None]


_warned: set = set()


def _warn_once(op: str, chosen: str, reason: str) -> None:
    key = (op, reason)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"bcos_kernels.{op}: falling back to backend {chosen!r}: {reason}", RuntimeWarning, stacklevel=4)


def check_name(name) -> None:
    """``name`` must be None, "auto" or a backend of BACKENDS."""
    if name is not None and (not isinstance(name, str) or (name != "auto" and name not in BACKENDS)):
        raise ValueError(f"backend must be one of {('auto', *BACKENDS)} or None, got {name!r}")


def resolve(op: str, requested: Optional[str], x: torch.Tensor, **facts) -> str:
    """The backend that runs this call of ``op`` on x (see the module docstring)."""
    name = requested if requested is not None else os.environ.get(ENV_VAR) or "auto"
    check_name(name)
    if name != "auto":
        if name not in OPS[op]:
            raise ValueError(
                f"bcos_kernels.{op}: backend {name!r} does not implement this op (implemented: {list(OPS[op])})"
            )
        reason = call_reason(op, name, x, **facts)
        if reason is not None:
            raise ValueError(f"bcos_kernels.{op}: backend {name!r} cannot run this call: {reason}")
        return name
    reasons = []
    for candidate in AUTO_ORDER.get(x.device.type, ("reference",)):
        support = OPS[op].get(candidate)
        if support is None or (support.auto is not None and not support.auto(**facts)):
            continue
        reason = call_reason(op, candidate, x, **facts)
        if reason is None:
            if reasons:
                _warn_once(op, candidate, "; ".join(reasons))
            return candidate
        reasons.append(f"{candidate}: {reason}")
    last = "torch" if "torch" in OPS[op] else "reference"  # both run everything
    _warn_once(op, last, "; ".join(reasons))
    return last

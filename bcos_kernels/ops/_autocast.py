"""The ops under ``torch.autocast``.

Autocast casts the inputs of the ATen ops on its lists; a custom op is on none, so without this module an op would
run in the dtypes it was given, and its backends' own ATen calls (a conv, a GEMM) would be cast behind their backs
(the CPU B-cos conv then failed on an fp32 norm of a bf16 output). The policy follows torch's for each op's nearest
ATen op:

* B-cos conv and linear and the DAU conv are convolutions and GEMMs: their floating inputs (x, weights, bias,
  channel_scale; not fp64, not a learnable b, which stays a scalar in its own dtype) are cast to the autocast dtype,
  like ``conv2d``/``linear``'s (:func:`lower_precision`);
* the norms, LWTA and the class-specific gate run in x's dtype, as ``layer_norm``/``group_norm``/``batch_norm`` and
  elementwise ops do on the CPU: the norms' fp32 parameters (and an eval-mode running variance) are cast to it
  (:func:`in_dtype_of`), where without autocast mixed dtypes run the reference's type promotion.

Inside an op autocast is off (:func:`off`, in the front doors and the eager fast path, forward and backward): each
backend then runs its own mixed-precision path (fp32 accumulation, DESIGN.md section 4), so that a call under
autocast is exactly the call on the cast inputs (tests/ops/_util.py checks it for every op, case and backend).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

# whether torch has autocast for a device type (torch.is_autocast_enabled raises for e.g. "meta"); filled here, not
# on first use: a cache filled while dynamo traces makes its restarted trace take another path, which it refuses
_AVAILABLE = {device_type: torch.amp.is_autocast_available(device_type) for device_type in ("cpu", "cuda", "meta")}


def _enabled(device_type: str) -> bool:
    available = _AVAILABLE.get(device_type)
    if available is None:
        available = torch.amp.is_autocast_available(device_type)
    return available and torch.is_autocast_enabled(device_type)


def _on(x) -> bool:
    """Whether autocast is on for x's device (False when x is no tensor)."""
    return isinstance(x, torch.Tensor) and _enabled(x.device.type)


def autocast_dtype(x) -> Optional[torch.dtype]:
    """The dtype autocast runs a conv in on x's device, or None where autocast is off there (or x is no tensor)."""
    return torch.get_autocast_dtype(x.device.type) if _on(x) else None


def lower_precision(x, *tensors) -> tuple:
    """(x, *tensors), under autocast each floating tensor of them in the autocast dtype (fp64 and None as they
    are), as autocast casts the inputs of ``conv2d``; without autocast the arguments themselves."""
    dtype = autocast_dtype(x)
    if dtype is None:
        return (x, *tensors)
    return tuple(
        t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
        for t in (x, *tensors)
    )


def in_dtype_of(x, *tensors) -> tuple:
    """tensors, under autocast each floating one of them in x's dtype (None as it is); without autocast
    themselves."""
    if not _on(x):
        return tensors
    return tuple(t.to(x.dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


def off(x):
    """A context in which autocast is off on x's device (a no-op context where it is off already)."""
    if not _on(x):
        return contextlib.nullcontext()
    return torch.autocast(x.device.type, enabled=False)

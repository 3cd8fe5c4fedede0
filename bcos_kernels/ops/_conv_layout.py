"""The layout the CPU backends run a convolution in, chosen per shape by timing both once.

oneDNN's NCHW and channels_last convolutions differ by up to 2x either way on the same shape (on a 2-core AMD
EPYC, torch 2.13: the 7x7 stem of ResNet-50 runs 1.6x faster channels_last, a 1x1 256->64 at 56x56 1.5x slower),
and which one wins depends on the CPU, the thread count and the shape, so no fixed rule holds. Like
``torch.backends.cudnn.benchmark``, the first call of a shape runs both variants of the step (the conversions to
and from channels_last included) and keeps the faster for that (step, shape, dtype, thread count); later calls run
only the kept one. The caller's layout is unchanged: a variant converts back before it returns.

``BCOS_KERNELS_CPU_CONV_LAYOUT``: ``measure`` (default), ``nchw`` or ``channels_last`` fixes the choice. Under
``torch.use_deterministic_algorithms(True)`` the NCHW path always runs, so that a seeded run rounds the same way
on every run (the two layouts agree to rounding, not bit for bit).
"""

from __future__ import annotations

import os
import time
from typing import Callable, Dict, Hashable, Tuple, TypeVar

import torch

T = TypeVar("T")

NCHW, CHANNELS_LAST = "nchw", "channels_last"
POLICIES = ("measure", NCHW, CHANNELS_LAST)
_ENV = "BCOS_KERNELS_CPU_CONV_LAYOUT"
# channels_last must win by this fraction: a tie keeps the caller's NCHW layout and its rounding.
MARGIN = 0.05
ROUNDS = 3
_CHOICES: Dict[Hashable, str] = {}


def policy() -> str:
    value = os.environ.get(_ENV, "measure").strip().lower() or "measure"
    if value not in POLICIES:
        raise ValueError(f"{_ENV} must be one of {POLICIES}, got {value!r}")
    return value


def choices() -> Dict[Hashable, str]:
    """The choices made so far, {key: layout} (a copy; for tests and reports)."""
    return dict(_CHOICES)


def clear() -> None:
    _CHOICES.clear()


def _timed(fn: Callable[[], T]) -> Tuple[float, T]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def run_faster(key: Hashable, nchw: Callable[[], T], channels_last: Callable[[], T]) -> T:
    """``nchw()`` or ``channels_last()`` (the same step in two layouts, same result up to rounding): the one
    measured faster for ``key`` (the step, its shapes and dtype) at this process's thread count."""
    chosen = policy()
    if chosen == "measure":
        if torch.are_deterministic_algorithms_enabled():
            return nchw()
        key = (key, torch.get_num_threads())
        chosen = _CHOICES.get(key)
        if chosen is None:
            # Not the first run of each (it builds oneDNN's primitives and touches fresh memory); the best of
            # ROUNDS alternating runs, so that a burst of noise on a shared machine does not decide.
            nchw()
            channels_last()
            t_nchw = t_cl = float("inf")
            for _ in range(ROUNDS):
                t, result_nchw = _timed(nchw)
                t_nchw = min(t_nchw, t)
                t, result_cl = _timed(channels_last)
                t_cl = min(t_cl, t)
            chosen = CHANNELS_LAST if t_cl < (1 - MARGIN) * t_nchw else NCHW
            _CHOICES[key] = chosen
            return result_cl if chosen == CHANNELS_LAST else result_nchw
    return channels_last() if chosen == CHANNELS_LAST else nchw()

"""One timing routine for the benchmarks and profiling scripts.

CPU work is timed with ``torch.utils.benchmark.Timer.blocked_autorange`` and
CUDA work with ``triton.testing.do_bench`` (CUDA events, L2 cache flushed
between calls), so every number in the suite comes from one of two well-known
timers instead of home-made ``perf_counter`` loops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["Timing", "measure"]

_TIMER = "torch.utils.benchmark.Timer.blocked_autorange"
_DO_BENCH = "triton.testing.do_bench"


@dataclass(frozen=True)
class Timing:
    median_ms: float
    iqr_ms: float  # interquartile range of the per-call times
    runs: int  # how many measurements the median is over
    method: str  # _TIMER or _DO_BENCH


def measure(fn: Callable[[], object], *, device, min_run_time_s: float = 0.2) -> Timing:
    """Time ``fn()`` (no arguments) on ``device`` for about ``min_run_time_s``."""
    if not callable(fn):
        raise TypeError(f"fn must be callable with no arguments, got {type(fn).__name__}")
    if isinstance(device, str):
        try:
            device = torch.device(device)
        except RuntimeError as exc:
            raise ValueError(f"device: {exc}") from None
    if not isinstance(device, torch.device):
        raise TypeError(f"device must be a torch.device or a string, got {type(device).__name__}")
    if (
        isinstance(min_run_time_s, bool)
        or not isinstance(min_run_time_s, (int, float))
        or not math.isfinite(min_run_time_s)
        or min_run_time_s <= 0
    ):
        raise ValueError(f"min_run_time_s must be a positive number of seconds, got {min_run_time_s!r}")

    if device.type == "cpu":
        from torch.utils.benchmark import Timer

        # Timer defaults to one thread; keep the thread count the code really runs with.
        m = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
            min_run_time=min_run_time_s
        )
        # m.times holds per-call seconds (each block divided by its call count).
        return Timing(median_ms=m.median * 1e3, iqr_ms=m.iqr * 1e3, runs=len(m.times), method=_TIMER)

    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device} requested but CUDA is not available")
        import triton.testing  # lazy: triton is optional and only needed on CUDA

        calls = 0

        def counted():
            nonlocal calls
            calls += 1
            return fn()

        rep_ms = min_run_time_s * 1e3
        with torch.cuda.device(device):
            # warmup == rep makes do_bench run as many warm-up calls as timed calls,
            # after 1 + 5 estimate calls; that lets us count the timed runs, which
            # do_bench does not return when quantiles are asked for.
            q25, q50, q75 = triton.testing.do_bench(counted, warmup=rep_ms, rep=rep_ms, quantiles=[0.25, 0.5, 0.75])
        return Timing(median_ms=float(q50), iqr_ms=float(q75 - q25), runs=max(1, (calls - 6) // 2), method=_DO_BENCH)

    raise ValueError(f"device must be a cpu or cuda device, got {device}")

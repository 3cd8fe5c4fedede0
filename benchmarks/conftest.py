"""Collects every benchmark's record, prints the ratio table at the end and writes the results JSON."""

import datetime
import json
import os
import platform
import re
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))

from harness import DEVICE, MIN_RUN_TIME_S, RECORDS, SMOKE, baseline_description  # noqa: E402
from report import render_text, results_folder, table_rows  # noqa: E402

_START = time.perf_counter()
# What median_ms / iqr_ms are (bcos_kernels.timing.measure's two timers).
TIMING = (
    "triton.testing.do_bench" if DEVICE.type == "cuda" else "torch.utils.benchmark.Timer.blocked_autorange"
) + f", min_run_time_s={MIN_RUN_TIME_S}: median and interquartile range of the per-call times in ms"


def device_name() -> str:
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"CPU {line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


def _results(tr):
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(),
        "torch": torch.__version__,
        "triton": triton_version,
        "date": datetime.date.today().isoformat(),
        "smoke": SMOKE,
        "threads": torch.get_num_threads(),
        "timing": TIMING,
        "duration_s": round(time.perf_counter() - _START, 1),
        "baselines": baseline_description(),
        "records": [r.__dict__ for r in RECORDS],
    }


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not RECORDS:
        return
    terminalreporter.write("\n" + render_text(table_rows(RECORDS)))
    results = _results(terminalreporter)
    folder = results_folder(SMOKE, os.environ)
    if folder is None:
        return
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", results["device"]).strip("_") + ".json"
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    terminalreporter.write(f"\nresults written to {path}\n")

"""Collects every benchmark's record, prints the ratio table at the end and writes the results JSON."""
import datetime
import json
import os
import platform
import re
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(__file__))

from harness import DEVICE, RECORDS, SMOKE  # noqa: E402

OURS = ("cuda", "triton", "cpu", "torch")  # ours, best first when several ran


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
        "records": [r.__dict__ for r in RECORDS],
    }


def _table(write):
    groups = defaultdict(dict)
    for r in RECORDS:
        groups[(r.op, r.case, r.dtype, r.mode)][r.provider] = r
    providers = [p for p in ("original", "original_compiled", "reference", "torch", "cpu", "triton", "cuda", "plain")
                 if any(p in g for g in groups.values())]
    head = f"{'op':<20} {'case':<34} {'dtype':<9} {'mode':<8}" + "".join(f"{p[:12]:>13}" for p in providers)
    head += f"{'orig/ours':>11}{'ours/plain':>11}{'mem orig/ours':>15}"
    write("\nmedian ms per provider (ours = fastest of " + "/".join(OURS) + " that ran)\n" + head + "\n")
    for (op, case, dtype, mode), by in groups.items():
        line = f"{op:<20} {case[:34]:<34} {dtype:<9} {mode:<8}"
        line += "".join(f"{by[p].median_ms:>13.3f}" if p in by else f"{'-':>13}" for p in providers)
        ours = min((by[p] for p in OURS if p in by), key=lambda r: r.median_ms, default=None)
        orig = by.get("original") or by.get("reference")
        plain = by.get("plain")
        line += f"{orig.median_ms / ours.median_ms:>11.2f}" if orig and ours else f"{'-':>11}"
        line += f"{ours.median_ms / plain.median_ms:>11.2f}" if plain and ours else f"{'-':>11}"
        if orig and ours and ours.peak_mem_mb > 0:
            line += f"{orig.peak_mem_mb / ours.peak_mem_mb:>15.2f}"
        write(line + "\n")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not RECORDS:
        return
    _table(terminalreporter.write)
    results = _results(terminalreporter)
    targets = []
    if os.environ.get("BCOS_BENCH_OUT"):
        targets.append(os.environ["BCOS_BENCH_OUT"])
    if not SMOKE:  # smoke runs never overwrite the committed results
        targets.append(os.path.join(os.path.dirname(__file__), "results"))
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", results["device"]).strip("_") + ".json"
    for folder in targets:
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, name)
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
        terminalreporter.write(f"\nresults written to {path}\n")

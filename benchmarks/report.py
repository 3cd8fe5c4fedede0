"""The ratio table of a benchmark run, as text (end of `pytest benchmarks/`) or Markdown (README).

    python benchmarks/report.py benchmarks/results/<device>.json [--markdown] [--mode fwd+bwd] [--dtype float32]
    python benchmarks/report.py <json> --goals          the project's speed goals, measured or not
    python benchmarks/report.py --merge out.json a.json b.json ...   one results file from split runs

Per (op, case, dtype, mode): each provider's median ms, then
  base/ours   the baseline ("original", else our "reference" of it) over ours: > 1 means ours is faster;
  ours/plain  ours over a plain conv/linear/elementwise op of the same shape: 1 is the limit; for convolutions
              the faster of the NCHW plain conv and the channels_last one ("plain_channels_last": module and
              input channels_last, what a plain network would run) where both ran;
  mem base/ours, mem ours/plain   the same for peak memory.
"ours" is the fastest of our backends that ran ("cuda", "triton", "cpu", "torch", and "cpu_channels_last": backend
"cpu" on a channels_last module and input); "original" the faster of it and "original_channels_last".
Records carry "iqr_ms" next to "median_ms" (files written before bcos_kernels.timing lack it; both are read).
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from typing import Dict, Iterable, List, Optional

OURS = ("cuda", "triton", "cpu", "torch", "cpu_channels_last")
ORIGINAL = ("original", "original_channels_last")
PLAIN = ("plain", "plain_channels_last")  # the best of them is the limit
PROVIDER_ORDER = (
    "original",
    "original_channels_last",
    "original_compiled",
    "original_batched",
    "reference",
    "reference_compiled",
    "torch",
    "cpu",
    "cpu_channels_last",
    "triton",
    "cuda",
    "plain",
    "plain_channels_last",
)


def _get(r, key):
    return r[key] if isinstance(r, dict) else getattr(r, key)


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b is not None and b > 0 else None


def table_rows(records: Iterable, mode: Optional[str] = None, dtype: Optional[str] = None) -> List[Dict]:
    """One row per (op, case, dtype, mode), in the order the records came."""
    groups: Dict[tuple, Dict[str, object]] = defaultdict(dict)
    for r in records:
        if (mode and _get(r, "mode") != mode) or (dtype and _get(r, "dtype") != dtype):
            continue
        groups[(_get(r, "op"), _get(r, "case"), _get(r, "dtype"), _get(r, "mode"))][_get(r, "provider")] = r
    rows = []
    for (op, case, dt, md), by in groups.items():
        ms = {p: _get(r, "median_ms") for p, r in by.items()}
        mem = {p: _get(r, "peak_mem_mb") for p, r in by.items()}
        ours = min((p for p in OURS if p in by), key=lambda p: ms[p], default=None)
        base = min((p for p in ORIGINAL if p in by), key=lambda p: ms[p], default=None)
        base = base if base is not None else ("reference" if "reference" in by else None)
        plain = min((p for p in PLAIN if p in by), key=lambda p: ms[p], default=None)
        rows.append(
            dict(
                op=op,
                case=case,
                dtype=dt,
                mode=md,
                ms=ms,
                ours=ours,
                base=base,
                base_over_ours=_ratio(ms.get(base), ms.get(ours)),
                plain=plain,
                ours_over_plain=_ratio(ms.get(ours), ms.get(plain)),
                mem_base_over_ours=_ratio(mem.get(base), mem.get(ours)),
                mem_ours_over_plain=_ratio(mem.get(ours), mem.get(plain)),
            )
        )
    return rows


def _providers(rows) -> List[str]:
    seen = {p for row in rows for p in row["ms"]}
    return [p for p in PROVIDER_ORDER if p in seen] + sorted(seen - set(PROVIDER_ORDER))


def _fmt(value: Optional[float], digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


RATIO_COLUMNS = (
    ("base/ours", "base_over_ours"),
    ("ours/plain", "ours_over_plain"),
    ("mem base/ours", "mem_base_over_ours"),
    ("mem ours/plain", "mem_ours_over_plain"),
)


def render_text(rows: List[Dict]) -> str:
    providers = _providers(rows)
    head = f"{'op':<20} {'case':<44} {'dtype':<9} {'mode':<8}" + "".join(f"{p[:17]:>18}" for p in providers)
    head += "".join(f"{title:>15}" for title, _ in RATIO_COLUMNS) + f"  {'ours':<6}"
    lines = [
        "median ms per provider; ours = the fastest of " + "/".join(OURS) + " that ran; "
        "base = original (else our reference of it)",
        head,
    ]
    for row in rows:
        line = f"{row['op']:<20} {row['case'][:44]:<44} {row['dtype']:<9} {row['mode']:<8}"
        line += "".join(f"{_fmt(row['ms'].get(p), 3):>18}" for p in providers)
        line += "".join(f"{_fmt(row[key]):>15}" for _, key in RATIO_COLUMNS) + f"  {row['ours'] or '-':<6}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def render_markdown(rows: List[Dict]) -> str:
    providers = _providers(rows)
    head = ["op", "case", "dtype", "mode"] + [f"{p} ms" for p in providers] + [t for t, _ in RATIO_COLUMNS] + ["ours"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["op"], row["case"], row["dtype"], row["mode"]]
        cells += [_fmt(row["ms"].get(p), 3) for p in providers]
        cells += [_fmt(row[key]) for _, key in RATIO_COLUMNS] + [row["ours"] or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# The speed goals set for the GPU run (issue 9), as (goal, op, case prefix, dtype, ratio key, "at most"/"at least",
# bound). Each goal must hold for every case it covers; the reported figure is the worst one.
GOALS = (
    (
        "B-cos conv fwd+bwd, ResNet-50 layers, bf16: at most 1.15x a plain conv",
        "bcos_conv2d",
        "resnet50 ",
        "bfloat16",
        "ours_over_plain",
        "at most",
        1.15,
    ),
    (
        "B-cos conv fwd+bwd, ResNet-50 layers, bf16: at least 2x faster than the original",
        "bcos_conv2d",
        "resnet50 ",
        "bfloat16",
        "base_over_ours",
        "at least",
        2.0,
    ),
    (
        "CoDA-Net CIFAR-10 train step: at least 5x faster than the original",
        "model",
        "CoDA-Net CIFAR-10 9L train step",
        None,
        "base_over_ours",
        "at least",
        5.0,
    ),
    (
        "CoDA-Net CIFAR-10 train step: at least 10x less peak memory than the original",
        "model",
        "CoDA-Net CIFAR-10 9L train step",
        None,
        "mem_base_over_ours",
        "at least",
        10.0,
    ),
    ("LWTA fwd+bwd: at least 4x faster than the original", "lwta", "", None, "base_over_ours", "at least", 4.0),
    (
        "Class-specific gate fwd+bwd: at least 20x faster than the original",
        "class_specific_gate",
        "",
        None,
        "base_over_ours",
        "at least",
        20.0,
    ),
)


def goal_rows(records: Iterable) -> List[Dict]:
    """Each goal with its worst measured figure over the fwd+bwd rows it covers (None: not measured here)."""
    rows = table_rows(records, mode="fwd+bwd")
    out = []
    for goal, op, prefix, dtype, key, direction, bound in GOALS:
        covered = [
            r
            for r in rows
            if r["op"] == op
            and r["case"].startswith(prefix)
            and not r["case"].endswith("largest batch")
            and (dtype is None or r["dtype"] == dtype)
            and r[key] is not None
        ]
        if not covered:
            out.append(dict(goal=goal, measured=None, met=None, worst_case=None, cases=0))
            continue
        at_most = direction == "at most"
        worst = (max if at_most else min)(covered, key=lambda r: r[key])
        value = worst[key]
        out.append(
            dict(
                goal=goal,
                measured=value,
                met=value <= bound if at_most else value >= bound,
                worst_case=f"{worst['case']} ({worst['dtype']}, {worst['ours']})",
                cases=len(covered),
            )
        )
    return out


def render_goals(rows: List[Dict]) -> str:
    lines = ["| goal | measured (worst case) | met | worst case | cases |", "|---|---|---|---|---|"]
    for row in rows:
        met = "not measured" if row["met"] is None else ("yes" if row["met"] else "NO")
        lines.append(
            f"| {row['goal']} | {_fmt(row['measured'])} | {met} | {row['worst_case'] or '-'} | {row['cases']} |"
        )
    return "\n".join(lines) + "\n"


def results_folder(smoke: bool, environ) -> Optional[str]:
    """Where a run writes its results JSON: ``BCOS_BENCH_OUT`` if set, else benchmarks/out/ (git ignores it) for a
    full run and nowhere for a smoke run. Never the committed benchmarks/results/ unless asked for by name, so a
    user's run cannot overwrite them."""
    if environ.get("BCOS_BENCH_OUT"):
        return environ["BCOS_BENCH_OUT"]
    return None if smoke else os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")


def merge_results(parts: List[Dict]) -> Dict:
    """One results file from runs of parts of the suite on one machine (the device and versions must agree)."""
    if not parts:
        raise ValueError("merge needs at least one results file")
    for key in ("device", "torch", "triton", "smoke"):
        values = {str(p.get(key)) for p in parts}
        if len(values) > 1:
            raise ValueError(f"cannot merge results with different {key!r}: {sorted(values)}")
    merged = dict(parts[0])
    merged["date"] = max(p["date"] for p in parts)
    merged["duration_s"] = round(sum(p.get("duration_s", 0.0) for p in parts), 1)
    merged["parts"] = len(parts)
    merged["records"] = [r for p in parts for r in p["records"]]
    return merged


def _header(results: Dict) -> str:
    return f"{results['device']}, torch {results['torch']}, triton {results['triton']}, {results['date']}\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "results",
        nargs="+",
        help="a results JSON written by `pytest benchmarks/` (with --merge: the output file, then the parts)",
    )
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--goals", action="store_true", help="the speed goals against the figures in the file")
    parser.add_argument("--merge", action="store_true", help="write RESULTS[0] from the parts RESULTS[1:]")
    parser.add_argument("--mode", help="only this mode (fwd, bwd, fwd+bwd)")
    parser.add_argument("--dtype", help="only this dtype (float32, bfloat16)")
    args = parser.parse_args(argv)
    if args.merge:
        if len(args.results) < 2:
            parser.error("--merge needs the output file and at least one part")
        parts = []
        for path in args.results[1:]:
            with open(path) as f:
                parts.append(json.load(f))
        with open(args.results[0], "w") as f:
            json.dump(merge_results(parts), f, indent=1)
        return
    if len(args.results) != 1:
        parser.error("one results file (several only with --merge)")
    with open(args.results[0]) as f:
        results = json.load(f)
    if args.goals:
        print(_header(results))
        if results["device"].startswith("CPU"):
            print(
                "These goals are set for a GPU at batch 64; this file was measured elsewhere, at the sizes in its "
                "records' shapes.\n"
            )
        print(render_goals(goal_rows(results["records"])), end="")
        return
    rows = table_rows(results["records"], args.mode, args.dtype)
    if args.markdown:
        print(_header(results))
    print((render_markdown if args.markdown else render_text)(rows), end="")


if __name__ == "__main__":
    main()

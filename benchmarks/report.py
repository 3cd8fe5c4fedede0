"""The ratio table of a benchmark run, as text (end of `pytest benchmarks/`) or Markdown (README).

    python benchmarks/report.py benchmarks/results/<device>.json [--markdown] [--mode fwd+bwd] [--dtype float32]

Per (op, case, dtype, mode): each provider's median ms, then
  base/ours   the baseline ("original", else our "reference" of it) over ours: > 1 means ours is faster;
  ours/plain  ours over a plain conv/linear/elementwise op of the same shape: 1 is the limit;
  mem base/ours, mem ours/plain   the same for peak memory.
"ours" is the fastest of our backends that ran ("cuda", "triton", "cpu", "torch").
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from typing import Dict, Iterable, List, Optional

OURS = ("cuda", "triton", "cpu", "torch")
PROVIDER_ORDER = ("original", "original_compiled", "original_batched", "reference", "reference_compiled", "torch",
                  "cpu", "triton", "cuda", "plain")


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
        base = "original" if "original" in by else ("reference" if "reference" in by else None)
        rows.append(dict(
            op=op, case=case, dtype=dt, mode=md, ms=ms, ours=ours, base=base,
            base_over_ours=_ratio(ms.get(base), ms.get(ours)),
            ours_over_plain=_ratio(ms.get(ours), ms.get("plain")),
            mem_base_over_ours=_ratio(mem.get(base), mem.get(ours)),
            mem_ours_over_plain=_ratio(mem.get(ours), mem.get("plain")),
        ))
    return rows


def _providers(rows) -> List[str]:
    seen = {p for row in rows for p in row["ms"]}
    return [p for p in PROVIDER_ORDER if p in seen] + sorted(seen - set(PROVIDER_ORDER))


def _fmt(value: Optional[float], digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


RATIO_COLUMNS = (("base/ours", "base_over_ours"), ("ours/plain", "ours_over_plain"),
                 ("mem base/ours", "mem_base_over_ours"), ("mem ours/plain", "mem_ours_over_plain"))


def render_text(rows: List[Dict]) -> str:
    providers = _providers(rows)
    head = f"{'op':<20} {'case':<44} {'dtype':<9} {'mode':<8}" + "".join(f"{p[:17]:>18}" for p in providers)
    head += "".join(f"{title:>15}" for title, _ in RATIO_COLUMNS) + f"  {'ours':<6}"
    lines = ["median ms per provider; ours = the fastest of " + "/".join(OURS) + " that ran; "
             "base = original (else our reference of it)", head]
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="a results JSON written by `pytest benchmarks/`")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--mode", help="only this mode (fwd, bwd, fwd+bwd)")
    parser.add_argument("--dtype", help="only this dtype (float32, bfloat16)")
    args = parser.parse_args(argv)
    with open(args.results) as f:
        results = json.load(f)
    rows = table_rows(results["records"], args.mode, args.dtype)
    if args.markdown:
        print(f"{results['device']}, torch {results['torch']}, triton {results['triton']}, {results['date']}\n")
    print((render_markdown if args.markdown else render_text)(rows), end="")


if __name__ == "__main__":
    main()

"""The benchmark suite's contract: the results JSON schema (of a real smoke run and of every committed results
file) and the ratio table's arithmetic."""
import glob
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import report  # noqa: E402

OPS = {"bcos_conv2d", "bcos_linear", "dau_conv2d", "lwta", "class_specific_gate", "model", "explain"}
PROVIDERS = {"original", "original_compiled", "original_batched", "reference", "reference_compiled", "torch", "cpu",
             "triton", "cuda", "plain"}
RECORD_KEYS = {"op", "case", "dtype", "mode", "provider", "median_ms", "peak_mem_mb", "shape"}


def check_results(results: dict):
    for key in ("device", "torch", "triton", "date", "records"):
        assert key in results, f"results JSON lacks {key!r}"
    assert isinstance(results["device"], str) and results["device"]
    assert results["records"], "no records"
    for r in results["records"]:
        assert set(r) == RECORD_KEYS, f"record keys {sorted(r)}"
        assert r["op"] in OPS, r["op"]
        assert r["provider"] in PROVIDERS, r["provider"]
        assert r["mode"] in ("fwd", "bwd", "fwd+bwd"), r["mode"]
        assert r["median_ms"] > 0 and r["peak_mem_mb"] >= 0, r
        assert r["case"] and r["shape"] and r["dtype"] in ("float32", "bfloat16", "float16", "float64"), r


def test_smoke_run_writes_the_documented_json(tmp_path):
    env = dict(os.environ, BCOS_BENCH_SMOKE="1", BCOS_BENCH_OUT=str(tmp_path))
    env.pop("TRITON_INTERPRET", None)  # the suite's own view of the machine, as a user runs it
    proc = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/test_bench_lwta_csg.py", "-q",
                           "-p", "no:cacheprovider"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = glob.glob(str(tmp_path / "*.json"))
    assert len(files) == 1, files
    with open(files[0]) as f:
        results = json.load(f)
    check_results(results)
    assert results["smoke"] is True
    by_op = {}
    for r in results["records"]:
        by_op.setdefault(r["op"], set()).add(r["provider"])
    assert set(by_op) == {"lwta", "class_specific_gate"}
    for op, providers in by_op.items():
        # the originals of LWTA and CSG are not installable: their baseline must be labelled "reference"
        assert "reference" in providers and "original" not in providers and "plain" in providers, (op, providers)
        assert "torch" in providers, (op, providers)
    assert "base/ours" in proc.stdout and "lwta" in proc.stdout  # the table was printed


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "*.json"))),
                         ids=os.path.basename)
def test_committed_results_follow_the_schema(path):
    with open(path) as f:
        results = json.load(f)
    check_results(results)
    assert results.get("smoke") is False, "committed results must come from a full run, not a smoke run"


def _rec(provider, ms, mem=1.0, op="bcos_conv2d", case="c", mode="fwd"):
    return dict(op=op, case=case, dtype="float32", mode=mode, provider=provider, median_ms=ms, peak_mem_mb=mem,
                shape="x")


def test_table_ratios():
    records = [_rec("original", 10.0, 8.0), _rec("reference", 99.0), _rec("torch", 6.0, 4.0), _rec("cpu", 4.0, 2.0),
               _rec("plain", 2.0, 1.0), _rec("reference", 30.0, 6.0, op="lwta"), _rec("torch", 10.0, 3.0, op="lwta")]
    rows = report.table_rows(records)
    assert len(rows) == 2
    conv, lwta = rows
    assert conv["ours"] == "cpu" and conv["base"] == "original"  # original wins over reference as the baseline
    assert conv["base_over_ours"] == pytest.approx(2.5) and conv["ours_over_plain"] == pytest.approx(2.0)
    assert conv["mem_base_over_ours"] == pytest.approx(4.0) and conv["mem_ours_over_plain"] == pytest.approx(2.0)
    assert lwta["base"] == "reference" and lwta["base_over_ours"] == pytest.approx(3.0)
    assert lwta["ours_over_plain"] is None
    text = report.render_text(rows)
    assert "2.50" in text and "3.00" in text
    md = report.render_markdown(rows)
    assert md.count("\n") == 4 and "| bcos_conv2d | c | float32 | fwd |" in md


def test_table_filters_by_mode():
    records = [_rec("torch", 1.0, mode="fwd"), _rec("torch", 2.0, mode="bwd")]
    assert [r["mode"] for r in report.table_rows(records, mode="bwd")] == ["bwd"]

"""The benchmark suite's contract: the results JSON schema (of a real smoke run and of every committed results
file) and the ratio table's arithmetic."""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.join(os.path.dirname(__file__), "..")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import report  # noqa: E402

from bcos_kernels.timing import Timing, measure  # noqa: E402

OPS = {"bcos_conv2d", "bcos_linear", "dau_conv2d", "lwta", "class_specific_gate", "model", "explain"}
PROVIDERS = set(report.PROVIDER_ORDER)
RECORD_KEYS = {"op", "case", "dtype", "mode", "provider", "median_ms", "iqr_ms", "peak_mem_mb", "shape"}
# results committed before the timing module (bcos_kernels.timing) have no iqr_ms
OLD_RECORD_KEYS = RECORD_KEYS - {"iqr_ms"}


def check_results(results: dict, allow_old: bool = False):
    for key in ("device", "torch", "triton", "date", "records"):
        assert key in results, f"results JSON lacks {key!r}"
    assert isinstance(results["device"], str) and results["device"]
    assert results["records"], "no records"
    for r in results["records"]:
        assert set(r) == RECORD_KEYS or (allow_old and set(r) == OLD_RECORD_KEYS), f"record keys {sorted(r)}"
        assert r.get("iqr_ms", 0) >= 0, r
        assert r["op"] in OPS, r["op"]
        assert r["provider"] in PROVIDERS, r["provider"]
        assert r["mode"] in ("fwd", "bwd", "fwd+bwd"), r["mode"]
        assert r["median_ms"] > 0 and r["peak_mem_mb"] >= 0, r
        assert r["case"] and r["shape"] and r["dtype"] in ("float32", "bfloat16", "float16", "float64"), r


def test_smoke_run_writes_the_documented_json(tmp_path):
    env = dict(os.environ, BCOS_BENCH_SMOKE="1", BCOS_BENCH_OUT=str(tmp_path))
    env.pop("TRITON_INTERPRET", None)  # the suite's own view of the machine, as a user runs it
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/test_bench_lwta_csg.py", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = glob.glob(str(tmp_path / "*.json"))
    assert len(files) == 1, files
    with open(files[0]) as f:
        results = json.load(f)
    check_results(results)
    assert results["smoke"] is True
    assert "do_bench" in results["timing"] or "blocked_autorange" in results["timing"], results["timing"]
    by_op = {}
    for r in results["records"]:
        by_op.setdefault(r["op"], set()).add(r["provider"])
    assert set(by_op) == {"lwta", "class_specific_gate"}
    for op, providers in by_op.items():
        # the originals of LWTA and CSG are not installable: their baseline must be labelled "reference"
        assert "reference" in providers and "original" not in providers and "plain" in providers, (op, providers)
        assert "torch" in providers, (op, providers)
    assert "base/ours" in proc.stdout and "lwta" in proc.stdout  # the table was printed


def test_runs_never_write_the_committed_results_unless_asked():
    committed = os.path.join(ROOT, "benchmarks", "results")
    full_run = report.results_folder(False, {})
    assert os.path.samefile(os.path.dirname(full_run), os.path.join(ROOT, "benchmarks"))
    assert os.path.basename(full_run) == "out" and os.path.abspath(full_run) != os.path.abspath(committed)
    assert report.results_folder(True, {}) is None  # smoke runs write nothing by default
    assert report.results_folder(True, {"BCOS_BENCH_OUT": "/some/dir"}) == "/some/dir"
    assert report.results_folder(False, {"BCOS_BENCH_OUT": committed}) == committed


@pytest.mark.parametrize(
    "path", sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "*.json"))), ids=os.path.basename
)
def test_committed_results_follow_the_schema(path):
    with open(path) as f:
        results = json.load(f)
    check_results(results, allow_old=True)
    report.render_text(report.table_rows(results["records"]))  # report.py reads old and new files alike
    assert results.get("smoke") is False, "committed results must come from a full run, not a smoke run"


def _rec(provider, ms, mem=1.0, op="bcos_conv2d", case="c", mode="fwd", dtype="float32"):
    timing = dict(median_ms=ms, iqr_ms=0.1 * ms, peak_mem_mb=mem)
    return dict(op=op, case=case, dtype=dtype, mode=mode, provider=provider, shape="x", **timing)


def test_measure_times_a_cpu_call_and_names_bad_arguments():
    calls = []
    timing = measure(lambda: calls.append(1), device="cpu", min_run_time_s=0.01)
    assert isinstance(timing, Timing) and timing.method == "torch.utils.benchmark.Timer.blocked_autorange"
    assert timing.median_ms > 0 and timing.iqr_ms >= 0 and 1 <= timing.runs <= len(calls)
    with pytest.raises(TypeError, match="fn"):
        measure(None, device="cpu")
    with pytest.raises(TypeError, match="device"):
        measure(lambda: None, device=0)
    with pytest.raises(ValueError, match="device"):
        measure(lambda: None, device="meta")
    with pytest.raises(ValueError, match="min_run_time_s"):
        measure(lambda: None, device=torch.device("cpu"), min_run_time_s=0)


def test_old_records_without_iqr_are_read():
    old = [{k: v for k, v in _rec(p, ms).items() if k != "iqr_ms"} for p, ms in (("original", 4.0), ("cpu", 2.0))]
    assert report.table_rows(old)[0]["base_over_ours"] == pytest.approx(2.0)


def test_table_ratios():
    records = [
        _rec("original", 10.0, 8.0),
        _rec("reference", 99.0),
        _rec("torch", 6.0, 4.0),
        _rec("cpu", 4.0, 2.0),
        _rec("plain", 2.0, 1.0),
        _rec("reference", 30.0, 6.0, op="lwta"),
        _rec("torch", 10.0, 3.0, op="lwta"),
    ]
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


def test_plain_is_the_faster_layout():
    records = [_rec("cpu", 6.0, 3.0), _rec("plain", 4.0, 1.0), _rec("plain_channels_last", 3.0, 2.0)]
    (row,) = report.table_rows(records)
    assert row["plain"] == "plain_channels_last"
    assert row["ours_over_plain"] == pytest.approx(2.0) and row["mem_ours_over_plain"] == pytest.approx(1.5)
    (row,) = report.table_rows(records[:2])  # only the NCHW one ran
    assert row["plain"] == "plain" and row["ours_over_plain"] == pytest.approx(1.5)


def test_original_and_ours_are_their_faster_layout():
    records = [
        _rec("original", 9.0, 1.0),
        _rec("original_channels_last", 6.0, 1.0),
        _rec("cpu", 4.0, 1.0),
        _rec("cpu_channels_last", 3.0, 1.0),
        _rec("plain", 2.0, 1.0),
    ]
    (row,) = report.table_rows(records)
    assert row["base"] == "original_channels_last" and row["ours"] == "cpu_channels_last"
    assert row["base_over_ours"] == pytest.approx(2.0) and row["ours_over_plain"] == pytest.approx(1.5)
    (row,) = report.table_rows([records[0], records[3], records[4]])
    assert row["base"] == "original" and row["base_over_ours"] == pytest.approx(3.0)


def test_table_filters_by_mode():
    records = [_rec("torch", 1.0, mode="fwd"), _rec("torch", 2.0, mode="bwd")]
    assert [r["mode"] for r in report.table_rows(records, mode="bwd")] == ["bwd"]


def test_goals_take_the_worst_covered_case():
    bf16 = dict(mode="fwd+bwd", dtype="bfloat16")
    records = [
        # two ResNet-50 layers: ours/plain 1.1 and 1.3 (the worst, 1.3, misses the 1.15 bound); base/ours 3 and 2.5
        _rec("original", 33.0, case="resnet50 a", **bf16),
        _rec("triton", 11.0, case="resnet50 a", **bf16),
        _rec("plain", 10.0, case="resnet50 a", **bf16),
        _rec("original", 32.5, case="resnet50 b", **bf16),
        _rec("cuda", 13.0, case="resnet50 b", **bf16),
        _rec("plain", 10.0, case="resnet50 b", **bf16),
        # not covered: float32, another model, the forward alone, a largest-batch record
        _rec("original", 1000.0, case="resnet50 a", mode="fwd+bwd"),
        _rec("triton", 1.0, case="resnet50 a", mode="fwd+bwd"),
        _rec("original", 100.0, case="densenet121 x", **bf16),
        _rec("triton", 99.0, case="densenet121 x", **bf16),
        _rec("original", 1.0, case="resnet50 a", mode="fwd", dtype="bfloat16"),
        _rec("triton", 100.0, case="resnet50 a", mode="fwd", dtype="bfloat16"),
        # CoDA: 6x faster, 8x less memory
        _rec("reference", 60.0, 80.0, op="model", case="CoDA-Net CIFAR-10 9L train step", mode="fwd+bwd"),
        _rec("triton", 10.0, 10.0, op="model", case="CoDA-Net CIFAR-10 9L train step", mode="fwd+bwd"),
        _rec("reference", 9.0, op="model", case="CoDA-Net CIFAR-10 9L train step largest batch", mode="fwd+bwd"),
        _rec("triton", 1.0, op="model", case="CoDA-Net CIFAR-10 9L train step largest batch", mode="fwd+bwd"),
    ]
    rows = {row["goal"].split(":")[1].strip(): row for row in report.goal_rows(records)}
    plain = rows["at most 1.15x a plain conv"]
    assert plain["measured"] == pytest.approx(1.3) and plain["met"] is False and plain["cases"] == 2
    assert plain["worst_case"] == "resnet50 b (bfloat16, cuda)"
    faster = rows["at least 2x faster than the original"]
    assert faster["measured"] == pytest.approx(2.5) and faster["met"] is True
    coda_time = rows["at least 5x faster than the original"]
    assert coda_time["measured"] == pytest.approx(6.0) and coda_time["met"] is True and coda_time["cases"] == 1
    assert rows["at least 10x less peak memory than the original"]["met"] is False
    lwta = [row for row in report.goal_rows(records) if row["goal"].startswith("LWTA")][0]
    assert lwta["met"] is None and lwta["measured"] is None
    table = report.render_goals(report.goal_rows(records))
    assert "| NO |" in table and "| yes |" in table and "not measured" in table


def test_merge_of_split_runs(tmp_path):
    part = dict(
        device="GPU x",
        torch="2.11",
        triton="3.6",
        date="2026-11-22",
        smoke=False,
        duration_s=10.0,
        records=[_rec("torch", 1.0)],
    )
    other = dict(part, date="2026-11-23", duration_s=5.5, records=[_rec("plain", 2.0), _rec("cpu", 3.0)])
    paths = []
    for i, results in enumerate((part, other)):
        paths.append(tmp_path / f"part{i}.json")
        paths[-1].write_text(json.dumps(results))
    out = tmp_path / "merged.json"
    report.main(["--merge", str(out)] + [str(p) for p in paths])
    merged = json.loads(out.read_text())
    check_results(merged)
    assert [r["provider"] for r in merged["records"]] == ["torch", "plain", "cpu"]
    assert merged["date"] == "2026-11-23" and merged["duration_s"] == 15.5 and merged["parts"] == 2
    with pytest.raises(ValueError, match="'torch'"):
        report.merge_results([part, dict(other, torch="2.13")])


def test_profile_case_runs_a_benchmark_case(capsys):
    """scripts/profile_case.py (what ncu profiles on the GPU) builds the suite's cases; here one step on the CPU."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import profile_case

    profile_case.main(
        [
            "bcos_conv2d",
            "resnet50 layer4.1.conv2 3x3 512->512 @7",
            "--provider",
            "reference",
            "--dtype",
            "float32",
            "--batch",
            "1",
            "--warmup",
            "1",
        ]
    )
    assert "x=[1, 512, 7, 7]" in capsys.readouterr().out
    module, x = profile_case.build_step(
        "dau_conv2d", "coda_cifar10 L9 1x1 64->10 r64 @8", "plain", torch.float32, torch.device("cpu"), batch=2
    )
    assert isinstance(module, torch.nn.Conv2d) and module.out_channels == 10 and list(x.shape) == [2, 64, 8, 8]
    with pytest.raises(SystemExit, match="unknown bcos_linear case"):
        profile_case.build_step("bcos_linear", "no such layer", "torch", torch.float32, torch.device("cpu"))


def test_gpu_pass_script_parses_and_names_its_stages():
    script = os.path.join(ROOT, "scripts", "gpu_pass.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    proc = subprocess.run(["bash", script, "no-such-stage"], capture_output=True, text=True)
    assert proc.returncode == 2
    for stage in ("setup", "tests", "sanitizer", "bench", "profile"):
        assert f"gpu_pass.sh {stage}" in proc.stdout, stage

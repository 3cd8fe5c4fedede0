"""examples/train_and_explain.py run as a script (``--quick``, CPU): its exit status, its parity report, its
speed table, and the PNGs it wrote, decoded with Pillow. The example is not importable package code, so it is
only ever run the way a user runs it."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

Image = pytest.importorskip(
    "PIL.Image", reason="the example's pictures need the viz extra (pip install matplotlib pillow)"
)
pytest.importorskip("matplotlib", reason="the example's pictures need the viz extra (pip install matplotlib pillow)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "train_and_explain.py")
QUICK_EXAMPLES = 3  # pictures of single examples the quick mode writes (and min(3, batch))
BATCH = 6


def run_example(tmp_path, *extra, python_args=()):
    out = tmp_path / "pngs"
    # One OpenMP thread: the quick model's layers are tiny, and on a busy machine every parallel region would
    # wait for a descheduled thread, which makes the run many times slower.
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    cmd = [
        sys.executable,
        *python_args,
        EXAMPLE,
        "--quick",
        "--device",
        "cpu",
        "--batch",
        str(BATCH),
        "--out",
        str(out),
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600)
    return proc, out


def check_report(proc, out):
    text = proc.stdout
    assert proc.returncode == 0, text + proc.stderr
    assert "parity: OK" in text
    for name in (
        "eval: logits",
        "eval: input gradient",
        "train: input gradient",
        "train: parameter gradients",
        "explain: dynamic linear weights",
    ):
        line = next(line for line in text.splitlines() if name in line)
        assert "max abs err" in line and "rel" in line and line.rstrip().endswith("ok"), line
    assert "speed-up" in text and "forward+backward (train)" in text and f"explain {BATCH} images" in text
    assert "bcos_kernels.timing.measure" in text

    files = sorted(os.listdir(out))
    examples = [f for f in files if re.fullmatch(r"example_\d\d_true-\w+_pred-\w+\.png", f)]
    assert "overview.png" in files and len(examples) == QUICK_EXAMPLES, files
    for name in files:
        assert str(out / name) in text  # every path is printed
    sizes = {}
    for name in files:
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.mode in ("RGB", "RGBA"), (name, image.format, image.mode)
            sizes[name] = image.size
            pixels = np.asarray(image.convert("RGB")).astype(np.int64)
        # not blank: four pictures of a textured input, its explanation and a colour map
        assert pixels.std() > 10, f"{name} is (nearly) one flat colour"
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100, f"{name} has too few colours"
    for name in examples:
        width, height = sizes[name]
        assert width >= 400 and height >= 100 and width > 2 * height  # one row of four pictures
    width, height = sizes["overview.png"]
    assert width == sizes[examples[0]][0] and height > 2 * sizes[examples[0]][1]  # all rows stacked
    return text


def test_example_quick(tmp_path):
    proc, out = run_example(tmp_path)
    text = check_report(proc, out)
    assert "bcos 0.1.3 (original)" in text or "bcos not installed" in text


def test_example_quick_on_the_reference(tmp_path):
    """--original reference (what runs where `bcos` is missing): the same report, saying what it compared."""
    proc, out = run_example(tmp_path, "--original", "reference")
    text = check_report(proc, out)
    assert "original layers: bcos_kernels reference" in text and "not the bcos package's code" in text


def test_example_reports_a_parity_failure(tmp_path):
    """The exit status is what scripts check: with a zero tolerance, fp32 rounding differences must fail it."""
    proc, _ = run_example(tmp_path, "--tolerance", "0")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "parity: FAILED" in proc.stdout and "FAILED" in proc.stdout.split("parity: FAILED")[0]


def test_example_says_what_to_install_without_matplotlib(tmp_path):
    # sys.modules[name] = None makes `import name` raise ImportError, as if it were not installed
    blocker = (
        "import runpy, sys; sys.modules['matplotlib'] = None; sys.argv = sys.argv[1:]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    proc, out = run_example(tmp_path, python_args=("-c", blocker))
    assert proc.returncode != 0
    assert "pip install 'bcos-kernels[viz]'" in proc.stderr and "matplotlib" in proc.stderr, proc.stderr
    assert "training" not in proc.stdout and not out.exists()  # it stops before any work


def test_bcosify_vit_example_quick(tmp_path):
    """examples/bcosify_vit.py --quick: trains, B-cosifies, fine-tunes, explains a batch and writes its PNGs."""
    out = tmp_path / "vit"
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    example = os.path.join(ROOT, "examples", "bcosify_vit.py")
    cmd = [sys.executable, example, "--quick", "--batch", "4", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    layers = re.search(r"B-cosified layers: (.*)", proc.stdout).group(1).split(", ")
    assert {"BcosifyConv2d", "BcosifyLinear", "MultiheadAttention", "DetachableLayerNorm"} <= set(layers)
    pngs = sorted(p.name for p in out.iterdir())
    assert "overview.png" in pngs and len(pngs) == 4
    with Image.open(out / "overview.png") as image:
        assert image.size[0] > 100 and np.asarray(image).std() > 0

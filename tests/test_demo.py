"""`python -m bcos_kernels.demo --quick` end to end, in process: exit status, the parity report, the speed table,
and the PNGs (decoded here with a small independent reader, so a broken writer cannot pass its own check)."""
import os
import struct
import zlib

import numpy as np
import pytest
import torch

from bcos_kernels import _png, demo


def read_png(path):
    """(header dict, pixels (H, W, channels) uint8) of an 8-bit RGB/RGBA PNG; checks signature and CRCs.
    Only filter type 0 ("None") rows, which is what _png writes."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "bad PNG signature"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, f"bad CRC in {kind!r} chunk"
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, compression, filtering, interlace) == (8, 0, 0, 0)
    channels = {2: 3, 6: 4}[colour]
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    rows = np.frombuffer(raw, np.uint8).reshape(height, 1 + width * channels)
    assert (rows[:, 0] == 0).all(), "reader handles filter type 0 only"
    return {"width": width, "height": height, "colour_type": colour}, rows[:, 1:].reshape(height, width, channels)


def test_png_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    for channels, colour in ((3, 2), (4, 6)):
        image = rng.integers(0, 256, (5, 7, channels), dtype=np.uint8)
        path = _png.write_png(str(tmp_path / f"x{channels}.png"), image)
        header, pixels = read_png(path)
        assert (header["width"], header["height"], header["colour_type"]) == (7, 5, colour)
        np.testing.assert_array_equal(pixels, image)
    with pytest.raises(ValueError):
        _png.encode_png(np.zeros((4, 4, 3), np.float32))


@pytest.fixture
def one_thread():
    # The quick demo's layers are tiny: with two OpenMP threads on a busy 2-core machine every parallel region
    # waits for a descheduled thread, which makes it many times slower; one thread keeps the test's time stable.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_demo(tmp_path, capsys, *extra):
    out = tmp_path / "pngs"
    status = demo.main(["--quick", "--device", "cpu", "--batch", "6", "--out", str(out), *extra])
    return status, capsys.readouterr().out, out


def check_outputs(status, text, out):
    assert status == 0, text
    assert "parity: OK" in text
    for name in ("eval: logits", "eval: input gradient", "train: input gradient", "train: parameter gradients",
                 "explain: dynamic linear weights"):
        line = next(line for line in text.splitlines() if name in line)
        assert "max abs err" in line and "rel" in line and line.rstrip().endswith("ok"), line
    assert "speed-up" in text and "forward+backward (train)" in text and "explain 6 images" in text

    files = sorted(os.listdir(out))
    assert "overview.png" in files
    examples = [f for f in files if f.startswith("example_")]
    assert len(examples) == demo.QUICK.examples
    for name in files:
        assert str(out / name) in text  # every path is printed
    tile = 16 * max(1, demo.TILE // 16)  # the quick demo's 16x16 inputs, upscaled
    for name in examples:
        header, pixels = read_png(str(out / name))
        assert header["colour_type"] == 2
        assert header["width"] == demo.GAP + 4 * (tile + demo.GAP)
        # the explanation tile (second column), at the bottom of the picture: not one flat colour
        left = demo.GAP + tile + demo.GAP
        explanation = pixels[-tile:, left:left + tile].astype(np.int64)
        assert explanation.std() > 1.0, f"{name}: the explanation tile is constant"
        assert len(np.unique(explanation.reshape(-1, 3), axis=0)) > 10
    header, overview = read_png(str(out / "overview.png"))
    assert header["height"] > demo.QUICK.examples * tile


def test_demo_quick(tmp_path, capsys, one_thread):
    status, text, out = run_demo(tmp_path, capsys)
    check_outputs(status, text, out)
    assert "bcos 0.1.3 (original)" in text or "bcos not installed" in text


def test_demo_quick_without_bcos(tmp_path, capsys, one_thread, monkeypatch):
    """Where `bcos` is missing, the same demo runs on our exact reference and says so."""
    monkeypatch.setattr(demo, "import_bcos_modules", lambda: None)
    status, text, out = run_demo(tmp_path, capsys)
    check_outputs(status, text, out)
    assert "bcos is not installed" in text.replace("`", "") or "bcos not installed" in text
    assert "reference" in text


def test_demo_reports_a_parity_failure(tmp_path, capsys, one_thread, monkeypatch):
    """The exit status is what scripts check: with a zero tolerance, fp32 rounding differences must fail it."""
    monkeypatch.setattr(demo, "TOLERANCE", 0.0)
    status, text, _ = run_demo(tmp_path, capsys)
    assert status == 1
    assert "parity: FAILED" in text and "FAILED" in text.split("parity: FAILED")[0]

"""The CPU convolution's layout choice (bcos_kernels/ops/_conv_layout.py): both layouts give the reference's
results on the whole conv case table, the measured choice is recorded per shape and reused, the environment
variable fixes it, and deterministic mode keeps NCHW."""

import pytest
import torch
from cases import BCOS_CONV2D
from ops._util import check_backend

import bcos_kernels
from bcos_kernels import backends
from bcos_kernels.ops import _conv_layout
from bcos_kernels.ops.bcos_conv2d import reference

CPU_REASON = backends.device_reason("cpu", torch.device("cpu"))
pytestmark = pytest.mark.skipif(CPU_REASON is not None, reason=f"backend cpu: {CPU_REASON}")
ENV = "BCOS_KERNELS_CPU_CONV_LAYOUT"


@pytest.fixture(autouse=True)
def fresh_choices():
    _conv_layout.clear()
    yield
    _conv_layout.clear()


@pytest.mark.parametrize("layout", [_conv_layout.NCHW, _conv_layout.CHANNELS_LAST])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in BCOS_CONV2D])
def test_each_layout_matches_the_reference(case, dtype, layout, monkeypatch):
    monkeypatch.setenv(ENV, layout)
    check_backend("bcos_conv2d", "cpu", bcos_kernels.bcos_conv2d, reference.bcos_conv2d, case, dtype)


def _call(x, w):
    out = bcos_kernels.bcos_conv2d(x, w, padding=1, backend="cpu")
    out.backward(torch.ones_like(out))


def test_measured_once_per_shape_and_step(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    calls = []
    real = _conv_layout._timed
    monkeypatch.setattr(_conv_layout, "_timed", lambda fn: calls.append(fn) or real(fn))
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    for _ in range(3):
        _call(torch.randn(2, 3, 6, 6, requires_grad=True), w)
    choices = _conv_layout.choices()
    assert sorted(key[0][0] for key in choices) == ["backward", "forward"]
    assert set(choices.values()) <= {_conv_layout.NCHW, _conv_layout.CHANNELS_LAST}
    runs = 2 * _conv_layout.ROUNDS  # per step, on the first call only
    assert len(calls) == 2 * runs
    _call(torch.randn(1, 3, 6, 6, requires_grad=True), w)  # a new batch size is a new shape
    assert len(_conv_layout.choices()) == 4 and len(calls) == 4 * runs


def test_a_channels_last_win_is_kept(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    ran = []
    times = iter([1.0, 0.5] * _conv_layout.ROUNDS)  # nchw, then channels_last: channels_last is faster
    monkeypatch.setattr(_conv_layout, "_timed", lambda fn: (next(times), fn()))
    result = _conv_layout.run_faster("k", lambda: ran.append("nchw") or "a", lambda: ran.append("cl") or "b")
    assert result == "b" and _conv_layout.choices()[("k", torch.get_num_threads())] == _conv_layout.CHANNELS_LAST
    ran.clear()
    assert _conv_layout.run_faster("k", lambda: ran.append("nchw") or "a", lambda: ran.append("cl") or "b") == "b"
    assert ran == ["cl"]


def test_a_tie_keeps_nchw(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    times = iter([1.0, 0.97] * _conv_layout.ROUNDS)  # within the margin
    monkeypatch.setattr(_conv_layout, "_timed", lambda fn: (next(times), fn()))
    assert _conv_layout.run_faster("k", lambda: "a", lambda: "b") == "a"


def test_deterministic_mode_runs_nchw_without_measuring(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    torch.use_deterministic_algorithms(True)
    try:
        assert _conv_layout.run_faster("k", lambda: "a", lambda: "b") == "a"
    finally:
        torch.use_deterministic_algorithms(False)
    assert _conv_layout.choices() == {}


def test_bad_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv(ENV, "nhwc")
    with pytest.raises(ValueError, match=ENV):
        _conv_layout.run_faster("k", lambda: "a", lambda: "b")

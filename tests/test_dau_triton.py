"""Backend "triton" of the CoDA DAU convolution against the fp64 original (reference/dau.py).

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before any kernel
module is imported): tiny shapes, fp32. With a GPU the same tests run on CUDA, plus the fp16/bf16 checks.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("triton", reason="backend 'triton' needs the triton package")

from helpers import make_dau_case as make_case  # noqa: E402
from helpers import one_intra_op_thread  # noqa: E402, F401  (autouse fixture: pytest finds it here)

from bcos_kernels import backends  # noqa: E402
from bcos_kernels.nn.dau import DAUConv2d  # noqa: E402
from bcos_kernels.ops.dau_conv2d import dau_conv2d  # noqa: E402
from bcos_kernels.ops.dau_conv2d.reference import dau_conv2d_original  # noqa: E402

F64 = torch.float64
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
TOL = 1e-4  # DESIGN.md section 4: fp32 vs the fp64 reference
NAMES = ("x", "rank_weight", "expand_weight", "expand_bias")

if not ON_GPU and not backends.triton_interpreting():
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)


def run(fn, inputs, kw, grad_out=None, seed=1):
    """out and the gradients of every input (None where a parameter gets none) for one grad_out."""
    inputs = [None if t is None else t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs, **kw)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    live = [t for t in inputs if t is not None]
    got = iter(torch.autograd.grad(out, live, grad_out.to(out.device, out.dtype), allow_unused=True))
    return out, [None if t is None else next(got) for t in inputs], grad_out


def compare(inputs, kw, what, dtype=torch.float32, tol=TOL):
    """Forward and every gradient of backend "triton" (dtype, on DEVICE) vs the fp64 original. Returns the
    largest absolute error."""
    ref_out, ref_grads, g = run(dau_conv2d_original, inputs, kw)
    cast = [None if t is None else t.to(DEVICE, dtype) for t in inputs]
    out, grads, _ = run(dau_conv2d, cast, dict(kw, backend="triton"), g)
    assert out.dtype == dtype and out.device.type == DEVICE.type and out.shape == ref_out.shape, what
    worst = 0.0
    for name, got, want in zip(("out",) + NAMES, [out] + grads, [ref_out] + ref_grads):
        if want is None:  # no bias, or a parameter in explanation mode
            assert got is None or not got.any(), f"{what} d{name}"
            continue
        assert got is not None and got.dtype == dtype, f"{what} {name}"
        got = got.double().cpu()
        assert torch.isfinite(got).all(), f"{what} {name}"
        torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=lambda m: f"{what} {name}: {m}")
        worst = max(worst, (got - want).abs().max().item())
    return worst


# ----------------------------------------------------------------------------------------- the sweep

# kernel sizes 1/3/5/7 x strides 1-3 x padding 0 and (k-1)/2; ranks 3, 5, 7 (not powers of two); batch 1 and 2;
# odd (and some even) sizes; bias on most cases.
SWEEP = [(k, s, p) for k in (1, 3, 5, 7) for s in (1, 2, 3) for p in sorted({0, (k - 1) // 2})]


def sweep_case(i, k, seed_offset=0):
    c, o, r, n = 2 + i % 2, 3 + i % 3, (3, 5, 7)[i % 3], 1 + i % 2
    h, w = k + 2 + 2 * (i % 2), k + 1 + (i % 3)
    return make_case(c, o, r, k, n, h, w, bias=i % 4 != 3, seed=i + seed_offset)


@pytest.mark.parametrize("mode", ["train", "detach"])
@pytest.mark.parametrize("norm", ["squash", "l2"])
@pytest.mark.parametrize("k", [1, 3, 5, 7])
def test_matches_reference(k, norm, mode):
    for i, (kk, s, p) in enumerate(SWEEP):
        if kk != k:
            continue
        inputs = sweep_case(i, k, seed_offset=7 * (norm == "l2"))
        kw = dict(kernel_size=k, stride=s, padding=p, norm=norm, detach=mode == "detach")
        shapes = f"{mode} {norm} k={k} s={s} p={p} r={inputs[1].shape[0]} x={tuple(inputs[0].shape)}"
        compare(inputs, kw, shapes + (" bias" if inputs[3] is not None else " no bias"))


def test_several_blocks_per_program_axis(monkeypatch):
    """17 units (2 unit blocks), rank 20 (2 rank chunks and 2 Gram tiles), C*k*k = 45 (2 patch chunks), 144 output
    pixels (3 pixel tiles), 377 virtual columns (many column tiles in the backward), and split-K over pixels
    (forced: under the interpreter there is one split) -- every loop and grid axis runs more than once."""
    triton_dau = importlib.import_module("bcos_kernels.ops.dau_conv2d.triton")
    monkeypatch.setattr(triton_dau, "_splits", lambda x, other, pix_tiles, numel: min(pix_tiles, 2))
    inputs = make_case(5, 17, 20, 3, 2, 8, 9, seed=3)
    for norm in ("squash", "l2"):
        compare(inputs, dict(kernel_size=3, stride=1, padding=1, norm=norm), f"big {norm}")


def test_asymmetric_stride_padding_and_channels_last():
    x, a, e, b = make_case(3, 4, 6, 3, 2, 9, 8, seed=4)
    kw = dict(kernel_size=3, stride=(2, 1), padding=(1, 0), norm="squash")
    compare((x, a, e, b), kw, "asymmetric")
    compare((x.contiguous(memory_format=torch.channels_last), a, e, b), kw, "channels_last")


def test_rank_one_and_rank_sixteen():
    for r in (1, 16):
        compare(make_case(2, 3, r, 3, 1, 5, 6, seed=r), dict(kernel_size=3, norm="l2"), f"rank {r}")


@pytest.mark.parametrize("norm", ["squash", "l2"])
def test_zero_input_gives_zero_and_finite_gradients(norm):
    """Without bias the dynamic weights of a zero input are exactly 0: output 0, finite gradients (the original
    divides by zero there); with a bias it is an ordinary input."""
    compare(make_case(2, 3, 3, 3, 1, 5, 5, seed=5, zero_x=True), dict(kernel_size=3, norm=norm), "zero x")
    x, a, e, _ = make_case(2, 3, 3, 3, 1, 5, 5, seed=5, zero_x=True)
    for detach in (False, True):
        out, grads, _ = run(
            dau_conv2d,
            [t.to(DEVICE, torch.float32) for t in (x, a, e)] + [None],
            dict(kernel_size=3, norm=norm, detach=detach, backend="triton"),
        )
        assert (out == 0).all()
        assert all(t is None or torch.isfinite(t).all() for t in grads)


def test_explanation_mode_is_linear_in_x():
    """detach=True: out_j = W_j(x) . x with W constant, so sum(x * d out_j / d x) == out_j."""
    x, a, e, b = (t.to(DEVICE, torch.float32) for t in make_case(3, 4, 5, 3, 1, 7, 7, seed=6))
    x.requires_grad_(True)
    out = dau_conv2d(x, a, e, b, kernel_size=3, detach=True, backend="triton")
    for j in [(0, 1, 3, 3), (0, 3, 0, 6)]:
        (gx,) = torch.autograd.grad(out[j], x, retain_graph=True)
        torch.testing.assert_close((gx * x).sum(), out[j], atol=1e-5, rtol=1e-5)


def test_module_backend_triton_matches_torch():
    torch.manual_seed(0)
    ref = DAUConv2d(4, 5, 3, kernel_size=3, stride=2).to(DEVICE)
    fused = DAUConv2d(4, 5, 3, kernel_size=3, stride=2, backend="triton").to(DEVICE)
    fused.load_state_dict(ref.state_dict())
    x = torch.rand(2, 4, 7, 9, device=DEVICE)
    for mod in (ref, fused):
        mod.zero_grad()
    outs = [mod(x) for mod in (ref, fused)]
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    for out in outs:
        out.square().sum().backward()
    for p_ref, p_fused in zip(ref.parameters(), fused.parameters()):
        torch.testing.assert_close(p_fused.grad, p_ref.grad, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ GPU dtypes


@pytest.mark.skipif(not ON_GPU, reason="fp16/bf16 run on a GPU only (the interpreter has no bf16 arithmetic)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_error_within_twice_reference_error(dtype):
    """DESIGN.md section 4: error vs the fp64 reference at most 2x that of the reference run in the dtype."""
    inputs = make_case(16, 32, 32, 3, 4, 16, 16, seed=8)
    kw = dict(kernel_size=3, norm="squash")
    exact_out, exact_grads, g = run(dau_conv2d_original, inputs, kw)
    low = [t.to(DEVICE, dtype) for t in inputs]
    ref_out, ref_grads, _ = run(dau_conv2d_original, low, kw, g)
    out, grads, _ = run(dau_conv2d, low, dict(kw, backend="triton"), g)
    for name, got, ref, exact in zip(("out",) + NAMES, [out] + grads, [ref_out] + ref_grads, [exact_out] + exact_grads):
        assert got.dtype == dtype
        ref_err = (ref.double().cpu() - exact).abs().max()
        err = (got.double().cpu() - exact).abs().max()
        assert err <= 2 * ref_err, f"{dtype} {name}: {err} > 2 x {ref_err}"


# ------------------------------------------------------------------------------------ backend selection


def _small(dtype=torch.float32, device=DEVICE):
    x, a, e, b = make_case(3, 4, 2, 3, 1, 6, 6)
    return [t.to(device, dtype) for t in (x, a, e, b)]


def test_explicit_triton_with_unsupported_dtype_raises():
    x, a, e, b = _small(F64)
    with pytest.raises(ValueError, match="backend 'triton' cannot run this call: dtype torch.float64"):
        dau_conv2d(x, a, e, b, kernel_size=3, backend="triton")
    if not ON_GPU:
        x, a, e, b = _small(torch.bfloat16)
        with pytest.raises(ValueError, match="interpreter.*float32 only"):
            dau_conv2d(x, a, e, b, kernel_size=3, backend="triton")


def test_explicit_triton_with_too_many_pixels_raises():
    """Pixel indices are int32 in the kernels: 2**32 input pixels go elsewhere (an expanded view: no memory)."""
    x = torch.ones(1, 1, 1, 1, device=DEVICE).expand(2**16, 1, 2**8, 2**8)
    a, e = torch.ones(2, 1, 1, 1, device=DEVICE), torch.ones(3, 2, 1, 1, device=DEVICE)
    with pytest.raises(ValueError, match="2\\*\\*31 - 1 pixels"):
        dau_conv2d(x, a, e, kernel_size=1, backend="triton")


@pytest.mark.skipif(ON_GPU, reason="checks the CPU device rule")
def test_explicit_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    x, a, e, b = _small()
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        dau_conv2d(x, a, e, b, kernel_size=3, backend="triton")


def test_auto_prefers_triton_and_falls_back_with_a_warning(monkeypatch):
    """ "auto" runs triton where it can and falls back to torch, with one warning naming the reason, where not."""
    monkeypatch.setitem(backends.AUTO_ORDER, DEVICE.type, ("triton",))
    monkeypatch.setattr(backends, "_warned", set())
    triton_dau = importlib.import_module("bcos_kernels.ops.dau_conv2d.triton")
    calls = []
    real = triton_dau.forward
    monkeypatch.setattr(triton_dau, "forward", lambda *args, **kw: calls.append(1) or real(*args, **kw))
    x, a, e, b = _small()
    with warnings.catch_warnings():
        # our fallback warning is a RuntimeWarning; other categories (e.g. numpy deprecations raised inside
        # older Triton interpreters) are not ours to fail on
        warnings.simplefilter("error", RuntimeWarning)
        want = dau_conv2d_original(x, a, e, b, kernel_size=3)
        torch.testing.assert_close(dau_conv2d(x, a, e, b, kernel_size=3, backend="auto"), want)
    assert calls == [1]
    x, a, e, b = _small(F64)
    with pytest.warns(RuntimeWarning, match="falling back to backend 'torch'.*triton: dtype torch.float64"):
        out = dau_conv2d(x, a, e, b, kernel_size=3, backend="auto")
    assert out.dtype == F64 and calls == [1]


def test_triton_not_imported_by_the_package():
    code = (
        "import sys, bcos_kernels, bcos_kernels.nn; "
        "assert 'bcos_kernels.ops.dau_conv2d.triton' not in sys.modules, "
        "'bcos_kernels.ops.dau_conv2d.triton imported eagerly'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------- torch.library / compile


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("case", ["bias-squash-channels_last", "nobias-l2-detach"])
def test_opcheck(case):
    x, a, e, b = _small()
    if "nobias" in case:
        b = None
    if "channels_last" in case:
        x = x.contiguous(memory_format=torch.channels_last)
    args = [None if t is None else t.requires_grad_(True) for t in (x, a, e, b)]
    norm = "l2" if "l2" in case else "squash"
    torch.library.opcheck(
        torch.ops.bcos_kernels.dau_conv2d.default,
        tuple(args),
        dict(kernel_size=3, stride=[2, 1], padding=[1, 0], norm=norm, detach="detach" in case, backend="triton"),
    )


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_opcheck_backward_op():
    x, a, e, b = _small()
    options = dict(kernel_size=3, stride=[1, 1], padding=[1, 1], norm="squash", backend="triton")
    out, z, s, w = torch.ops.bcos_kernels.dau_conv2d(x, a, e, b, detach=False, **options)
    g = torch.randn_like(out)
    for detach, needs in (
        (False, [True, True, True, True]),
        (False, [False, True, False, True]),
        (True, [True, False, False, False]),
    ):
        torch.library.opcheck(
            torch.ops.bcos_kernels.dau_conv2d_backward.default,
            (g, x, a, e, b, z, s, out, w),
            dict(options, detach=detach, needs=needs),
            test_utils=("test_schema", "test_faketensor"),
        )


@pytest.fixture
def fresh_dynamo():
    """Compile caches reset before and after: a DAUConv2d.forward compiled here with other shapes would make a
    later test's compile of it a dynamic-shape recompile."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # from inside torch.compile
@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")  # backends.device_reason
def test_compile_fullgraph_matches_eager(fresh_dynamo):
    torch.manual_seed(0)
    m = DAUConv2d(3, 4, 3, kernel_size=3, stride=2, backend="triton").to(DEVICE)
    x = torch.rand(1, 3, 7, 6, device=DEVICE, requires_grad=True)

    def grads(mod):
        out = mod(x)
        return out, torch.autograd.grad(out.square().sum(), [x] + list(m.parameters()))

    want = grads(m)
    got = grads(torch.compile(m, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(got[0], want[0])
    for g1, g2 in zip(got[1], want[1]):
        torch.testing.assert_close(g1, g2)

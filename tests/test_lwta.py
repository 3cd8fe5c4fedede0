"""LWTA: the reference against DISCOVER's original code, the op against the reference."""

import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import assert_compiled_matches_eager_after_same_seed
from helpers import fwd_bwd as _fwd_bwd
from helpers import lwta_kwargs as _kwargs
from helpers import saved_bytes as _saved_bytes
from originals import mirror_source

from bcos_kernels import backends
from bcos_kernels.nn.lwta import LWTA
from bcos_kernels.ops.lwta import lwta
from bcos_kernels.ops.lwta import reference as ref

ORIGINAL_FILE = "models/ResNet/activations.py"


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """DISCOVER's activations.py, read from the git mirror at test time (never stored in this repo)."""
    text = mirror_source("konpanousis+DISCOVER", ORIGINAL_FILE)
    path = tmp_path_factory.mktemp("original") / "discover_activations.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("discover_activations", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _feed_rand(monkeypatch, u):
    """Make torch.rand (the original's noise source) return the uniforms u, reshaped to the asked shape."""

    def fake_rand(*size, device=None, **kwargs):
        shape = size[0] if len(size) == 1 and not isinstance(size[0], int) else size
        return u.reshape(shape).to(device)

    monkeypatch.setattr(torch, "rand", fake_rand)


# (shape, U): conv (N, C, H, W) competes along C, the rest along the last dim
CASES = [
    ((2, 8, 3, 5), 2),
    ((2, 8, 3, 5), 4),
    ((2, 16, 3, 3), 8),
    ((1, 9, 5, 7), 3),
    ((3, 6, 1, 1), 2),
    ((4, 12), 2),
    ((4, 12), 3),
    ((1, 8), 8),
    ((5, 12), 4),
    ((2, 5, 12), 3),
    ((1, 3, 8), 4),
]
MODES = ["train", "eval", "deterministic"]


def _inputs(shape, dtype=torch.float32, seed=0, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype)
    u = torch.rand(shape, generator=g, dtype=torch.float32)
    gout = torch.randn(shape, generator=g, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(), u, gout


# ---------------------------------------------------------------- reference vs the original code


@pytest.mark.parametrize("shape,U", CASES[:3] + CASES[5:6] + CASES[9:10])
@pytest.mark.parametrize("mode", MODES)
def test_reference_matches_original(original, monkeypatch, shape, U, mode):
    x, u, gout = _inputs(shape)
    kw = _kwargs(mode)
    _feed_rand(monkeypatch, u)
    out_o, kl = original.lwta_activation(
        x,
        U=U,
        deterministic=kw["deterministic"],
        training=kw["training"],
        temperature=kw["temperature"],
        temp_test=1.67,
        kl_flag=True,
    )
    (grad_o,) = torch.autograd.grad(out_o, x, gout)
    assert kl == 0.0
    monkeypatch.undo()
    out_r, grad_r = _fwd_bwd(lambda t: ref.lwta(t, U, noise=u, **kw), x, gout)
    assert torch.equal(out_r, out_o)
    assert torch.equal(grad_r, grad_o)
    out_op, grad_op = _fwd_bwd(lambda t: lwta(t, U, noise=u, **kw), x, gout)
    assert torch.equal(out_op, out_o)
    torch.testing.assert_close(grad_op, grad_o, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape,U", [((2, 8, 6, 6), 2), ((3, 7, 12), 4)])
def test_module_matches_original_module_same_seed(original, shape, U, mode):
    """Same constructor, same torch.manual_seed: the same noise, so the same output (no noise passed)."""
    x, _, gout = _inputs(shape, seed=1)
    orig = original.LWTA(U=U, temp=0.9, deterministic=mode == "deterministic")
    ours = LWTA(U=U, temp=0.9, deterministic=mode == "deterministic")
    if mode == "eval":
        orig.eval(), ours.eval()
    torch.manual_seed(123)
    out_o, grad_o = _fwd_bwd(orig, x, gout)
    torch.manual_seed(123)
    out_n, grad_n = _fwd_bwd(ours, x, gout)
    assert torch.equal(out_n, out_o)
    torch.testing.assert_close(grad_n, grad_o, rtol=1e-5, atol=1e-6)
    assert ours.kl_ == orig.kl_ == 0.0


def test_module_defaults_and_relu_match_original(original):
    orig, ours = original.LWTA(), LWTA()
    for name in ("inplace", "deterministic", "U", "temp", "temp_test", "kl_flag"):
        assert getattr(ours, name) == getattr(orig, name), name
    assert ours.state_dict().keys() == orig.state_dict().keys()
    x = torch.randn(2, 4, 3, 3)
    assert torch.equal(LWTA(U=1)(x), original.LWTA(U=1)(x))


# ---------------------------------------------------------------- op vs reference


@pytest.mark.parametrize("shape,U", CASES)
@pytest.mark.parametrize("mode", MODES)
def test_op_matches_reference(shape, U, mode):
    x, u, gout = _inputs(shape)
    kw = _kwargs(mode)
    out_r, grad_r = _fwd_bwd(lambda t: ref.lwta(t, U, noise=u, **kw), x, gout)
    out_op, grad_op = _fwd_bwd(lambda t: lwta(t, U, noise=u, **kw), x, gout)
    assert torch.equal(out_op, out_r)
    torch.testing.assert_close(grad_op, grad_r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape,U", [CASES[1], CASES[4], CASES[6], CASES[9]])
@pytest.mark.parametrize("mode", MODES)
def test_backend_reference_is_the_reference_bit_for_bit(shape, U, mode):
    """backend="reference" runs reference.lwta itself: output and gradient equal, given noise or drawing it."""
    x, u, gout = _inputs(shape)
    kw = _kwargs(mode)
    for noise in (u, None):
        torch.manual_seed(3)
        out_r, grad_r = _fwd_bwd(lambda t: ref.lwta(t, U, noise=noise, **kw), x, gout)
        torch.manual_seed(3)
        out, grad = _fwd_bwd(lambda t: lwta(t, U, noise=noise, backend="reference", **kw), x, gout)
        assert torch.equal(out, out_r) and torch.equal(grad, grad_r)


@pytest.mark.parametrize("mode", MODES)
def test_channels_last(mode):
    x, u, gout = _inputs((2, 8, 5, 3), channels_last=True)
    kw = _kwargs(mode)
    out_r, grad_r = _fwd_bwd(lambda t: ref.lwta(t, 4, noise=u, **kw), x, gout)
    out_op, grad_op = _fwd_bwd(lambda t: lwta(t, 4, noise=u, **kw), x, gout)
    assert out_op.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out_op, out_r)
    torch.testing.assert_close(grad_op, grad_r, rtol=1e-5, atol=1e-6)
    # backend "torch" draws its noise (torch.rand) in x's logical order, not its memory order; "cpu" (auto's
    # choice here) and "cuda" draw from the kernels' stream in memory order (ops/lwta/cpu.py)
    torch.manual_seed(5)
    a = lwta(x.detach(), 4, backend="torch")
    torch.manual_seed(5)
    b = lwta(x.detach().contiguous(), 4, backend="torch")
    assert torch.equal(a, b)


@pytest.mark.parametrize("shape,U", [((2, 8, 3, 5), 4), ((3, 12), 3)])
def test_straight_through_formula_fp64(shape, U):
    """d out/d x_i = m_i g_i + (1/T) p_i (v_i - sum_j p_j v_j), v = g x, p = y_soft: autograd of the reference."""
    T = 0.6
    x, u, gout = _inputs(shape, dtype=torch.float64)
    u = u.double()
    out_r, grad_r = _fwd_bwd(lambda t: ref.lwta(t, U, temperature=T, noise=u), x, gout)
    dim = ref.competition_dim(x)
    blocks = lambda t: t.detach().unflatten(dim, (t.shape[dim] // U, U))  # noqa: E731
    p = ((blocks(x) + ref.gumbel(blocks(u))) / T).softmax(dim + 1)
    m = (blocks(out_r) != 0).double()
    v = blocks(gout) * blocks(x)
    formula = m * blocks(gout) + p * (v - (p * v).sum(dim + 1, keepdim=True)) / T
    torch.testing.assert_close(formula.flatten(dim, dim + 1), grad_r, rtol=1e-12, atol=1e-12)
    _, grad_op = _fwd_bwd(lambda t: lwta(t, U, temperature=T, noise=u), x, gout)
    torch.testing.assert_close(grad_op, grad_r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_computes_in_fp32(dtype):
    x, u, gout = _inputs((2, 8, 3, 3))
    xh = x.detach().to(dtype)
    out = lwta(xh, 4, noise=u)
    assert out.dtype == dtype
    assert torch.equal(out, ref.lwta(xh.float(), 4, noise=u).to(dtype))


def test_fp64_input_with_fp32_noise_like_the_original():
    x, u, _ = _inputs((3, 8), dtype=torch.float64)
    assert torch.equal(lwta(x, 2, noise=u), ref.lwta(x, 2, noise=u))


def test_gumbel_noise_is_finite_on_all_of_unit_interval():
    """Why the original's NaN re-draw can never trigger for u in [0, 1)."""
    for dtype in (torch.float32, torch.float64):
        u = torch.tensor([0.0, 1e-30, 0.5, 1.0], dtype=dtype)
        u[-1] = torch.nextafter(u[-1], torch.tensor(0.0, dtype=dtype))
        assert torch.isfinite(ref.gumbel(u)).all()


# ---------------------------------------------------------------- sampling


def test_winner_frequencies_follow_softmax_of_x_not_of_x_over_T():
    """With Gumbel noise the winner is distributed as softmax(x), whatever T (T only shapes the gradient)."""
    logits = torch.tensor([1.0, 0.2, -0.5, 0.7])
    M = 20000
    x = logits.repeat(M, 1)
    expected = logits.softmax(0)
    tol = 4 * torch.sqrt(expected * (1 - expected) / M)
    torch.manual_seed(0)
    for T, training in ((0.5, True), (1.67, True), (4.0, True), (0.5, False)):
        out = lwta(x, 4, temperature=T, training=training)
        assert ((out != 0).sum(1) == 1).all()
        freq = torch.bincount((out != 0).int().argmax(1), minlength=4).double() / M
        assert ((freq - expected.double()).abs() <= tol).all(), (T, freq, expected)
        if T == 0.5:  # clearly not softmax(x / T)
            assert ((freq - (logits / T).softmax(0).double()).abs() > 5 * tol).any()


def test_same_seed_reproduces():
    x = torch.randn(4, 16, 5, 5)
    torch.manual_seed(7)
    a = lwta(x, 4)
    torch.manual_seed(7)
    b = lwta(x, 4)
    c = lwta(x, 4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # eval still samples (as the original)
    torch.manual_seed(7)
    assert torch.equal(lwta(x, 4, training=False), a)


def test_deterministic_keeps_the_argmax():
    x = torch.randn(3, 12, 4, 4)
    out = lwta(x, 3, deterministic=True)
    blocks = x.unflatten(1, (4, 3))
    expected = blocks * torch.nn.functional.one_hot(blocks.argmax(2), 3).movedim(-1, 2)
    assert torch.equal(out, expected.flatten(1, 2))


# ---------------------------------------------------------------- memory, gradcheck, opcheck, compile


def test_saves_x_noise_and_uint8_winner_only():
    x, u, _ = _inputs((2, 8, 6, 6))
    ours = _saved_bytes(lambda t: lwta(t, 4, noise=u, backend="torch"), x)
    assert ours == x.numel() * 4 + u.numel() * 4 + x.numel() // 4
    assert ours < _saved_bytes(lambda t: ref.lwta(t, 4, noise=u), x)
    assert _saved_bytes(lambda t: lwta(t, 4, deterministic=True, backend="torch"), x) == x.numel() * 4 + x.numel() // 4
    # the C++ kernels' deterministic backward reads the winner alone (auto's choice on CPU for that mode)
    assert _saved_bytes(lambda t: lwta(t, 4, deterministic=True, backend="cpu"), x) == x.numel() // 4
    assert _saved_bytes(lambda t: lwta(t, 4, deterministic=True), x) == x.numel() // 4


@pytest.mark.parametrize("shape,U", [((1, 6, 3, 2), 3), ((2, 8), 4), ((2, 3, 4), 2)])
def test_gradcheck_fp64(shape, U):
    """Deterministic mode has a true gradient; the stochastic straight-through one is checked above."""
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: lwta(t, U, deterministic=True), (x,))


@pytest.mark.skipif(
    backends.device_reason("cpu", "cpu") is not None,
    reason="backend 'cpu' needs the C++ extension (scripts/install.sh)",
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "shape,U,channels_last", [((3, 16, 10, 10), 4, False), ((2, 6, 5, 3), 3, True), ((4, 5, 12), 4, False)]
)
def test_cpu_kept_probabilities_are_the_softmax(shape, U, channels_last, dtype):
    """Backend "cpu"'s third output (stochastic fp32/fp64): y_soft = softmax((x + gumbel(u)) / T) over each block,
    in x's layout; the winners are its first maxima. (3, 16, 10, 10): blocks 8 at a time with a tail of 4, over
    two tiles; (2, 6, 5, 3) channels_last and (4, 5, 12): blocks along a contiguous dim, one at a time."""
    x, u, _ = _inputs(shape, dtype=dtype, channels_last=channels_last)
    out, winner, probs = torch.ops.bcos_kernels.lwta(x.detach(), u, None, competitors=U, temperature=0.8, backend="cpu")
    assert winner.numel() == 0 and probs.dtype == dtype and probs.stride() == x.stride()
    dim = ref.competition_dim(x)
    logits = (x.detach().double() + ref.gumbel(u).double()) / 0.8  # the noise's transform in its dtype (fp32)
    want = logits.unflatten(dim, (x.shape[dim] // U, U)).softmax(dim + 1).flatten(dim, dim + 1)
    torch.testing.assert_close(probs.double(), want, rtol=1e-4 if dtype == torch.float32 else 1e-12, atol=1e-6)
    first_max = probs.unflatten(dim, (x.shape[dim] // U, U)).argmax(dim + 1, keepdim=True)
    keep = torch.zeros_like(probs.unflatten(dim, (x.shape[dim] // U, U))).scatter_(dim + 1, first_max, 1.0)
    assert torch.equal(out != 0, (keep.flatten(dim, dim + 1) != 0) & (x != 0))


# The sampling kernels' outputs for _VECTOR_PATH_CASES, as a subprocess computes them (see the test below).
_VECTOR_PATH_SCRIPT = """
import sys, torch, bcos_kernels
cases = [((3, 16, 10, 10), 4), ((2, 6, 20, 3), 2), ((2, 8, 3, 3), 4), ((5, 41), 1)]
out = []
for i, (shape, U) in enumerate(cases):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(i))
    out.append(torch.ops.bcos_kernels.lwta_uniform(x, 77, 5))
    out.extend(torch.ops.bcos_kernels.lwta_sample_forward(x, U, 0.7, None, 77, 5))
torch.save(out, sys.argv[1])
"""


@pytest.mark.skipif(
    backends.device_reason("cpu", "cpu") is not None,
    reason="backend 'cpu' needs the C++ extension (scripts/install.sh)",
)
def test_cpu_sampling_isa_paths_agree_bit_for_bit(tmp_path):
    """The Philox draws and the sampling forward (probabilities and output) are the same, bit for bit, with the
    AVX-512 and AVX2 paths, and the same draws and winners with the scalar one (std::log/exp against SLEEF's:
    an ulp apart) -- BCOS_KERNELS_CPU_ISA lowers the instruction set, each run in a fresh process, as the CPU's
    features are read once. Inner sizes 100 (16 blocks at a time and a tail), 60, 9 (8 at a time) and 1."""
    runs = []
    for isa in (None, "avx2", "baseline"):
        env = {k: v for k, v in os.environ.items() if k != "BCOS_KERNELS_CPU_ISA"}
        if isa is not None:
            env["BCOS_KERNELS_CPU_ISA"] = isa
        path = tmp_path / f"run-{isa}.pt"
        subprocess.run([sys.executable, "-c", _VECTOR_PATH_SCRIPT, str(path)], env=env, check=True)
        runs.append(torch.load(path))
    assert [len(r) for r in runs] == [12, 12, 12]
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)
    for i, (a, b) in enumerate(zip(runs[0], runs[2])):
        if i % 3 == 0:  # the uniforms
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
            assert torch.equal(a != 0, b != 0)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("case", ["conv", "channels_last", "linear3d", "deterministic", "seed", "float64"])
def test_opcheck(case, backend):
    """The op and its backward, for "cpu" with the probabilities kept (stochastic fp32/fp64) and without."""
    if backend == "torch" and case == "seed":
        pytest.skip('backend "torch" takes noise, not a seed')
    shape = (2, 5, 8) if case == "linear3d" else (2, 8, 3, 3)
    dtype = torch.float64 if case == "float64" else torch.float32
    x, u, _ = _inputs(shape, channels_last=case == "channels_last", dtype=dtype)
    noise = None if case in ("deterministic", "seed") else u
    seed = torch.tensor([3]) if case == "seed" else None
    options = dict(competitors=4, temperature=0.8, backend=backend)
    torch.library.opcheck(torch.ops.bcos_kernels.lwta.default, (x, noise, seed), options)
    _, winner, probs = torch.ops.bcos_kernels.lwta.default(x, noise, seed, **options)
    kept = backend == "cpu" and case != "deterministic"
    assert (probs.shape == x.shape and winner.numel() == 0) if kept else probs.numel() == 0
    torch.library.opcheck(
        torch.ops.bcos_kernels.lwta_backward.default,
        (torch.randn(shape, dtype=dtype), x.detach(), noise, seed, winner, probs),
        dict(options, nhwc=case == "channels_last"),
    )


@pytest.mark.parametrize("deterministic", [False, True])
def test_compile_fullgraph_matches_eager(deterministic):
    x, u, gout = _inputs((2, 8, 3, 5))
    if deterministic:
        fn = LWTA(U=4, deterministic=True)
    else:

        def fn(t):
            return lwta(t, 4, temperature=0.8, noise=u)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out_e, grad_e = _fwd_bwd(fn, x, gout)
    out_c, grad_c = _fwd_bwd(compiled, x, gout)
    assert torch.equal(out_c, out_e)
    torch.testing.assert_close(grad_c, grad_e, rtol=0, atol=0)


def test_compile_module_drawing_its_own_noise():
    """Under aot_eager the front door's torch.rand is the eager one: the same seed gives the same result.
    (Inductor replaces torch.rand with its own generator: same distribution, other numbers.)"""
    x, _, gout = _inputs((2, 8, 3, 5))
    m = LWTA(U=4, temp=0.8)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    assert_compiled_matches_eager_after_same_seed(m, compiled, x, gout)


@pytest.mark.skipif(
    os.environ.get("BCOS_KERNELS_INDUCTOR_TESTS") != "1",
    reason="inductor compiles C++ (15-60 s on CPU); set BCOS_KERNELS_INDUCTOR_TESTS=1 to run",
)
def test_compile_inductor_matches_eager():
    x, u, gout = _inputs((2, 8, 3, 5))

    def fn(t):
        return lwta(t, 4, temperature=0.8, noise=u) + LWTA(U=2, deterministic=True)(t)

    out_e, grad_e = _fwd_bwd(fn, x, gout)
    out_c, grad_c = _fwd_bwd(torch.compile(fn, fullgraph=True), x, gout)
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(grad_c, grad_e)


# ---------------------------------------------------------------- module


def test_module_eval_uses_temp_test_for_the_gradient():
    x, _, gout = _inputs((2, 8, 3, 3))
    m = LWTA(U=4, temp=0.3, backend="torch").eval()  # torch.rand: the reference's draws after one seed
    torch.manual_seed(3)
    out, grad = _fwd_bwd(m, x, gout)
    torch.manual_seed(3)
    out_r, grad_r = _fwd_bwd(lambda t: ref.lwta(t, 4, temperature=0.3, training=False), x, gout)
    assert torch.equal(out, out_r)
    torch.testing.assert_close(grad, grad_r, rtol=1e-5, atol=1e-6)
    m.train()
    torch.manual_seed(3)
    _, grad_train = _fwd_bwd(m, x, gout)
    assert not torch.allclose(grad_train, grad)


def test_module_u1_is_relu_and_repr():
    x = torch.randn(2, 4, 3, 3)
    assert torch.equal(LWTA(U=1)(x), torch.relu(x))
    assert "U=4" in repr(LWTA(U=4))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "make,exc,name",
    [
        (lambda: lwta([1.0, 2.0], 2), TypeError, "x"),
        (lambda: lwta(torch.zeros(8), 2), ValueError, "x"),
        (lambda: lwta(torch.zeros(1, 2, 2, 2, 2), 2), ValueError, "x"),
        (lambda: lwta(torch.zeros(2, 8, dtype=torch.int64), 2), TypeError, "x"),
        (lambda: lwta(torch.zeros(2, 8, 3, 3), 3), ValueError, "competitors"),
        (lambda: lwta(torch.zeros(2, 9), 2), ValueError, "competitors"),
        (lambda: lwta(torch.zeros(2, 8), 0), ValueError, "competitors"),
        (lambda: lwta(torch.zeros(2, 8), 2.0), ValueError, "competitors"),
        (lambda: lwta(torch.zeros(2, 512), 512), ValueError, "competitors"),
        (lambda: lwta(torch.zeros(2, 8), 2, temperature=0.0), ValueError, "temperature"),
        (lambda: lwta(torch.zeros(2, 8), 2, temperature=-1.0), ValueError, "temperature"),
        (lambda: lwta(torch.zeros(2, 8), 2, temperature=math.nan), ValueError, "temperature"),
        (lambda: lwta(torch.zeros(2, 8), 2, temperature="1"), TypeError, "temperature"),
        (lambda: lwta(torch.zeros(2, 8), 2, noise=torch.rand(2, 4)), ValueError, "noise"),
        (lambda: lwta(torch.zeros(2, 8), 2, noise=torch.zeros(2, 8, dtype=torch.int32)), TypeError, "noise"),
        (lambda: lwta(torch.zeros(2, 8), 2, noise=torch.rand(2, 8, dtype=torch.float64)), TypeError, "noise"),
        (lambda: lwta(torch.zeros(2, 8), 2, noise=torch.rand(2, 8, device="meta")), ValueError, "noise"),
        (lambda: lwta(torch.zeros(2, 8), 2, backend="cuda"), ValueError, "backend"),
        (lambda: lwta(torch.zeros(2, 8), 2, backend="nope"), ValueError, "backend"),
    ],
)
def test_bad_input(make, exc, name):
    with pytest.raises(exc, match=name):
        make()


# ---------------------------------------------------------------------------------------------------------------
# backend "cpu": the Philox stream of csrc/common/philox.h, the one the CUDA kernels draw from
# ---------------------------------------------------------------------------------------------------------------
_MASK = 0xFFFFFFFF


def _philox4x32_10(counter, key):
    """Philox4x32-10 (Salmon et al. 2011) written out in Python, the test's oracle of the kernels' generator."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & _MASK, (k1 + 0xBB67AE85) & _MASK
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & _MASK, p1 & _MASK, ((p0 >> 32) ^ c3 ^ k1) & _MASK, p0 & _MASK
    return c0, c1, c2, c3


def _stream(seed, offset, n):
    """Element i: word i % 4 of Philox(counter = (i // 4, offset), key = seed), its top 24 bits times 2**-24."""
    words = []
    for i in range(n):
        block = i // 4
        counter = (block & _MASK, block >> 32, offset & _MASK, offset >> 32)
        words.append(_philox4x32_10(counter, (seed & _MASK, seed >> 32))[i % 4])
    return torch.tensor([(w >> 8) * 2.0**-24 for w in words], dtype=torch.float32)


@pytest.mark.skipif(
    backends.device_reason("cpu", "cpu") is not None,
    reason="backend 'cpu' needs the C++ extension (scripts/install.sh)",
)
def test_cpu_backend_draws_the_philox_stream_and_reproduces_a_seed():
    seed, offset = 0x1234_5678_9ABC, 3
    # 39 elements: whole and partial groups of four; 205: also the vector steps (32 and 64 elements) and a tail
    for shape in ((3, 13), (5, 41)):
        x = torch.randn(shape)
        want = _stream(seed, offset, x.numel())
        assert torch.equal(torch.ops.bcos_kernels.lwta_uniform(x, seed, offset).flatten(), want)
    # a seeded call is the call with the uniforms that seed gives, as the reference computes it
    from bcos_kernels.ops.lwta import cpu

    # (50, 2, 7, 7): two tiles, the second starting inside a Philox call (element 41 * 98 = 4 * 1004 + 2)
    for shape, U in (((2, 8, 5, 3), 2), ((4, 12), 3), ((50, 2, 7, 7), 2)):
        x = torch.randn(shape)
        seed_t = torch.tensor([seed])
        out, _, _ = torch.ops.bcos_kernels.lwta(x, None, seed_t, competitors=U, temperature=0.7, backend="cpu")
        want = ref.lwta(x, U, temperature=0.7, noise=cpu.uniforms(x, seed_t))
        torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
        assert torch.equal(out != 0, want != 0)  # the same winners

"""LWTA, backend "triton", against the reference: given the same noise, the in-kernel noise, layouts, modes.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1): tiny shapes,
fp32. With a GPU they run on it, and the fp16/bf16 tests run too.
"""

import functools
import importlib
import math
import warnings

import pytest
import torch

pytest.importorskip("triton", reason="backend 'triton' needs the triton package")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from cases import LWTA_LAYOUTS, LWTA_MODES  # noqa: E402
from helpers import (  # noqa: E402
    assert_compiled_matches_eager_after_same_seed,
    assert_lwta_matches_reference_given_noise,
    assert_lwta_noise_grad_and_x_layouts,
    lwta_inputs,
    on_gpu,
    triton_module_marks,
)
from helpers import assert_lwta_output_matches as _assert_output_matches  # noqa: E402
from helpers import fwd_bwd as _fwd_bwd  # noqa: E402
from helpers import saved_bytes as _saved_bytes  # noqa: E402

from bcos_kernels import backends  # noqa: E402
from bcos_kernels.nn.lwta import LWTA  # noqa: E402
from bcos_kernels.ops.lwta import lwta  # noqa: E402
from bcos_kernels.ops.lwta import reference as ref  # noqa: E402
from bcos_kernels.ops.lwta import triton as kernels  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = triton_module_marks(DEVICE)
# the module itself: bcos_kernels.ops re-exports the function under the module's name
lwta_ops = importlib.import_module("bcos_kernels.ops.lwta")


_inputs = functools.partial(lwta_inputs, DEVICE)


def _triton(x, U, **kw):
    return lwta(x, U, backend="triton", **kw)


def _draw_seed():
    """The seed the front door draws next (it calls exactly this)."""
    return torch.randint(0, lwta_ops.SEED_HIGH, (1,), dtype=torch.int64, device=DEVICE)


# ---------------------------------------------------------------- given the same noise: the reference


@pytest.mark.parametrize("shape,U,layout", LWTA_LAYOUTS)
@pytest.mark.parametrize("mode", LWTA_MODES)
def test_matches_reference_given_noise(shape, U, layout, mode):
    x, u, gout = _inputs(shape, layout)
    assert_lwta_matches_reference_given_noise(_triton, x, u, gout, U, mode)


def test_non_contiguous_noise_and_grad_and_odd_layout():
    """Noise and grad_out in other layouts than x, and an x that is neither contiguous nor channels_last."""
    x, u, gout = _inputs((2, 8, 3, 4))
    assert_lwta_noise_grad_and_x_layouts(_triton, x, u, gout)
    sliced = torch.randn(2, 16, 3, 3, device=DEVICE)[:, ::2]
    torch.testing.assert_close(
        _triton(sliced, 2, noise=u[:, :, :, :3]), ref.lwta(sliced, 2, noise=u[:, :, :, :3]), rtol=2.4e-7, atol=0
    )


def test_straight_through_formula():
    """d x_i = m_i g_i + (1/T) p_i (v_i - sum_j p_j v_j), v = g x, with p from the reference's steps in fp64."""
    T, U = 0.6, 4
    x, u, gout = _inputs((2, 8, 3, 5))
    _, grad = _fwd_bwd(lambda t: _triton(t, U, temperature=T, noise=u), x, gout)
    blocks = lambda t: t.detach().double().unflatten(1, (t.shape[1] // U, U))  # noqa: E731
    p = ((blocks(x) + ref.gumbel(blocks(u))) / T).softmax(2)
    m = torch.nn.functional.one_hot(p.argmax(2), U).movedim(-1, 2).double()
    v = blocks(gout) * blocks(x)
    formula = m * blocks(gout) + p * (v - (p * v).sum(2, keepdim=True)) / T
    torch.testing.assert_close(grad.double(), formula.flatten(1, 2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("U", [2, 3, 4, 8])
def test_deterministic_keeps_the_argmax_and_routes_the_gradient(U):
    x, _, gout = _inputs((3, 4 * U, 2, 3))
    out, grad = _fwd_bwd(lambda t: _triton(t, U, deterministic=True), x, gout)
    blocks = x.detach().unflatten(1, (4, U))
    onehot = torch.nn.functional.one_hot(blocks.argmax(2), U).movedim(-1, 2).to(x.dtype).flatten(1, 2)
    assert torch.equal(out, x.detach() * onehot)
    assert torch.equal(grad, gout * onehot)


def test_ties_go_to_the_first_unit():
    x = torch.tensor([[1.0, 3.0, 3.0, 0.0, 2.0, 2.0]], device=DEVICE)
    assert torch.equal(_triton(x, 3, deterministic=True), ref.lwta(x, 3, deterministic=True))
    assert _triton(x, 3, deterministic=True).tolist() == [[0.0, 3.0, 0.0, 0.0, 2.0, 0.0]]


# ---------------------------------------------------------------- the in-kernel noise


def test_seeded_call_uses_exactly_the_uniforms_it_reports():
    """Forward and backward of a seeded call equal the explicit-noise call fed the seed's uniforms: the backward
    re-draws the forward's noise exactly; and that matches the reference given those uniforms."""
    for shape, U, layout in ((2, 8, 3, 5), 4, "nchw"), ((2, 12, 2, 3), 3, "nhwc"), ((3, 5, 16), 8, "rows"):
        x, _, gout = _inputs(shape, layout)
        torch.manual_seed(21)
        out_s, grad_s = _fwd_bwd(lambda t: _triton(t, U, temperature=0.8), x, gout)
        torch.manual_seed(21)
        u = kernels.draw_uniforms(_draw_seed(), shape, U)
        out_n, grad_n = _fwd_bwd(lambda t: _triton(t, U, temperature=0.8, noise=u), x, gout)
        assert torch.equal(out_s, out_n)
        assert torch.equal(grad_s, grad_n)
        out_r, grad_r = _fwd_bwd(lambda t: ref.lwta(t, U, temperature=0.8, noise=u), x, gout)
        _assert_output_matches(out_s, out_r, U, "train")
        torch.testing.assert_close(grad_s, grad_r, rtol=1e-5, atol=1e-6)


def test_noise_follows_the_logical_order_whatever_the_layout():
    x, _, gout = _inputs((2, 8, 3, 5))
    x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    results = []
    for t in (x, x_cl):
        torch.manual_seed(5)
        results.append(_fwd_bwd(lambda a: _triton(a, 4), t, gout))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_same_seed_reproduces_and_manual_seed_controls_it():
    x = torch.randn(4, 16, 3, 3, device=DEVICE)
    torch.manual_seed(7)
    a = _triton(x, 4)
    torch.manual_seed(7)
    b = _triton(x, 4)
    c = _triton(x, 4)  # the generator moved on: another seed
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    torch.manual_seed(8)
    assert not torch.equal(_triton(x, 4), a)
    # eval samples too (as the original); the temperature does not change the winner
    torch.manual_seed(7)
    assert torch.equal(_triton(x, 4, training=False), a)


@pytest.mark.parametrize("U", [4, 8])
def test_different_seeds_give_independent_uniforms(U):
    n = 1 << 14
    a = kernels.draw_uniforms(torch.tensor([1], device=DEVICE), (n // U, U), U).double()
    b = kernels.draw_uniforms(torch.tensor([2], device=DEVICE), (n // U, U), U).double()
    assert not torch.equal(a, b)
    corr = ((a - 0.5) * (b - 0.5)).mean() * 12  # ~ N(0, 1 / n) if independent
    assert abs(float(corr)) < 5.5 / math.sqrt(n)
    high = kernels.draw_uniforms(torch.tensor([(1 << 62) + 1], device=DEVICE), (n // U, U), U)
    assert not torch.equal(high, a.float())  # the high word of the seed is part of the key


@triton.jit
def _uniforms_at(seed_ptr, out_ptr, rand_ptr, base, BLOCKS: tl.constexpr):
    """kernels._block_uniforms (U = 4) of blocks base + [0, BLOCKS) (int64), and tl.rand4x of [0, BLOCKS) (int32),
    both as (BLOCKS, 4) row-major."""
    seed = tl.load(seed_ptr)
    block = tl.arange(0, BLOCKS)
    unit = tl.arange(0, 4)[None, :]
    u = kernels._block_uniforms(seed, base + block.to(tl.int64)[:, None], unit, 4)
    tl.store(out_ptr + block[:, None] * 4 + unit, u)
    r0, r1, r2, r3 = tl.rand4x(seed, block)
    tl.store(rand_ptr + block * 4, r0)
    tl.store(rand_ptr + block * 4 + 1, r1)
    tl.store(rand_ptr + block * 4 + 2, r2)
    tl.store(rand_ptr + block * 4 + 3, r3)


def test_uniforms_are_tl_rand4x_below_2_31_and_use_the_high_word_of_the_counter():
    seed = torch.tensor([12345], device=DEVICE)
    low, rand, high, rand2 = (torch.empty(256, 4, device=DEVICE) for _ in range(4))
    _uniforms_at[(1,)](seed, low, rand, 0, BLOCKS=256)
    _uniforms_at[(1,)](seed, high, rand2, 1 << 32, BLOCKS=256)
    assert torch.equal(low, rand)  # unit u of block b: output u of tl.rand4x(seed, b), for b below 2^31
    assert torch.equal(low, kernels.draw_uniforms(seed, (256, 4), 4))
    assert not torch.equal(high, low)  # counters 2^32 apart get different numbers
    # U = 8: two calls a block, counters 2b and 2b + 1
    u8 = kernels.draw_uniforms(seed, (128, 8), 8)
    assert torch.equal(u8.reshape(256, 4), rand)
    # U = 2 and 3: the first outputs of the block's call
    assert torch.equal(kernels.draw_uniforms(seed, (256, 2), 2), rand[:, :2])
    assert torch.equal(kernels.draw_uniforms(seed, (256, 3), 3), rand[:, :3])


@pytest.mark.parametrize("U", [2, 4, 8])
def test_uniforms_are_uniform(U):
    """Dvoretzky-Kiefer-Wolfowitz: sup |F_n - F| > eps has probability <= 2 exp(-2 n eps^2) (here 1e-6); serial
    correlation of neighbours (same Philox call, and across calls) ~ N(0, 1 / n)."""
    n = 1 << 15
    u = kernels.draw_uniforms(torch.tensor([99], device=DEVICE), (n // U, U), U).double().cpu().flatten()
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    s, _ = torch.sort(u)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    sup = torch.maximum(i / n - s, s - (i - 1) / n).max()
    assert float(sup) < math.sqrt(math.log(2 / 1e-6) / (2 * n))
    for lag in (1, 2, 3, 4, U):
        corr = ((u[lag:] - 0.5) * (u[:-lag] - 0.5)).mean() * 12
        assert abs(float(corr)) < 5.5 / math.sqrt(n), lag


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P(chi2_{k-1} >= statistic) of Pearson's goodness-of-fit test (upper regularised incomplete gamma)."""
    expected = probs.double() * counts.sum()
    stat = ((counts.double() - expected) ** 2 / expected).sum()
    return float(torch.special.gammaincc(torch.tensor((len(probs) - 1) / 2, dtype=torch.float64), stat / 2))


# one logit vector per block (no zeros: the winner is read off out != 0); the winner is distributed as
# softmax(logits), whatever T
LOGITS = {2: [0.6, -0.4], 3: [1.0, 0.2, -0.5], 4: [1.0, 0.2, -0.5, 0.7], 8: [0.5, -1.0, 0.1, 1.2, 0.3, -0.2, 0.8, -0.6]}
ALPHA = 1e-6  # false-alarm probability of each test for a correct sampler


@pytest.mark.parametrize("U", [2, 3, 4, 8])
@pytest.mark.parametrize("layout", ["rows", "nchw"])
def test_winner_frequencies_follow_softmax_of_x(U, layout):
    """Pearson chi-square against softmax(x) (accepted at level 1e-6) and against softmax(x / T) for T = 0.5
    (rejected): with Gumbel noise the argmax of (x + g) / T is the argmax of x + g. Also independence: two blocks
    with the same logits in one sample agree with probability sum p^2."""
    logits = torch.tensor(LOGITS[U])
    samples = 12000
    blocks = 2
    if layout == "rows":
        x = logits.repeat(samples, blocks)  # (samples, blocks * U)
    else:
        x = logits.repeat(blocks).reshape(1, blocks * U, 1, 1).repeat(samples // 4, 1, 2, 2)  # 4 pixels a sample
    x = x.to(DEVICE)
    probs = logits.softmax(0)
    for T, training in ((0.5, True), (1.67, False)):
        torch.manual_seed(100 + U)
        out = _triton(x, U, temperature=T, training=training)
        hard = (out != 0).unflatten(1, (blocks, U))  # (samples, blocks, U[, H, W])
        assert torch.equal(hard.sum(2), torch.ones_like(hard.sum(2)))  # one winner per block
        winners = hard.int().argmax(2).movedim(1, -1).reshape(-1, blocks).cpu()  # (samples * pixels, blocks)
        counts = torch.bincount(winners.flatten(), minlength=U)
        assert _chi2_pvalue(counts, probs) > ALPHA, (T, counts, probs)
        if T == 0.5:
            assert _chi2_pvalue(counts, (logits / T).softmax(0)) < ALPHA
        same = (winners[:, 0] == winners[:, 1]).sum()
        p_same = float((probs.double() ** 2).sum())
        m = winners.shape[0]
        z = float(torch.special.ndtri(torch.tensor(1 - ALPHA / 2, dtype=torch.float64)))
        assert abs(float(same) / m - p_same) < z * math.sqrt(p_same * (1 - p_same) / m)


# ---------------------------------------------------------------- memory, opcheck, compile, module


def test_saves_x_seed_and_uint8_winner_only():
    x, u, _ = _inputs((2, 8, 6, 6))
    assert _saved_bytes(lambda t: _triton(t, 4), x) == x.numel() * 4 + 8 + x.numel() // 4
    assert _saved_bytes(lambda t: _triton(t, 4, deterministic=True), x) == x.numel() // 4
    assert _saved_bytes(lambda t: _triton(t, 4, noise=u), x) == 2 * x.numel() * 4 + x.numel() // 4


@pytest.mark.parametrize("case", ["seed", "noise", "deterministic", "channels_last", "rows3d"])
def test_opcheck(case):
    shape = (2, 5, 8) if case == "rows3d" else (2, 8, 3, 3)
    x, u, _ = _inputs(shape, "nhwc" if case == "channels_last" else "nchw")
    seed = torch.tensor([3], device=DEVICE)
    noise = u if case == "noise" else None
    seed = None if case in ("noise", "deterministic") else seed
    options = dict(competitors=4, temperature=0.8, backend="triton")
    torch.library.opcheck(torch.ops.bcos_kernels.lwta.default, (x, noise, seed), options)
    _, winner, probs = torch.ops.bcos_kernels.lwta.default(x, noise, seed, **options)
    nhwc = case == "channels_last"
    grad = torch.randn(shape, device=DEVICE)
    torch.library.opcheck(
        torch.ops.bcos_kernels.lwta_backward.default,
        (grad, x.detach(), noise, seed, winner, probs),
        dict(options, nhwc=nhwc),
    )


def test_compile_keeps_the_seed_a_graph_value():
    """fullgraph compile: the same torch.manual_seed gives the eager result, and successive calls differ (the seed
    is drawn per call, not baked into the graph)."""
    torch._dynamo.reset()
    x, _, gout = _inputs((2, 8, 3, 5))
    m = LWTA(U=4, temp=0.8, backend="triton")
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    assert_compiled_matches_eager_after_same_seed(m, compiled, x, gout)
    assert not torch.equal(compiled(x.detach()), compiled(x.detach()))


def test_module_backend_triton_eval_temperature():
    x, _, gout = _inputs((2, 8, 3, 3))
    m = LWTA(U=4, temp=0.3, backend="triton").eval()
    torch.manual_seed(3)
    out, grad = _fwd_bwd(m, x, gout)
    torch.manual_seed(3)
    u = kernels.draw_uniforms(_draw_seed(), x.shape, 4)
    out_r, grad_r = _fwd_bwd(lambda t: ref.lwta(t, 4, temperature=0.3, training=False, noise=u), x, gout)
    _assert_output_matches(out, out_r, 4, "eval")
    torch.testing.assert_close(grad, grad_r, rtol=1e-5, atol=1e-6)
    assert torch.equal(LWTA(U=1, backend="triton")(x.detach()), torch.relu(x.detach()))


def test_empty_input():
    x = torch.randn(0, 8, device=DEVICE, requires_grad=True)
    out = _triton(x, 4)
    out.sum().backward()
    assert out.shape == (0, 8) and x.grad.shape == (0, 8)


# ---------------------------------------------------------------- GPU dtypes


@on_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "rows"])
def test_half_precision_against_fp64_reference(dtype, layout):
    """Output: x at the winner (exact); gradient error against fp64 at most 2x that of the torch backend in dtype."""
    shape = (4, 64, 8, 8) if layout != "rows" else (64, 256)
    x, u, gout = _inputs(shape, layout, dtype=dtype)
    out, grad = _fwd_bwd(lambda t: _triton(t, 4, noise=u), x, gout)
    out_t, grad_t = _fwd_bwd(lambda t: lwta(t, 4, noise=u, backend="torch"), x, gout)
    x64 = x.detach().double().requires_grad_()
    out_64, grad_64 = _fwd_bwd(lambda t: ref.lwta(t, 4, noise=u.double()), x64, gout.double())
    assert out.dtype == dtype and grad.dtype == dtype
    assert torch.equal(out != 0, out_64 != 0)
    assert torch.equal(out, x.detach() * (out != 0))
    err = (grad.double() - grad_64).abs().max()
    err_t = (grad_t.double() - grad_64).abs().max()
    assert err <= 2 * err_t + 1e-6, (err, err_t)


# ---------------------------------------------------------------- errors


def test_explicit_triton_raises_with_the_reason():
    with pytest.raises(ValueError, match="backend 'triton'.*float64"):
        lwta(torch.randn(2, 8, dtype=torch.float64, device=DEVICE), 2, backend="triton")
    if DEVICE.type == "cpu":
        with pytest.raises(ValueError, match="interpreter.*float32"):
            lwta(torch.randn(2, 8, dtype=torch.float16), 2, backend="triton")
    with pytest.raises(ValueError, match="competitors"):
        lwta(torch.randn(2, 9, device=DEVICE), 2, backend="triton")
    options = dict(competitors=2, temperature=1.0)
    with pytest.raises(ValueError, match="seed needs backend 'triton'"):
        torch.ops.bcos_kernels.lwta.default(torch.randn(2, 8), None, torch.tensor([1]), **options, backend="torch")
    with pytest.raises(ValueError, match="backend 'cuda' cannot run here"):
        torch.ops.bcos_kernels.lwta.default(torch.randn(2, 8), None, None, **options, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        torch.ops.bcos_kernels.lwta.default(torch.randn(2, 8), None, None, **options, backend="bogus")


def test_auto_falls_back_with_a_warning(monkeypatch):
    """ "auto" tries triton where AUTO_ORDER says so (GPU), and falls back, once-warned, for a call it cannot run."""
    monkeypatch.setitem(backends.AUTO_ORDER, DEVICE.type, ("triton",))
    monkeypatch.setattr(backends, "_warned", set())
    x = torch.randn(2, 8, dtype=torch.float64, device=DEVICE)
    with pytest.warns(RuntimeWarning, match="float64"):
        out = lwta(x, 2, deterministic=True, backend="auto")
    assert torch.equal(out, ref.lwta(x, 2, deterministic=True))
    xf = x.float()
    with warnings.catch_warnings():
        # our fallback warning is a RuntimeWarning; other categories (e.g. numpy deprecations raised inside
        # older Triton interpreters) are not ours to fail on
        warnings.simplefilter("error", RuntimeWarning)
        assert torch.equal(lwta(xf, 2, deterministic=True, backend="auto"), ref.lwta(xf, 2, deterministic=True))

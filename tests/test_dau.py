"""CoDA DAU convolution: references vs the real original code, the custom op, the module.

The real original (github moboehle/CoDA-Nets) is read at test time from a local git mirror
(``$BCOS_KERNELS_MIRRORS/moboehle+CoDA-Nets/repo``, see tests/originals.py) into a temporary directory;
where the mirror is absent (CI) the tests that need it are skipped. Everything else uses
``dau_conv2d_original`` (checked against the real code where the mirror exists) as the oracle.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers import one_intra_op_thread  # noqa: F401  (autouse fixture: pytest finds it here)

from bcos_kernels.nn.dau import DAUConv2d
from bcos_kernels.ops.dau_conv2d import cost_model, dau_conv2d, lowrank, materialised
from bcos_kernels.ops.dau_conv2d.reference import dau_conv2d_lowrank, dau_conv2d_original

F64 = torch.float64


# --------------------------------------------------------------------------------------------- the original


@pytest.fixture(scope="module")
def original(coda_original):
    """The original ``modules`` package of CoDA-Nets (tests/conftest.py)."""
    return coda_original


def make_original(original, c, o, r, k, stride, padding, norm, bias=True):
    norm_func = original["norms"].Squashing() if norm == "squash" else original["norms"].L2Norm(return_norm=True)
    dau = original["DAUs"].DAUWeights(c, o, r, norm_func, kernel_size=k, stride=stride, padding=padding, bias=bias)
    return original["coda_conv"].CoDAConv2d(dau)


# ------------------------------------------------------------------------------------------------- helpers


def make_params(c, o, r, k, bias=True, dtype=F64, seed=0):
    """Parameters initialised like the original (nn.Conv2d defaults), plus a positive input."""
    g = torch.Generator().manual_seed(seed)
    d = c * k * k
    a = (torch.rand(r, c, k, k, generator=g, dtype=dtype) * 2 - 1) / (c * k * k) ** 0.5
    e = (torch.rand(d * o, r, 1, 1, generator=g, dtype=dtype) * 2 - 1) / r**0.5
    b = (torch.rand(d * o, generator=g, dtype=dtype) * 2 - 1) / r**0.5 if bias else None
    return a, e, b


def grads_of(fn, inputs, kw, grad_out=None, seed=1):
    inputs = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
    out = fn(*inputs, **kw)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    live = [t for t in inputs if t is not None]
    grads = torch.autograd.grad(out, live, grad_out.to(out.dtype), allow_unused=True)
    return out, grads, grad_out


def assert_close_to(got, ref, dtype, what):
    """fp64: tight; fp32: atol = rtol = 1e-4 against the fp64 oracle (DESIGN.md section 4)."""
    tol = 1e-10 if dtype == F64 else 1e-4
    if ref is None:
        assert got is None or not got.any(), what
        return
    assert got is not None, what
    torch.testing.assert_close(got.double(), ref, atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


# Shapes: kernel sizes 1/3/5/7, strides 1-3, padding 0 and (k-1)/2, ranks 3 and 7, batch 1 and 2, odd sizes.
SWEEP = [(k, s, p) for k in (1, 3, 5, 7) for s in (1, 2, 3) for p in sorted({0, (k - 1) // 2})]


# ----------------------------------------------------------------------------------- reference vs original


@pytest.mark.parametrize("norm", ["squash", "l2"])
@pytest.mark.parametrize("detach", [False, True])
def test_reference_matches_real_original(original, norm, detach):
    for i, (k, s, p) in enumerate([(3, 1, None), (1, 1, 0), (5, 2, 0), (3, 3, 1), (7, 1, 3)]):
        c, o, r, n = 3, 4, (3, 7)[i % 2], 1 + i % 2
        torch.manual_seed(i)
        mod = make_original(original, c, o, r, k, s, p, norm, bias=i != 1).double()
        mod.explanation_mode(detach)
        x = torch.rand(n, c, 9, 7, dtype=F64, requires_grad=True)
        out = mod(x)
        g = torch.randn_like(out)
        params = list(mod.parameters())
        want = torch.autograd.grad(out, [x] + params, g, allow_unused=True)
        f = mod.weight_mod.weighting_f
        args = (x, f[0].weight, f[1].weight, f[1].bias)
        got_out, got, _ = grads_of(
            dau_conv2d_original, args, dict(kernel_size=k, stride=s, padding=p, norm=norm, detach=detach), g
        )
        torch.testing.assert_close(got_out, out, atol=1e-13, rtol=1e-13)
        for a, b in zip(got, want):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_state_dict_round_trip_with_original(original):
    torch.manual_seed(0)
    orig = make_original(original, 6, 16, 32, 3, 1, None, "squash").double()
    ours = DAUConv2d(6, 16, 32, kernel_size=3).double()
    assert (
        set(ours.state_dict())
        == set(orig.state_dict())
        == {"weight_mod.weighting_f.0.weight", "weight_mod.weighting_f.1.weight", "weight_mod.weighting_f.1.bias"}
    )
    for key, val in ours.state_dict().items():
        assert val.shape == orig.state_dict()[key].shape, key
    ours.load_state_dict(orig.state_dict())
    x = torch.rand(2, 6, 11, 9, dtype=F64)
    torch.testing.assert_close(ours(x), orig(x), atol=1e-12, rtol=1e-12)
    orig2 = make_original(original, 6, 16, 32, 3, 1, None, "squash").double()
    orig2.load_state_dict(ours.state_dict())
    torch.testing.assert_close(orig2(x), orig(x), atol=0, rtol=0)
    # from_original: configuration, parameters and explanation mode
    orig.explanation_mode(True)
    conv = DAUConv2d.from_original(orig)
    assert conv.detach and conv.norm == "squash" and conv.padding == 1
    torch.testing.assert_close(conv(x), orig(x), atol=1e-12, rtol=1e-12)
    l2 = make_original(original, 4, 3, 5, 1, 2, 0, "l2", bias=False)
    conv = DAUConv2d.from_original(l2)
    assert conv.norm == "l2" and conv.weight_mod.weighting_f[1].bias is None and conv.stride == 2
    x = torch.rand(1, 4, 7, 5)
    torch.testing.assert_close(conv(x), l2(x), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------- low-rank reference and op vs original


@pytest.mark.parametrize("norm", ["squash", "l2"])
@pytest.mark.parametrize("detach", [False, True], ids=["train", "detach"])
def test_lowrank_and_op_match_original(norm, detach):
    """Forward and every gradient vs the fp64 original: fp64 on the whole sweep, fp32 on every other case."""
    for i, (k, s, p) in enumerate(SWEEP):
        c, o, r, n = 2 + i % 3, 3 + i % 2, (3, 7)[i % 2], 1 + i % 2
        h, w = 2 * k + 3 + i % 2, 2 * k + 1 + 2 * (i % 3)  # odd (and some even) sizes
        a, e, b = make_params(c, o, r, k, bias=i % 5 != 4, seed=i)
        x = torch.rand(n, c, h, w, dtype=F64, generator=torch.Generator().manual_seed(100 + i))
        kw = dict(kernel_size=k, stride=s, padding=p, norm=norm, detach=detach)
        ref_out, ref_grads, g = grads_of(dau_conv2d_original, (x, a, e, b), kw)
        for dtype in (F64, torch.float32)[: 1 + i % 2]:
            cast = [t.to(dtype) if t is not None else None for t in (x, a, e, b)]
            for name, fn in (("lowrank", dau_conv2d_lowrank), ("op", dau_conv2d)):
                out, grads, _ = grads_of(fn, cast, kw, g)
                what = f"{name} {dtype} k={k} s={s} p={p} r={r} n={n} {h}x{w}"
                assert out.dtype == dtype and out.shape == ref_out.shape, what
                assert_close_to(out, ref_out, dtype, what + " out")
                for gname, got, want in zip(("x", "rank_weight", "expand_weight", "expand_bias"), grads, ref_grads):
                    assert_close_to(got, want, dtype, f"{what} d{gname}")


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_backend_reference_is_the_original_bit_for_bit(dtype):
    """backend="reference" runs exactly the original's formulas: the same output and gradients, to the bit."""
    for i, (k, s, p) in enumerate([(3, 1, None), (1, 2, 0), (5, 2, 2)]):
        a, e, b = make_params(3, 4, 5, k, bias=i != 1, dtype=dtype, seed=i)
        x = torch.rand(2, 3, 9, 8, dtype=dtype, generator=torch.Generator().manual_seed(i))
        for norm, detach in (("squash", False), ("l2", False), ("squash", True)):
            kw = dict(kernel_size=k, stride=s, padding=p, norm=norm, detach=detach)
            want_out, want, g = grads_of(dau_conv2d_original, (x, a, e, b), kw)
            got_out, got, _ = grads_of(dau_conv2d, (x, a, e, b), dict(kw, backend="reference"), g)
            assert torch.equal(got_out, want_out)
            for t, w in zip(got, want):
                assert (t is None) == (w is None) and (t is None or torch.equal(t, w))


def test_cifar_layer_shapes_fp32():
    """Two real CoDA-Net CIFAR-10 layers (batch 2), fp32 vs the fp64 oracle."""
    for c, o, r, k, s, hw in ((6, 16, 32, 3, 1, 16), (64, 10, 64, 1, 1, 8)):
        a, e, b = make_params(c, o, r, k)
        x = torch.rand(2, c, hw, hw, dtype=F64)
        for norm in ("squash", "l2"):
            kw = dict(kernel_size=k, stride=s, norm=norm)
            ref_out, ref_grads, g = grads_of(dau_conv2d_original, (x, a, e, b), kw)
            out, grads, _ = grads_of(dau_conv2d, [t.float() for t in (x, a, e, b)], kw, g)
            assert_close_to(out, ref_out, torch.float32, f"{norm} {c}->{o} out")
            for got, want in zip(grads, ref_grads):
                assert_close_to(got, want, torch.float32, f"{norm} {c}->{o} grad")


def test_batch_chunks_match(monkeypatch):
    """Eager runs the O*R-channel transients a chunk of the batch at a time: force one image per chunk."""
    # the backend module (the package's attribute `torch` is the library)
    torch_backend = importlib.import_module("bcos_kernels.ops.dau_conv2d.torch")

    a, e, b = make_params(3, 4, 5, 3)
    x = torch.rand(3, 3, 7, 9, dtype=F64)
    for norm, detach in (("squash", False), ("l2", False), ("squash", True)):
        kw = dict(kernel_size=3, stride=2, norm=norm, detach=detach)
        ref_out, ref_grads, g = grads_of(dau_conv2d_original, (x, a, e, b), kw)
        monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", 1)
        assert len(lowrank.batch_chunks(3, 100, torch_backend.CHUNK_ELEMENTS)) == 3
        out, grads, _ = grads_of(dau_conv2d, (x, a, e, b), kw, g)
        monkeypatch.undo()
        assert_close_to(out, ref_out, F64, "chunked out")
        for got, want in zip(grads, ref_grads):
            assert_close_to(got, want, F64, "chunked grad")


@pytest.mark.parametrize("norm", ["squash", "l2"])
def test_zero_input(norm):
    a, e, b = make_params(3, 4, 3, 3)
    x = torch.zeros(2, 3, 5, 5, dtype=F64)
    kw = dict(kernel_size=3, norm=norm)
    ref_out, ref_grads, g = grads_of(dau_conv2d_original, (x, a, e, b), kw)
    for fn in (dau_conv2d_lowrank, dau_conv2d):
        out, grads, _ = grads_of(fn, (x, a, e, b), kw, g)
        assert_close_to(out, ref_out, F64, "zero input out")
        for got, want in zip(grads, ref_grads):
            assert torch.isfinite(got).all()
            assert_close_to(got, want, F64, "zero input grad")
        # Without bias the dynamic weights are exactly 0 (the original divides by zero there):
        # we give 0 and finite gradients.
        for detach in (False, True):
            out, grads, _ = grads_of(fn, (x, a, e, None), dict(kw, detach=detach), g)
            assert (out == 0).all()
            assert all(t is None or torch.isfinite(t).all() for t in grads)


def test_explanation_mode_is_linear():
    """detach=True: out = W(x) x with W constant, so sum(x * d out_j / d x) == out_j."""
    a, e, b = make_params(3, 4, 5, 3)
    x = torch.rand(1, 3, 7, 7, dtype=F64, requires_grad=True)
    for norm in ("squash", "l2"):
        out = dau_conv2d(x, a, e, b, kernel_size=3, norm=norm, detach=True)
        for j in [(0, 1, 3, 3), (0, 3, 0, 6)]:
            (gx,) = torch.autograd.grad(out[j], x, retain_graph=True)
            torch.testing.assert_close((gx * x).sum(), out[j])


def test_channels_last_and_module_vs_original_reference():
    torch.manual_seed(0)
    m = DAUConv2d(5, 4, 7, kernel_size=3, stride=2).double()
    x = torch.rand(2, 5, 9, 11, dtype=F64)
    f = m.weight_mod.weighting_f
    want = dau_conv2d_original(x, f[0].weight, f[1].weight, f[1].bias, kernel_size=3, stride=2)
    torch.testing.assert_close(m(x), want)
    torch.testing.assert_close(m(x.contiguous(memory_format=torch.channels_last)), want)
    m.explanation_mode()
    assert m.detach
    xg = x.clone().requires_grad_(True)
    m(xg).sum().backward()
    assert xg.grad is not None and all(p.grad is None for p in m.parameters())


PLANS = cost_model.PLANS


def force_plan(monkeypatch, plan):
    monkeypatch.setattr(cost_model, "choose", lambda shape, needs_backward=True: plan)


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: f"{p.forward}-{p.backward}")
def test_materialised_chunks_and_empty_batch(plan, monkeypatch):
    """Each plan of backend "torch" with one image per chunk of its transients, and with an empty batch."""
    force_plan(monkeypatch, plan)
    monkeypatch.setattr(materialised, "CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(importlib.import_module("bcos_kernels.ops.dau_conv2d.torch"), "CHUNK_ELEMENTS", 1)
    for n, k, stride, padding in ((3, 3, 2, 1), (2, 1, 1, 0), (0, 3, 1, 1), (0, 1, 1, 0)):
        a, e, b = make_params(3, 4, 5, k)
        x = torch.rand(n, 3, 7, 9, dtype=F64)
        for norm, detach in (("squash", False), ("l2", False), ("squash", True)):
            kw = dict(kernel_size=k, stride=stride, padding=padding, norm=norm, detach=detach)
            if n == 0:  # the original cannot view an empty batch: the gradients of the parameters are 0
                out, grads, _ = grads_of(dau_conv2d, (x, a, e, b), kw, torch.zeros(0, 4, 7 // stride, 9 // stride))
                assert out.shape == (0, 4, 7 // stride, 9 // stride) and grads[0].shape == x.shape
                assert all(t is None or (t == 0).all() for t in grads[1:])
                continue
            ref_out, ref_grads, g = grads_of(dau_conv2d_original, (x, a, e, b), kw)
            out, grads, _ = grads_of(dau_conv2d, (x, a, e, b), kw, g)
            assert_close_to(out, ref_out, F64, f"{plan} n={n} k={k} out")
            for got, want in zip(grads, ref_grads):
                assert_close_to(got, want, F64, f"{plan} n={n} k={k} grad")


def test_cost_model_choices():
    """The plans of the CoDA-Net layers where the forms differ most (cost_model.py's fit), and what decides."""
    shape = cost_model.DauShape
    # ImageNet-100 L9 (64->100, rank 256 @20, batch 1): the Gram terms outweigh the weights
    assert cost_model.choose(shape(400, 576, 100, 256, True)) == cost_model.Plan("materialised", "materialised")
    # CIFAR-10 L9 (1x1 64->10, rank 64 @8, batch 8): R = 65 > D = 64
    assert cost_model.choose(shape(512, 64, 10, 64, True)) == cost_model.Plan("materialised", "materialised")
    # CIFAR-10 L2 and L7 (3x3 16->16 r32 @32, 64->64 r64 @8, batch 8): the long reductions of the low-rank conv
    assert cost_model.choose(shape(8192, 144, 16, 32, True)) == cost_model.Plan("lowrank", "lowrank")
    assert cost_model.choose(shape(512, 576, 64, 64, True)) == cost_model.Plan("lowrank", "lowrank")
    # inference: the forward alone decides, and no weights are kept
    plan = cost_model.choose(shape(400, 576, 100, 256, True), needs_backward=False)
    assert plan.forward == "materialised" and not plan.saves_weights
    assert cost_model.Plan("materialised", "materialised").saves_weights
    assert not cost_model.Plan("lowrank", "materialised").saves_weights


def test_front_door_plans_the_backward_only_when_needed(monkeypatch):
    seen = []
    monkeypatch.setattr(cost_model, "choose", lambda s, needs_backward=True: seen.append(needs_backward) or PLANS[0])
    a, e, b = make_params(3, 4, 5, 3)
    x = torch.rand(2, 3, 5, 5, dtype=F64)
    dau_conv2d(x, a, e, b, kernel_size=3)  # nothing requires grad
    dau_conv2d(x.requires_grad_(), a, e, b, kernel_size=3)
    with torch.no_grad():
        dau_conv2d(x, a, e, b, kernel_size=3)
    dau_conv2d(x.detach(), a.requires_grad_(), e, b, kernel_size=3, detach=True)  # explanation mode: x only
    assert seen == [False, True, False, False]


def test_plan_errors_and_kept_weights():
    """A form a backend lacks is refused by name; the op returns w only when both forms are materialised."""
    a, e, b = make_params(3, 4, 5, 3)
    x = torch.rand(2, 3, 5, 5, dtype=F64)
    opts = dict(kernel_size=3, stride=[1, 1], padding=[1, 1], norm="squash", detach=False)
    with pytest.raises(ValueError, match="backend 'triton' has no forward_form='materialised'"):
        torch.ops.bcos_kernels.dau_conv2d(x, a, e, b, **opts, backend="triton", forward_form="materialised")
    with pytest.raises(ValueError, match="backward_form='sparse'"):
        torch.ops.bcos_kernels.dau_conv2d(x, a, e, b, **opts, backend="torch", backward_form="sparse")
    for plan in PLANS:
        out, z, s, w = torch.ops.bcos_kernels.dau_conv2d(
            x, a, e, b, **opts, backend="torch", forward_form=plan.forward, backward_form=plan.backward
        )
        assert w.shape == ((2 * 25, 27 * 4) if plan.saves_weights else (0,)), plan


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("plan", PLANS, ids=lambda p: f"{p.forward}-{p.backward}")
def test_opcheck_every_plan(plan):
    a, e, b = make_params(3, 4, 5, 3)
    x = torch.rand(2, 3, 7, 6, dtype=F64).contiguous(memory_format=torch.channels_last)
    args = tuple(t.requires_grad_(True) for t in (x, a, e, b))
    opts = dict(kernel_size=3, stride=[2, 1], padding=[1, 0], norm="squash", detach=False, backend="torch")
    torch.library.opcheck(
        torch.ops.bcos_kernels.dau_conv2d.default,
        args,
        dict(opts, forward_form=plan.forward, backward_form=plan.backward),
    )


def saved_sizes(monkeypatch, plan):
    """(element counts of the tensors autograd keeps besides the inputs, pixels, (C, O, r, k)) of one call in
    ``plan``."""
    force_plan(monkeypatch, plan)
    c, o, r, k = 16, 8, 6, 3
    a, e, b = (t.float().requires_grad_(True) for t in make_params(c, o, r, k))
    x = torch.rand(2, c, 9, 9, requires_grad=True)
    inputs = {t.untyped_storage().data_ptr() for t in (x, a, e, b)}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in inputs:
            saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = dau_conv2d(x, a, e, b, kernel_size=k)
    return saved, out.shape[0] * out.shape[2] * out.shape[3], (c, o, r, k)


def test_kept_weights_are_no_more_than_the_originals(monkeypatch):
    """The one plan that keeps w keeps P*D*O elements (the original's per-pixel weights) and nothing larger."""
    saved, pixels, (c, o, r, k) = saved_sizes(monkeypatch, cost_model.Plan("materialised", "materialised"))
    assert max(saved) == pixels * c * k * k * o
    assert sum(saved) <= pixels * (c * k * k * o + r + 2 * o)


@pytest.mark.parametrize("plan", PLANS[:3], ids=lambda p: f"{p.forward}-{p.backward}")
def test_saves_no_per_pixel_weights(monkeypatch, plan):
    """Autograd keeps only small tensors (z: r channels; ||w||: O channels; the output) besides the inputs, in
    every plan but the one that keeps w (test above)."""
    assert not plan.saves_weights
    saved, pixels, (c, o, r, k) = saved_sizes(monkeypatch, plan)
    assert sum(saved) <= pixels * (r + 2 * o)
    assert max(saved) < pixels * o * (r + 1)  # not even the O*R-channel intermediate


# ----------------------------------------------------------------------------------- autograd and compile


@pytest.mark.parametrize("norm", ["squash", "l2"])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(norm, bias):
    a, e, b = make_params(2, 2, 3, 3, bias=bias)
    x = torch.rand(1, 2, 5, 4, dtype=F64)
    inputs = [t.clone().requires_grad_(True) for t in (x, a, e, b) if t is not None]

    def fn(*args):
        if not bias:
            args = (*args, None)
        return dau_conv2d(*args, kernel_size=3, stride=(1, 2), padding=1, norm=norm)

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def test_double_backward_raises():
    """The hand-written backward is once-differentiable (z, ||w|| and out are saved as constants): say so."""
    a, e, b = (t.requires_grad_(True) for t in make_params(2, 2, 3, 3))
    x = torch.rand(1, 2, 5, 4, dtype=F64, requires_grad=True)
    out = dau_conv2d(x, a, e, b, kernel_size=3)
    (gx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gx.sum().backward()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("case", ["fp64-bias-channels_last", "fp32-nobias-detach"])
def test_opcheck(case):
    dtype = F64 if "fp64" in case else torch.float32
    a, e, b = make_params(3, 4, 5, 3, bias="nobias" not in case, dtype=dtype)
    x = torch.rand(2, 3, 7, 6, dtype=dtype)
    if "channels_last" in case:
        x = x.contiguous(memory_format=torch.channels_last)
    args = [t.requires_grad_(True) if t is not None else None for t in (x, a, e, b)]
    torch.library.opcheck(
        torch.ops.bcos_kernels.dau_conv2d.default,
        tuple(args),
        dict(
            kernel_size=3,
            stride=[2, 1],
            padding=[1, 0],
            norm="squash" if dtype == F64 else "l2",
            detach="detach" in case,
            backend="torch",
        ),
    )


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # from inside torch.compile
def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()  # a fresh compile, not a dynamic-shape recompile of an earlier test's graph
    torch.manual_seed(0)
    m = DAUConv2d(4, 5, 3, kernel_size=3, stride=2).double()
    x = torch.rand(2, 4, 9, 7, dtype=F64, requires_grad=True)

    def run(mod):
        out = mod(x)
        grads = torch.autograd.grad(out.square().sum(), [x] + list(m.parameters()))
        return out, grads

    want = run(m)
    got = run(torch.compile(m, fullgraph=True))
    torch.testing.assert_close(got[0], want[0])
    for g1, g2 in zip(got[1], want[1]):
        torch.testing.assert_close(g1, g2)


def test_bfloat16_error_within_twice_reference_error():
    a, e, b = make_params(4, 3, 5, 3)
    x = torch.rand(2, 4, 8, 8, dtype=F64)
    kw = dict(kernel_size=3)
    exact = dau_conv2d_original(x, a, e, b, **kw)
    low = [t.bfloat16() for t in (x, a, e, b)]
    ref_err = (dau_conv2d_original(*low, **kw).double() - exact).abs().max()
    out = dau_conv2d(*low, **kw)
    assert out.dtype == torch.bfloat16
    assert (out.double() - exact).abs().max() <= 2 * ref_err


# --------------------------------------------------------------------------------------------- bad input


def _good():
    a, e, b = make_params(3, 4, 2, 3, dtype=torch.float32)
    return dict(x=torch.rand(1, 3, 6, 6), rank_weight=a, expand_weight=e, expand_bias=b, kernel_size=3)


BAD = [
    ("x", lambda k: k.update(x=torch.rand(3, 6, 6)), ValueError),
    ("x", lambda k: k.update(x=torch.ones(1, 3, 6, 6, dtype=torch.int64)), TypeError),
    ("x", lambda k: k.update(x=[[1.0]]), TypeError),
    ("rank_weight", lambda k: k.update(rank_weight=torch.rand(2, 4, 3, 3)), ValueError),
    ("rank_weight", lambda k: k.update(rank_weight=torch.rand(2, 3, 1, 1)), ValueError),
    ("rank_weight", lambda k: k.update(rank_weight=k["rank_weight"].double()), TypeError),
    ("rank_weight", lambda k: k.update(rank_weight=k["rank_weight"].to("meta")), ValueError),
    ("expand_weight", lambda k: k.update(expand_weight=torch.rand(27 * 4, 5, 1, 1)), ValueError),
    ("expand_weight", lambda k: k.update(expand_weight=torch.rand(27 * 4 + 1, 2, 1, 1)), ValueError),
    ("expand_weight", lambda k: k.update(expand_weight=torch.rand(27 * 4, 2)), ValueError),
    ("expand_bias", lambda k: k.update(expand_bias=torch.rand(7)), ValueError),
    ("expand_bias", lambda k: k.update(expand_bias=torch.ones(108, dtype=torch.int32)), TypeError),
    ("kernel_size", lambda k: k.update(kernel_size=0), ValueError),
    ("kernel_size", lambda k: k.update(kernel_size=1), ValueError),  # rank_weight is 3x3
    ("stride", lambda k: k.update(stride=0), ValueError),
    ("stride", lambda k: k.update(stride=(1, -2)), ValueError),
    ("padding", lambda k: k.update(padding=-1), ValueError),
    ("norm", lambda k: k.update(norm="l1"), ValueError),
    ("detach", lambda k: k.update(detach="yes"), TypeError),
    ("backend", lambda k: k.update(backend="nonsense"), ValueError),
    ("backend", lambda k: k.update(backend="cpu"), ValueError),  # no fused DAU backend exists yet
    ("height", lambda k: k.update(x=torch.rand(1, 3, 1, 6), padding=0), ValueError),
]


@pytest.mark.parametrize("name,mutate,exc", BAD, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD)])
def test_bad_input(name, mutate, exc):
    kw = _good()
    mutate(kw)
    x, a, e, b = (kw.pop(k) for k in ("x", "rank_weight", "expand_weight", "expand_bias"))
    with pytest.raises(exc, match=name):
        dau_conv2d(x, a, e, b, **kw)


def test_good_input_and_backends():
    kw = _good()
    x, a, e, b = (kw.pop(k) for k in ("x", "rank_weight", "expand_weight", "expand_bias"))
    want = dau_conv2d_original(x, a, e, b, **kw)
    for backend in (None, "torch", "auto"):
        torch.testing.assert_close(dau_conv2d(x, a, e, b, backend=backend, **kw), want)
    with pytest.raises(ValueError, match="norm"):
        DAUConv2d(3, 4, 2, norm="squashing")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # from inside torch.compile
def test_compile_dynamic_batch_sizes_one_graph():
    """dynamic=True: the front door's plan is not a guard on the batch size (compiled: the low-rank plan)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    m = DAUConv2d(4, 5, 3, kernel_size=3).double()
    compiled = torch.compile(m, dynamic=True, fullgraph=True)
    for n in (2, 3, 5):
        x = torch.rand(n, 4, 9, 7, dtype=F64, requires_grad=True)
        got, want = compiled(x), m(x)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(
            torch.autograd.grad(got.square().sum(), x)[0], torch.autograd.grad(want.square().sum(), x)[0]
        )
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1

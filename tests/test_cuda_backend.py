"""Backend "cuda" (the extension's CUDA kernels, csrc/cuda) of every op against the reference.

Two tiers:

* everywhere: the backend table, the errors for CPU tensors, and the layouts of the Python glue's outputs against
  the fake impls (the glue run on meta tensors: no GPU needed);
* with a GPU and an extension built with CUDA (``backends.device_reason("cuda", ...)`` is None): forward and every
  gradient against the reference (fp32 within 1e-4 of fp64 with TF32 off; bf16 by the 2x-reference-error rule),
  awkward shapes, layouts, LWTA's noise (explicit: the reference; seeded: reproducible), CSG determinism, opcheck
  of every custom op and torch.compile(fullgraph=True).  Elsewhere these are skipped with the reason.

The kernels' host-side launch logic (grid sizes, workspaces) is tested without a GPU by ctest
(csrc/tests/test_launch_geometry.cpp).
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from cases import LWTA_LAYOUTS, LWTA_MODES
from helpers import (
    CSG_OPCHECK_CASES,
    assert_lwta_matches_reference_given_noise,
    assert_lwta_noise_grad_and_x_layouts,
    conv_fused_args,
    fused_backward_args,
    linear_fused_args,
    opcheck_class_specific_gate,
)
from helpers import assert_lwta_output_matches as _assert_lwta_output_matches
from helpers import csg_inputs as _csg_inputs
from helpers import fwd_bwd as _fwd_bwd
from helpers import lwta_inputs as _lwta_inputs
from helpers import make_dau_case as _dau_case

import bcos_kernels
from bcos_kernels import backends
from bcos_kernels.nn.bcos import BcosConv2d
from bcos_kernels.nn.csg import ClassSpecificGate
from bcos_kernels.nn.dau import DAUConv2d
from bcos_kernels.nn.lwta import LWTA
from bcos_kernels.ops._layout import is_channels_last
from bcos_kernels.ops.bcos_conv2d import reference as bcos_ref
from bcos_kernels.ops.bcos_linear import reference as linear_ref
from bcos_kernels.ops.class_specific_gate import GateBackwardOptions
from bcos_kernels.ops.class_specific_gate import reference as csg_ref
from bcos_kernels.ops.dau_conv2d import DauOptions
from bcos_kernels.ops.dau_conv2d.reference import dau_conv2d_original
from bcos_kernels.ops.lwta import LwtaOptions
from bcos_kernels.ops.lwta import reference as lwta_ref

# the modules themselves: bcos_kernels.ops re-exports the functions under the modules' names
dau_cuda = importlib.import_module("bcos_kernels.ops.dau_conv2d.cuda")
lwta_ops = importlib.import_module("bcos_kernels.ops.lwta")
lwta_cuda = importlib.import_module("bcos_kernels.ops.lwta.cuda")
csg_cuda = importlib.import_module("bcos_kernels.ops.class_specific_gate.cuda")
bcos_conv_ops = importlib.import_module("bcos_kernels.ops.bcos_conv2d")
bcos_linear_ops = importlib.import_module("bcos_kernels.ops.bcos_linear")

F64 = torch.float64
TOL = 1e-4  # DESIGN.md section 4: fp32 vs the fp64 reference
if torch.cuda.is_available():
    DEVICE = torch.device("cuda")
    SKIP_REASON = backends.device_reason("cuda", DEVICE)
else:
    DEVICE = torch.device("cpu")
    SKIP_REASON = backends.device_reason("cuda", torch.device("cuda")) or "no CUDA device"
ON_GPU = SKIP_REASON is None


@pytest.fixture
def dev(monkeypatch):
    """The device of the backend "cuda" tests (skips without one); TF32 off for the 1e-4 fp32 contract."""
    if not ON_GPU:
        pytest.skip(f"backend cuda unavailable: {SKIP_REASON}")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    return DEVICE


def _grads(fn, inputs, grad_out=None, seed=1):
    """(out, gradients of every input that requires grad (None for the others), grad_out)."""
    out = fn(*inputs)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    live = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    # allow_unused: in explanation mode (detach) the parameters get no gradient
    got = iter(torch.autograd.grad(out, live, grad_out.to(out.device, out.dtype), allow_unused=True))
    grads = [next(got) if isinstance(t, torch.Tensor) and t.requires_grad else None for t in inputs]
    return out.detach(), grads, grad_out


def _leaf(t, device=None, dtype=None):
    if t is None:
        return None
    return t.detach().to(device or t.device, dtype or t.dtype).clone().requires_grad_(True)


def _compare_to_fp64(fn_cuda, fn_ref, inputs64, dev, what, tol=TOL, dtype=torch.float32):
    """fn_cuda on (inputs in dtype on dev) vs fn_ref on the fp64 inputs on the CPU: forward and every gradient."""
    ref_in = [_leaf(t) if isinstance(t, torch.Tensor) else t for t in inputs64]
    want_out, want_grads, g = _grads(fn_ref, ref_in)
    cuda_in = [_leaf(t, dev, dtype) if isinstance(t, torch.Tensor) else t for t in inputs64]
    out, grads, _ = _grads(fn_cuda, cuda_in, g)
    assert out.dtype == dtype and out.device.type == dev.type and out.shape == want_out.shape, what
    for i, (got, want) in enumerate(zip([out] + grads, [want_out] + want_grads)):
        if want is None:  # not an input, or a parameter in explanation mode
            assert got is None or not got.any(), f"{what}: input {i - 1} got a gradient"
            continue
        assert got is not None and got.dtype == dtype and got.shape == want.shape, f"{what}: {i}"
        got = got.double().cpu()
        assert torch.isfinite(got).all(), f"{what}: {i}"
        torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=lambda m: f"{what} ({i}): {m}")


def _half_errors(fn_cuda, fn_ref, inputs64, dev, dtype=torch.bfloat16):
    """Largest error against fp64 of fn_cuda and of fn_ref, both run in dtype on dev: per output and gradient."""
    ref_in = [_leaf(t) if isinstance(t, torch.Tensor) else t for t in inputs64]
    exact_out, exact_grads, g = _grads(fn_ref, ref_in)
    errors = []
    for fn in (fn_cuda, fn_ref):
        low = [_leaf(t, dev, dtype) if isinstance(t, torch.Tensor) else t for t in inputs64]
        out, grads, _ = _grads(fn, low, g)
        errors.append(
            [
                (got.double().cpu() - want).abs().max().item()
                for got, want in zip([out] + grads, [exact_out] + exact_grads)
                if want is not None
            ]
        )
    return errors


def _assert_within_twice_the_reference(errors, what):
    ours, theirs = errors
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a <= 2 * b + 1e-3, f"{what} ({i}): error {a} vs the reference's {b} in the same dtype"


# ---------------------------------------------------------------------------------------------------------------
# Everywhere: the table, the errors for CPU tensors, the glue's layouts against the fakes.
# ---------------------------------------------------------------------------------------------------------------
# The uncentered batch norm's and the detachable norms' fast paths are ATen ops (backend "torch"), the same on a
# GPU: they have no CUDA kernels.
ATEN_ONLY_OPS = {"batch_norm_uncentered", "detachable_norm"}
CUDA_OPS = sorted(set(backends.OPS) - ATEN_ONLY_OPS)


def test_every_op_lists_backend_cuda():
    for op, implemented in backends.OPS.items():
        assert ("cuda" in implemented) == (op not in ATEN_ONLY_OPS), op


def _front_door_calls():
    x = torch.randn(2, 4, 6, 6)
    return {
        "bcos_conv2d": lambda: bcos_kernels.bcos_conv2d(x, torch.randn(6, 4, 3, 3), backend="cuda"),
        "bcos_linear": lambda: bcos_kernels.bcos_linear(torch.randn(3, 4), torch.randn(5, 4), backend="cuda"),
        "dau_conv2d": lambda: bcos_kernels.dau_conv2d(
            x, torch.randn(3, 4, 3, 3), torch.randn(4 * 9 * 2, 3, 1, 1), kernel_size=3, backend="cuda"
        ),
        "lwta": lambda: bcos_kernels.lwta(x, 2, backend="cuda"),
        "class_specific_gate": lambda: bcos_kernels.class_specific_gate(
            x, torch.rand(4, 3), torch.tensor([0, 2]), backend="cuda"
        ),
    }


@pytest.mark.parametrize("op", CUDA_OPS)
def test_front_door_rejects_cpu_tensors_with_the_reason(op):
    with pytest.raises(
        ValueError,
        match=f"bcos_kernels.{op}: backend 'cuda' cannot run this call: "
        "backend 'cuda' needs CUDA tensors, got device cpu",
    ):
        _front_door_calls()[op]()


def test_custom_ops_reject_cpu_tensors():
    """Called directly (not through a front door) with backend "cuda" and CPU tensors: a ValueError naming the op
    and the reason, not torch's "no kernel" error from inside the glue."""
    x = torch.randn(2, 4, 5, 5)
    a, e = torch.randn(3, 4, 3, 3), torch.randn(4 * 9 * 2, 3, 1, 1)
    gout = torch.randn(2, 2, 5, 5)
    labels = torch.tensor([0, 1])
    dau_options = dict(kernel_size=3, stride=[1, 1], padding=[1, 1], norm="squash", backend="cuda")
    calls = {
        "dau_conv2d": lambda: torch.ops.bcos_kernels.dau_conv2d(x, a, e, None, detach=False, **dau_options),
        "dau_conv2d_backward": lambda: torch.ops.bcos_kernels.dau_conv2d_backward(
            gout,
            x,
            a,
            e,
            None,
            torch.randn(50, 3),
            torch.rand(50, 2),
            gout,
            torch.empty(0),
            detach=False,
            needs=[True, True, True, False],
            **dau_options,
        ),
        "lwta": lambda: torch.ops.bcos_kernels.lwta(x, None, None, competitors=2, temperature=1.0, backend="cuda"),
        "lwta_backward": lambda: torch.ops.bcos_kernels.lwta_backward(
            x,
            x,
            None,
            torch.tensor([1]),
            torch.zeros(2, 2, 5, 5, dtype=torch.uint8),
            torch.empty(0),
            competitors=2,
            temperature=1.0,
            nhwc=False,
            backend="cuda",
        ),
        "class_specific_gate": lambda: torch.ops.bcos_kernels.class_specific_gate(
            x, torch.rand(4, 2), labels, backend="cuda"
        ),
        "class_specific_gate_backward": lambda: torch.ops.bcos_kernels.class_specific_gate_backward(
            x, x, torch.rand(4, 2), labels, num_classes=2, nhwc=False, need_x=True, need_mask=True, backend="cuda"
        ),
    }
    for name, call in calls.items():
        op = name.removesuffix("_backward")
        with pytest.raises(
            ValueError, match=f"bcos_kernels.{op}: backend 'cuda' cannot run here: backend 'cuda' needs CUDA tensors"
        ):
            call()


def test_capability_reasons():
    """What backend "cuda" cannot run, besides the device: the DAU rank is bounded by the kernels' tiles."""
    limits = backends.OPS["dau_conv2d"]["cuda"].limits
    assert limits(rank=backends.DAU_CUDA_MAX_RANK) is None
    assert "rank 512" in limits(rank=backends.DAU_CUDA_MAX_RANK + 1)
    for op in ("dau_conv2d", "lwta", "class_specific_gate"):
        assert set(backends.OPS[op]["cuda"].dtypes) == {torch.float16, torch.bfloat16, torch.float32, torch.float64}


def test_lwta_seed_comes_from_the_cpu_generator():
    """Backend "cuda" draws its seed on the CPU generator (no device sync to read it): torch.manual_seed sets it."""
    x = torch.empty(2, 8, device="meta")  # draw_noise reads nothing of x
    torch.manual_seed(5)
    noise, a = lwta_cuda.draw_noise(x)
    torch.manual_seed(5)
    assert noise is None and a.device.type == "cpu" and a.dtype == torch.int64 and a.shape == (1,)
    assert torch.equal(a, torch.randint(0, lwta_ops.SEED_HIGH, (1,), dtype=torch.int64))
    assert not torch.equal(lwta_cuda.draw_noise(x)[1], a)


def _same_layout(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    assert a.stride() == b.stride(), (a.shape, a.stride(), b.stride())


LAYOUT_X = {
    "nchw": lambda: torch.empty(2, 8, 3, 5, device="meta"),
    "nhwc": lambda: torch.empty(2, 8, 3, 5, device="meta").contiguous(memory_format=torch.channels_last),
    "odd": lambda: torch.empty(2, 3, 8, 5, device="meta").transpose(1, 2),  # memory N, H, C, W
    "sliced": lambda: torch.empty(2, 16, 3, 5, device="meta")[:, ::2],
    "rows": lambda: torch.empty(6, 8, device="meta"),
    "rows3d": lambda: torch.empty(2, 3, 8, device="meta"),
}
# The glue of backend "cuda" run on meta tensors (the C++ ops' fakes, bcos_kernels/ops/_cpu_fake.py, are their meta
# kernels and stand in for the CUDA kernels) against the Python custom ops' fakes (what torch.ops.bcos_kernels.*
# return for meta tensors): the outputs have the strides the fakes promise, whatever the layouts of x and of the
# incoming gradient. (Meta rather than fake CUDA tensors: a CPU-only torch cannot copy_ fake CUDA tensors.)


@pytest.mark.parametrize("layout", sorted(LAYOUT_X))
def test_lwta_glue_layouts_match_the_fakes(layout):
    x = LAYOUT_X[layout]()
    opts = LwtaOptions(competitors=4, temperature=0.7, backend="cuda")
    nhwc = is_channels_last(x)
    for noise in (torch.empty(x.shape, device="meta"), None):
        out, winner = lwta_cuda.forward(x, noise, None, opts)
        fake_out, fake_winner, fake_probs = torch.ops.bcos_kernels.lwta(x, noise, None, **opts._asdict())
        _same_layout(out, fake_out)
        _same_layout(winner, fake_winner)
        assert fake_probs.numel() == 0  # backend "cuda" keeps no probabilities
        for g in (torch.empty(x.shape, device="meta"), torch.empty_like(x)):
            args = (g, x if noise is not None else None, noise, None, winner, fake_probs)
            _same_layout(
                lwta_cuda.backward(*args[:5], opts, nhwc=nhwc),
                torch.ops.bcos_kernels.lwta_backward(*args, **opts._asdict(), nhwc=nhwc),
            )


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "odd", "sliced", "rows"])
def test_csg_glue_layouts_match_the_fakes(layout):
    x = LAYOUT_X[layout]()
    mask = torch.empty(8, 3, device="meta")
    labels = torch.zeros(x.shape[0], dtype=torch.int64, device="meta")
    _same_layout(
        csg_cuda.forward(x, mask, labels), torch.ops.bcos_kernels.class_specific_gate(x, mask, labels, backend="cuda")
    )
    for g in (torch.empty(x.shape, device="meta"), torch.empty_like(x)):
        for need_x, need_mask in ((True, True), (True, False), (False, True)):
            args = (g, x, mask, labels)
            kw = dict(num_classes=3, nhwc=is_channels_last(x), need_x=need_x, need_mask=need_mask)
            for got, want in zip(
                csg_cuda.backward(*args, GateBackwardOptions(**kw, backend="cuda")),
                torch.ops.bcos_kernels.class_specific_gate_backward(*args, **kw, backend="cuda"),
            ):
                _same_layout(got, want)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("bias", [True, False])
def test_dau_glue_layouts_match_the_fakes(layout, bias):
    x = torch.empty(2, 3, 7, 6, device="meta")
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    a, e = torch.empty(4, 3, 3, 3, device="meta"), torch.empty(27 * 5, 4, 1, 1, device="meta")
    b = torch.empty(27 * 5, device="meta") if bias else None
    opts = DauOptions(kernel_size=3, stride=[2, 1], padding=[1, 0], norm="squash", detach=False, backend="cuda")
    got = dau_cuda.forward(x, a, e, b, opts)
    for norm in ("squash", "l2"):
        want = torch.ops.bcos_kernels.dau_conv2d(x, a, e, b, **opts._replace(norm=norm)._asdict())
        for t, w in zip(got, want):
            _same_layout(x.new_empty(0) if t is None else t, w)  # None: no per-pixel weights kept
    out, z, s, _ = got
    for g in (torch.empty_like(out), out.contiguous(memory_format=torch.channels_last)):
        for detach in (False, True):
            for needs in ([True, True, True, bias], [True, False, False, False], [False, True, True, bias]):
                grads = dau_cuda.backward(g, x, a, e, b, z, s, out, None, opts._replace(detach=detach), needs)
                want = torch.ops.bcos_kernels.dau_conv2d_backward(
                    g, x, a, e, b, z, s, out, x.new_empty(0), needs=needs, **opts._replace(detach=detach)._asdict()
                )
                for t, w in zip(grads, want):
                    _same_layout(x.new_empty(0) if t is None else t, w)


# ---------------------------------------------------------------------------------------------------------------
# B-cos conv2d and linear.
# ---------------------------------------------------------------------------------------------------------------
# in, out, k, stride, padding, dilation, groups, max_out, bias, N, H, W
CONV_SHAPES = [
    (3, 4, 3, 1, 1, 1, 1, 1, False, 2, 7, 9),
    (6, 8, 3, 2, 0, 1, 1, 2, False, 1, 9, 8),  # stride 2, padding 0, batch 1, MaxOut
    (8, 8, 1, 1, 0, 1, 1, 1, True, 3, 5, 5),  # 1x1, bias
    (8, 12, 3, 1, 1, 1, 4, 1, False, 2, 6, 7),  # groups
    (8, 8, 3, 2, 1, 1, 8, 1, True, 2, 7, 7),  # depthwise, stride 2
    (4, 6, 5, 1, 2, 1, 2, 3, False, 1, 5, 5),  # MaxOut 3 with groups
    (5, 3, (3, 1), (2, 1), (1, 0), 1, 1, 2, True, 2, 7, 5),  # non-square
    (4, 4, 3, 1, 2, 2, 2, 2, False, 2, 9, 8),  # dilation 2
    (3, 2, 1, 1, 1, 1, 1, 1, False, 1, 1, 1),  # 1x1 image, padding larger than kernel/2
    (16, 5, 3, 3, 1, 1, 1, 1, False, 1, 11, 13),  # stride 3, odd sizes
]


def _conv_case(shape, seed=0):
    cin, cout, k, s, p, d, g, m, bias, n, h, w = shape
    k = (k, k) if isinstance(k, int) else k
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=gen, dtype=F64)
    weight = torch.randn(cout * m, cin // g, *k, generator=gen, dtype=F64)
    bias_t = torch.randn(cout * m, generator=gen, dtype=F64) if bias else None
    return [x, weight, bias_t], dict(stride=s, padding=p, dilation=d, groups=g, max_out=m, normalize_weight=not bias)


def _with_b(b, inputs):
    """inputs + [b as a tensor] for a learnable b, else inputs + [None] (b passed as a number)."""
    return inputs + [torch.tensor(1.7, dtype=F64) if b == "tensor" else None]


def _bcos_fn(op, backend, b, layout="nchw", **kw):
    def fn(x, w, bias, b_t):
        if layout == "nhwc":
            x = x.contiguous(memory_format=torch.channels_last)
        return op(x, w, bias, b=b_t if b == "tensor" else b, backend=backend, **kw)

    return fn


@pytest.mark.parametrize("shape", CONV_SHAPES)
@pytest.mark.parametrize("b", [1, 1.5, 2, 2.5, "tensor"])
@pytest.mark.parametrize("detach", [False, True])
def test_bcos_conv2d_matches_reference(dev, shape, b, detach):
    inputs, kw = _conv_case(shape)
    kw.update(detach=detach, scale=0.37 if kw["max_out"] == 2 else 1.0)
    ref_fn = lambda x, w, bias, b_t: bcos_ref.bcos_conv2d(x, w, bias, b=b_t if b == "tensor" else b, **kw)  # noqa
    _compare_to_fp64(
        _bcos_fn(bcos_kernels.bcos_conv2d, "cuda", b, **kw),
        ref_fn,
        _with_b(b, inputs),
        dev,
        f"conv {shape} b={b} detach={detach}",
    )


@pytest.mark.parametrize("shape", [CONV_SHAPES[1], CONV_SHAPES[4], CONV_SHAPES[5]])
@pytest.mark.parametrize("b", [2, 2.5, "tensor"])
def test_bcos_conv2d_channels_last(dev, shape, b):
    inputs, kw = _conv_case(shape, seed=1)
    ref_fn = lambda x, w, bias, b_t: bcos_ref.bcos_conv2d(x, w, bias, b=b_t if b == "tensor" else b, **kw)  # noqa
    _compare_to_fp64(
        _bcos_fn(bcos_kernels.bcos_conv2d, "cuda", b, layout="nhwc", **kw),
        ref_fn,
        _with_b(b, inputs),
        dev,
        f"conv channels_last {shape} b={b}",
    )


LINEAR_SHAPES = [((5, 7), 4, 1, False), ((2, 3, 7), 5, 2, True), ((1, 16), 3, 3, False), ((2, 19, 24), 8, 1, True)]


@pytest.mark.parametrize("shape", LINEAR_SHAPES)
@pytest.mark.parametrize("b", [1, 2, 2.5, "tensor"])
@pytest.mark.parametrize("detach", [False, True])
def test_bcos_linear_matches_reference(dev, shape, b, detach):
    x_shape, out_features, m, bias = shape
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(*x_shape, generator=gen, dtype=F64)
    w = torch.randn(out_features * m, x_shape[-1], generator=gen, dtype=F64)
    bias_t = torch.randn(out_features * m, generator=gen, dtype=F64) if bias else None
    kw = dict(max_out=m, detach=detach, normalize_weight=not bias, scale=2.0 if m > 1 else 1.0)
    ref_fn = lambda x, w, bias, b_t: linear_ref.bcos_linear(x, w, bias, b=b_t if b == "tensor" else b, **kw)  # noqa
    _compare_to_fp64(
        _bcos_fn(bcos_kernels.bcos_linear, "cuda", b, **kw),
        ref_fn,
        _with_b(b, [x, w, bias_t]),
        dev,
        f"linear {shape} b={b} detach={detach}",
    )


@pytest.mark.parametrize("b", [2, 2.5])
def test_bcos_bf16_within_twice_the_reference_error(dev, b):
    inputs, kw = _conv_case((16, 16, 3, 1, 1, 1, 1, 2, False, 2, 9, 9))
    ref_fn = lambda x, w, bias, b_t: bcos_ref.bcos_conv2d(x, w, bias, b=b, **kw)  # noqa: E731
    _assert_within_twice_the_reference(
        _half_errors(_bcos_fn(bcos_kernels.bcos_conv2d, "cuda", b, **kw), ref_fn, _with_b(b, inputs), dev), "conv"
    )
    gen = torch.Generator().manual_seed(4)
    lin_in = [torch.randn(6, 5, 32, generator=gen, dtype=F64), torch.randn(16, 32, generator=gen, dtype=F64), None]
    lin_ref = lambda x, w, bias, b_t: linear_ref.bcos_linear(x, w, bias, b=b, max_out=2)  # noqa: E731
    _assert_within_twice_the_reference(
        _half_errors(_bcos_fn(bcos_kernels.bcos_linear, "cuda", b, max_out=2), lin_ref, _with_b(b, lin_in), dev),
        "linear",
    )


def _conv_backward_args(args):
    """The arguments of bcos_conv2d_fused_backward for the forward call with ``args``."""
    out, lin_max, norm, winner = bcos_conv_ops.bcos_conv2d_fused(
        *conv_fused_args(*args)[0], **conv_fused_args(*args)[1]
    )
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    bw = [torch.randn_like(out), detached[0], detached[1], detached[3], lin_max.detach(), norm, winner]
    return fused_backward_args(bw, detached[4:], [True, True, args[2] is not None, args[3] is not None])


def test_bcos_conv_backward_fake_layout_for_channels_last(dev):
    x = torch.randn(2, 4, 6, 5, device=dev).contiguous(memory_format=torch.channels_last)
    args = [
        x,
        torch.randn(6, 2, 3, 3, device=dev),
        None,
        None,
        2.0,
        [1, 1],
        [1, 1],
        [1, 1],
        2,
        3,
        True,
        1.0,
        False,
        "cuda",
    ]
    torch.library.opcheck(bcos_conv_ops.bcos_conv2d_fused_backward, *_conv_backward_args(args))


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_bcos_opcheck(dev, layout):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 6, 5, generator=gen).to(dev)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(6, 2, 3, 3, generator=gen).to(dev)
    bias = torch.randn(6, generator=gen).to(dev)
    bt = torch.tensor(1.9, device=dev)
    conv_cases = [
        (x, w, None, None, 2.0, [1, 1], [1, 1], [1, 1], 2, 3, True, 1.0, False),
        (x, w, bias, bt, float("nan"), [2, 1], [0, 1], [1, 2], 2, 1, False, 0.5, False),
        (x, w, None, None, 1.0, [1, 1], [1, 1], [1, 1], 2, 3, True, 1.0, True),
    ]
    for args in conv_cases:
        args = [a.clone().requires_grad_(True) if isinstance(a, torch.Tensor) else a for a in args] + ["cuda"]
        torch.library.opcheck(bcos_conv_ops.bcos_conv2d_fused, *conv_fused_args(*args))
        torch.library.opcheck(bcos_conv_ops.bcos_conv2d_fused_backward, *_conv_backward_args(args))
    xl = torch.randn(2, 3, 5, generator=gen).to(dev).requires_grad_(True)
    wl = torch.randn(8, 5, generator=gen).to(dev).requires_grad_(True)
    for args in [
        (xl, wl, None, None, 2.0, 2, True, 1.0, False, "cuda"),
        (xl, wl, None, bt.clone().requires_grad_(True), float("nan"), 1, False, 3.0, True, "cuda"),
    ]:
        torch.library.opcheck(bcos_linear_ops.bcos_linear_fused, *linear_fused_args(*args))


# ---------------------------------------------------------------------------------------------------------------
# DAU (CoDA).
# ---------------------------------------------------------------------------------------------------------------
# (c, o, r, k, n, h, w, bias, stride, padding): odd sizes, batch 1, stride 2 / 3 / asymmetric, padding 0, 1x1,
# rank 1 and a rank that is no power of two, with and without bias
DAU_CASES = [
    (3, 4, 5, 3, 2, 7, 6, True, 1, 1),
    (2, 3, 3, 3, 1, 8, 7, False, 2, 0),
    (4, 5, 7, 1, 2, 5, 5, True, 1, 0),
    (3, 3, 4, 5, 1, 9, 8, True, 2, 2),
    (3, 4, 6, 3, 2, 9, 8, True, (2, 1), (1, 0)),
    (2, 3, 1, 3, 1, 5, 6, False, 1, 1),
    (2, 6, 16, 7, 1, 9, 10, True, 3, 3),
]


def _dau_fn(backend, layout="nchw", **kw):
    def fn(x, a, e, b):
        if layout == "nhwc":
            x = x.contiguous(memory_format=torch.channels_last)
        return bcos_kernels.dau_conv2d(x, a, e, b, backend=backend, **kw)

    return fn


@pytest.mark.parametrize("case", DAU_CASES)
@pytest.mark.parametrize("norm", ["squash", "l2"])
@pytest.mark.parametrize("detach", [False, True])
def test_dau_matches_reference(dev, case, norm, detach):
    c, o, r, k, n, h, w, bias, stride, padding = case
    kw = dict(kernel_size=k, stride=stride, padding=padding, norm=norm, detach=detach)
    inputs = _dau_case(c, o, r, k, n, h, w, bias=bias, seed=hash(case) % 1000)
    _compare_to_fp64(
        _dau_fn("cuda", **kw),
        lambda *t: dau_conv2d_original(*t, **kw),
        inputs,
        dev,
        f"dau {case} {norm} detach={detach}",
    )


def test_dau_channels_last_and_fp64(dev):
    inputs = _dau_case(3, 4, 6, 3, 2, 9, 8, seed=4)
    kw = dict(kernel_size=3, stride=(2, 1), padding=(1, 0), norm="squash")
    ref = lambda *t: dau_conv2d_original(*t, **kw)  # noqa: E731
    _compare_to_fp64(_dau_fn("cuda", layout="nhwc", **kw), ref, inputs, dev, "channels_last")
    _compare_to_fp64(_dau_fn("cuda", **kw), ref, inputs, dev, "fp64", tol=1e-10, dtype=F64)


@pytest.mark.parametrize("norm", ["squash", "l2"])
def test_dau_zero_input_gives_zero_and_finite_gradients(dev, norm):
    x, a, e, _ = _dau_case(2, 3, 3, 3, 1, 5, 5, seed=5, zero_x=True)
    for detach in (False, True):
        out, grads, _ = _grads(
            _dau_fn("cuda", kernel_size=3, norm=norm, detach=detach),
            [_leaf(t, dev, torch.float32) for t in (x, a, e)] + [None],
        )
        assert not out.any()
        assert all(g is None or torch.isfinite(g).all() for g in grads)


def test_dau_chunks_of_the_batch_agree_with_one_chunk(dev, monkeypatch):
    """The O*R-channel transients are built a chunk of the batch at a time; one image a chunk gives the result of
    the whole batch at once (up to the order of the filter gradient's sum over chunks)."""
    inputs = [_leaf(t, dev, torch.float32) for t in _dau_case(3, 4, 5, 3, 3, 6, 7, seed=6)]
    fn = _dau_fn("cuda", kernel_size=3, stride=2, norm="squash")
    whole = _grads(fn, inputs)
    monkeypatch.setattr(dau_cuda, "CHUNK_ELEMENTS", 1)
    chunked = _grads(fn, inputs, whole[2])
    assert torch.equal(chunked[0], whole[0])
    for got, want in zip(chunked[1], whole[1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_dau_bf16_within_twice_the_reference_error(dev):
    for norm in ("squash", "l2"):
        kw = dict(kernel_size=3, norm=norm)
        inputs = _dau_case(8, 6, 8, 3, 2, 8, 8, seed=7)
        errors = _half_errors(_dau_fn("cuda", **kw), lambda *t: dau_conv2d_original(*t, **kw), inputs, dev)
        _assert_within_twice_the_reference(errors, f"dau bf16 {norm}")


def test_dau_opcheck(dev):
    x, a, e, b = (t.to(dev, torch.float32) for t in _dau_case(3, 4, 5, 3, 2, 6, 5, seed=8))
    for bias, norm, detach, layout in [
        (b, "squash", False, "nchw"),
        (None, "l2", False, "nhwc"),
        (b, "l2", True, "nchw"),
    ]:
        xx = x.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else x
        args = [xx, a, e, bias]
        options = dict(kernel_size=3, stride=[2, 1], padding=[1, 0], norm=norm, detach=detach, backend="cuda")
        leaves = [t.clone().requires_grad_(True) if isinstance(t, torch.Tensor) else t for t in args]
        torch.library.opcheck(torch.ops.bcos_kernels.dau_conv2d.default, tuple(leaves), options)
        out, z, s, w = torch.ops.bcos_kernels.dau_conv2d.default(*args, **options)
        for needs in ([True, True, True, bias is not None], [True, False, False, False], [False, True, True, False]):
            torch.library.opcheck(
                torch.ops.bcos_kernels.dau_conv2d_backward.default,
                (torch.randn_like(out), xx, a, e, bias, z, s, out, w),
                dict(options, needs=needs),
            )


# ---------------------------------------------------------------------------------------------------------------
# LWTA.
# ---------------------------------------------------------------------------------------------------------------


def _cuda_lwta(x, U, **kw):
    return bcos_kernels.lwta(x, U, backend="cuda", **kw)


@pytest.mark.parametrize("shape,U,layout", LWTA_LAYOUTS)
@pytest.mark.parametrize("mode", LWTA_MODES)
def test_lwta_matches_reference_given_noise(dev, shape, U, layout, mode):
    x, u, gout = _lwta_inputs(dev, shape, layout)
    assert_lwta_matches_reference_given_noise(_cuda_lwta, x, u, gout, U, mode)


def test_lwta_other_layouts_of_x_noise_and_grad(dev):
    x, u, gout = _lwta_inputs(dev, (2, 8, 3, 4))
    out, grad = assert_lwta_noise_grad_and_x_layouts(_cuda_lwta, x, u, gout)
    x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    out_c, grad_c = _fwd_bwd(lambda t: _cuda_lwta(t, 4, noise=u), x_cl, gout)  # NCHW grad for a channels_last x
    assert out_c.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out_c, out) and torch.equal(grad_c, grad)


def test_lwta_seeded_call_uses_exactly_the_uniforms_it_reports(dev):
    """Forward and backward of a seeded call equal the explicit-noise call fed the seed's uniforms (the backward
    re-draws the forward's noise exactly), and that matches the reference given those uniforms."""
    for shape, U, layout in (
        ((2, 8, 3, 5), 4, "nchw"),
        ((2, 12, 2, 3), 3, "nhwc"),
        ((3, 5, 16), 8, "rows"),
        ((2, 8, 3, 5), 2, "nhwc"),
    ):
        x, _, gout = _lwta_inputs(dev, shape, layout)
        torch.manual_seed(21)
        out_s, grad_s = _fwd_bwd(lambda t: _cuda_lwta(t, U, temperature=0.8), x, gout)
        torch.manual_seed(21)
        u = lwta_cuda.uniforms(x.detach(), lwta_cuda.draw_noise(x)[1])
        assert u.dtype == torch.float32 and u.shape == x.shape and 0 <= u.min() and u.max() < 1
        out_n, grad_n = _fwd_bwd(lambda t: _cuda_lwta(t, U, temperature=0.8, noise=u), x, gout)
        assert torch.equal(out_s, out_n) and torch.equal(grad_s, grad_n)
        out_r, grad_r = _fwd_bwd(lambda t: lwta_ref.lwta(t, U, temperature=0.8, noise=u), x, gout)
        _assert_lwta_output_matches(out_s, out_r, U, "train")
        torch.testing.assert_close(grad_s, grad_r, rtol=1e-5, atol=1e-6)


def test_lwta_same_seed_reproduces_and_manual_seed_controls_it(dev):
    x = torch.randn(4, 16, 3, 3, device=dev)
    torch.manual_seed(7)
    a = _cuda_lwta(x, 4)
    torch.manual_seed(7)
    assert torch.equal(_cuda_lwta(x, 4), a)
    assert not torch.equal(_cuda_lwta(x, 4), a)  # the generator moved on: another seed
    torch.manual_seed(8)
    assert not torch.equal(_cuda_lwta(x, 4), a)
    torch.manual_seed(7)
    assert torch.equal(_cuda_lwta(x, 4, training=False), a)  # eval samples too; T does not change the winner


def test_lwta_uniforms_are_uniform(dev):
    """Dvoretzky-Kiefer-Wolfowitz (false alarm 1e-6) and the serial correlation of neighbours ~ N(0, 1/n)."""
    n = 1 << 15
    u = lwta_cuda.uniforms(torch.empty(n // 8, 8, device=dev), torch.tensor([99])).double().cpu().flatten()
    s, _ = torch.sort(u)
    i = torch.arange(1, n + 1, dtype=F64)
    assert float(torch.maximum(i / n - s, s - (i - 1) / n).max()) < math.sqrt(math.log(2 / 1e-6) / (2 * n))
    for lag in (1, 2, 3, 4, 8):
        assert abs(float(((u[lag:] - 0.5) * (u[:-lag] - 0.5)).mean() * 12)) < 5.5 / math.sqrt(n), lag


def test_lwta_winner_frequencies_follow_softmax_of_x(dev):
    """With Gumbel noise the winner of a block is distributed as softmax(x) whatever T (Pearson chi-square,
    accepted at level 1e-6)."""
    logits = torch.tensor([1.0, 0.2, -0.5, 0.7])
    x = logits.repeat(6000, 2).to(dev)
    torch.manual_seed(3)
    out = _cuda_lwta(x, 4, temperature=0.5)
    winners = (out != 0).unflatten(1, (2, 4)).int().argmax(2).flatten().cpu()
    counts = torch.bincount(winners, minlength=4).double()
    expected = logits.softmax(0).double() * counts.sum()
    stat = ((counts - expected) ** 2 / expected).sum()
    assert float(torch.special.gammaincc(torch.tensor(1.5, dtype=F64), stat / 2)) > 1e-6, counts


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "rows"])
def test_lwta_bf16_within_twice_the_reference_error(dev, layout):
    shape = (4, 32, 6, 6) if layout != "rows" else (32, 64)
    x, u, gout = _lwta_inputs(dev, shape, layout, dtype=torch.bfloat16)
    out, grad = _fwd_bwd(lambda t: _cuda_lwta(t, 4, noise=u), x, gout)
    out_t, grad_t = _fwd_bwd(lambda t: lwta_ref.lwta(t, 4, noise=u), x, gout)
    x64 = x.detach().double().requires_grad_()
    out_64, grad_64 = _fwd_bwd(lambda t: lwta_ref.lwta(t, 4, noise=u.double()), x64, gout.double())
    assert out.dtype == torch.bfloat16 and grad.dtype == torch.bfloat16
    assert torch.equal(out != 0, out_64 != 0)
    assert torch.equal(out, x.detach() * (out != 0))
    err = (grad.double() - grad_64).abs().max()
    err_t = (grad_t.double() - grad_64).abs().max()
    assert err <= 2 * err_t + 1e-6, (err, err_t)


@pytest.mark.parametrize("case", ["seed", "noise", "deterministic", "channels_last", "rows3d"])
def test_lwta_opcheck(dev, case):
    shape = (2, 5, 8) if case == "rows3d" else (2, 8, 3, 3)
    x, u, _ = _lwta_inputs(dev, shape, "nhwc" if case == "channels_last" else "nchw")
    noise = u if case == "noise" else None
    seed = None if case in ("noise", "deterministic") else torch.tensor([3])
    options = dict(competitors=4, temperature=0.8, backend="cuda")
    torch.library.opcheck(torch.ops.bcos_kernels.lwta.default, (x, noise, seed), options)
    _, winner, probs = torch.ops.bcos_kernels.lwta.default(x, noise, seed, **options)
    stochastic = noise is not None or seed is not None
    torch.library.opcheck(
        torch.ops.bcos_kernels.lwta_backward.default,
        (torch.randn(shape, device=dev), x.detach() if stochastic else None, noise, seed, winner, probs),
        dict(options, nhwc=case == "channels_last"),
    )


def test_lwta_empty_input(dev):
    x = torch.randn(0, 8, device=dev, requires_grad=True)
    out = _cuda_lwta(x, 4)
    out.sum().backward()
    assert out.shape == (0, 8) and x.grad.shape == (0, 8)


# ---------------------------------------------------------------------------------------------------------------
# Class-specific gate.
# ---------------------------------------------------------------------------------------------------------------
def _csg_fwd_bwd(fn, x, mask, gout):
    out = fn(x, mask)
    return (out.detach(),) + torch.autograd.grad(out, (x, mask), gout)


# (shape, K, layout, labels): batch 1, one class, repeated and missing classes, every layout
CSG_CASES = [
    ((4, 8, 3, 5), 3, "nchw", None),
    ((4, 8, 3, 5), 3, "nhwc", None),
    ((3, 8, 3, 5), 3, "odd", None),
    ((1, 16, 2, 2), 6, "nchw", [4]),
    ((5, 7, 1, 3), 2, "nchw", None),
    ((6, 10), 4, "rows", [3, 3, 0, 3, 0, 3]),
    ((1, 3), 1, "rows", [0]),
    ((7, 6, 3, 3), 5, "nhwc", [2, 2, 2, 2, 2, 2, 2]),
]


@pytest.mark.parametrize("shape,K,layout,labels", CSG_CASES)
def test_csg_matches_reference(dev, shape, K, layout, labels):
    x, mask, labels, gout = _csg_inputs(dev, shape, K, layout=layout, labels=labels)
    out, gx, gm = _csg_fwd_bwd(
        lambda a, m: bcos_kernels.class_specific_gate(a, m, labels, backend="cuda"), x, mask, gout
    )
    out_r, gx_r, _ = _csg_fwd_bwd(lambda a, m: csg_ref.class_specific_gate(a, m, labels), x, mask, gout)
    assert out.stride() == torch.empty_like(x).stride()
    assert torch.equal(out, out_r) and torch.equal(gx, gx_r)  # one rounding of the same product
    x64, m64 = x.detach().double().requires_grad_(), mask.detach().double().requires_grad_()
    _, _, gm_64 = _csg_fwd_bwd(lambda a, m: csg_ref.class_specific_gate(a, m, labels), x64, m64, gout.double())
    torch.testing.assert_close(gm.double(), gm_64, rtol=1e-5, atol=1e-5)


def test_csg_is_deterministic_and_eval_is_identity(dev):
    """Many samples per class (the segmented sum over the label-sorted batch): bitwise the same every run."""
    x, mask, labels, gout = _csg_inputs(dev, (96, 32, 5, 5), 5, layout="nhwc")
    fn = lambda a, m: bcos_kernels.class_specific_gate(a, m, labels, backend="cuda")  # noqa: E731
    first = _csg_fwd_bwd(fn, x, mask, gout)
    for _ in range(3):
        for a, b in zip(_csg_fwd_bwd(fn, x, mask, gout), first):
            assert torch.equal(a, b)
    assert bcos_kernels.class_specific_gate(x, mask, None, training=False, backend="cuda") is x


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "rows"])
def test_csg_bf16_within_twice_the_reference_error(dev, layout):
    shape = (32, 64) if layout == "rows" else (16, 32, 5, 5)
    x, mask, labels, gout = _csg_inputs(dev, shape, 6, dtype=torch.bfloat16, layout=layout)
    out, gx, gm = _csg_fwd_bwd(
        lambda a, m: bcos_kernels.class_specific_gate(a, m, labels, backend="cuda"), x, mask, gout
    )
    out_t, gx_t, gm_t = _csg_fwd_bwd(
        lambda a, m: bcos_kernels.class_specific_gate(a, m, labels, backend="torch"), x, mask, gout
    )
    assert torch.equal(out, out_t) and torch.equal(gx, gx_t)
    x64, m64 = x.detach().double().requires_grad_(), mask.detach().double().requires_grad_()
    _, _, gm_64 = _csg_fwd_bwd(lambda a, m: csg_ref.class_specific_gate(a, m, labels), x64, m64, gout.double())
    x_low, m_low = x.detach().clone().requires_grad_(), mask.detach().clone().requires_grad_()
    _, _, gm_ref = _csg_fwd_bwd(lambda a, m: csg_ref.class_specific_gate(a, m, labels).to(a.dtype), x_low, m_low, gout)
    err = (gm.double() - gm_64).abs().max()
    err_ref = (gm_ref.double() - gm_64).abs().max()
    assert err <= 2 * err_ref + 1e-6, (err, err_ref)


@pytest.mark.parametrize("case", CSG_OPCHECK_CASES)
def test_csg_opcheck(dev, case):
    opcheck_class_specific_gate(dev, case, "cuda")


# ---------------------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): one graph per module, the same results as eager (aot_eager runs the traced graph
# without code generation, so it is bit for bit); inductor too on a GPU.
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compile_backends():
    return ["aot_eager", "inductor"] if ON_GPU else ["aot_eager"]


def _module_grads(module, x, *extra):
    out = module(x, *extra)
    if isinstance(out, tuple):
        out = out[0] + out[1]
    return (out.detach(),) + torch.autograd.grad(out.square().sum(), [x] + list(module.parameters()))


def _assert_same(got, want, exact):
    for a, b in zip(got, want):
        if exact:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # from inside torch.compile
@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")  # backends.device_reason
@pytest.mark.parametrize("compile_backend", _compile_backends())
def test_compile_fullgraph_matches_eager(dev, fresh_dynamo, compile_backend):
    exact = compile_backend == "aot_eager"
    torch.manual_seed(0)
    x = torch.rand(2, 8, 7, 6, device=dev, requires_grad=True)
    labels = torch.tensor([1, 0], device=dev)
    modules = [
        (BcosConv2d(8, 6, 3, padding=1, max_out=2, backend="cuda").to(dev), ()),
        (DAUConv2d(8, 4, 3, kernel_size=3, stride=2, backend="cuda").to(dev), ()),
        (LWTA(U=4, temp=0.8, deterministic=True, backend="cuda").to(dev), ()),
        (ClassSpecificGate(8, 3, backend="cuda").to(dev), (labels,)),
    ]
    for module, extra in modules:
        torch._dynamo.reset()
        want = _module_grads(module, x, *extra)
        got = _module_grads(torch.compile(module, fullgraph=True, backend=compile_backend), x, *extra)
        _assert_same(got, want, exact)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
@pytest.mark.parametrize("compile_backend", _compile_backends())
def test_compile_keeps_the_lwta_seed_a_graph_value(dev, fresh_dynamo, compile_backend):
    """The seed is drawn in the graph (torch.manual_seed gives the eager result with aot_eager) and per call: two
    calls of the compiled module differ."""
    x, _, gout = _lwta_inputs(dev, (2, 8, 3, 5))
    m = LWTA(U=4, temp=0.8, backend="cuda")
    compiled = torch.compile(m, fullgraph=True, backend=compile_backend)
    torch.manual_seed(11)
    out_e, grad_e = _fwd_bwd(m, x, gout)
    torch.manual_seed(11)
    out_c, grad_c = _fwd_bwd(compiled, x, gout)
    if compile_backend == "aot_eager":
        assert torch.equal(out_c, out_e) and torch.equal(grad_c, grad_e)
    assert not torch.equal(compiled(x.detach()), compiled(x.detach()))

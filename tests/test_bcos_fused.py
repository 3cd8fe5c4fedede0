"""Every fused B-cos backend available here against the reference: forward and every gradient
(x, weight, bias, learnable b), awkward shapes, explanation mode, dtypes, opcheck."""

import pytest
import torch
from helpers import assert_zero_output_and_finite_grads, conv_fused_args, fused_backward_args, linear_fused_args

import bcos_kernels
from bcos_kernels.ops.bcos_conv2d import reference as ref
from bcos_kernels.ops.bcos_linear import reference as linear_ref

# The fused backends that run on CPU tensors natively; "triton" (the interpreter here) has its own file,
# tests/test_bcos_triton.py, with cases small enough for the interpreter.
FUSED = [b for b in bcos_kernels.available_backends("cpu", op="bcos_conv2d") if b not in ("reference", "triton")]
if not FUSED:
    pytestmark = pytest.mark.skip(reason="no fused backend built here (pip install --no-build-isolation -e .)")

# in, out, k, stride, padding, dilation, groups, max_out, bias, N, H, W
CONV_SHAPES = [
    (3, 4, 3, 1, 1, 1, 1, 1, False, 2, 7, 9),
    (6, 8, 3, 2, 0, 1, 1, 2, False, 1, 9, 8),
    (8, 8, 1, 1, 0, 1, 1, 1, True, 3, 5, 5),  # 1x1
    (8, 12, 3, 1, 1, 1, 4, 1, False, 2, 6, 7),  # groups
    (8, 8, 3, 2, 1, 1, 8, 1, True, 2, 7, 7),  # depthwise, stride 2
    (4, 6, 5, 1, 2, 1, 2, 3, False, 1, 5, 5),  # MaxOut 3 with groups
    (5, 3, (3, 1), (2, 1), (1, 0), 1, 1, 2, True, 2, 7, 5),  # non-square
    (4, 4, 3, 1, 2, 2, 2, 2, False, 2, 9, 8),  # dilation 2 with MaxOut (the original breaks here)
    (3, 2, 1, 1, 1, 1, 1, 1, False, 1, 1, 1),  # 1x1 image, padding larger than kernel/2
    (16, 5, 3, 3, 1, 1, 1, 1, False, 1, 11, 13),  # stride 3, odd sizes
]
B_VALUES = [1, 1.5, 2, 2.5, "tensor"]


def _b(b, dtype):
    if b == "tensor":
        return torch.tensor(1.7, dtype=dtype, requires_grad=True)
    return b


def _run(fn, inputs, b, seed=3):
    """Output and gradients w.r.t. every tensor input that requires grad (and b when it is a tensor)."""
    out = fn(*inputs, b=b)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    wrt = [t for t in inputs if t is not None and t.requires_grad] + ([b] if isinstance(b, torch.Tensor) else [])
    return out, torch.autograd.grad(out, wrt, g)


def _conv_inputs(shape, dtype, channels_last=False):
    cin, cout, k, s, p, d, g, m, bias, n, h, w = shape
    k = (k, k) if isinstance(k, int) else k
    x = torch.randn(n, cin, h, w, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(cout * m, cin // g, *k, dtype=dtype)
    bias_t = torch.randn(cout * m, dtype=dtype) if bias else None
    kwargs = dict(stride=s, padding=p, dilation=d, groups=g, max_out=m)
    return [t.requires_grad_(True) if t is not None else None for t in (x, weight, bias_t)], kwargs


def _compare(backend, fn_fused, fn_ref, inputs, b, dtype, tol):
    b_fused = _b(b, dtype)
    b_ref = b_fused.detach().clone().requires_grad_(True) if isinstance(b_fused, torch.Tensor) else b_fused
    out, grads = _run(fn_fused, inputs, b_fused)
    out_r, grads_r = _run(fn_ref, inputs, b_ref)
    torch.testing.assert_close(out, out_r, atol=tol, rtol=tol)
    assert len(grads) == len(grads_r)
    for got, want in zip(grads, grads_r):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def over_options(shapes):
    """backend x shapes x b x explanation mode x dtype (with its tolerance)."""

    def parametrize(test):
        for name, values in (
            ("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)]),
            ("detach", [False, True]),
            ("b", B_VALUES),
            ("shape", shapes),
            ("backend", FUSED),
        ):
            test = pytest.mark.parametrize(name, values)(test)
        return test

    return parametrize


@over_options(CONV_SHAPES)
def test_conv_matches_reference(backend, shape, b, detach, dtype, tol):
    inputs, kw = _conv_inputs(shape, dtype)
    scale = 0.37 if shape[7] == 2 else 1.0  # v1's divisor on some cases
    common = dict(scale=scale, detach=detach, normalize_weight=not shape[8], **kw)
    _compare(
        backend,
        lambda x, w, bias, b: bcos_kernels.bcos_conv2d(x, w, bias, b=b, backend=backend, **common),
        lambda x, w, bias, b: ref.bcos_conv2d(x, w, bias, b=b, **common),
        inputs,
        b,
        dtype,
        tol,
    )


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("b", [2, 2.5, "tensor"])
def test_conv_channels_last(backend, b):
    inputs, kw = _conv_inputs(CONV_SHAPES[5], torch.float64, channels_last=True)
    _compare(
        backend,
        lambda x, w, bias, b: bcos_kernels.bcos_conv2d(x, w, bias, b=b, backend=backend, **kw),
        lambda x, w, bias, b: ref.bcos_conv2d(x, w, bias, b=b, **kw),
        inputs,
        b,
        torch.float64,
        1e-10,
    )


LINEAR_SHAPES = [((5, 7), 4, 1, False), ((2, 3, 7), 5, 2, True), ((1, 16), 3, 3, False), ((2, 197, 24), 8, 1, True)]


@over_options(LINEAR_SHAPES)
def test_linear_matches_reference(backend, shape, b, detach, dtype, tol):
    x_shape, out_features, m, bias = shape
    x = torch.randn(*x_shape, dtype=dtype, requires_grad=True)
    w = torch.randn(out_features * m, x_shape[-1], dtype=dtype, requires_grad=True)
    bias_t = torch.randn(out_features * m, dtype=dtype, requires_grad=True) if bias else None
    common = dict(max_out=m, detach=detach, normalize_weight=not bias, scale=2.0 if m > 1 else 1.0)
    _compare(
        backend,
        lambda x, w, bias, b: bcos_kernels.bcos_linear(x, w, bias, b=b, backend=backend, **common),
        lambda x, w, bias, b: linear_ref.bcos_linear(x, w, bias, b=b, **common),
        [x, w, bias_t],
        b,
        dtype,
        tol,
    )


@pytest.mark.parametrize("backend", FUSED)
def test_zero_inputs_give_zero_output_and_finite_grads(backend):
    for fn, x, w in [
        (
            lambda x, w, b: bcos_kernels.bcos_conv2d(x, w, b=b, padding=1, backend=backend),
            torch.zeros(2, 3, 5, 5),
            torch.randn(4, 3, 3, 3),
        ),
        (lambda x, w, b: bcos_kernels.bcos_linear(x, w, b=b, backend=backend), torch.zeros(3, 6), torch.randn(4, 6)),
    ]:
        for b in (1.5, 2, 3, torch.tensor(2.2, requires_grad=True)):
            assert_zero_output_and_finite_grads(fn, x.clone().requires_grad_(True), w.clone().requires_grad_(True), b)


@pytest.mark.parametrize("backend", FUSED)
def test_gradcheck_fp64(backend):
    x = torch.randn(1, 4, 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(1.8, dtype=torch.float64, requires_grad=True)
    for bb in (2.0, 2.6, b):
        torch.autograd.gradcheck(
            lambda x, w, bias: bcos_kernels.bcos_conv2d(
                x, w, bias, b=bb, padding=1, stride=(2, 1), groups=2, max_out=3, backend=backend
            ),
            (x, w, bias),
        )
    torch.autograd.gradcheck(
        lambda x, w, b: bcos_kernels.bcos_conv2d(
            x, w, b=b, padding=1, groups=2, max_out=3, normalize_weight=False, backend=backend
        ),
        (x, w, b),
    )
    xl = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    wl = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(
        lambda x, w, b: bcos_kernels.bcos_linear(x, w, b=b, max_out=2, backend=backend), (xl, wl, b)
    )


def _bf16_error(fn_fp64, fn, inputs):
    exact = fn_fp64(*[t.double() for t in inputs])
    return (fn(*[t.bfloat16() for t in inputs]).double() - exact).abs().max().item()


@pytest.mark.parametrize("backend", [b for b in FUSED if b == "cpu"])
@pytest.mark.parametrize("b", [2, 2.5])
def test_bf16_within_twice_the_reference_error(backend, b):
    """Numerics contract: error vs fp64 at most 2x the reference's own error in bf16 (forward and grad x)."""
    x = torch.randn(2, 16, 9, 9)
    w = torch.randn(16, 16, 3, 3)

    def layer(be):
        return lambda x, w: bcos_kernels.bcos_conv2d(x, w, b=b, padding=1, max_out=2, backend=be)

    def grad_x(be):
        def f(x, w):
            x = x.detach().requires_grad_(True)
            out = layer(be)(x, w)
            return torch.autograd.grad(out, x, torch.ones_like(out))[0]

        return f

    for make in (layer, grad_x):
        ours = _bf16_error(make("reference"), make(backend), [x, w])
        theirs = _bf16_error(make("reference"), make("reference"), [x, w])
        assert ours <= 2 * theirs + 1e-3, (make.__name__, ours, theirs)


def _opcheck_conv_tensors(channels_last):
    """fp64 (x, weight, bias, b) for the opchecks of the conv ops."""
    x = torch.randn(2, 4, 6, 5, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64)
    bias = torch.randn(6, dtype=torch.float64)
    b = torch.tensor(1.9, dtype=torch.float64)
    return x, w, bias, b


@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck_conv(channels_last):
    if "cpu" not in FUSED:
        pytest.skip("cpu extension not built")
    from bcos_kernels.ops.bcos_conv2d import bcos_conv2d_fused

    x, w, bias, b = _opcheck_conv_tensors(channels_last)
    cases = [
        (x, w, None, None, 2.0, [1, 1], [1, 1], [1, 1], 2, 3, True, 1.0, False, "cpu"),
        (x, w, bias, b, float("nan"), [2, 1], [0, 1], [1, 2], 2, 1, False, 0.5, False, "cpu"),
        (x, w, None, None, 1.0, [1, 1], [1, 1], [1, 1], 2, 3, True, 1.0, True, "cpu"),
    ]
    for args in cases:
        args = [a.clone().requires_grad_(True) if isinstance(a, torch.Tensor) else a for a in args]
        torch.library.opcheck(bcos_conv2d_fused, *conv_fused_args(*args))


def test_opcheck_linear():
    if "cpu" not in FUSED:
        pytest.skip("cpu extension not built")
    from bcos_kernels.ops.bcos_linear import bcos_linear_fused

    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(1.9, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(bcos_linear_fused, *linear_fused_args(x, w, None, None, 2.0, 2, True, 1.0, False, "cpu"))
    torch.library.opcheck(
        bcos_linear_fused, *linear_fused_args(x, w, None, b, float("nan"), 1, False, 3.0, True, "cpu")
    )


@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck_conv_backward(channels_last):
    """The backward op's fake impl promises grad x in x's layout (channels_last stays channels_last)."""
    if "cpu" not in FUSED:
        pytest.skip("cpu extension not built")
    from bcos_kernels.ops.bcos_conv2d import bcos_conv2d_fused, bcos_conv2d_fused_backward

    x, w, _, b = _opcheck_conv_tensors(channels_last)
    options = [float("nan"), [1, 1], [1, 1], [1, 1], 2, 3, True, 1.0, False, "cpu"]
    args, kwargs = conv_fused_args(x, w, None, b, *options)
    out, lin_max, norm, winner = bcos_conv2d_fused(*args, **kwargs)
    torch.library.opcheck(
        bcos_conv2d_fused_backward,
        *fused_backward_args(
            (torch.randn_like(out), x, w, b, lin_max, norm, winner), options, [True, True, False, True]
        ),
    )

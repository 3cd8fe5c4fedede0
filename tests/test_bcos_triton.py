"""Backend "triton" of the B-cos conv2d and linear ops against the reference: forward and every gradient.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1): tiny shapes,
fp32, compared with the reference run in fp64. With a GPU the same cases run on it (TF32 off), plus real layer
shapes and the bf16 numerics contract.
"""

import pytest
import torch
from helpers import assert_zero_output_and_finite_grads, conv_fused_args, fused_backward_args, linear_fused_args
from test_bcos_fused import CONV_SHAPES, LINEAR_SHAPES

import bcos_kernels
from bcos_kernels import backends
from bcos_kernels.ops.bcos_conv2d import reference as ref
from bcos_kernels.ops.bcos_linear import reference as linear_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if backends.device_reason("triton", torch.device(DEVICE)) is not None:
    pytestmark = pytest.mark.skip(reason=backends.device_reason("triton", torch.device(DEVICE)))
ON_GPU = DEVICE == "cuda"
TOL = 1e-4
gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a GPU (the interpreter runs tiny fp32 cases only)")


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 means fp32 here: the reference and the kernels follow torch's TF32 switches."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _grads(out, wrt, seed=3):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.autograd.grad(out, wrt, g.to(out.device, out.dtype))


def _check(fused, reference, tensors, b, tol=TOL):
    """Run ``fused`` on fp32 copies of ``tensors`` (on DEVICE) and ``reference`` on fp64 copies; compare the
    output and the gradient of every tensor (and of b when it is a tensor)."""
    if isinstance(b, torch.Tensor):
        b_value = float(b)
        make_b = lambda dtype, device: torch.tensor(b_value, dtype=dtype, device=device, requires_grad=True)  # noqa
    else:
        make_b = lambda dtype, device: b  # noqa
    results = []
    for fn, dtype, device in ((fused, torch.float32, DEVICE), (reference, torch.float64, "cpu")):
        ts = [t.detach().to(device, dtype).requires_grad_(True) if t is not None else None for t in tensors]
        bb = make_b(dtype, device)
        out = fn(*ts, b=bb)
        wrt = [t for t in ts if t is not None] + ([bb] if isinstance(bb, torch.Tensor) else [])
        results.append([out] + list(_grads(out, wrt)))
    got, want = results
    assert len(got) == len(want)
    names = ["out", "x", "weight", "bias", "b"]
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(
            g.detach().cpu().double(),
            w.detach(),
            atol=tol,
            rtol=tol,
            msg=lambda m: f"{names[i] if i < 3 else 'bias/b'}: {m}",
        )


def _conv_tensors(shape, channels_last=False):
    cin, cout, k, s, p, d, g, m, bias, n, h, w = shape
    k = (k, k) if isinstance(k, int) else k
    x = torch.randn(n, cin, h, w, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(cout * m, cin // g, *k, dtype=torch.float64)
    bias_t = torch.randn(cout * m, dtype=torch.float64) if bias else None
    return [x, weight, bias_t], dict(stride=s, padding=p, dilation=d, groups=g, max_out=m)


B_VALUES = [1, 1.5, 2, 2.5, torch.tensor(1.7)]
# Every shape with every b (not detached), and explanation mode with b = 2 and a learnable b.
CONV_CASES = [(s, b, False) for s in CONV_SHAPES for b in B_VALUES] + [
    (s, b, True) for s in CONV_SHAPES for b in (2, B_VALUES[-1])
]


def _case_id(case):
    shape, b, detach = case
    b_name = "tensor" if isinstance(b, torch.Tensor) else b
    return f"{'x'.join(map(str, shape[:8]))}-b{b_name}{'-detach' if detach else ''}"


@pytest.mark.parametrize("case", CONV_CASES, ids=_case_id)
def test_conv_matches_reference(case):
    shape, b, detach = case
    tensors, kw = _conv_tensors(shape)
    # v1's divisor and unnormalised (B-cosification) weights on some shapes
    opts = dict(scale=0.37 if shape[7] == 2 else 1.0, detach=detach, normalize_weight=not shape[8], **kw)
    _check(
        lambda x, w, bias, b: bcos_kernels.bcos_conv2d(x, w, bias, b=b, backend="triton", **opts),
        lambda x, w, bias, b: ref.bcos_conv2d(x, w, bias, b=b, **opts),
        tensors,
        b,
    )


@pytest.mark.parametrize("b", [2, B_VALUES[-1]], ids=["b2", "btensor"])
def test_conv_channels_last_input(b):
    tensors, kw = _conv_tensors(CONV_SHAPES[5], channels_last=True)
    _check(
        lambda x, w, bias, b: bcos_kernels.bcos_conv2d(x, w, bias, b=b, backend="triton", **kw),
        lambda x, w, bias, b: ref.bcos_conv2d(x, w, bias, b=b, **kw),
        tensors,
        b,
    )


# Wide enough (channels and filters per group >= the interpreter's 16-wide K tiles) for the tap-by-tap loops
# of all three GEMM kernels, with partial channel tiles: (in, out, k, stride, padding, dilation, groups, max_out,
# bias, N, H, W).
WIDE_SHAPES = [(20, 18, 3, 2, 1, 1, 1, 2, False, 2, 7, 6), (34, 34, 3, 1, 1, 1, 2, 1, True, 1, 5, 6)]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", WIDE_SHAPES, ids=str)
def test_conv_wide_layers(shape, channels_last):
    tensors, kw = _conv_tensors(shape, channels_last=channels_last)
    _check(
        lambda x, w, bias, b: bcos_kernels.bcos_conv2d(x, w, bias, b=b, backend="triton", **kw),
        lambda x, w, bias, b: ref.bcos_conv2d(x, w, bias, b=b, **kw),
        tensors,
        B_VALUES[-1],
    )


def test_channels_last_in_channels_last_out():
    """A channels_last network stays channels_last: outputs and the input gradient keep the layout."""
    x = torch.randn(2, 6, 5, 5, device=DEVICE).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    w = torch.randn(8, 6, 3, 3, device=DEVICE)
    out = bcos_kernels.bcos_conv2d(x, w, padding=1, max_out=2, backend="triton")
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    out.sum().backward()
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    plain = bcos_kernels.bcos_conv2d(x.detach().contiguous(), w, padding=1, max_out=2, backend="triton")
    assert plain.is_contiguous()
    torch.testing.assert_close(out, plain)


def test_conv_non_contiguous_weight_and_first_layer_shape():
    """A 7x7 stride-2 first layer on 3 channels (K tiles span several taps) with a transposed-storage weight."""
    x = torch.randn(1, 3, 12, 11, dtype=torch.float64)
    w = torch.randn(3, 7, 7, 16, dtype=torch.float64).permute(3, 0, 1, 2)  # (16, 3, 7, 7), not contiguous
    kw = dict(stride=2, padding=3)
    _check(
        lambda x, w, b: bcos_kernels.bcos_conv2d(x, w, b=b, backend="triton", **kw),
        lambda x, w, b: ref.bcos_conv2d(x, w, b=b, **kw),
        [x, w],
        2,
    )


LINEAR_CASES = [(s, b, False) for s in LINEAR_SHAPES for b in B_VALUES] + [
    (s, b, True) for s in LINEAR_SHAPES for b in (2, B_VALUES[-1])
]


def _linear_case_id(case):
    b = "tensor" if isinstance(case[1], torch.Tensor) else case[1]
    return f"{case[0]}-b{b}{'-detach' if case[2] else ''}"


@pytest.mark.parametrize("case", LINEAR_CASES, ids=_linear_case_id)
def test_linear_matches_reference(case):
    (x_shape, out_features, m, bias), b, detach = case
    x = torch.randn(*x_shape, dtype=torch.float64)
    w = torch.randn(out_features * m, x_shape[-1], dtype=torch.float64)
    bias_t = torch.randn(out_features * m, dtype=torch.float64) if bias else None
    opts = dict(max_out=m, detach=detach, normalize_weight=not bias, scale=2.0 if m > 1 else 1.0)
    _check(
        lambda x, w, bias, b: bcos_kernels.bcos_linear(x, w, bias, b=b, backend="triton", **opts),
        lambda x, w, bias, b: linear_ref.bcos_linear(x, w, bias, b=b, **opts),
        [x, w, bias_t],
        b,
    )


def test_linear_non_contiguous_input():
    x = torch.randn(6, 4, 18, dtype=torch.float64).transpose(0, 1)  # (4, 6, 18), rows not contiguous
    w = torch.randn(10, 18, dtype=torch.float64)
    _check(
        lambda x, w, b: bcos_kernels.bcos_linear(x, w, b=b, max_out=2, backend="triton"),
        lambda x, w, b: linear_ref.bcos_linear(x, w, b=b, max_out=2),
        [x, w],
        2.5,
    )


def test_zero_inputs_give_zero_output_and_finite_grads():
    for fn, x, w in [
        (
            lambda x, w, b: bcos_kernels.bcos_conv2d(x, w, b=b, padding=1, backend="triton"),
            torch.zeros(2, 3, 5, 5),
            torch.randn(4, 3, 3, 3),
        ),
        (lambda x, w, b: bcos_kernels.bcos_linear(x, w, b=b, backend="triton"), torch.zeros(3, 6), torch.randn(4, 6)),
    ]:
        for b in (1.5, 2, 3, "tensor"):
            b = torch.tensor(2.2, device=DEVICE, requires_grad=True) if b == "tensor" else b
            xr, wr = x.to(DEVICE).requires_grad_(True), w.to(DEVICE).requires_grad_(True)
            assert_zero_output_and_finite_grads(fn, xr, wr, b)


def test_only_the_requested_gradients():
    """needs_input_grad is honoured: a frozen weight gets no gradient, x alone still gets the right one."""
    x = torch.randn(2, 4, 6, 6, device=DEVICE, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, device=DEVICE)
    out = bcos_kernels.bcos_conv2d(x, w, padding=1, max_out=2, backend="triton")
    (gx,) = torch.autograd.grad(out.square().sum(), x)
    xr = x.detach().double().cpu().requires_grad_(True)
    (gr,) = torch.autograd.grad(ref.bcos_conv2d(xr, w.double().cpu(), padding=1, max_out=2).square().sum(), xr)
    torch.testing.assert_close(gx.cpu().double(), gr, atol=TOL, rtol=TOL)


def test_modules_run_the_triton_backend():
    """nn.BcosConv2d / nn.BcosLinear with backend="triton": same output and weight gradient as backend="reference"."""
    for make, x in [
        (lambda be: bcos_kernels.nn.BcosConv2d(4, 6, 3, padding=1, max_out=2, backend=be), torch.randn(2, 4, 7, 7)),
        (lambda be: bcos_kernels.nn.BcosLinear(12, 5, b=2.5, backend=be), torch.randn(3, 4, 12)),
    ]:
        fused, plain = make("triton").to(DEVICE), make("reference").to(DEVICE)
        plain.load_state_dict(fused.state_dict())
        outs = []
        for layer in (fused, plain):
            out = layer(x.to(DEVICE))
            out.square().sum().backward()
            outs.append((out, next(layer.parameters()).grad))
        for got, want in zip(*outs):
            torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)


def test_explicit_triton_raises_on_what_it_cannot_run():
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, device=DEVICE)
    w = torch.randn(2, 2, 3, 3, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="backend 'triton' cannot run this call: dtype torch.float64"):
        bcos_kernels.bcos_conv2d(x, w, backend="triton")
    with pytest.raises(ValueError, match="backend 'triton' cannot run this call: dtype torch.float64"):
        bcos_kernels.bcos_linear(x[0, 0], torch.randn_like(x[0, 0]), backend="triton")
    if not ON_GPU:
        with pytest.raises(ValueError, match="float32 only"):
            bcos_kernels.bcos_conv2d(x.bfloat16(), w.bfloat16(), backend="triton")


@gpu_only
def test_auto_falls_back_with_a_warning_on_gpu():
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, device="cuda")
    w = torch.randn(2, 2, 3, 3, dtype=torch.float64, device="cuda")
    backends._warned.clear()
    with pytest.warns(RuntimeWarning, match="falling back to backend 'torch'"):
        out = bcos_kernels.bcos_conv2d(x, w, padding=1)
    torch.testing.assert_close(out, ref.bcos_conv2d(x, w, padding=1))


def test_opcheck():
    from bcos_kernels.ops.bcos_conv2d import bcos_conv2d_fused
    from bcos_kernels.ops.bcos_linear import bcos_linear_fused

    x = torch.randn(2, 4, 6, 5, device=DEVICE, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, device=DEVICE, requires_grad=True)
    bias = torch.randn(6, device=DEVICE, requires_grad=True)
    b = torch.tensor(1.9, device=DEVICE, requires_grad=True)
    torch.library.opcheck(
        bcos_conv2d_fused,
        *conv_fused_args(x, w, None, None, 2.0, [1, 1], [1, 1], [1, 1], 2, 3, True, 1.0, False, "triton"),
    )
    torch.library.opcheck(
        bcos_conv2d_fused,
        *conv_fused_args(x, w, bias, b, float("nan"), [2, 1], [0, 1], [1, 2], 2, 1, False, 0.5, False, "triton"),
    )
    x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    torch.library.opcheck(
        bcos_conv2d_fused,
        *conv_fused_args(x_cl, w, None, b, float("nan"), [1, 1], [1, 1], [1, 1], 2, 1, True, 1.0, False, "triton"),
    )
    # the backward op on its own: grad x and grad weight keep the layouts of x and the weight
    from bcos_kernels.ops.bcos_conv2d import bcos_conv2d_fused_backward

    options = [float("nan"), [1, 1], [1, 1], [1, 1], 2, 1, True, 1.0, False, "triton"]
    xd, wd = x_cl.detach(), w.detach().contiguous(memory_format=torch.channels_last)
    args, kwargs = conv_fused_args(xd, wd, None, b.detach(), *options)
    out, lin_max, norm, winner = bcos_conv2d_fused(*args, **kwargs)
    torch.library.opcheck(
        bcos_conv2d_fused_backward,
        *fused_backward_args(
            (torch.randn_like(out), xd, wd, b.detach(), lin_max, norm, winner), options, [True, True, False, True]
        ),
    )
    xl = torch.randn(2, 3, 5, device=DEVICE, requires_grad=True)
    wl = torch.randn(8, 5, device=DEVICE, requires_grad=True)
    torch.library.opcheck(
        bcos_linear_fused, *linear_fused_args(xl, wl, None, b, float("nan"), 2, True, 3.0, True, "triton")
    )


def test_compile_keeps_the_fused_op():
    """torch.compile(fullgraph=True) traces through the custom op (fake impl) and matches eager."""
    torch._dynamo.reset()
    x = torch.randn(2, 4, 6, 6, device=DEVICE, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, device=DEVICE, requires_grad=True)
    wl = torch.randn(5, 3 * 6 * 6, device=DEVICE, requires_grad=True)

    def net(x, w, wl):
        h = bcos_kernels.bcos_conv2d(x, w, padding=1, max_out=2, backend="triton")
        return bcos_kernels.bcos_linear(h.flatten(1), wl, b=2.5, backend="triton")

    eager = net(x, w, wl)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")(x, w, wl)
    torch.testing.assert_close(compiled, eager)
    g_eager = torch.autograd.grad(eager.sum(), [x, w, wl])
    g_comp = torch.autograd.grad(compiled.sum(), [x, w, wl])
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------------------------
# GPU only: real layer shapes, bf16 numerics contract
# ---------------------------------------------------------------------------------------------------------------


# (C, O, k, stride, groups, max_out, N, H): layers of B-cos ResNet-50 / ConvNeXt-like, reduced batch
REAL_CONVS = [
    (64, 64, 3, 1, 1, 1, 8, 56),
    (256, 128, 1, 1, 1, 1, 8, 56),
    (128, 128, 3, 2, 1, 1, 8, 56),
    (3, 64, 7, 2, 1, 1, 4, 224),
    (512, 256, 1, 1, 1, 2, 8, 14),
    (96, 96, 7, 1, 96, 1, 4, 56),
]


@gpu_only
@pytest.mark.parametrize("layer", REAL_CONVS, ids=str)
def test_gpu_real_conv_shapes_fp32(layer):
    c, o, k, s, g, m, n, h = layer
    x = torch.randn(n, c, h, h, dtype=torch.float64)
    w = torch.randn(o * m, c // g, k, k, dtype=torch.float64)
    kw = dict(stride=s, padding=k // 2, groups=g, max_out=m)
    _check(
        lambda x, w, b: bcos_kernels.bcos_conv2d(x, w, b=b, backend="triton", **kw),
        lambda x, w, b: ref.bcos_conv2d(x, w, b=b, **kw),
        [x, w],
        2,
        tol=2e-4,
    )


@gpu_only
@pytest.mark.parametrize("op", ["conv", "linear"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_half_within_twice_the_reference_error(op, dtype):
    """Numerics contract: error vs fp64 at most 2x the reference's own error in that dtype, forward and grads."""
    if op == "conv":
        x, w = torch.randn(8, 64, 28, 28, device="cuda"), torch.randn(128, 64, 3, 3, device="cuda")
        run = lambda x, w, be: bcos_kernels.bcos_conv2d(x, w, b=2.0, padding=1, max_out=2, backend=be)  # noqa
    else:
        x, w = torch.randn(8, 197, 384, device="cuda"), torch.randn(1536, 384, device="cuda")
        run = lambda x, w, be: bcos_kernels.bcos_linear(x, w, b=2.0, backend=be)  # noqa

    def outputs(dtype, be):
        xx, ww = x.to(dtype).requires_grad_(True), w.to(dtype).requires_grad_(True)
        out = run(xx, ww, be)
        g = torch.randn(out.shape, generator=torch.Generator(device="cuda").manual_seed(0), device="cuda")
        return [out] + list(torch.autograd.grad(out, [xx, ww], g.to(dtype)))

    exact = outputs(torch.float64, "reference")
    ours = outputs(dtype, "triton")
    theirs = outputs(dtype, "reference")
    for name, e, a, r in zip(["out", "grad x", "grad w"], exact, ours, theirs):
        err_ours = (a.double() - e).abs().max().item()
        err_ref = (r.double() - e).abs().max().item()
        assert err_ours <= 2 * err_ref + 1e-6, (name, err_ours, err_ref)

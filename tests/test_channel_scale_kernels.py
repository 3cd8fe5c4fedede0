"""The per-output-channel factor ``channel_scale`` in the forward epilogue of the fused B-cos conv kernels.

An eval-mode (uncentered) batch norm folded into the layer multiplies output channel o by channel_scale[o]; the
kernels do it in the pass that writes the output:

    out[n, o, ...] = (dynamic scale of lin_max / scale) * channel_scale[o]     (fp32 for half types, then cast)

Checked here, at the kernel level (the front door has its own tests), for every backend that runs on this
machine:

* "cpu": ``torch.ops.bcos_kernels.bcos_scale_forward(..., channel_scale)`` (both its P > 1 and its P == 1 rows
  path) and a whole conv through the ATen conv + patch_norm + that op; also on CUDA tensors where the extension
  has CUDA kernels (the same op, its CUDA implementation) and there ``bcos_conv_scale_forward``;
* "triton": ``bcos_kernels.ops.bcos_conv2d.triton.fused_forward(..., channel_scale=...)`` (the interpreter
  without a GPU: tiny fp32 shapes);
* the CUDA kernels only where a GPU is present (without one, scripts/check_cuda.sh compiles them and the C++
  test csrc/tests/test_launch_geometry.cpp checks their launch geometry).

Each is compared with the same kernel's unscaled output times channel_scale[None, :, None, None] (bit for bit in
fp32/fp64: it is one multiply of the same value) and with a plain float64 PyTorch formula; lin_max, the norms and
the MaxOut winner must not change; channel_scale=None and all-ones factors give the unscaled output bit for bit;
bad factors raise errors that name ``channel_scale``; the fake impls accept the argument.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import one_intra_op_thread  # noqa: F401  (autouse: one intra-op thread for tiny tensors)

from bcos_kernels import backends

F64 = torch.float64
EPS = 1e-6
HAS_CPU_EXT = backends.cpu_extension() is not None
TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON_REASON = backends.device_reason("triton", TRITON_DEVICE)
CUDA_OP_REASON = (
    backends.device_reason("cuda", torch.device("cuda"))
    if torch.cuda.is_available()
    else "needs a GPU (without one, scripts/check_cuda.sh compiles the CUDA kernels)"
)

needs_cpu_ext = pytest.mark.skipif(not HAS_CPU_EXT, reason="the C++ extension bcos_kernels._C is not built")
if HAS_CPU_EXT:
    from bcos_kernels.ops import _cpu_fake  # noqa: F401  (the fake impls: opcheck, meta tensors)
needs_triton = pytest.mark.skipif(TRITON_REASON is not None, reason=str(TRITON_REASON))
# the extension's ops on CPU tensors here, and on CUDA tensors too where its CUDA kernels are built
OP_DEVICES = ["cpu"] + (["cuda"] if CUDA_OP_REASON is None else [])

# b: 1, 2 (the two special forward modes), a general power and a learnable (tensor) b
B_CASES = [1, 2, 1.5, "tensor"]
B_TENSOR_VALUE = 1.7


def _b_args(b):
    """(b as a float, b_is_tensor) as the front door passes them to the C++ ops."""
    return (B_TENSOR_VALUE, True) if b == "tensor" else (float(b), False)


def _mode(b):
    b_val, b_is_tensor = _b_args(b)
    if not b_is_tensor and b_val == 1:
        return "one"
    if not b_is_tensor and b_val == 2:
        return "two"
    return "general"


def _channel_scale(o, dtype=torch.float32, device="cpu", seed=0):
    """(O,) factors of both signs with a zero (a folded norm can flip or kill a channel)."""
    g = torch.Generator().manual_seed(seed)
    cs = torch.rand(o, generator=g, dtype=F64) * 1.5 + 0.25
    cs[torch.arange(o) % 2 == 1] *= -1
    cs[0] = 0.0
    return cs.to(device=device, dtype=dtype)


def _scaled(unscaled, channel_scale):
    """unscaled * channel_scale[o] over dim 1 of an (N, O, ...) tensor, computed exactly in float64."""
    view = [1, -1] + [1] * (unscaled.dim() - 2)
    return unscaled.double() * channel_scale.double().view(view)


def _assert_scaled(got, unscaled, channel_scale, what):
    """got == unscaled * channel_scale: in fp32/fp64 bit for bit (the product of two floats is exact in float64,
    so rounding it once to the dtype is what the kernel's single multiply gives); in bf16/fp16 within one rounding
    of the output (unscaled was rounded before the multiply, got after it)."""
    want = _scaled(unscaled, channel_scale)
    if got.dtype in (torch.float32, torch.float64):
        assert torch.equal(got, want.to(got.dtype)), f"{what}: max diff {(got.double() - want).abs().max()}"
    else:
        torch.testing.assert_close(got.double(), want, rtol=2 * torch.finfo(got.dtype).eps, atol=0, msg=what)


def _dynamic_scale_formula(lin_max, norm, b, scale):
    """The B-cos output before channel_scale (DESIGN.md section 3), float64; norm already per output channel."""
    mode = _mode(b)
    if mode == "one":
        out = lin_max
    elif mode == "two":
        out = lin_max.abs() / norm * lin_max
    else:
        out = (lin_max / norm).abs().add(EPS).pow(_b_args(b)[0] - 1) * lin_max
    return out / scale


def _conv_formula(x, w, bias, b, stride, padding, dilation, groups, max_out, scale, normalize_weight, channel_scale):
    """Plain PyTorch, float64: (out, lin_max, norm (N, G, Ho, Wo), winner) of a B-cos conv with channel_scale."""
    x, w = x.double(), w.double()
    bias = bias.double() if bias is not None else None
    w_hat = w / w.flatten(1).norm(dim=1).view(-1, 1, 1, 1) if normalize_weight else w
    lin = F.conv2d(x, w_hat, bias, stride, padding, dilation, groups)
    n, filters, ho, wo = lin.shape
    o = filters // max_out
    lin_max, winner = lin.view(n, o, max_out, ho, wo).max(2)
    ones = x.new_ones(groups, x.shape[1] // groups, *w.shape[2:])
    norm = (F.conv2d(x * x, ones, None, stride, padding, dilation, groups) + EPS).sqrt()
    out = _dynamic_scale_formula(lin_max, norm.repeat_interleave(o // groups, dim=1), b, scale)
    return _scaled(out, channel_scale), lin_max, norm, winner


# (in, out, k, stride, padding, dilation, groups, max_out, bias, N, H, W) -- out is O, after MaxOut
CONV_SHAPES = [
    pytest.param((4, 4, 3, 1, 1, 1, 1, 1, False, 2, 5, 6), id="maxout1"),
    pytest.param((4, 4, 3, 2, 1, 1, 2, 2, True, 1, 6, 5), id="groups2-maxout2-batch1-bias"),
    pytest.param((3, 4, 3, 1, 0, 1, 1, 2, False, 2, 3, 3), id="1x1-output-maxout2"),
    pytest.param((4, 6, 1, 1, 0, 1, 2, 1, True, 1, 1, 1), id="1x1-output-groups2-batch1"),
]


def _conv_case(shape, device, dtype, seed=0):
    cin, cout, k, s, p, d, g, m, bias, n, h, w = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=gen, dtype=F64)
    weight = torch.randn(cout * m, cin // g, k, k, generator=gen, dtype=F64)
    bias_t = torch.randn(cout * m, generator=gen, dtype=F64) if bias else None
    to = dict(device=device, dtype=dtype)
    kw = dict(
        stride=(s, s), padding=(p, p), dilation=(d, d), groups=g, max_out=m, normalize_weight=not bias
    )  # B-cosification style (bias, unnormalised weights) on the bias cases
    return x.to(**to), weight.to(**to), bias_t.to(**to) if bias_t is not None else None, kw


# ---------------------------------------------------------------------------------------------------------------
# Backend "cpu" (and the same op's CUDA kernels where built): bcos_scale_forward
# ---------------------------------------------------------------------------------------------------------------
# (N, O, P, G): batch 1; P == 1 (the rows path: channels contiguous) with groups, and with more channels than one
# tile of it (600 > 256); P above one position block (2500 > 2048)
OP_SHAPES = [(1, 4, 7, 1), (2, 6, 1, 2), (3, 600, 1, 1), (2, 4, 2500, 2)]


def _op_inputs(n, o, p, g, max_out, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lin = torch.randn(n, o * max_out, p, generator=gen, dtype=F64)
    lin[0, :max_out] = 0  # a zero response
    norm = torch.rand(n, g, p, generator=gen, dtype=F64) * 2 + 0.25
    return lin.to(device=device, dtype=dtype), norm.to(device=device, dtype=dtype)


@needs_cpu_ext
@pytest.mark.parametrize("device", OP_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("max_out", [1, 2])
@pytest.mark.parametrize("b", B_CASES)
def test_scale_forward_op(b, max_out, dtype, device):
    ops = torch.ops.bcos_kernels
    b_val, b_is_tensor = _b_args(b)
    for i, (n, o, p, g) in enumerate(OP_SHAPES):
        scale = 0.6 if i % 2 else 1.0  # the v1 divisor, and the compiled-out division by 1
        lin, norm = _op_inputs(n, o, p, g, max_out, dtype, device, seed=i)
        cs = _channel_scale(o, dtype, device, seed=i)
        plain = ops.bcos_scale_forward(lin, norm, b_val, b_is_tensor, max_out, scale)
        got = ops.bcos_scale_forward(lin, norm, b_val, b_is_tensor, max_out, scale, cs)
        assert got[0].shape == (n, o, p) and got[0].dtype == dtype
        _assert_scaled(got[0], plain[0], cs, f"out, shape {(n, o, p, g)}")
        # lin_max and winner are what the backward reads: never scaled
        assert torch.equal(got[1], plain[1]) and torch.equal(got[2], plain[2])
        # channel_scale=None (positional or keyword) and all-ones factors: the unscaled output, bit for bit
        assert torch.equal(ops.bcos_scale_forward(lin, norm, b_val, b_is_tensor, max_out, scale, None)[0], plain[0])
        assert torch.equal(
            ops.bcos_scale_forward(lin, norm, b_val, b_is_tensor, max_out, scale, channel_scale=None)[0], plain[0]
        )
        ones = torch.ones(o, dtype=dtype, device=device)
        assert torch.equal(ops.bcos_scale_forward(lin, norm, b_val, b_is_tensor, max_out, scale, ones)[0], plain[0])
        if dtype != torch.bfloat16:
            lin_max = lin.double().view(n, o, max_out, p).max(2).values
            nr = norm.double().repeat_interleave(o // g, dim=1)
            want = _scaled(_dynamic_scale_formula(lin_max, nr, b, scale), cs)
            tol = 1e-5 if dtype == torch.float32 else 1e-12
            torch.testing.assert_close(got[0].double(), want, rtol=tol, atol=tol)


@needs_cpu_ext
@pytest.mark.parametrize("device", OP_DEVICES)
@pytest.mark.parametrize("shape", CONV_SHAPES)
@pytest.mark.parametrize("b", B_CASES)
def test_cpu_conv_with_channel_scale(shape, b, device):
    """A whole conv the way backend "cpu" runs it (ATen conv, patch_norm, bcos_scale_forward) against the float64
    formula: the factor lands on the right channel with groups, MaxOut and 1x1 outputs."""
    ops = torch.ops.bcos_kernels
    x, weight, bias, kw = _conv_case(shape, device, torch.float32)
    groups, max_out = kw["groups"], kw["max_out"]
    conv_args = (list(weight.shape[2:]), list(kw["stride"]), list(kw["padding"]), list(kw["dilation"]), groups)
    w_hat = weight / weight.flatten(1).norm(dim=1).view(-1, 1, 1, 1) if kw["normalize_weight"] else weight
    lin = F.conv2d(x, w_hat, bias, kw["stride"], kw["padding"], kw["dilation"], groups)
    n, filters, ho, wo = lin.shape
    lin = lin.reshape(n, filters, ho * wo)
    b_val, b_is_tensor = _b_args(b)
    norm = ops.patch_norm(x, *conv_args) if _mode(b) != "one" else x.new_empty(0)
    norm3 = norm.flatten(2) if norm.numel() else norm
    cs = _channel_scale(filters // max_out, device=device, seed=3)
    out, lin_max, winner = ops.bcos_scale_forward(lin, norm3, b_val, b_is_tensor, max_out, 0.8, cs)
    want, want_max, want_norm, want_win = _conv_formula(x, weight, bias, b, scale=0.8, channel_scale=cs, **kw)
    torch.testing.assert_close(out.view(want.shape).double(), want, rtol=1e-5, atol=1e-5)
    if max_out > 1:
        assert torch.equal(winner.view(want_win.shape).long(), want_win.to(winner.device))
        torch.testing.assert_close(lin_max.view(want_max.shape).double(), want_max, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(CUDA_OP_REASON is not None, reason=str(CUDA_OP_REASON))
@pytest.mark.parametrize("shape", CONV_SHAPES)
@pytest.mark.parametrize("b", B_CASES)
def test_cuda_conv_scale_forward(shape, b):
    """bcos_conv_scale_forward (the norms computed inside the scale pass) with channel_scale against the unfused
    CUDA ops with it, and against its own unscaled output."""
    ops = torch.ops.bcos_kernels
    x, weight, _, kw = _conv_case(shape, "cuda", torch.float32)
    groups, max_out = kw["groups"], kw["max_out"]
    conv_args = (list(weight.shape[2:]), list(kw["stride"]), list(kw["padding"]), list(kw["dilation"]), groups)
    lin = F.conv2d(x, weight, None, kw["stride"], kw["padding"], kw["dilation"], groups)
    n, filters, ho, wo = lin.shape
    lin = lin.reshape(n, filters, ho * wo).contiguous()
    b_val, b_is_tensor = _b_args(b)
    cs = _channel_scale(filters // max_out, device="cuda", seed=5)
    plain = ops.bcos_conv_scale_forward(lin, x, *conv_args, b_val, b_is_tensor, max_out, 1.0)
    got = ops.bcos_conv_scale_forward(lin, x, *conv_args, b_val, b_is_tensor, max_out, 1.0, cs)
    _assert_scaled(got[0], plain[0], cs, "out")
    assert all(torch.equal(a, c) for a, c in zip(got[1:], plain[1:])), "lin_max, winner and norm must not change"
    norm = ops.patch_norm(x, *conv_args) if _mode(b) != "one" else x.new_empty(0)
    want = ops.bcos_scale_forward(lin, norm.flatten(2) if norm.numel() else norm, b_val, b_is_tensor, max_out, 1.0, cs)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="channel_scale"):
        ops.bcos_conv_scale_forward(lin, x, *conv_args, b_val, b_is_tensor, max_out, 1.0, cs[:-1])


@needs_cpu_ext
@pytest.mark.parametrize("device", OP_DEVICES)
def test_scale_forward_op_rejects_bad_channel_scale(device):
    ops = torch.ops.bcos_kernels
    lin, norm = _op_inputs(2, 6, 5, 2, 2, torch.float32, device)
    args = (lin, norm, 2.0, False, 2, 1.0)
    good = _channel_scale(6, device=device)
    bad = [
        ("must have 6 elements", good[:5]),  # O = lin's channels / max_out = 6
        ("must have 6 elements", torch.ones(12, device=device)),  # lin's channels before MaxOut
        ("has dtype", good.double()),
        ("must have 1 dimension", good.view(2, 3)),
        ("must be on the device of lin", good.to("meta")),
    ]  # dispatched to the fake, which checks the same
    for expected, cs in bad:
        with pytest.raises(RuntimeError, match="channel_scale") as info:
            ops.bcos_scale_forward(*args, cs)
        assert expected in str(info.value), str(info.value)


@needs_cpu_ext
@pytest.mark.parametrize("max_out", [1, 2])
@pytest.mark.parametrize("b", [1, 2, "tensor"])
def test_fakes_accept_channel_scale(b, max_out):
    """The schemas default channel_scale to None (old callers keep working) and the fake impls take it: opcheck
    of bcos_scale_forward with a factor, and bcos_conv_scale_forward (a CUDA-only op: its fake) on meta tensors."""
    ops = torch.ops.bcos_kernels
    for op in (ops.bcos_scale_forward, ops.bcos_conv_scale_forward):
        arg = op.default._schema.arguments[-1]
        assert arg.name == "channel_scale" and arg.default_value is None
    b_val, b_is_tensor = _b_args(b)
    lin, norm = _op_inputs(2, 4, 9, 2, max_out, torch.float32, "cpu")
    cs = _channel_scale(4)
    torch.library.opcheck(
        ops.bcos_scale_forward.default,
        (lin, norm, b_val, b_is_tensor, max_out, 0.5, cs),
        test_utils=("test_schema", "test_faketensor"),
    )

    x = torch.empty(2, 4, 5, 5, device="meta")
    lin = torch.empty(2, 4 * max_out, 25, device="meta")
    conv_args = ([3, 3], [1, 1], [1, 1], [1, 1], 2)
    out, lin_max, winner, norm = ops.bcos_conv_scale_forward(
        lin, x, *conv_args, b_val, b_is_tensor, max_out, 1.0, torch.empty(4, device="meta")
    )
    assert out.shape == (2, 4, 25)
    assert norm.shape == ((0,) if _mode(b) == "one" else (2, 2, 5, 5))
    with pytest.raises(RuntimeError, match="channel_scale must have 4 elements"):
        ops.bcos_conv_scale_forward(
            lin, x, *conv_args, b_val, b_is_tensor, max_out, 1.0, torch.empty(4 * max_out + 1, device="meta")
        )


# ---------------------------------------------------------------------------------------------------------------
# Backend "triton": bcos_kernels.ops.bcos_conv2d.triton.forward
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def _no_tf32():
    """fp32 means fp32 on a GPU: the kernels follow torch's TF32 switches."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


_OMITTED = object()


def _triton_forward(x, weight, bias, b, kw, memory_format, scale=1.0, channel_scale=_OMITTED):
    from bcos_kernels.ops.bcos_conv2d import triton as tk

    geo = tk.conv_geometry(x, weight, kw["stride"], kw["padding"], kw["dilation"], kw["groups"], kw["max_out"])
    b_tensor = torch.tensor([B_TENSOR_VALUE], device=x.device) if b == "tensor" else None
    b_float = 0.0 if b == "tensor" else float(b)
    args = (x, weight, bias, b_tensor, b_float, geo, kw["normalize_weight"], scale, tk.NORM_CONV, memory_format)
    if channel_scale is _OMITTED:
        return tk.fused_forward(*args)  # the call of every caller that predates channel_scale
    return tk.fused_forward(*args, channel_scale=channel_scale)


@needs_triton
@pytest.mark.usefixtures("_no_tf32")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", CONV_SHAPES)
@pytest.mark.parametrize("b", B_CASES)
def test_triton_forward(b, shape, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, weight, bias, kw = _conv_case(shape, TRITON_DEVICE, torch.float32)
    x = x.contiguous(memory_format=fmt)
    o = weight.shape[0] // kw["max_out"]
    cs = _channel_scale(o, device=TRITON_DEVICE, seed=1)
    plain = _triton_forward(x, weight, bias, b, kw, fmt, scale=0.7)
    got = _triton_forward(x, weight, bias, b, kw, fmt, scale=0.7, channel_scale=cs)
    assert got[0].shape == plain[0].shape and got[0].stride() == plain[0].stride()
    _assert_scaled(got[0], plain[0], cs, "out")
    for name, a, c in zip(("lin_max", "norm", "winner"), got[1:], plain[1:]):
        assert torch.equal(a, c), f"{name} must stay unscaled (the backward reads it)"
    # None passed explicitly, and all-ones factors: the unscaled output bit for bit
    assert torch.equal(_triton_forward(x, weight, bias, b, kw, fmt, scale=0.7, channel_scale=None)[0], plain[0])
    ones = torch.ones(o, device=TRITON_DEVICE)
    assert torch.equal(_triton_forward(x, weight, bias, b, kw, fmt, scale=0.7, channel_scale=ones)[0], plain[0])
    # any float dtype of the factor: read as fp32
    assert torch.equal(_triton_forward(x, weight, bias, b, kw, fmt, scale=0.7, channel_scale=cs.double())[0], got[0])

    want, want_max, want_norm, want_win = _conv_formula(
        x.cpu(), weight.cpu(), bias.cpu() if bias is not None else None, b, scale=0.7, channel_scale=cs.cpu(), **kw
    )
    torch.testing.assert_close(got[0].cpu().double(), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1].cpu().double(), want_max, rtol=1e-4, atol=1e-4)
    if _mode(b) != "one":
        torch.testing.assert_close(got[2].cpu().double(), want_norm, rtol=1e-5, atol=1e-5)
    if kw["max_out"] > 1:
        assert torch.equal(got[3].cpu().long(), want_win)


def test_triton_forward_none_is_the_path_without_channel_scale():
    """channel_scale=None must not add work: the kernel is launched with HAS_CHANNEL_SCALE=False (a constexpr,
    so the multiply is compiled out) -- checked on the launch arguments, without running a kernel."""
    pytest.importorskip("triton")
    from bcos_kernels.ops.bcos_conv2d import triton as tk

    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(kwargs)

    shape = CONV_SHAPES[0].values[0]
    x, weight, bias, kw = _conv_case(shape, "meta", torch.float32)
    original = tk._bcos_forward_kernel
    tk._bcos_forward_kernel = Recorder()
    try:
        _triton_forward(x, weight, bias, 2, kw, torch.contiguous_format)
        _triton_forward(x, weight, bias, 2, kw, torch.contiguous_format, channel_scale=torch.ones(4, device="meta"))
    finally:
        tk._bcos_forward_kernel = original
    assert [launch["HAS_CHANNEL_SCALE"] for launch in launches] == [False, True]


@needs_triton
def test_triton_forward_rejects_bad_channel_scale():
    from bcos_kernels.ops.bcos_conv2d import triton as tk

    x, weight, bias, kw = _conv_case(CONV_SHAPES[1].values[0], TRITON_DEVICE, torch.float32)
    good = _channel_scale(4, device=TRITON_DEVICE)
    bad = [
        good[:3],
        torch.ones(8, device=TRITON_DEVICE),  # O after MaxOut is 4; 8 is before it
        good.view(2, 2),
        torch.ones(4, dtype=torch.int64, device=TRITON_DEVICE),
        good.to("meta"),
    ]
    for cs in bad:
        with pytest.raises(ValueError, match="channel_scale"):
            _triton_forward(x, weight, bias, 2, kw, torch.contiguous_format, channel_scale=cs)
    # the linear path has no channel_scale
    rows = torch.randn(5, 8, device=TRITON_DEVICE)
    w = torch.randn(6, 8, device=TRITON_DEVICE)
    geo = tk.linear_geometry(5, 8, 6, 1)
    with pytest.raises(ValueError, match="channel_scale"):
        tk.fused_forward(
            rows,
            w,
            None,
            None,
            2.0,
            geo,
            True,
            1.0,
            tk.NORM_LINEAR,
            torch.contiguous_format,
            channel_scale=torch.ones(6, device=TRITON_DEVICE),
        )

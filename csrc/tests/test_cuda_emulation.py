"""The CUDA kernels of csrc/cuda, run on the CPU through the host emulation, against the CPU ops and the
Python references.

The kernel files are compiled as C++ with BCOS_CUDA_HOST_EMULATION (csrc/tests/cuda_host_emulation.h: one
std::thread per CUDA thread, real barriers) into a shared library whose C entry points
(csrc/tests/cuda_emulation_api.cpp) call the same launchers the torch glue calls. scripts/check_cuda.sh builds it
and runs this file with BCOS_CUDA_EMULATION_LIB set; without that variable every test is skipped.

What this proves: the kernels' index arithmetic, grid-stride loops, shared-memory tiles, barriers and
deterministic reductions compute the ops' semantics. What it cannot: device numerics (FMA contraction, the
device's libm), races that need real parallel hardware, performance, and the torch glue (ops_cuda.cpp, which
is only compiled). Tensors here play the role of the glue's allocations, following its conventions.
"""
from __future__ import annotations

import ctypes
import itertools
import os

import pytest
import torch
import torch.nn.functional as F

LIB_PATH = os.environ.get("BCOS_CUDA_EMULATION_LIB")
if not LIB_PATH or not os.path.exists(LIB_PATH):
    pytest.skip("BCOS_CUDA_EMULATION_LIB not set (scripts/check_cuda.sh builds the emulation library)",
                allow_module_level=True)

import bcos_kernels  # noqa: E402,F401  (loads the CPU extension: the oracle of the B-cos ops)
from bcos_kernels.ops.class_specific_gate import reference as csg_ref  # noqa: E402
from bcos_kernels.ops.dau_conv2d import reference as dau_ref  # noqa: E402
from bcos_kernels.ops.lwta import reference as lwta_ref  # noqa: E402

lib = ctypes.CDLL(LIB_PATH)
cpu_ops = torch.ops.bcos_kernels

DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
MODES = {"one": 0, "two": 1, "general": 2}
I64 = ctypes.c_int64
P = ctypes.c_void_p


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def ptr(t):
    return None if t is None or t.numel() == 0 else ctypes.c_void_p(t.data_ptr())


def i64s(values):
    return (I64 * len(values))(*[int(v) for v in values])


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def check(rc):
    assert rc == 0, f"launcher returned cudaError {rc}"


for name, restype in [("emu_bcos_scale_backward_partials", I64), ("emu_dau_backward_workspace_elems", I64)]:
    getattr(lib, name).restype = restype
# the P before prob: channel_scale (None: no per-channel factor)
lib.emu_bcos_scale_forward.argtypes = [ctypes.c_int, P, P, P, P, P, P, P, ctypes.c_int, ctypes.c_double,
                                       ctypes.c_double]
lib.emu_bcos_conv_scale_forward.argtypes = [ctypes.c_int, P, P, P, ctypes.c_int, P, P, P, P, P, P, P, P,
                                            ctypes.c_int, ctypes.c_double, ctypes.c_double]
lib.emu_bcos_scale_backward_partials.argtypes = [P, ctypes.c_int, ctypes.c_double, ctypes.c_double]
lib.emu_bcos_scale_backward.argtypes = [ctypes.c_int, P, P, P, P, P, P, P, P, P, ctypes.c_int, ctypes.c_double,
                                        ctypes.c_double, ctypes.c_int]
lib.emu_dau_forward.argtypes = [ctypes.c_int, P, P, P, P, P, I64, I64, ctypes.c_int, ctypes.c_int, ctypes.c_int, P, P]
lib.emu_dau_backward_workspace_elems.argtypes = [I64, I64, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
lib.emu_dau_backward.argtypes = [ctypes.c_int, P, P, P, P, P, P, P, P, P, I64, I64, ctypes.c_int, ctypes.c_int,
                                 ctypes.c_int, ctypes.c_int, P, P, P, P]
lib.emu_lwta_forward.argtypes = [ctypes.c_int, P, P, ctypes.c_int, P, ctypes.c_int, ctypes.c_double, ctypes.c_int,
                                 ctypes.c_uint64, ctypes.c_uint64, P, P]
lib.emu_lwta_backward.argtypes = [ctypes.c_int, P, P, P, P, ctypes.c_int, P, ctypes.c_int, ctypes.c_double,
                                  ctypes.c_int, ctypes.c_uint64, ctypes.c_uint64, P]
lib.emu_lwta_uniform.argtypes = [P, I64, ctypes.c_uint64, ctypes.c_uint64]


def assert_close(got, want, dtype, what):
    tol = {torch.float32: (2e-6, 1e-6), torch.float64: (1e-12, 1e-12), torch.bfloat16: (1.6e-2, 1e-3),
           torch.float16: (2e-3, 1e-4)}[dtype]
    torch.testing.assert_close(got.double(), want.double(), rtol=tol[0], atol=tol[1], msg=what)


# ---------------------------------------------------------------------------------------------------------------
# B-cos: the CPU extension is the oracle (its semantics are the contract of the CUDA ops).
# ---------------------------------------------------------------------------------------------------------------
def geometry(x, kernel_size, stride, padding, dilation, groups):
    n, c, h, w = x.shape
    ho = (h + 2 * padding[0] - dilation[0] * (kernel_size[0] - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kernel_size[1] - 1) - 1) // stride[1] + 1
    return [n, c, h, w, groups, c // groups, ho, wo, kernel_size[0], kernel_size[1], stride[0], stride[1],
            padding[0], padding[1], dilation[0], dilation[1]], ho, wo


def channels_last(x):
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def emu_patch_norm(x, kernel_size, stride, padding, dilation, groups):
    geom, ho, wo = geometry(x, kernel_size, stride, padding, dilation, groups)
    n, c, h, w = x.shape
    norm = torch.empty(n, groups, ho, wo, dtype=x.dtype)
    sq = torch.empty(n, groups, h, w, dtype=acc_dtype(x.dtype))
    check(lib.emu_patch_norm(DTYPE_CODE[x.dtype], ptr(x), i64s(x.stride()), int(channels_last(x)), i64s(geom),
                             ptr(sq), ptr(norm)))
    return norm


def emu_patch_norm_backward(grad_norm, x, norm, kernel_size, stride, padding, dilation, groups):
    geom, _, _ = geometry(x, kernel_size, stride, padding, dilation, groups)
    cl = channels_last(x)
    grad_x = torch.empty(x.shape, dtype=x.dtype, memory_format=torch.channels_last if cl else torch.contiguous_format)
    r = torch.empty(x.shape[0], groups, x.shape[2], x.shape[3], dtype=acc_dtype(x.dtype))
    check(lib.emu_patch_norm_backward(DTYPE_CODE[x.dtype], ptr(grad_norm.contiguous()), ptr(norm.contiguous()),
                                      ptr(x), i64s(x.stride()), ptr(grad_x), i64s(grad_x.stride()), int(cl),
                                      i64s(geom), ptr(r)))
    return grad_x


CONV_CASES = [  # kernel_size, stride, padding, dilation, groups
    ((3, 3), (1, 1), (1, 1), (1, 1), 1),
    ((3, 3), (2, 2), (1, 1), (1, 1), 2),
    ((2, 3), (2, 1), (0, 1), (1, 2), 2),
    ((1, 1), (1, 1), (0, 0), (1, 1), 4),
    ((5, 5), (1, 3), (2, 0), (1, 1), 1),
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "strided"])
def test_patch_norm_and_backward(case, dtype, layout):
    kernel_size, stride, padding, dilation, groups = case
    x = torch.randn(2, 4, 7, 6).to(dtype)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(2, 4, 7, 12).to(dtype)[..., ::2]  # neither layout: the kernels read its strides
    x[0, :, 0, :] = 0  # an all-zero row: finite values and gradients
    want = cpu_ops.patch_norm(x, list(kernel_size), list(stride), list(padding), list(dilation), groups)
    got = emu_patch_norm(x, kernel_size, stride, padding, dilation, groups)
    assert_close(got, want, dtype, "patch_norm")
    grad_norm = torch.randn(want.shape).to(dtype)
    want_gx = cpu_ops.patch_norm_backward(grad_norm, x.contiguous() if layout == "strided" else x, want,
                                          list(kernel_size), list(stride), list(padding), list(dilation), groups)
    got_gx = emu_patch_norm_backward(grad_norm, x, want, kernel_size, stride, padding, dilation, groups)
    assert_close(got_gx, want_gx, dtype, "patch_norm_backward")
    assert got_gx.is_contiguous(memory_format=torch.channels_last if layout == "nhwc" else torch.contiguous_format)


def scale_mode(b, b_is_tensor):
    if not b_is_tensor and b == 1:
        return "one"
    if not b_is_tensor and b == 2:
        return "two"
    return "general"


def emu_scale_forward(lin, norm, b, b_is_tensor, max_out, scale):
    return emu_scale_forward_channel_scale(lin, norm, b, b_is_tensor, max_out, scale, None)


def emu_scale_backward(grad_out, lin_max, norm, winner, b, b_is_tensor, max_out, scale, detach, need_norm, need_b):
    mode = scale_mode(b, b_is_tensor)
    n, o, p = lin_max.shape
    g = 1 if mode == "one" else norm.shape[1]
    need_dn = need_norm and not detach and mode != "one"
    need_db = need_b and mode == "general"
    b_dtype = acc_dtype(grad_out.dtype)
    grad_lin = torch.empty(n, o * max_out, p, dtype=grad_out.dtype)
    grad_norm = torch.empty(n, g, p, dtype=grad_out.dtype) if need_dn else torch.empty(0, dtype=grad_out.dtype)
    grad_b = torch.empty((), dtype=b_dtype) if need_db else torch.empty(0, dtype=b_dtype)
    prob = i64s([n, o, max_out, p, g])
    partials = torch.empty(lib.emu_bcos_scale_backward_partials(prob, MODES[mode], b, scale), dtype=torch.float64)
    check(lib.emu_bcos_scale_backward(DTYPE_CODE[grad_out.dtype], ptr(grad_out), ptr(lin_max),
                                      None if mode == "one" else ptr(norm), ptr(winner) if max_out > 1 else None,
                                      ptr(grad_lin), ptr(grad_norm) if need_dn else None,
                                      ptr(grad_b) if need_db else None, ptr(partials), prob, MODES[mode], b, scale,
                                      int(detach)))
    return grad_lin, grad_norm, grad_b


B_CASES = [(1.0, False), (2.0, False), (2.5, False), (2.0, True), (1.0, True)]
SHAPES = [(2, 4, 1, 1), (3, 4, 5, 2), (2, 6, 40, 2), (1, 64, 3, 1)]  # n, o, p, groups


@pytest.mark.parametrize("b,b_is_tensor", B_CASES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("max_out", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_scale_forward_and_backward(b, b_is_tensor, shape, max_out, dtype):
    n, o, p, g = shape
    scale = 0.7
    lin = torch.randn(n, o * max_out, p).to(dtype)
    if max_out > 1:
        units = lin.view(n, o, max_out, p)
        units[:, ::2, 1] = units[:, ::2, 0]  # ties: the first maximum wins
    lin[0, 0] = 0  # zero responses
    norm = (torch.rand(n, g, p) + 0.5).to(dtype)
    want = cpu_ops.bcos_scale_forward(lin, norm, b, b_is_tensor, max_out, scale)
    got = emu_scale_forward(lin, norm, b, b_is_tensor, max_out, scale)
    for name, w, gt in zip(("out", "lin_max", "winner"), want, got):
        if name == "winner":
            assert torch.equal(gt, w), name
        else:
            assert_close(gt, w, dtype, name)
    lin_max = want[1] if max_out > 1 else lin
    grad_out = torch.randn(n, o, p).to(dtype)
    for detach, need_norm, need_b in itertools.product((False, True), repeat=3):
        args = (grad_out, lin_max, norm, want[2], b, b_is_tensor, max_out, scale, detach, need_norm, need_b)
        want_g = cpu_ops.bcos_scale_backward(*args)
        got_g = emu_scale_backward(*args)
        for name, w, gt in zip(("grad_lin", "grad_norm", "grad_b"), want_g, got_g):
            assert gt.shape == w.shape and gt.dtype == w.dtype, name
            if name == "grad_b" and w.numel():
                # sums of many terms in another order: relative to the sum of magnitudes
                torch.testing.assert_close(gt.double(), w.double(), rtol=1e-5, atol=1e-5 * o * p * n, msg=name)
            else:
                assert_close(gt, w, dtype, f"{name} detach={detach} need_norm={need_norm} need_b={need_b}")


@pytest.mark.parametrize("case", CONV_CASES[:3])
@pytest.mark.parametrize("b,b_is_tensor", [(2.0, False), (2.5, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("max_out", [1, 2])
def test_conv_scale_forward_matches_unfused(case, b, b_is_tensor, dtype, max_out):
    kernel_size, stride, padding, dilation, groups = case
    x = torch.randn(2, 4, 7, 6).to(dtype).contiguous(memory_format=torch.channels_last)
    geom, ho, wo = geometry(x, kernel_size, stride, padding, dilation, groups)
    o = 2 * groups
    lin = torch.randn(2, o * max_out, ho * wo).to(dtype)
    norm_want = cpu_ops.patch_norm(x, list(kernel_size), list(stride), list(padding), list(dilation), groups)
    want = cpu_ops.bcos_scale_forward(lin, norm_want.flatten(2), b, b_is_tensor, max_out, 1.0)
    norm = torch.empty(2, groups, ho, wo, dtype=dtype)
    out = torch.empty(2, o, ho * wo, dtype=dtype)
    lin_max = torch.empty(2, o, ho * wo, dtype=dtype) if max_out > 1 else torch.empty(0, dtype=dtype)
    winner = torch.empty(2, o, ho * wo, dtype=torch.uint8) if max_out > 1 else torch.empty(0, dtype=torch.uint8)
    sq = torch.empty(2, groups, 7, 6, dtype=acc_dtype(dtype))
    check(lib.emu_bcos_conv_scale_forward(DTYPE_CODE[dtype], ptr(lin), ptr(x), i64s(x.stride()), 1, i64s(geom),
                                          ptr(sq), ptr(norm), ptr(out), ptr(lin_max), ptr(winner), None,
                                          i64s([2, o, max_out, ho * wo, groups]), MODES[scale_mode(b, b_is_tensor)],
                                          b, 1.0))
    assert_close(norm, norm_want, dtype, "norm")
    assert_close(out, want[0], dtype, "out")
    if max_out > 1:
        assert torch.equal(winner, want[2])
        assert_close(lin_max, want[1], dtype, "lin_max")


# ---------------------------------------------------------------------------------------------------------------
# The forward's per-output-channel factor (channel_scale: an eval-mode batch norm folded into the layer): out times
# channel_scale[o] in the same pass; lin_max, winner and the norms unscaled. Oracle: the CPU op with the same factor
# (the same bcos_math::apply_channel_scale after the same scale formula).
# ---------------------------------------------------------------------------------------------------------------
def channel_scale_for(o, dtype, seed=0):
    """(O,) factors with a zero and a negative entry (a folded norm can flip or kill a channel)."""
    cs = torch.randn(o, generator=torch.Generator().manual_seed(seed)).abs() + 0.25
    cs[0] = 0.0
    cs[-1] = -cs[-1]
    return cs.to(dtype)


def emu_scale_forward_channel_scale(lin, norm, b, b_is_tensor, max_out, scale, channel_scale):
    mode = scale_mode(b, b_is_tensor)
    n, om, p = lin.shape
    o = om // max_out
    g = 1 if mode == "one" else norm.shape[1]
    out = torch.empty(n, o, p, dtype=lin.dtype)
    lin_max = torch.empty(n, o, p, dtype=lin.dtype) if max_out > 1 else torch.empty(0, dtype=lin.dtype)
    winner = torch.empty(n, o, p, dtype=torch.uint8) if max_out > 1 else torch.empty(0, dtype=torch.uint8)
    check(lib.emu_bcos_scale_forward(DTYPE_CODE[lin.dtype], ptr(lin), None if mode == "one" else ptr(norm), ptr(out),
                                     ptr(lin_max), ptr(winner), ptr(channel_scale), i64s([n, o, max_out, p, g]),
                                     MODES[mode], b, scale))
    return out, lin_max, winner


def emu_conv_scale_forward_channel_scale(lin, x, case, b, b_is_tensor, max_out, scale, channel_scale):
    kernel_size, stride, padding, dilation, groups = case
    geom, ho, wo = geometry(x, kernel_size, stride, padding, dilation, groups)
    n = x.shape[0]
    o = lin.shape[1] // max_out
    dtype = lin.dtype
    norm = torch.empty(n, groups, ho, wo, dtype=dtype)
    out = torch.empty(n, o, ho * wo, dtype=dtype)
    lin_max = torch.empty(n, o, ho * wo, dtype=dtype) if max_out > 1 else torch.empty(0, dtype=dtype)
    winner = torch.empty(n, o, ho * wo, dtype=torch.uint8) if max_out > 1 else torch.empty(0, dtype=torch.uint8)
    sq = torch.empty(n, groups, x.shape[2], x.shape[3], dtype=acc_dtype(dtype))
    check(lib.emu_bcos_conv_scale_forward(
        DTYPE_CODE[dtype], ptr(lin), ptr(x), i64s(x.stride()), int(channels_last(x)), i64s(geom), ptr(sq), ptr(norm),
        ptr(out), ptr(lin_max), ptr(winner), ptr(channel_scale), i64s([n, o, max_out, ho * wo, groups]),
        MODES[scale_mode(b, b_is_tensor)], b, scale))
    return out, lin_max, winner, norm


def assert_scaled(got, unscaled, channel_scale, dtype, what):
    """got == unscaled * channel_scale[o]: bit for bit in fp32/fp64 (one multiply of the same value), within one
    rounding of the output in bf16/fp16 (unscaled was rounded before the multiply, got after it)."""
    want = unscaled.double() * channel_scale.double().view(1, -1, 1)
    if dtype in (torch.float32, torch.float64):
        assert torch.equal(got, want.to(dtype)), what
    else:
        torch.testing.assert_close(got.double(), want, rtol=2 * torch.finfo(dtype).eps, atol=0, msg=what)


# (N, O, P, G): batch 1, groups 2, P == 1 (a 1x1 output) and P > 1
CS_SHAPES = [(1, 4, 7, 1), (2, 6, 1, 2), (3, 4, 40, 2)]


@pytest.mark.parametrize("b,b_is_tensor", [(1.0, False), (2.0, False), (1.5, False), (1.7, True)])
@pytest.mark.parametrize("shape", CS_SHAPES)
@pytest.mark.parametrize("max_out", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_scale_forward_channel_scale(b, b_is_tensor, shape, max_out, dtype):
    n, o, p, g = shape
    scale = 0.7
    lin = torch.randn(n, o * max_out, p).to(dtype)
    lin[0, 0] = 0
    norm = (torch.rand(n, g, p) + 0.5).to(dtype)
    cs = channel_scale_for(o, dtype)
    plain = emu_scale_forward(lin, norm, b, b_is_tensor, max_out, scale)
    got = emu_scale_forward_channel_scale(lin, norm, b, b_is_tensor, max_out, scale, cs)
    assert_scaled(got[0], plain[0], cs, dtype, "out vs unscaled * channel_scale")
    assert torch.equal(got[1], plain[1]) and torch.equal(got[2], plain[2]), "lin_max / winner must stay unscaled"
    want = cpu_ops.bcos_scale_forward(lin, norm, b, b_is_tensor, max_out, scale, cs)
    assert_close(got[0], want[0], dtype, "out vs the CPU op with channel_scale")
    # a null factor is the plain kernel: bit for bit the entry point without the argument
    none = emu_scale_forward_channel_scale(lin, norm, b, b_is_tensor, max_out, scale, None)
    assert all(torch.equal(a, c) for a, c in zip(none, plain))
    ones = emu_scale_forward_channel_scale(lin, norm, b, b_is_tensor, max_out, scale, torch.ones(o, dtype=dtype))
    assert torch.equal(ones[0], plain[0])


@pytest.mark.parametrize("case", CONV_CASES[:3] + [((3, 3), (1, 1), (0, 0), (1, 1), 2)])
@pytest.mark.parametrize("b,b_is_tensor", [(2.0, False), (1.5, False), (1.7, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("max_out", [1, 2])
def test_conv_scale_forward_channel_scale(case, b, b_is_tensor, dtype, max_out):
    kernel_size, stride, padding, dilation, groups = case
    # the last case: a 3x3 input and a 3x3 kernel without padding, so one output pixel (P == 1); batch 1 there
    hw, n = ((3, 3), 1) if padding == (0, 0) and kernel_size == (3, 3) else ((7, 6), 2)
    x = torch.randn(n, 4, *hw).to(dtype).contiguous(memory_format=torch.channels_last)
    _, ho, wo = geometry(x, kernel_size, stride, padding, dilation, groups)
    o = 2 * groups
    lin = torch.randn(n, o * max_out, ho * wo).to(dtype)
    cs = channel_scale_for(o, dtype, seed=1)
    plain = emu_conv_scale_forward_channel_scale(lin, x, case, b, b_is_tensor, max_out, 1.0, None)
    got = emu_conv_scale_forward_channel_scale(lin, x, case, b, b_is_tensor, max_out, 1.0, cs)
    assert_scaled(got[0], plain[0], cs, dtype, "out vs unscaled * channel_scale")
    for name, a, c in zip(("lin_max", "winner", "norm"), got[1:], plain[1:]):
        assert torch.equal(a, c), f"{name} must not depend on channel_scale"
    norm_want = cpu_ops.patch_norm(x, list(kernel_size), list(stride), list(padding), list(dilation), groups)
    want = cpu_ops.bcos_scale_forward(lin, norm_want.flatten(2), b, b_is_tensor, max_out, 1.0, cs)
    assert_close(got[0], want[0], dtype, "out vs the CPU ops with channel_scale")


# ---------------------------------------------------------------------------------------------------------------
# DAU: the reference low-rank form and its derivatives, in float64.
# ---------------------------------------------------------------------------------------------------------------
def dau_inputs(bias, dtype, n=2, c=3, hw=5, k=3, rank=4, o=5):
    x = torch.randn(n, c, hw, hw, dtype=torch.float64)
    a = torch.randn(rank, c, k, k, dtype=torch.float64) * 0.3
    e = torch.randn(c * k * k * o, rank, 1, 1, dtype=torch.float64) * 0.3
    eb = torch.randn(c * k * k * o, dtype=torch.float64) * 0.3 if bias else None
    z = F.conv2d(x, a, None, 1, 1)
    filt = dau_ref.expand_to_filters(e, c, k)
    if bias:
        filt = torch.cat([filt, dau_ref.bias_to_filters(eb, c, k).unsqueeze(1)], 1)
    big_r = filt.shape[1]
    y = F.conv2d(x, filt.reshape(o * big_r, c, k, k), None, 1, 1)
    e3 = filt.reshape(o, big_r, -1)
    gram = e3 @ e3.transpose(1, 2)
    zp = z.permute(0, 2, 3, 1).reshape(-1, rank)
    yp = y.permute(0, 2, 3, 1).reshape(-1, o * big_r)
    return dict(x=x, a=a, e=e, eb=eb, z=zp, y=yp, gram=gram, o=o, rank=rank, big_r=big_r, k=k, n=n, hw=hw,
                dtype=dtype)


def dau_expected(d, norm, grad_out, detach):
    """out, s, and the backward quantities of csrc/common/dau_math.h, in float64."""
    z, y, gram, o, big_r = d["z"], d["y"], d["gram"], d["o"], d["big_r"]
    za = torch.cat([z, torch.ones(z.shape[0], 1, dtype=z.dtype)], 1) if big_r > z.shape[1] else z
    yo = y.reshape(-1, o, big_r)
    num = (yo * za.unsqueeze(1)).sum(2)
    q = torch.einsum("ps,ost,pt->po", za, gram, za)
    s = q.clamp_min(0).sqrt()
    qs = s * s
    if norm == "squash":
        inv, ratio = s / (1 + qs), (1 - qs) / (2 * qs * (1 + qs))
    else:
        inv, ratio = 1 / s, -0.5 / qs
    out = num * inv
    g = grad_out.double()
    dnum = g * inv
    dq = torch.zeros_like(dnum) if detach else g * out * ratio
    dza = (dnum.unsqueeze(2) * yo).sum(1) + 2 * torch.einsum("po,ost,pt->ps", dq, gram, za)
    dy = (dnum.unsqueeze(2) * za.unsqueeze(1)).reshape(y.shape)
    m = torch.einsum("po,ps,pt->ost", dq, za, za)
    return out, s, dza[:, : z.shape[1]], dy, m


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("norm", ["squash", "l2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dau_forward_backward(bias, norm, dtype):
    d = dau_inputs(bias, dtype)
    o, big_r, rank = d["o"], d["big_r"], d["rank"]
    cdt = acc_dtype(dtype)
    # y as a strided view of a wider tensor (the front door's zy[:, rank:]), z as the other part of it
    zy = torch.cat([d["z"], d["y"]], 1).to(dtype)
    z, y = zy[:, :rank], zy[:, rank:]
    gram = d["gram"].to(cdt)
    npix = z.shape[0]
    out = torch.empty(npix, o, dtype=dtype)
    s = torch.empty(npix, o, dtype=cdt)
    code = 0 if norm == "squash" else 1
    check(lib.emu_dau_forward(DTYPE_CODE[dtype], ptr(y), i64s(y.stride()), ptr(z), i64s(z.stride()), ptr(gram), npix,
                              o, rank, big_r, code, ptr(out), ptr(s)))
    grad_out = torch.randn(npix, o).to(dtype)
    # expected values from the inputs as the kernel sees them (rounded to dtype)
    d64 = dict(d, z=z.double(), y=y.double(), gram=gram.double())
    for detach in (False, True):
        want_out, want_s, want_dz, want_dy, want_m = dau_expected(d64, norm, grad_out, detach)
        if not detach:
            assert_close(out, want_out, dtype, "out")
            assert_close(s, want_s, cdt, "s")
        dz = torch.empty(npix, rank, dtype=dtype)
        dy = torch.empty(npix, o * big_r, dtype=dtype)
        m = torch.empty(o, big_r, big_r, dtype=cdt)
        need_m = not detach
        ws = torch.empty(lib.emu_dau_backward_workspace_elems(npix, o, rank, big_r, code, int(need_m)), dtype=cdt)
        gt = grad_out.t().contiguous().t()  # column-major grad_out: the kernels read its strides
        check(lib.emu_dau_backward(DTYPE_CODE[dtype], ptr(gt), i64s(gt.stride()), ptr(y), i64s(y.stride()), ptr(z),
                                   i64s(z.stride()), ptr(s), i64s(s.stride()), ptr(gram), npix, o, rank, big_r, code,
                                   int(detach), None if detach else ptr(dz), ptr(dy), None if detach else ptr(m),
                                   ptr(ws)))
        tol = dict(rtol=1e-4, atol=1e-5) if dtype != torch.bfloat16 else dict(rtol=3e-2, atol=3e-2)
        if dtype == torch.float64:
            tol = dict(rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(dy.double(), want_dy, **tol, msg="dy")
        if not detach:
            torch.testing.assert_close(dz.double(), want_dz, **tol, msg="dz")
            torch.testing.assert_close(m.double(), want_m, **tol, msg="m")


def test_dau_out_matches_reference_layer():
    d = dau_inputs(True, torch.float64)
    x, a, e, eb, k = d["x"], d["a"], d["e"], d["eb"], d["k"]
    want = dau_ref.dau_conv2d_lowrank(x, a, e, eb, kernel_size=k, stride=1, padding=1, norm="squash")
    npix, o = d["z"].shape[0], d["o"]
    out = torch.empty(npix, o, dtype=torch.float64)
    s = torch.empty(npix, o, dtype=torch.float64)
    check(lib.emu_dau_forward(1, ptr(d["y"]), i64s(d["y"].stride()), ptr(d["z"]), i64s(d["z"].stride()),
                              ptr(d["gram"]), npix, o, d["rank"], d["big_r"], 0, ptr(out), ptr(s)))
    got = out.reshape(d["n"], d["hw"], d["hw"], o).permute(0, 3, 1, 2)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# LWTA: the reference with explicit noise; the in-kernel draws against lwta_uniform and an independent Philox.
# ---------------------------------------------------------------------------------------------------------------
def lwta_shape(x, competitors):
    dim = 1 if x.dim() == 4 else x.dim() - 1
    outer = 1
    for v in x.shape[:dim]:
        outer *= v
    inner = 1
    for v in x.shape[dim + 1:]:
        inner *= v
    wshape = list(x.shape)
    wshape[dim] //= competitors
    return [outer, x.shape[dim], inner], wshape


def emu_lwta(x, competitors, temperature, deterministic, noise=None, seed=0, offset=0):
    shape, wshape = lwta_shape(x, competitors)
    out = torch.empty_like(x)
    winner = torch.empty(wshape, dtype=torch.uint8)
    ncode = DTYPE_CODE[noise.dtype] if noise is not None else 0
    check(lib.emu_lwta_forward(DTYPE_CODE[x.dtype], ptr(x), ptr(noise), ncode, i64s(shape), competitors, temperature,
                               int(deterministic), seed, offset, ptr(out), ptr(winner)))
    return out, winner


def emu_lwta_backward(grad_out, x, winner, competitors, temperature, deterministic, noise=None, seed=0, offset=0):
    shape, _ = lwta_shape(x, competitors)
    grad_x = torch.empty_like(x)
    ncode = DTYPE_CODE[noise.dtype] if noise is not None else 0
    check(lib.emu_lwta_backward(DTYPE_CODE[x.dtype], ptr(grad_out), ptr(x), ptr(winner), ptr(noise), ncode,
                                i64s(shape), competitors, temperature, int(deterministic), seed, offset, ptr(grad_x)))
    return grad_x


LWTA_CASES = [((2, 6, 3, 4), 2), ((2, 6, 3, 4), 3), ((5, 8), 4), ((2, 3, 8), 2), ((2, 3, 8), 8), ((3, 16), 16)]


@pytest.mark.parametrize("shape,competitors", LWTA_CASES)
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lwta_matches_reference(shape, competitors, deterministic, dtype):
    x = torch.randn(shape, dtype=dtype)
    noise = torch.rand(shape, dtype=torch.float32)
    temperature = 0.67
    out, winner = emu_lwta(x, competitors, temperature, deterministic, None if deterministic else noise)
    xr = x.clone().requires_grad_()
    want = lwta_ref.lwta(xr, competitors, temperature=temperature, deterministic=deterministic, noise=noise)
    assert_close(out, want.detach(), dtype, "out")
    grad_out = torch.randn(shape, dtype=dtype)
    want.backward(grad_out)
    grad_x = emu_lwta_backward(grad_out, x, winner, competitors, temperature, deterministic,
                               None if deterministic else noise)
    torch.testing.assert_close(grad_x, xr.grad, rtol=1e-5, atol=1e-6)


def test_lwta_half_noise_and_input():
    x = torch.randn(2, 8, 3, 3).to(torch.float16)
    noise = torch.rand(2, 8, 3, 3).to(torch.float16)
    out, winner = emu_lwta(x, 2, 1.67, False, noise)
    # the front door's semantics: the Gumbel transform in the noise's dtype (torch rounds after every op),
    # the rest in fp32, the output in x's dtype
    g = (noise + lwta_ref.GUMBEL_EPS).log().neg().add(lwta_ref.GUMBEL_EPS).log().neg()
    p = ((g.float() + x.float()) / 1.67).unflatten(1, (4, 2)).softmax(2)
    p_win, want_winner = p.max(2)
    mask = torch.zeros_like(p).scatter_(2, want_winner.unsqueeze(2), ((1.0 - p_win) + p_win).unsqueeze(2))
    want = (x.float() * mask.flatten(1, 2)).half()
    assert torch.equal(winner, want_winner.to(torch.uint8))
    torch.testing.assert_close(out, want, rtol=1e-3, atol=0)


def philox4x32_10(ctr, key):
    """Independent Python Philox4x32-10 (Salmon et al. 2011)."""
    m0, m1, w0, w1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for i in range(10):
        if i:
            k0, k1 = (k0 + w0) & 0xFFFFFFFF, (k1 + w1) & 0xFFFFFFFF
        p0, p1 = m0 * c0, m1 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & 0xFFFFFFFF, p1 & 0xFFFFFFFF, ((p0 >> 32) ^ c3 ^ k1) & 0xFFFFFFFF, \
            p0 & 0xFFFFFFFF
    return c0, c1, c2, c3


def test_philox_stream():
    assert philox4x32_10((0, 0, 0, 0), (0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    seed, offset, numel = 0x123456789AB, 7 + (3 << 32), 37
    u = torch.empty(numel, dtype=torch.float32)
    check(lib.emu_lwta_uniform(ptr(u), numel, seed, offset))
    for i in range(numel):
        blk = i // 4
        words = philox4x32_10((blk & 0xFFFFFFFF, blk >> 32, offset & 0xFFFFFFFF, offset >> 32),
                              (seed & 0xFFFFFFFF, seed >> 32))
        assert u[i].item() == (words[i % 4] >> 8) * 2.0 ** -24
    assert 0.0 <= u.min() and u.max() < 1.0


@pytest.mark.parametrize("shape,competitors", LWTA_CASES[:4])
def test_lwta_seeded_draw_equals_explicit_noise(shape, competitors):
    x = torch.randn(shape)
    seed, offset = 1234, 5
    u = torch.empty(shape, dtype=torch.float32)
    check(lib.emu_lwta_uniform(ptr(u), u.numel(), seed, offset))
    out_s, win_s = emu_lwta(x, competitors, 1.67, False, None, seed, offset)
    out_n, win_n = emu_lwta(x, competitors, 1.67, False, u)
    assert torch.equal(out_s, out_n) and torch.equal(win_s, win_n)
    g = torch.randn(shape)
    gx_s = emu_lwta_backward(g, x, win_s, competitors, 1.67, False, None, seed, offset)
    gx_n = emu_lwta_backward(g, x, win_n, competitors, 1.67, False, u)
    assert torch.equal(gx_s, gx_n)
    out_o, _ = emu_lwta(x, competitors, 1.67, False, None, seed, offset + 1)
    assert not torch.equal(out_o, out_s) or x.numel() < 8  # another offset, other draws


# ---------------------------------------------------------------------------------------------------------------
# Class-specific gate.
# ---------------------------------------------------------------------------------------------------------------
def emu_csg_forward(x, mask, labels):
    cl = x.dim() == 4 and channels_last(x)
    hw = x.shape[2] * x.shape[3] if x.dim() == 4 else 1
    out = torch.empty_like(x)  # keeps x's layout (NCHW or NHWC, both dense)
    check(lib.emu_csg_forward(DTYPE_CODE[x.dtype], ptr(x), ptr(mask), ptr(labels),
                              i64s([x.shape[0], x.shape[1], hw, mask.shape[1]]), int(cl), ptr(out)))
    return out


def emu_csg_backward(grad_out, x, mask, labels):
    cl = x.dim() == 4 and channels_last(x)
    hw = x.shape[2] * x.shape[3] if x.dim() == 4 else 1
    grad_out = grad_out.contiguous(memory_format=torch.channels_last) if cl else grad_out.contiguous()
    grad_x = torch.empty_like(grad_out)
    grad_mask = torch.empty(mask.shape, dtype=x.dtype)
    per_sample = torch.empty(x.shape[0], x.shape[1], dtype=acc_dtype(x.dtype))
    check(lib.emu_csg_backward(DTYPE_CODE[x.dtype], ptr(grad_out), ptr(x), ptr(mask), ptr(labels),
                               i64s([x.shape[0], x.shape[1], hw, mask.shape[1]]), int(cl), ptr(grad_x),
                               ptr(grad_mask), ptr(per_sample)))
    return grad_x, grad_mask


@pytest.mark.parametrize("shape", [(5, 4, 3, 2), (5, 4), (3, 40, 7, 7)])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_csg_forward_backward(shape, layout, dtype):
    if layout == "nhwc" and len(shape) != 4:
        pytest.skip("2-D input has one layout")
    x = torch.randn(shape).to(dtype)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    mask = torch.rand(shape[1], 3).to(dtype)
    labels = torch.tensor([2, 0, 2, 1, 0][: shape[0]])
    # the reference's semantics in float64 (csg_ref builds its gate in the default dtype, fp32)
    gate = mask.double()[:, labels].t().reshape(shape[:2] + (1,) * (len(shape) - 2))
    assert_close(emu_csg_forward(x, mask, labels), x.double() * gate, dtype, "out")
    ref32 = csg_ref.class_specific_gate(x.float(), mask.float(), labels)
    torch.testing.assert_close(emu_csg_forward(x, mask, labels).float(), ref32, rtol=2e-2, atol=1e-2)
    grad_out = torch.randn(shape).to(dtype)
    grad_x, grad_mask = emu_csg_backward(grad_out, x, mask, labels)
    assert_close(grad_x, grad_out.double() * gate, dtype, "grad_x")
    per_sample = grad_out.double() * x.double()
    if per_sample.dim() == 4:
        per_sample = per_sample.sum((2, 3))
    want_mask = per_sample.t() @ F.one_hot(labels, 3).double()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype != torch.bfloat16 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(grad_mask.double(), want_mask, **tol)


def test_csg_label_out_of_range_gives_nan():
    x = torch.randn(2, 3)
    mask = torch.rand(3, 2)
    out = emu_csg_forward(x, mask, torch.tensor([1, 2]))
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).all()

"""The C++ CPU ops of bcos_kernels._C against pure-PyTorch formulas in float64.

Ops: patch_norm, patch_norm_backward(_add_), bcos_scale_forward, bcos_scale_backward,
weight_normalize(_backward) (schemas in csrc/ops.cpp).  The formulas below are written out here, in
float64, independently of bcos_kernels.reference.  fp32/fp64 are compared
with tight tolerances; bf16/fp16 follow the design's convention: the error of
the kernel against the float64 formula is at most twice the error of the same
formula evaluated by PyTorch in that dtype (plus one rounding of the output).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("bcos_kernels._C")  # guard only: CI always builds the extension

from bcos_kernels.ops import _cpu_fake  # noqa: E402,F401  (fake impls, needed by opcheck)

ops = torch.ops.bcos_kernels

FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16]
LOWP = (torch.bfloat16, torch.float16)
EPS = 1e-6


# ---------------------------------------------------------------------------
# Float64 formulas.
# ---------------------------------------------------------------------------
def ref_patch_norm(x, kernel_size, stride, padding, dilation, groups):
    """sqrt(sum over the channels of the group and the taps of the patch of x^2 + 1e-6)."""
    n, c, h, w = x.shape
    sq = x.pow(2).reshape(n, groups, c // groups, h, w).sum(2)
    ones = torch.ones(groups, 1, *kernel_size, dtype=x.dtype)
    box = F.conv2d(sq, ones, stride=stride, padding=padding, dilation=dilation, groups=groups)
    return (box + EPS).sqrt()


def scale_mode(b, b_is_tensor):
    if not b_is_tensor and b == 1:
        return "one"
    if not b_is_tensor and b == 2:
        return "two"
    return "general"


def ref_scale(lin, norm, b, b_is_tensor, max_out, scale, detach=False):
    """(out, lin_max, winner) of the B-cos dynamic scale; b may be a float or a 0-dim tensor."""
    n, om, p = lin.shape
    o = om // max_out
    lin_max, winner = lin.reshape(n, o, max_out, p).max(2)
    mode = scale_mode(float(b.detach()) if torch.is_tensor(b) else b, b_is_tensor)
    if mode == "one":
        return lin_max / scale, lin_max, winner
    nr = norm.repeat_interleave(o // norm.shape[1], dim=1)
    if mode == "two":
        factor = lin_max.abs() / nr
    else:
        factor = (lin_max / nr).abs().add(EPS).pow(b - 1)
    if detach:
        factor = factor.detach()
    return (factor * lin_max) / scale, lin_max, winner


# ---------------------------------------------------------------------------
# Comparison helpers.
# ---------------------------------------------------------------------------
def assert_close(got, ref64, ref_lowp=None, rtol=None, atol=None):
    """got vs the float64 formula; in bf16/fp16 by the 2x-the-reference-error rule."""
    assert torch.isfinite(got).all()
    if got.dtype in LOWP:
        assert ref_lowp is not None
        err = (got.double() - ref64).abs().max().item() if got.numel() else 0.0
        err_ref = (ref_lowp.double() - ref64).abs().max().item() if got.numel() else 0.0
        floor = torch.finfo(got.dtype).eps * (ref64.abs().max().item() if got.numel() else 0.0)
        assert err <= 2 * err_ref + floor, f"error {err} > 2 x reference error {err_ref} (+ {floor})"
        return
    if rtol is None:
        # atol is relative to the largest value: sums (grad_norm, grad_x) cancel
        rtol, atol = (1e-5, 1e-6) if got.dtype == torch.float32 else (1e-10, 1e-12)
        atol *= max(1.0, ref64.abs().max().item() if ref64.numel() else 0.0)
    torch.testing.assert_close(got.double(), ref64, rtol=rtol, atol=atol)


def randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def rand_norm(*shape, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 + 0.25).to(dtype)


# ---------------------------------------------------------------------------
# patch_norm and its backward.
# ---------------------------------------------------------------------------
# (N, C, H, W, kernel_size, stride, padding, dilation, groups)
GEOMETRIES = [
    pytest.param(1, 3, 7, 5, (3, 3), (1, 1), (1, 1), (1, 1), 1, id="batch1-odd-3x3"),
    pytest.param(2, 8, 9, 11, (1, 1), (2, 2), (0, 0), (1, 1), 2, id="1x1-stride2-g2"),
    pytest.param(2, 8, 10, 9, (3, 3), (2, 2), (0, 0), (2, 2), 4, id="dilation2-pad0-g4"),
    pytest.param(3, 6, 8, 8, (3, 3), (1, 1), (3, 3), (1, 1), 6, id="depthwise-pad-gt-half"),
    pytest.param(2, 4, 7, 7, (5, 3), (2, 1), (2, 1), (1, 2), 1, id="rect-kernel-mixed"),
    pytest.param(1, 5, 13, 13, (7, 7), (2, 2), (3, 3), (1, 1), 1, id="stem-7x7-s2"),
    pytest.param(2, 2, 3, 3, (3, 3), (1, 1), (4, 4), (1, 1), 2, id="pad-larger-than-kernel"),
    pytest.param(1, 13, 50, 47, (3, 3), (1, 1), (1, 1), (1, 1), 1, id="large-plane-odd-channels"),
]

LAYOUTS = ["contiguous", "channels_last", "strided"]


def make_x(n, c, h, w, dtype, layout, seed=0):
    if layout == "strided":  # a non-dense view: every other column of a wider tensor
        return randn(n, c, h, 2 * w, dtype=dtype, seed=seed)[..., ::2]
    x = randn(n, c, h, w, dtype=dtype, seed=seed)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def over_geometries(test):
    """Every geometry x dtype x layout."""
    for mark in (
        pytest.mark.parametrize("n,c,h,w,k,s,p,d,g", GEOMETRIES),
        pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str),
        pytest.mark.parametrize("layout", LAYOUTS),
    ):
        test = mark(test)
    return test


@over_geometries
def test_patch_norm(n, c, h, w, k, s, p, d, g, dtype, layout):
    x = make_x(n, c, h, w, dtype, layout)
    norm = ops.patch_norm(x, list(k), list(s), list(p), list(d), g)
    ref64 = ref_patch_norm(x.double(), k, s, p, d, g)
    assert norm.shape == ref64.shape and norm.dtype == dtype and norm.is_contiguous()
    ref_lowp = ref_patch_norm(x, k, s, p, d, g) if dtype in LOWP else None
    assert_close(norm, ref64, ref_lowp)


def patch_norm_backward_args(n, c, h, w, k, s, p, d, g, dtype, layout):
    """(grad_norm, x, norm, geometry...): the arguments of patch_norm_backward for a geometry."""
    x = make_x(n, c, h, w, dtype, layout)
    norm = ops.patch_norm(x, list(k), list(s), list(p), list(d), g)
    return randn(*norm.shape, dtype=dtype, seed=5), x, norm, list(k), list(s), list(p), list(d), g


@over_geometries
def test_patch_norm_backward(n, c, h, w, k, s, p, d, g, dtype, layout):
    grad_norm, x, *_ = args = patch_norm_backward_args(n, c, h, w, k, s, p, d, g, dtype, layout)
    grad_x = ops.patch_norm_backward(*args)
    assert grad_x.shape == x.shape and grad_x.dtype == dtype
    if layout == "channels_last":
        assert grad_x.is_contiguous(memory_format=torch.channels_last)
    else:
        assert grad_x.is_contiguous()

    def autograd_ref(xr, gn):
        xr = xr.detach().requires_grad_()
        (gx,) = torch.autograd.grad(ref_patch_norm(xr, k, s, p, d, g), xr, gn)
        return gx

    ref64 = autograd_ref(x.double(), grad_norm.double())
    ref_lowp = autograd_ref(x, grad_norm) if dtype in LOWP else None
    assert_close(grad_x, ref64, ref_lowp)


@over_geometries
def test_patch_norm_backward_add_(n, c, h, w, k, s, p, d, g, dtype, layout):
    """Adds exactly the gradient patch_norm_backward returns into grad_x, in the layout x is read in."""
    _, x, *_ = args = patch_norm_backward_args(n, c, h, w, k, s, p, d, g, dtype, layout)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    start = randn(*x.shape, dtype=dtype, seed=7).contiguous(memory_format=fmt)
    grad_x = start.clone(memory_format=fmt)
    ops.patch_norm_backward_add_(grad_x, *args)
    gx = ops.patch_norm_backward(*args)
    # one rounding of the sum instead of two (and a fused multiply-add where the compiler makes one)
    assert_close(grad_x, start.double() + gx.double(), start + gx if dtype in LOWP else None)


def test_patch_norm_backward_add_rejects_another_layout():
    x = make_x(2, 4, 6, 6, torch.float32, "channels_last")
    norm = ops.patch_norm(x, [3, 3], [1, 1], [1, 1], [1, 1], 1)
    args = (torch.ones_like(norm), x, norm, [3, 3], [1, 1], [1, 1], [1, 1], 1)
    with pytest.raises(RuntimeError, match="grad_x must be channels_last"):
        ops.patch_norm_backward_add_(torch.zeros(x.shape), *args)
    with pytest.raises(RuntimeError, match="grad_x must have the shape"):
        ops.patch_norm_backward_add_(torch.zeros(2, 4, 6, 5), *args)


# ---------------------------------------------------------------------------
# weight_normalize and its backward: w / ||w|| per filter.
# ---------------------------------------------------------------------------
# (shape, layout): conv filters NCHW and channels_last, 1x1, one filter, a linear, one input feature,
# rows longer than the 16 summation lanes and not a multiple of them
WEIGHT_CASES = [
    pytest.param((7, 5, 3, 3), "contiguous", id="conv-3x3-odd"),
    pytest.param((7, 5, 3, 3), "channels_last", id="conv-3x3-channels-last"),
    pytest.param((4, 6, 7, 7), "strided", id="conv-7x7-strided"),
    pytest.param((9, 33, 1, 1), "contiguous", id="conv-1x1"),
    pytest.param((1, 3, 2, 2), "contiguous", id="one-filter"),
    pytest.param((5, 37), "contiguous", id="linear"),
    pytest.param((6, 1), "contiguous", id="linear-one-input"),
]


def make_weight(shape, layout, dtype, seed=0):
    if layout == "strided":  # a non-dense view: every other input channel
        return randn(shape[0], 2 * shape[1], *shape[2:], dtype=dtype, seed=seed)[:, ::2]
    w = randn(*shape, dtype=dtype, seed=seed)
    return w.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else w


def ref_weight_normalize(w):
    dims = tuple(range(1, w.dim()))
    norm = torch.linalg.vector_norm(w, dim=dims, keepdim=True)
    return w / norm, norm


@pytest.mark.parametrize("shape,layout", WEIGHT_CASES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES + [torch.float16], ids=str)
def test_weight_normalize(shape, layout, dtype):
    w = make_weight(shape, layout, dtype)
    w_hat, norm = ops.weight_normalize(w)
    assert w_hat.shape == w.shape and norm.shape == (shape[0],) + (1,) * (len(shape) - 1)
    assert w_hat.is_contiguous(
        memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format
    )
    ref_w_hat, ref_norm = ref_weight_normalize(w.double())
    lowp = ref_weight_normalize(w) if dtype in LOWP else (None, None)
    assert_close(norm, ref_norm, lowp[1])
    assert_close(w_hat, ref_w_hat, lowp[0])


@pytest.mark.parametrize("shape,layout", WEIGHT_CASES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES + [torch.float16], ids=str)
def test_weight_normalize_backward(shape, layout, dtype):
    w = make_weight(shape, layout, dtype)
    grad = randn(*shape, dtype=dtype, seed=3)  # NCHW even for a channels_last weight
    w_hat, norm = ops.weight_normalize(w)
    grad_w = ops.weight_normalize_backward(grad, w_hat, norm)
    assert grad_w.shape == w.shape

    def autograd_ref(wr, g):
        wr = wr.detach().requires_grad_()
        (gw,) = torch.autograd.grad(ref_weight_normalize(wr)[0], wr, g)
        return gw

    assert_close(grad_w, autograd_ref(w.double(), grad.double()), autograd_ref(w, grad) if dtype in LOWP else None)


def test_weight_normalize_zero_filter_is_nan_like_the_reference():
    w = randn(3, 4, 3, 3)
    w[1] = 0
    w_hat, norm = ops.weight_normalize(w)
    ref_w_hat, ref_norm = ref_weight_normalize(w)
    torch.testing.assert_close(w_hat, ref_w_hat, equal_nan=True)
    assert torch.isnan(w_hat[1]).all() and norm[1].item() == 0


def test_weight_normalize_errors_name_the_argument():
    with pytest.raises(RuntimeError, match="weight must have at least 2 dimensions"):
        ops.weight_normalize(torch.ones(3))
    with pytest.raises(RuntimeError, match="weight must be a floating point tensor"):
        ops.weight_normalize(torch.ones(3, 2, dtype=torch.int32))
    w_hat, norm = ops.weight_normalize(torch.ones(3, 2))
    with pytest.raises(RuntimeError, match="grad_w_hat must have the shape"):
        ops.weight_normalize_backward(torch.ones(3, 3), w_hat, norm)
    with pytest.raises(RuntimeError, match="norm must hold one value per filter"):
        ops.weight_normalize_backward(torch.ones(3, 2), w_hat, norm[:2])


def test_patch_norm_float16():
    x = make_x(2, 6, 9, 9, torch.float16, "contiguous")
    norm = ops.patch_norm(x, [3, 3], [1, 1], [1, 1], [1, 1], 3)
    assert_close(
        norm,
        ref_patch_norm(x.double(), (3, 3), (1, 1), (1, 1), (1, 1), 3),
        ref_patch_norm(x.float(), (3, 3), (1, 1), (1, 1), (1, 1), 3).half(),
    )


def test_patch_norm_zero_input_is_finite():
    x = torch.zeros(2, 4, 6, 6)
    norm = ops.patch_norm(x, [3, 3], [1, 1], [2, 2], [1, 1], 1)
    torch.testing.assert_close(norm, torch.full_like(norm, 1e-3))
    grad_x = ops.patch_norm_backward(torch.ones_like(norm), x, norm, [3, 3], [1, 1], [2, 2], [1, 1], 1)
    assert torch.isfinite(grad_x).all() and (grad_x == 0).all()


# ---------------------------------------------------------------------------
# bcos_scale_forward / bcos_scale_backward.
# ---------------------------------------------------------------------------
# (N, O, P, G): batch 1, odd sizes, groups 1/2/4, depthwise (G == O), P above one position block,
# and P == 1 (the linear layers: rows x features x 1), with more channels than one tile
SCALE_SHAPES = [
    (1, 4, 7, 1),
    (3, 8, 33, 2),
    (2, 8, 19, 4),
    (2, 6, 5, 6),
    (2, 4, 2500, 2),
    (5, 12, 1, 3),
    (3, 600, 1, 1),
]
B_VALUES = [1.0, 1.5, 2.0, 2.5]


def scale_inputs(n, o, p, g, max_out, dtype, seed=0):
    lin = randn(n, o * max_out, p, dtype=dtype, seed=seed)
    norm = rand_norm(n, g, p, dtype=dtype, seed=seed + 1)
    return lin, norm


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("max_out", [1, 2, 3])
@pytest.mark.parametrize("b_is_tensor", [False, True])
@pytest.mark.parametrize("b", B_VALUES)
def test_scale_forward(b, b_is_tensor, max_out, dtype):
    for i, (n, o, p, g) in enumerate(SCALE_SHAPES):
        for scale in (1.0, 0.3):
            lin, norm = scale_inputs(n, o, p, g, max_out, dtype, seed=i)
            if scale_mode(b, b_is_tensor) == "one" and i % 2:
                norm = torch.empty(0, dtype=dtype)  # the norm is not read
            out, lin_max, winner = ops.bcos_scale_forward(lin, norm, b, b_is_tensor, max_out, scale)
            ref64, ref_max, ref_win = ref_scale(lin.double(), norm.double(), b, b_is_tensor, max_out, scale)
            assert out.shape == (n, o, p) and out.dtype == dtype
            if max_out == 1:
                assert lin_max.shape == (0,) and lin_max.dtype == dtype
                assert winner.shape == (0,) and winner.dtype == torch.uint8
            else:
                assert winner.dtype == torch.uint8 and torch.equal(winner.long(), ref_win)
                assert lin_max.dtype == dtype and torch.equal(lin_max.double(), ref_max)
            ref_lowp = ref_scale(lin, norm, b, b_is_tensor, max_out, scale)[0] if dtype in LOWP else None
            assert_close(out, ref64, ref_lowp)


def test_scale_forward_b2_bitwise_fp32():
    """b == 2 keeps the operation order of the original code: bit-identical in fp32."""
    lin, norm = scale_inputs(3, 8, 101, 2, 2, torch.float32)
    for scale in (1.0, 0.7):
        out, _, _ = ops.bcos_scale_forward(lin, norm, 2.0, False, 2, scale)
        lin_max = lin.view(3, 8, 2, 101).max(2).values
        nr = norm.repeat_interleave(4, dim=1)
        assert torch.equal(out, ((lin_max.abs() / nr) * lin_max) / scale)


def test_scale_forward_first_maximum_wins():
    lin = torch.tensor([[[1.0, 2.0, 3.0], [1.0, 5.0, 3.0], [0.0, 5.0, 3.0]]])  # (1, 3 = 1 * M, 3)
    out, lin_max, winner = ops.bcos_scale_forward(lin, torch.empty(0), 1.0, False, 3, 1.0)
    assert torch.equal(winner, torch.tensor([[[0, 1, 0]]], dtype=torch.uint8))
    assert torch.equal(lin_max, torch.tensor([[[1.0, 5.0, 3.0]]]))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize("max_out", [1, 2, 3])
@pytest.mark.parametrize("b_is_tensor", [False, True])
@pytest.mark.parametrize("b", B_VALUES)
def test_scale_backward(b, b_is_tensor, max_out, detach, dtype):
    mode = scale_mode(b, b_is_tensor)
    for i, (n, o, p, g) in enumerate(SCALE_SHAPES):
        scale = 1.0 if i % 2 else 0.3
        need_grad_norm = i != 1
        need_grad_b = i != 2
        lin, norm = scale_inputs(n, o, p, g, max_out, dtype, seed=10 + i)
        _, lin_max, winner = ops.bcos_scale_forward(lin, norm, b, b_is_tensor, max_out, scale)
        if max_out == 1:
            lin_max = lin
        grad_out = randn(n, o, p, dtype=dtype, seed=20 + i)
        grad_lin, grad_norm, grad_b = ops.bcos_scale_backward(
            grad_out, lin_max, norm, winner, b, b_is_tensor, max_out, scale, detach, need_grad_norm, need_grad_b
        )

        def autograd_ref(lin_r, norm_r, b_r, go):
            lin_r = lin_r.detach().requires_grad_()
            norm_r = norm_r.detach().requires_grad_()
            b_t = torch.tensor(b, dtype=lin_r.dtype, requires_grad=True)
            out = ref_scale(lin_r, norm_r, b_t if b_is_tensor else b, b_is_tensor, max_out, scale, detach)[0]
            g_lin, g_norm = torch.autograd.grad(out, [lin_r, norm_r], go, allow_unused=True)
            # d out/d b: the full derivative, also when the scale factor is detached
            out_b = ref_scale(lin_r.detach(), norm_r.detach(), b_t, True, max_out, scale)[0]
            (g_b,) = torch.autograd.grad(out_b, [b_t], go)
            return g_lin, g_norm, g_b

        r_lin, r_norm, r_b = autograd_ref(lin.double(), norm.double(), b, grad_out.double())
        l_lin, l_norm, l_b = autograd_ref(lin, norm, b, grad_out) if dtype in LOWP else (None,) * 3

        assert grad_lin.shape == (n, o * max_out, p) and grad_lin.dtype == dtype
        assert_close(grad_lin, r_lin, l_lin)

        if need_grad_norm and not detach and mode != "one":
            assert grad_norm.shape == (n, g, p) and grad_norm.dtype == dtype
            assert_close(grad_norm, r_norm, l_norm)
        else:
            assert grad_norm.shape == (0,)

        b_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        assert grad_b.dtype == b_dtype
        if need_grad_b and mode == "general":
            assert grad_b.shape == ()
            if dtype in LOWP:
                # grad_b is returned in float32; compare like the other low-precision results
                assert_close(grad_b.to(dtype), r_b, l_b)
            else:
                assert_close(
                    grad_b,
                    r_b,
                    rtol=1e-5 if dtype == torch.float32 else 1e-10,
                    atol=1e-4 if dtype == torch.float32 else 1e-10,
                )
        else:
            assert grad_b.shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("b,b_is_tensor", [(2.0, False), (2.5, False), (2.0, True)])
@pytest.mark.parametrize("detach", [False, True])
def test_scale_zero_inputs_are_finite(b, b_is_tensor, detach, dtype):
    """Zero responses with conv-like (1e-3) and linear-like (1e-12) norms: finite, no NaN."""
    lin = torch.zeros(2, 4, 6, dtype=dtype)
    lin[1, :, :3] = 0.5  # non-zero responses over tiny norms too
    norm = torch.full((2, 2, 6), 1e-3, dtype=dtype)
    norm[:, :, 3:] = 1e-12
    out, _, _ = ops.bcos_scale_forward(lin, norm, b, b_is_tensor, 1, 1.0)
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all()
    grads = ops.bcos_scale_backward(
        torch.ones_like(out), lin, norm, torch.empty(0, dtype=torch.uint8), b, b_is_tensor, 1, 1.0, detach, True, True
    )
    for t in grads:
        assert torch.isfinite(t).all()


# ---------------------------------------------------------------------------
# Determinism: the results do not depend on the number of threads.
# ---------------------------------------------------------------------------
def test_results_independent_of_thread_count():
    x = make_x(2, 12, 40, 60, torch.float32, "contiguous")
    lin, norm = scale_inputs(2, 6, 40 * 60, 3, 2, torch.float32)
    grad_out = randn(2, 6, 40 * 60, seed=7)
    rows, rnorm = scale_inputs(500, 700, 1, 1, 1, torch.float32)  # P == 1
    rgrad = randn(500, 700, 1, seed=8)

    def run():
        nrm = ops.patch_norm(x, [3, 3], [1, 1], [1, 1], [1, 1], 3)
        gx = ops.patch_norm_backward(nrm, x, nrm, [3, 3], [1, 1], [1, 1], [1, 1], 3)
        fwd = ops.bcos_scale_forward(lin, norm, 2.5, True, 2, 1.0)
        bwd = ops.bcos_scale_backward(grad_out, fwd[1], norm, fwd[2], 2.5, True, 2, 1.0, False, True, True)
        rbwd = ops.bcos_scale_backward(
            rgrad, rows, rnorm, torch.empty(0, dtype=torch.uint8), 2.5, True, 1, 1.0, False, True, True
        )
        return (nrm, gx) + tuple(fwd) + tuple(bwd) + tuple(rbwd)

    old = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 1, 2):
            torch.set_num_threads(threads)
            results.append(run())
    finally:
        torch.set_num_threads(old)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------
# The baseline, AVX2 and AVX-512 builds of the kernels agree (each run is a
# fresh process: BCOS_KERNELS_CPU_ISA is read once; it can only lower the ISA).
# ---------------------------------------------------------------------------
_ISA_SCRIPT = r"""
import sys, torch
import bcos_kernels
from bcos_kernels.ops import _cpu_fake
ops = torch.ops.bcos_kernels
g = torch.Generator().manual_seed(0)
out = {}
for dtype in (torch.float32, torch.bfloat16):
    x = torch.randn(2, 12, 17, 23, generator=g).to(dtype)
    for cl in (False, True):
        xx = x.contiguous(memory_format=torch.channels_last) if cl else x
        nrm = ops.patch_norm(xx, [3, 3], [2, 1], [1, 2], [1, 2], 3)
        out[f"pn{dtype}{cl}"] = nrm
        args = ([3, 3], [2, 1], [1, 2], [1, 2], 3)
        out[f"pnb{dtype}{cl}"] = ops.patch_norm_backward(torch.ones_like(nrm), xx, nrm, *args)
    lin = torch.randn(2, 12, 2100, generator=g).to(dtype)
    norm = (torch.rand(2, 2, 2100, generator=g) + 0.5).to(dtype)
    go = torch.randn(2, 4, 2100, generator=g).to(dtype)
    rows = torch.randn(300, 900, 1, generator=g).to(dtype)  # P == 1 (linear layers)
    rnorm = (torch.rand(300, 1, 1, generator=g) + 0.5).to(dtype)
    rgo = torch.randn(300, 300, 1, generator=g).to(dtype)
    for b, bt in ((1.0, False), (2.0, False), (2.5, False), (2.0, True)):
        f = ops.bcos_scale_forward(lin, norm, b, bt, 3, 1.0)
        out[f"f{dtype}{b}{bt}"] = f
        out[f"b{dtype}{b}{bt}"] = ops.bcos_scale_backward(go, f[1], norm, f[2], b, bt, 3, 1.0, False, True, True)
        f = ops.bcos_scale_forward(rows, rnorm, b, bt, 3, 1.0)
        out[f"fr{dtype}{b}{bt}"] = f
        out[f"br{dtype}{b}{bt}"] = ops.bcos_scale_backward(rgo, f[1], rnorm, f[2], b, bt, 3, 1.0, False, True, True)
torch.save(out, sys.argv[1])
"""


def test_isa_builds_agree(tmp_path):
    results = {}
    for isa in ("baseline", "avx2", "avx512"):
        path = tmp_path / f"{isa}.pt"
        env = dict(os.environ, BCOS_KERNELS_CPU_ISA=isa)
        subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(path)], check=True, env=env)
        results[isa] = torch.load(path)
    ref = results["baseline"]
    for isa in ("avx2", "avx512"):
        for key, value in results[isa].items():
            got = value if isinstance(value, (tuple, list)) else (value,)
            want = ref[key] if isinstance(ref[key], (tuple, list)) else (ref[key],)
            for a, b in zip(got, want):
                if key.startswith(("f", "fr")) and ("2.0False" in key or "1.0False" in key):
                    assert torch.equal(a, b), key  # b in {1, 2}: no addition, identical bits
                elif a.dtype == torch.uint8:
                    assert torch.equal(a, b), key
                else:
                    tol = 1e-5 if a.dtype in (torch.float32, torch.float64) else 1e-2
                    torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=key)


# ---------------------------------------------------------------------------
# Argument checks name the argument.
# ---------------------------------------------------------------------------
def test_bad_arguments():
    x = torch.randn(2, 6, 5, 5)
    with pytest.raises(RuntimeError, match="x must have 4 dimensions"):
        ops.patch_norm(x[0], [3, 3], [1, 1], [1, 1], [1, 1], 1)
    with pytest.raises(RuntimeError, match="not divisible by groups"):
        ops.patch_norm(x, [3, 3], [1, 1], [1, 1], [1, 1], 4)
    with pytest.raises(RuntimeError, match="kernel"):
        ops.patch_norm(x, [7, 7], [1, 1], [0, 0], [1, 1], 1)
    with pytest.raises(RuntimeError, match="x must be float32"):
        ops.patch_norm(x.long(), [3, 3], [1, 1], [1, 1], [1, 1], 1)
    norm = ops.patch_norm(x, [3, 3], [1, 1], [1, 1], [1, 1], 2)
    with pytest.raises(RuntimeError, match="grad_norm must have shape"):
        ops.patch_norm_backward(norm[:, :1], x, norm, [3, 3], [1, 1], [1, 1], [1, 1], 2)
    with pytest.raises(RuntimeError, match="norm has dtype"):
        ops.patch_norm_backward(norm, x, norm.double(), [3, 3], [1, 1], [1, 1], [1, 1], 2)
    lin = torch.randn(2, 6, 10)
    nrm = torch.rand(2, 2, 10) + 1
    with pytest.raises(RuntimeError, match="lin must have 3 dimensions"):
        ops.bcos_scale_forward(lin[0], nrm, 2.0, False, 1, 1.0)
    with pytest.raises(RuntimeError, match="not divisible by max_out"):
        ops.bcos_scale_forward(lin, nrm, 2.0, False, 4, 1.0)
    with pytest.raises(RuntimeError, match="norm must have shape"):
        ops.bcos_scale_forward(lin, nrm[..., :5], 2.0, False, 1, 1.0)
    with pytest.raises(RuntimeError, match="does not divide"):
        ops.bcos_scale_forward(lin, torch.rand(2, 4, 10) + 1, 2.0, False, 1, 1.0)
    with pytest.raises(RuntimeError, match="scale must be non-zero"):
        ops.bcos_scale_forward(lin, nrm, 2.0, False, 1, 0.0)
    nrm3 = torch.rand(2, 3, 10) + 1
    out, lin_max, winner = ops.bcos_scale_forward(lin, nrm3, 2.0, False, 2, 1.0)
    with pytest.raises(RuntimeError, match="winner must be uint8"):
        ops.bcos_scale_backward(out, lin_max, nrm3, winner.long(), 2.0, False, 2, 1.0, False, True, False)
    with pytest.raises(RuntimeError, match="grad_out must have the shape"):
        ops.bcos_scale_backward(out[:, :1], lin_max, nrm3, winner, 2.0, False, 2, 1.0, False, True, False)


# ---------------------------------------------------------------------------
# opcheck: schemas and fake impls.
# ---------------------------------------------------------------------------
OPCHECK_UTILS = ("test_schema", "test_faketensor")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_patch_norm(dtype, layout):
    for n, c, h, w, k, s, p, d, g in [
        (2, 4, 7, 6, (3, 3), (1, 1), (1, 1), (1, 1), 2),
        (1, 3, 9, 9, (1, 1), (2, 2), (0, 0), (1, 1), 3),
        (1, 4, 8, 8, (3, 3), (2, 1), (3, 3), (2, 2), 1),
    ]:
        x = make_x(n, c, h, w, dtype, layout)
        args = (list(k), list(s), list(p), list(d), g)
        torch.library.opcheck(ops.patch_norm.default, (x, *args), test_utils=OPCHECK_UTILS)
        norm = ops.patch_norm(x, *args)
        grad_norm = randn(*norm.shape, dtype=dtype, seed=3)
        torch.library.opcheck(ops.patch_norm_backward.default, (grad_norm, x, norm, *args), test_utils=OPCHECK_UTILS)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck_weight_normalize(layout):
    w = make_weight((5, 3, 3, 3), layout, torch.float32)
    torch.library.opcheck(ops.weight_normalize.default, (w,), test_utils=OPCHECK_UTILS)
    w_hat, norm = ops.weight_normalize(w)
    grad = randn(5, 3, 3, 3, seed=2)
    torch.library.opcheck(ops.weight_normalize_backward.default, (grad, w_hat, norm), test_utils=OPCHECK_UTILS)
    x = make_x(2, 3, 6, 6, torch.float32, layout)
    norm_x = ops.patch_norm(x, [3, 3], [1, 1], [1, 1], [1, 1], 1)
    grad_x = torch.zeros_like(x)
    args = (grad_x, torch.ones_like(norm_x), x, norm_x, [3, 3], [1, 1], [1, 1], [1, 1], 1)
    torch.library.opcheck(ops.patch_norm_backward_add_.default, args, test_utils=OPCHECK_UTILS)


@pytest.mark.parametrize("max_out", [1, 3])
@pytest.mark.parametrize("b,b_is_tensor", [(1.0, False), (2.0, False), (2.5, False), (2.0, True)])
def test_opcheck_scale(b, b_is_tensor, max_out):
    n, o, p, g = 2, 4, 9, 2
    lin, norm = scale_inputs(n, o, p, g, max_out, torch.float32)
    torch.library.opcheck(
        ops.bcos_scale_forward.default, (lin, norm, b, b_is_tensor, max_out, 1.0), test_utils=OPCHECK_UTILS
    )
    if scale_mode(b, b_is_tensor) == "one":
        torch.library.opcheck(
            ops.bcos_scale_forward.default,
            (lin, torch.empty(0), b, b_is_tensor, max_out, 0.5),
            test_utils=OPCHECK_UTILS,
        )
    _, lin_max, winner = ops.bcos_scale_forward(lin, norm, b, b_is_tensor, max_out, 1.0)
    if max_out == 1:
        lin_max = lin
    grad_out = randn(n, o, p, seed=4)
    for detach, need_grad_norm, need_grad_b in itertools.product([False, True], repeat=3):
        torch.library.opcheck(
            ops.bcos_scale_backward.default,
            (grad_out, lin_max, norm, winner, b, b_is_tensor, max_out, 1.0, detach, need_grad_norm, need_grad_b),
            test_utils=OPCHECK_UTILS,
        )
    for dtype in (torch.float64, torch.bfloat16):
        torch.library.opcheck(
            ops.bcos_scale_backward.default,
            (
                grad_out.to(dtype),
                lin_max.to(dtype),
                norm.to(dtype),
                winner,
                b,
                b_is_tensor,
                max_out,
                1.0,
                False,
                True,
                True,
            ),
            test_utils=OPCHECK_UTILS,
        )

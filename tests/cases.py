"""The case table of every op (tests/ops/test_<op>.py runs each case on every backend the registry lists).

A case holds its inputs once, in fp64, under the names of the front door's (and the reference function's)
arguments: the fp64 tensors are the differentiable inputs (each test rounds them to its dtype and takes their
gradients); the others (labels, fp32 uniform noise) go in as they are. ``kwargs`` are the other arguments,
``channels_last`` puts x in that layout, ``facts`` are what the registry's limits read (backends.call_reason).
Shapes are tiny: the Triton interpreter runs every fp32 case.
"""

import zlib
from dataclasses import dataclass, field
from typing import Any, Dict

import torch
from helpers import csg_inputs, lwta_inputs, lwta_kwargs, make_dau_case

import bcos_kernels

F64 = torch.float64


@dataclass(frozen=True)
class Case:
    id: str
    inputs: Dict[str, Any]
    kwargs: Dict[str, Any] = field(default_factory=dict)
    channels_last: bool = False
    facts: Dict[str, Any] = field(default_factory=dict)


def _generator(case_id: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(case_id.encode()))


def _learnable_b(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=F64)


# ---------------------------------------------------------------------------------------------------------------
# B-cos conv2d: v2 (b = 2), v1 (max_out 2, scale), B-cosification (bias, unnormalised weight, learnable b)
# ---------------------------------------------------------------------------------------------------------------
def _bcos_conv(
    case_id,
    c=3,
    o=4,
    k=3,
    n=2,
    hw=(5, 7),
    groups=1,
    max_out=1,
    bias=False,
    b=2.0,
    channel_scale=False,
    channels_last=False,
    **kwargs,
):
    g = _generator(case_id)
    kh, kw = (k, k) if isinstance(k, int) else k
    inputs = dict(
        x=torch.randn(n, c, *hw, generator=g, dtype=F64),
        weight=torch.randn(o * max_out, c // groups, kh, kw, generator=g, dtype=F64),
    )
    if bias:
        inputs["bias"] = torch.randn(o * max_out, generator=g, dtype=F64)
    if channel_scale:
        inputs["channel_scale"] = torch.rand(o, generator=g, dtype=F64) + 0.5
    inputs["b"] = b
    return Case(case_id, inputs, dict(groups=groups, max_out=max_out, **kwargs), channels_last)


BCOS_CONV2D = [
    _bcos_conv("v2_b2_3x3_odd", padding=1),
    _bcos_conv("b1_bias", b=1.0, bias=True, padding=1),
    _bcos_conv("b2.5_general", b=2.5, padding=1),
    _bcos_conv("b_tensor_learnable", b=_learnable_b(1.7), padding=1),
    _bcos_conv("v1_maxout2_scale", max_out=2, scale=2.5, padding=1),
    _bcos_conv(
        "bcosify_bias_unnormalized_b_tensor", bias=True, normalize_weight=False, b=_learnable_b(1.25), padding=1
    ),
    _bcos_conv("detach_b2", detach=True, padding=1),
    _bcos_conv("detach_b_tensor", detach=True, b=_learnable_b(2.5), bias=True, padding=1),
    _bcos_conv("channel_scale_maxout2", channel_scale=True, max_out=2, padding=1),
    _bcos_conv("1x1_pad0", c=5, o=3, k=1, hw=(4, 5)),
    _bcos_conv("stride2_pad0", stride=2, hw=(7, 6)),
    _bcos_conv("kernel3x1_stride2x1", k=(3, 1), stride=(2, 1), padding=(1, 0), bias=True, b=2.5),
    _bcos_conv("groups2", c=4, o=6, groups=2, padding=1, b=2.5),
    _bcos_conv("groups2_maxout2", c=4, o=4, groups=2, max_out=2, padding=1),
    _bcos_conv("depthwise_stride2_bias", c=4, o=4, groups=4, stride=2, padding=1, bias=True),
    _bcos_conv("dilation2", dilation=2, padding=2, hw=(6, 7)),
    _bcos_conv("batch1", n=1, hw=(4, 5), padding=1, b=_learnable_b(2.0)),
    _bcos_conv("channels_last_b2", padding=1, channels_last=True),
    _bcos_conv("channels_last_b1_1x1_stride2", k=1, stride=2, padding=0, b=1.0, channels_last=True),
    _bcos_conv("channels_last_detach_maxout", o=3, max_out=2, padding=1, detach=True, channels_last=True),
    _bcos_conv(
        "channels_last_groups_maxout_b_tensor_channel_scale",
        c=4,
        o=4,
        groups=2,
        max_out=2,
        bias=True,
        b=_learnable_b(1.7),
        channel_scale=True,
        padding=1,
        channels_last=True,
    ),
]


# ---------------------------------------------------------------------------------------------------------------
# B-cos linear (over the last dim, any leading shape)
# ---------------------------------------------------------------------------------------------------------------
def _bcos_linear(case_id, shape=(3, 7), o=5, max_out=1, bias=False, b=2.0, **kwargs):
    g = _generator(case_id)
    inputs = dict(
        x=torch.randn(*shape, generator=g, dtype=F64),
        weight=torch.randn(o * max_out, shape[-1], generator=g, dtype=F64),
    )
    if bias:
        inputs["bias"] = torch.randn(o * max_out, generator=g, dtype=F64)
    inputs["b"] = b
    return Case(case_id, inputs, dict(max_out=max_out, **kwargs))


BCOS_LINEAR = [
    _bcos_linear("v2_b2"),
    _bcos_linear("b1_bias", b=1.0, bias=True),
    _bcos_linear("b2.5_general", b=2.5),
    _bcos_linear("b_tensor_learnable", b=_learnable_b(1.7)),
    _bcos_linear("v1_maxout2_scale", max_out=2, scale=2.5),
    _bcos_linear("bcosify_bias_unnormalized_b_tensor", bias=True, normalize_weight=False, b=_learnable_b(1.25)),
    _bcos_linear("detach_b2", detach=True),
    _bcos_linear("detach_b_tensor", detach=True, b=_learnable_b(2.5), bias=True),
    _bcos_linear("maxout3_odd", shape=(4, 11), o=3, max_out=3, b=2.5),
    _bcos_linear("batch1", shape=(1, 9), o=2),
    _bcos_linear("3d_input_bias", shape=(2, 3, 6), bias=True),
    _bcos_linear("1d_input", shape=(7,), o=3),
]


# ---------------------------------------------------------------------------------------------------------------
# DAU (CoDA) conv
# ---------------------------------------------------------------------------------------------------------------
def _dau(case_id, c=3, o=4, r=2, k=3, n=2, h=5, w=6, bias=True, channels_last=False, **kwargs):
    x, a, e, b = make_dau_case(c, o, r, k, n, h, w, bias=bias, seed=zlib.crc32(case_id.encode()))
    inputs = dict(x=x, rank_weight=a, expand_weight=e, expand_bias=b)
    return Case(case_id, inputs, dict(kernel_size=k, **kwargs), channels_last, facts=dict(rank=r, pixels=n * h * w))


DAU_CONV2D = [
    _dau("k3_squash_bias_odd"),
    _dau("k3_l2", norm="l2"),
    _dau("no_bias", bias=False),
    _dau("no_bias_l2", bias=False, norm="l2", r=3),
    _dau("1x1", k=1, c=5, o=3, h=4, w=3),
    _dau("stride2_pad0", stride=2, padding=0, h=7, w=7),
    _dau("detach", detach=True),
    _dau("detach_l2_no_bias", detach=True, norm="l2", bias=False),
    _dau("k5_rank1", k=5, r=1, c=2, o=2, h=5, w=5),
    _dau("batch1", n=1, h=4, w=5, o=5),
    _dau("channels_last", channels_last=True),
    _dau("channels_last_stride2_l2", channels_last=True, stride=2, norm="l2", h=6, w=7),
]


# ---------------------------------------------------------------------------------------------------------------
# LWTA: deterministic, and stochastic with explicit noise (every backend then computes the same thing)
# ---------------------------------------------------------------------------------------------------------------
def _lwta(case_id, shape, competitors, mode="train", channels_last=False):
    x, u, _ = lwta_inputs("cpu", shape, dtype=F64, seed=zlib.crc32(case_id.encode()))
    inputs = dict(x=x.detach()) if mode == "deterministic" else dict(x=x.detach(), noise=u)
    return Case(case_id, inputs, dict(competitors=competitors, **lwta_kwargs(mode)), channels_last)


LWTA = [
    _lwta("conv_U2_train", (2, 4, 3, 3), 2),
    _lwta("conv_U4_train_odd", (2, 8, 3, 5), 4),
    _lwta("conv_U2_eval", (2, 6, 2, 3), 2, "eval"),
    _lwta("conv_U3_deterministic", (2, 6, 3, 3), 3, "deterministic"),
    _lwta("conv_batch1_1x1", (1, 6, 1, 1), 2),
    _lwta("conv_U4_train_two_tiles", (3, 16, 10, 10), 4),
    _lwta("linear_U2_train", (3, 6), 2),
    _lwta("linear_U3_train", (3, 9), 3),
    _lwta("linear_U4_eval", (5, 8), 4, "eval"),
    _lwta("linear_U4_deterministic", (5, 8), 4, "deterministic"),
    _lwta("seq_U2_train", (2, 3, 4), 2),
    _lwta("channels_last_U2_train", (2, 4, 3, 3), 2, channels_last=True),
    _lwta("channels_last_U4_eval", (2, 8, 2, 3), 4, "eval", channels_last=True),
    _lwta("channels_last_U2_deterministic", (2, 6, 3, 2), 2, "deterministic", channels_last=True),
]


# The fused LWTA kernels' own tests (tests/test_lwta_triton.py, tests/test_cuda_backend.py): (shape, U, layout)
# with NCHW blocks along C (stride H*W), channels_last (read in place as its (N*H*W, C) memory) and [..., D]
# blocks along D; and the modes.
LWTA_LAYOUTS = [
    ((2, 8, 3, 5), 2, "nchw"),
    ((2, 12, 3, 3), 3, "nchw"),
    ((1, 16, 2, 3), 4, "nchw"),
    ((2, 16, 1, 3), 8, "nchw"),
    ((2, 8, 3, 5), 2, "nhwc"),
    ((2, 9, 2, 3), 3, "nhwc"),
    ((1, 16, 3, 2), 4, "nhwc"),
    ((2, 16, 2, 2), 8, "nhwc"),
    ((5, 12), 2, "rows"),
    ((4, 12), 3, "rows"),
    ((3, 16), 4, "rows"),
    ((2, 24), 8, "rows"),
    ((2, 5, 12), 3, "rows"),
    ((1, 3, 16), 8, "rows"),
]
LWTA_MODES = ["train", "eval", "deterministic"]


# ---------------------------------------------------------------------------------------------------------------
# Class-specific gate
# ---------------------------------------------------------------------------------------------------------------
def _csg(case_id, shape, classes, training=True, labels=None, channels_last=False):
    x, mask, labels, _ = csg_inputs("cpu", shape, classes, dtype=F64, seed=zlib.crc32(case_id.encode()), labels=labels)
    return Case(case_id, dict(x=x.detach(), mask=mask.detach(), labels=labels), dict(training=training), channels_last)


CLASS_SPECIFIC_GATE = [
    _csg("conv_train", (3, 4, 3, 3), 3),
    _csg("conv_odd_train", (3, 7, 5, 3), 4),
    _csg("linear_train", (4, 5), 2),
    _csg("conv_eval", (2, 4, 3, 3), 3, training=False),
    _csg("linear_eval", (3, 5), 2, training=False),
    _csg("batch1_1x1", (1, 4, 1, 1), 3),
    _csg("one_class", (2, 3, 2, 2), 1),
    _csg("repeated_labels", (4, 3, 2, 3), 3, labels=[1, 1, 2, 1]),
    _csg("channels_last_train", (2, 5, 3, 3), 3, channels_last=True),
    _csg("channels_last_eval", (2, 5, 3, 2), 2, training=False, channels_last=True),
]


# ---------------------------------------------------------------------------------------------------------------
# Uncentered batch norm: ``running_var`` is a tuple of numbers (tests/ops/test_batch_norm_uncentered.py makes a
# fresh buffer in x's dtype for every call, so that no run sees another's update)
# ---------------------------------------------------------------------------------------------------------------
def _norm(case_id, shape, training=True, weight=True, bias=True, detach=False, tracked=True, channels_last=False):
    g = _generator(case_id)
    c = shape[1]
    # an offset per channel: the mean term of the gradient matters
    x = torch.randn(shape, generator=g, dtype=F64) * 2 + torch.randn(c, generator=g, dtype=F64)[None, :, None, None]
    inputs = dict(x=x)
    if weight:
        inputs["weight"] = torch.rand(c, generator=g, dtype=F64) + 0.5
    if bias:
        inputs["bias"] = torch.randn(c, generator=g, dtype=F64)
    running = tuple((torch.rand(c, generator=g, dtype=F64) + 0.5).tolist()) if tracked or not training else None
    kwargs = dict(running_var=running, training=training, momentum=0.1, eps=1e-5, detach=detach)
    return Case(case_id, inputs, kwargs, channels_last)


BATCH_NORM_UNCENTERED = [
    _norm("train", (3, 5, 4, 7)),
    _norm("train_no_bias", (2, 6, 3, 3), bias=False),  # the B-cos models' NoBias(BatchNormUncentered2d)
    _norm("train_not_affine", (2, 4, 5, 5), weight=False, bias=False),
    _norm("train_untracked_odd", (3, 7, 5, 3), tracked=False),
    _norm("eval", (2, 5, 3, 4), training=False, bias=False),
    _norm("explanation_train", (2, 5, 3, 3), detach=True),
    _norm("batch1_1x2", (1, 8, 1, 2)),  # two values a channel
    _norm("batch2_1x1_stride_like", (2, 3, 1, 1), bias=False),
    _norm("channels_last_train", (2, 5, 3, 3), channels_last=True),
    _norm("channels_last_eval", (2, 6, 2, 3), training=False, channels_last=True),
]


# ---------------------------------------------------------------------------------------------------------------
# The B-cos ViTs' detachable norms: ``kind`` "layer" (``groups`` = normalized_shape) or "group" (``groups`` = the
# number of groups); mostly in explanation mode (``detach``), the path with our own backward
# ---------------------------------------------------------------------------------------------------------------
def _detachable_norm(case_id, shape, kind, groups, weight=True, bias=True, detach=True, channels_last=False):
    g = _generator(case_id)
    affine = tuple(groups) if kind == "layer" else (shape[1],)
    # an offset per feature: the mean's term of the gradient matters
    x = torch.randn(shape, generator=g, dtype=F64) * 2 + 1.5
    inputs = dict(x=x)
    if weight:
        inputs["weight"] = torch.rand(affine, generator=g, dtype=F64) + 0.5
    if bias:
        inputs["bias"] = torch.randn(affine, generator=g, dtype=F64)
    return Case(case_id, inputs, dict(kind=kind, groups=groups, eps=1e-5, detach=detach), channels_last)


DETACHABLE_NORM = [
    _detachable_norm("layer_tokens", (2, 5, 12), "layer", (12,)),
    _detachable_norm("layer_no_bias", (3, 7, 9), "layer", (9,), bias=False),  # the ViTs' NoBias(LayerNorm)
    _detachable_norm("layer_not_affine_2d", (2, 6), "layer", (6,), weight=False, bias=False),
    _detachable_norm("layer_two_dims", (2, 3, 4, 5), "layer", (4, 5)),
    _detachable_norm("layer_one_row", (1, 1, 7), "layer", (7,), bias=False),
    _detachable_norm("layer_trained", (2, 4, 8), "layer", (8,), detach=False),
    _detachable_norm("group_one_group", (2, 6, 3, 5), "group", 1, bias=False),  # DetachableGNLayerNorm2d
    _detachable_norm("group_three_groups", (3, 6, 2, 3), "group", 3),
    _detachable_norm("group_instance", (2, 4, 3, 3), "group", 4, weight=False, bias=False),
    _detachable_norm("group_batch1_1x1", (1, 5, 1, 1), "group", 1),  # 5 values a group
    _detachable_norm("group_channels_last", (2, 6, 3, 4), "group", 2, bias=False, channels_last=True),
    _detachable_norm("group_trained", (2, 4, 3, 3), "group", 2, detach=False),
]


# ---------------------------------------------------------------------------------------------------------------
# Each op's front door as its cases call it (the norms' cases hold plain values where the front doors take other
# forms), and the table of every op: {registry name: (front, cases)}
# ---------------------------------------------------------------------------------------------------------------
def running_var_buffer(values, like):
    """A fresh running-variance buffer in like's dtype from a case's tuple (None stays None)."""
    return None if values is None else torch.tensor(values, dtype=like.dtype)


def batch_norm_front(x, weight=None, bias=None, *, running_var, backend, **kwargs):
    running_var = running_var_buffer(running_var, x)
    return bcos_kernels.batch_norm_uncentered(x, running_var, weight, bias, backend=backend, **kwargs)


def detachable_norm_front(x, weight=None, bias=None, *, kind, groups, backend, **kwargs):
    if kind == "layer":
        return bcos_kernels.ops.detachable_layer_norm(x, groups, weight, bias, backend=backend, **kwargs)
    return bcos_kernels.ops.detachable_group_norm(x, groups, weight, bias, backend=backend, **kwargs)


OPS = {
    "bcos_conv2d": (bcos_kernels.bcos_conv2d, BCOS_CONV2D),
    "bcos_linear": (bcos_kernels.bcos_linear, BCOS_LINEAR),
    "dau_conv2d": (bcos_kernels.dau_conv2d, DAU_CONV2D),
    "lwta": (bcos_kernels.lwta, LWTA),
    "class_specific_gate": (bcos_kernels.class_specific_gate, CLASS_SPECIFIC_GATE),
    "batch_norm_uncentered": (batch_norm_front, BATCH_NORM_UNCENTERED),
    "detachable_norm": (detachable_norm_front, DETACHABLE_NORM),
}

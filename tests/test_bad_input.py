"""Bad input, one table for every op and backend (issue 21): each op's valid call (a case of tests/cases.py) is
spoilt in one way at a time -- int and mixed dtypes, a dimension too many or too few, a channel mismatch with the
weights, weights on another device, zero-size batch and spatial dims, non-contiguous and channels_last x, NaN and
inf in x and in the weights, all-zero x (the norms' eps path), b of 0, 1, -1, 1e6, inf and NaN, groups that do not
divide the channels, an unknown backend -- and the call must either

* raise a TypeError or ValueError whose message names the spoilt argument (for an explicitly named backend,
  naming the backend is also clear: an option or dtype that backend lacks), or
* return what the reference (the original's code) returns on the same input: output and every gradient, with the
  same NaN and inf positions;

never another exception (a crash inside a kernel), and never a result where the reference itself raises. Backend
None is "auto", which must never refuse for a backend's reason. The same oracle then runs on random shapes and
options (hypothesis) for the B-cos conv and linear, valid and invalid alike. A new op gets all of this by adding
a row to SPECS.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Tuple

import pytest
import torch
from cases import (
    BATCH_NORM_UNCENTERED,
    BCOS_CONV2D,
    BCOS_LINEAR,
    CLASS_SPECIFIC_GATE,
    DAU_CONV2D,
    DETACHABLE_NORM,
    LWTA,
    batch_norm_front,
    detachable_norm_front,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from ops._util import inputs
from ops.test_batch_norm_uncentered import original as batch_norm_original
from ops.test_detachable_norm import original as detachable_norm_original

import bcos_kernels
from bcos_kernels import backends
from bcos_kernels.ops.bcos_conv2d import reference as conv_reference
from bcos_kernels.ops.bcos_linear import reference as linear_reference
from bcos_kernels.ops.class_specific_gate import reference as gate_reference
from bcos_kernels.ops.dau_conv2d import reference as dau_reference
from bcos_kernels.ops.lwta import reference as lwta_reference

TOL = 1e-4  # fp32, as the numerics contract


@dataclass(frozen=True)
class Spec:
    op: str  # the registry's name
    front: Callable  # (**inputs, **kwargs, backend=...)
    reference: Callable  # (**inputs, **kwargs)
    case_id: str
    cases: list
    weights: Tuple[str, ...]  # the weight-like inputs (mixed dtype, device, NaN targets), first one spoilt
    x_shaped: Tuple[str, ...] = ("x",)  # inputs with x's shape, spoilt along with it
    batched: Tuple[str, ...] = ()  # other inputs with x's batch dim
    channel_dim: int = 1

    @property
    def case(self):
        return next(c for c in self.cases if c.id == self.case_id)


SPECS = [
    Spec(
        "bcos_conv2d", bcos_kernels.bcos_conv2d, conv_reference.bcos_conv2d, "v2_b2_3x3_odd", BCOS_CONV2D, ("weight",)
    ),
    Spec(
        "bcos_conv2d", bcos_kernels.bcos_conv2d, conv_reference.bcos_conv2d, "b1_bias", BCOS_CONV2D, ("weight", "bias")
    ),
    Spec(
        "bcos_linear",
        bcos_kernels.bcos_linear,
        linear_reference.bcos_linear,
        "v2_b2",
        BCOS_LINEAR,
        ("weight",),
        channel_dim=-1,
    ),
    Spec(
        "dau_conv2d",
        bcos_kernels.dau_conv2d,
        dau_reference.dau_conv2d_original,
        "k3_squash_bias_odd",
        DAU_CONV2D,
        ("rank_weight", "expand_weight", "expand_bias"),
    ),
    Spec("lwta", bcos_kernels.lwta, lwta_reference.lwta, "conv_U2_train", LWTA, (), x_shaped=("x", "noise")),
    Spec("lwta", bcos_kernels.lwta, lwta_reference.lwta, "linear_U4_deterministic", LWTA, (), channel_dim=-1),
    Spec(
        "class_specific_gate",
        bcos_kernels.class_specific_gate,
        gate_reference.class_specific_gate,
        "conv_train",
        CLASS_SPECIFIC_GATE,
        ("mask",),
        batched=("labels",),
    ),
    Spec(
        "batch_norm_uncentered",
        batch_norm_front,
        batch_norm_original,
        "train",
        BATCH_NORM_UNCENTERED,
        ("weight", "bias"),
    ),
    Spec(
        "detachable_norm",
        detachable_norm_front,
        detachable_norm_original,
        "group_three_groups",
        DETACHABLE_NORM,
        ("weight", "bias"),
    ),
    Spec(
        "detachable_norm",
        detachable_norm_front,
        detachable_norm_original,
        "layer_tokens",
        DETACHABLE_NORM,
        ("weight", "bias"),
        channel_dim=-1,
    ),
]

# the names an error about a shape may give: the inputs and the options that fix shapes
SHAPE_NAMES = ("x", "weight", "mask", "labels", "noise", "groups", "num_groups", "competitors", "normalized_shape")
SHAPE_NAMES += ("rank_weight", "expand_weight", "kernel_size", "running_var", "bias", "height", "width")


def _set(t: torch.Tensor, value: float) -> torch.Tensor:
    t = t.detach().clone()
    t.view(-1)[0] = value
    return t


def _spoil_x_shaped(spec, tensors, fn):
    return {k: fn(v) if k in spec.x_shaped and v is not None else v for k, v in tensors.items()}


def _add_channel(spec):
    dim = spec.channel_dim

    def add(t):
        return torch.cat([t, t.narrow(dim, 0, 1)], dim)

    return add


def _non_contiguous(t):
    # the same values through a view with a stride of 2 in the last dim
    return torch.stack([t, torch.zeros_like(t)], -1).select(-1, 0)


# (name, applies to spec, spoil: (spec, tensors, kwargs) -> (tensors, kwargs, names an error may give))
SPOILERS = [
    ("x_int", lambda s: True, lambda s, t, k: ({**t, "x": t["x"].detach().round().int()}, k, ("x",))),
    (
        "mixed_dtypes",
        lambda s: bool(s.weights),
        lambda s, t, k: ({**t, s.weights[0]: t[s.weights[0]].detach().double()}, k, (s.weights[0], "x")),
    ),
    ("extra_dim", lambda s: True, lambda s, t, k: (_spoil_x_shaped(s, t, lambda v: v[None]), k, SHAPE_NAMES)),
    (
        "missing_dim",
        lambda s: True,
        lambda s, t, k: (
            {**_spoil_x_shaped(s, t, lambda v: v[0]), **{n: t[n][0] for n in s.batched}},
            k,
            SHAPE_NAMES,
        ),
    ),
    ("channel_mismatch", lambda s: True, lambda s, t, k: (_spoil_x_shaped(s, t, _add_channel(s)), k, SHAPE_NAMES)),
    (
        "weight_on_meta",
        lambda s: bool(s.weights),
        lambda s, t, k: ({**t, s.weights[0]: t[s.weights[0]].detach().to("meta")}, k, (s.weights[0], "x")),
    ),
    (
        "zero_batch",
        lambda s: True,
        lambda s, t, k: (
            {**_spoil_x_shaped(s, t, lambda v: v[:0]), **{n: t[n][:0] for n in s.batched}},
            k,
            ("x", "labels"),
        ),
    ),
    (
        "zero_height",
        lambda s: s.channel_dim == 1,
        lambda s, t, k: (_spoil_x_shaped(s, t, lambda v: v[:, :, :0]), k, ("x", "height", "padding", "kernel_size")),
    ),
    ("non_contiguous", lambda s: True, lambda s, t, k: (_spoil_x_shaped(s, t, _non_contiguous), k, ())),
    (
        "channels_last",
        lambda s: s.channel_dim == 1,
        lambda s, t, k: (_spoil_x_shaped(s, t, lambda v: v.contiguous(memory_format=torch.channels_last)), k, ()),
    ),
    ("nan_in_x", lambda s: True, lambda s, t, k: ({**t, "x": _set(t["x"], math.nan)}, k, ("x",))),
    ("inf_in_x", lambda s: True, lambda s, t, k: ({**t, "x": _set(t["x"], math.inf)}, k, ("x",))),
    (
        "nan_in_weight",
        lambda s: bool(s.weights),
        lambda s, t, k: ({**t, s.weights[0]: _set(t[s.weights[0]], math.nan)}, k, (s.weights[0],)),
    ),
    (
        "inf_in_weight",
        lambda s: bool(s.weights),
        lambda s, t, k: ({**t, s.weights[0]: _set(t[s.weights[0]], math.inf)}, k, (s.weights[0],)),
    ),
    ("zero_x", lambda s: True, lambda s, t, k: ({**t, "x": torch.zeros_like(t["x"])}, k, ())),
    *[
        (f"b={b}", lambda s: "b" in s.case.inputs, lambda s, t, k, b=b: ({**t, "b": b}, k, ("b",)))
        for b in (0.0, 1.0, -1.0, 1e6, math.inf, math.nan)
    ],
    (
        "groups_not_dividing",
        lambda s: "groups" in s.case.kwargs and s.op == "bcos_conv2d",
        lambda s, t, k: (t, {**k, "groups": t["x"].shape[1] + 1}, ("groups",)),
    ),
]


def _leaf(t):
    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type != "meta":
        return t.detach().requires_grad_()
    return t


def _attempt(fn, tensors, kwargs, differentiable):
    """{name: tensor} of the output and the gradients of the ``differentiable`` inputs (where still floating), or
    the exception the call raised."""
    tensors = {k: _leaf(v) if k in differentiable else v for k, v in tensors.items()}
    try:
        out = fn(**tensors, **kwargs)
        leaves = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor) and v.requires_grad}
        results = {"out": out.detach()}
        if out.requires_grad and leaves:
            gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
            grads = torch.autograd.grad(out, list(leaves.values()), gout, allow_unused=True, materialize_grads=True)
            results.update({f"grad {k}": g for k, g in zip(leaves, grads)})
        return results
    except Exception as error:  # noqa: BLE001 -- the oracle judges every exception
        return error


def _names(message: str, names) -> bool:
    return any(re.search(rf"(?<![\w.]){re.escape(n)}(?!\w)", message) for n in names)


def check_oracle(
    what,
    front,
    reference,
    tensors,
    kwargs,
    names,
    backend,
    differentiable=("x", "weight", "bias"),
    extra_nonfinite=False,
    rtol=TOL,
):
    want = _attempt(reference, tensors, kwargs, differentiable)
    got = _attempt(lambda **kw: front(**kw, backend=backend), tensors, kwargs, differentiable)
    if isinstance(got, Exception):
        assert isinstance(got, (TypeError, ValueError)), f"{what}: crashed with {type(got).__name__}: {got}"
        allowed = tuple(names) + (("backend",) if backend is not None else ())
        assert _names(str(got), allowed), f"{what}: the error does not name any of {allowed}: {got}"
        return
    if isinstance(want, Exception):
        # the original's code fails on some empty inputs (a reshape with -1); an empty result is then the answer
        assert got["out"].numel() == 0, f"{what}: returned a result where the reference raises {want!r}"
        for name, grad in got.items():
            leaf = tensors[name.removeprefix("grad ")] if name != "out" else None
            assert leaf is None or (grad.shape == leaf.shape and not grad.any()), f"{what}: {name} of an empty call"
        return
    assert got.keys() == want.keys(), f"{what}: gradients of {sorted(got)} but the reference's of {sorted(want)}"
    for name, value in want.items():
        result = got[name]
        assert result.shape == value.shape and result.dtype == value.dtype, f"{what}: {name} shape/dtype"
        result, value = result.double(), value.double()
        # NaN and inf where the reference has them (one for the other: an inf weight gives inf or NaN depending on
        # the order of a formula's terms), finite and close where it is finite
        finite = value.isfinite()
        if extra_nonfinite:  # a non-finite weight: non-finite wherever the reference is, and maybe at padding too
            assert not result[~finite].isfinite().any(), f"{what}: {name} is finite where the reference is not"
            finite = finite & result.isfinite()
        else:
            assert torch.equal(result.isfinite(), finite), f"{what}: {name} is not finite where the reference is"
        torch.testing.assert_close(
            result[finite], value[finite], atol=TOL, rtol=rtol, msg=lambda m: f"{what}: {name}: {m}"
        )


def _spec_id(spec):
    return f"{spec.op}-{spec.case_id}"


CALLS = [
    pytest.param(spec, spoiler, backend, id=f"{_spec_id(spec)}-{spoiler[0]}-{backend or 'auto'}")
    for spec in SPECS
    for spoiler in SPOILERS
    if spoiler[1](spec)
    for backend in [None, *backends.OPS[spec.op]]
]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # auto's fallback notes
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("spec,spoiler,backend", CALLS)
def test_bad_input_gets_the_reference_result_or_a_clear_error(spec, spoiler, backend):
    name, _, spoil = spoiler
    case = spec.case
    tensors = inputs(case, torch.float32)
    differentiable = {k for k, v in tensors.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    tensors, kwargs, names = spoil(spec, tensors, dict(case.kwargs))
    what = f"{_spec_id(spec)} {name} backend={backend}"
    # an implicit-GEMM kernel (Triton's) multiplies a padding tap's 0 by a NaN or inf weight, which ATen's
    # convolutions skip: such a weight may make more outputs NaN than the reference's, never fewer
    extra_nonfinite = name in ("nan_in_weight", "inf_in_weight") and backend == "triton"
    check_oracle(what, spec.front, spec.reference, tensors, kwargs, names, backend, differentiable, extra_nonfinite)


@pytest.mark.parametrize("spec", SPECS, ids=_spec_id)
def test_unknown_backend_is_named(spec):
    case = spec.case
    with pytest.raises(ValueError, match="no_such_backend"):
        spec.front(**inputs(case, torch.float32), **case.kwargs, backend="no_such_backend")


# ---------------------------------------------------------------------------------------------------------------
# random shapes and options, valid and invalid (hypothesis)
# ---------------------------------------------------------------------------------------------------------------
VALID_B = st.sampled_from([1.0, 1.5, 2.0, 2.5, 1e4])
INVALID_B = st.sampled_from([0.5, 0.0, -2.0, math.inf, math.nan])
FUZZ_BACKENDS = st.sampled_from([None, *[b for b in ("cpu", "torch", "reference") if b in backends.OPS["bcos_conv2d"]]])
CONV_NAMES = ("x", "weight", "bias", "b", "stride", "padding", "dilation", "groups", "max_out", "height", "width")
# a valid call is drawn, then at most one thing of it is spoilt
CONV_SPOILS = st.sampled_from([None, None, None, "weight_channels", "groups", "stride", "padding", "b", "max_out"])


@st.composite
def conv_calls(draw):
    groups, spoil = draw(st.integers(1, 3)), draw(CONV_SPOILS)
    c, o, max_out = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 2)), draw(st.integers(1, 3))
    k, padding, dilation = draw(st.integers(1, 3)), draw(st.integers(0, 2)), draw(st.integers(1, 2))
    kwargs = dict(stride=draw(st.integers(1, 3)), padding=padding, dilation=dilation, groups=groups, max_out=max_out)
    kwargs.update(normalize_weight=draw(st.booleans()), detach=draw(st.booleans()))
    weight_channels = c // groups
    if spoil == "weight_channels":
        weight_channels += 1
    elif spoil in ("groups", "stride", "padding", "max_out"):
        kwargs[spoil] = draw(st.sampled_from({"groups": [0, c + 1], "padding": [-1]}.get(spoil, [0, -1])))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    n, h, w = draw(st.integers(0, 3)), draw(st.integers(1, 7)), draw(st.integers(1, 7))
    tensors = dict(
        x=torch.randn(n, c, h, w, generator=g),
        weight=torch.randn(o * max_out, weight_channels, k, k, generator=g),
        bias=torch.randn(o * max_out, generator=g) if draw(st.booleans()) else None,
        b=draw(INVALID_B if spoil == "b" else VALID_B),
    )
    return tensors, kwargs


def _rtol(tensors):
    """|cos|^(b - 1) multiplies the relative rounding error of cos by b - 1 (unnormalised weights: |cos| > 1)."""
    b = tensors["b"]
    return TOL * max(1.0, abs(b - 1)) if math.isfinite(b) else TOL


@settings(max_examples=150, deadline=None, derandomize=True)
@given(call=conv_calls(), backend=FUZZ_BACKENDS)
def test_fuzzed_bcos_conv2d(call, backend):
    tensors, kwargs = call
    what = f"bcos_conv2d {tensors['x'].shape} w{tensors['weight'].shape} {kwargs} b={tensors['b']} backend={backend}"
    front, reference = bcos_kernels.bcos_conv2d, conv_reference.bcos_conv2d
    check_oracle(what, front, reference, tensors, kwargs, CONV_NAMES, backend, rtol=_rtol(tensors))


@st.composite
def linear_calls(draw):
    spoil = draw(st.sampled_from([None, None, None, "features", "rows", "b", "scale"]))
    d, o, max_out = draw(st.integers(1, 9)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    rows, features = o * max_out + (spoil == "rows"), d + (spoil == "features")
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    lead = draw(st.lists(st.integers(0, 3), min_size=0, max_size=2))
    tensors = dict(
        x=torch.randn(*lead, d, generator=g),
        weight=torch.randn(rows, features, generator=g),
        bias=torch.randn(rows, generator=g) if draw(st.booleans()) else None,
        b=draw(INVALID_B if spoil == "b" else VALID_B),
    )
    scale = draw(st.sampled_from([0.0, -math.inf] if spoil == "scale" else [1.0, 2.5, -1.0]))
    return tensors, dict(max_out=max_out, scale=scale, detach=draw(st.booleans()))


@settings(max_examples=100, deadline=None, derandomize=True)
@given(call=linear_calls(), backend=FUZZ_BACKENDS)
def test_fuzzed_bcos_linear(call, backend):
    tensors, kwargs = call
    what = f"bcos_linear {tensors['x'].shape} w{tensors['weight'].shape} {kwargs} b={tensors['b']} backend={backend}"
    names = ("x", "weight", "bias", "b", "max_out", "scale")
    front, reference = bcos_kernels.bcos_linear, linear_reference.bcos_linear
    check_oracle(what, front, reference, tensors, kwargs, names, backend, rtol=_rtol(tensors))

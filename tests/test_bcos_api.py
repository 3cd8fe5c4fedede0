"""Bad input, backend selection, modules and torch.compile for the B-cos ops."""

import warnings

import pytest
import torch

import bcos_kernels
from bcos_kernels import backends
from bcos_kernels import nn as bnn
from bcos_kernels.ops.bcos_conv2d import reference as ref

X = torch.randn(2, 4, 6, 6)
W = torch.randn(6, 4, 3, 3)


@pytest.mark.parametrize(
    "kwargs,error,words",
    [
        (dict(x=torch.randn(4, 6, 6)), ValueError, "x must have 4"),
        (dict(x=torch.randint(0, 3, (2, 4, 6, 6))), TypeError, "x must be a floating"),
        (dict(weight=torch.randn(6, 3, 3, 3)), ValueError, "weight expects 3 input channels"),
        (dict(weight=W.double()), TypeError, "weight has dtype"),
        (dict(weight=W.to("meta")), ValueError, "weight is on meta"),
        (dict(groups=3), ValueError, "groups=3"),
        (dict(groups=0), ValueError, "groups must be a positive int"),
        (dict(max_out=4), ValueError, "max_out=4 must divide"),
        (dict(max_out=0), ValueError, "max_out must be a positive int"),
        (dict(b=0.5), ValueError, "b must be a finite number >= 1"),
        (dict(b=torch.ones(2)), ValueError, "b must be a number >= 1 or a one-element"),
        (dict(b="2"), ValueError, "b must be"),
        (dict(stride=0), ValueError, "stride must be"),
        (dict(padding=-1), ValueError, "padding must be"),
        (dict(dilation=(1, 2, 3)), ValueError, "dilation must be"),
        (dict(scale=0.0), ValueError, "scale must be"),
        (dict(bias=torch.randn(5)), ValueError, "bias has 5 elements"),
        (dict(x=torch.randn(2, 4, 2, 2)), ValueError, "smaller than the kernel"),
        (dict(backend="fast"), ValueError, "backend must be one of"),
        (dict(backend="cuda"), ValueError, "backend 'cuda'"),
        (dict(x=X.double(), weight=W.double(), backend="triton"), ValueError, "backend 'triton' cannot run this call"),
    ],
)
def test_conv_bad_input_names_the_argument(kwargs, error, words):
    args = dict(x=X, weight=W)
    args.update(kwargs)
    with pytest.raises(error, match=words):
        bcos_kernels.bcos_conv2d(args.pop("x"), args.pop("weight"), **args)


def test_conv_groups_must_divide_out_channels_with_max_out():
    with pytest.raises(ValueError, match="each MaxOut unit must lie inside one group"):
        bcos_kernels.bcos_conv2d(torch.randn(1, 4, 5, 5), torch.randn(6, 2, 3, 3), groups=2, max_out=2)


@pytest.mark.parametrize(
    "kwargs,error,words",
    [
        (dict(weight=torch.randn(6, 5)), ValueError, "weight has 5 input features"),
        (dict(weight=torch.randn(6)), ValueError, "weight must have 2"),
        (dict(x=torch.randn(3, 4, dtype=torch.float64)), TypeError, "weight has dtype"),
        (dict(max_out=4), ValueError, "max_out=4"),
        (dict(b=-1), ValueError, "b must be"),
        (dict(x=torch.randint(0, 2, (3, 4))), TypeError, "x must be a floating"),
    ],
)
def test_linear_bad_input_names_the_argument(kwargs, error, words):
    args = dict(x=torch.randn(3, 4), weight=torch.randn(6, 4))
    args.update(kwargs)
    with pytest.raises(error, match=words):
        bcos_kernels.bcos_linear(args.pop("x"), args.pop("weight"), **args)


@pytest.fixture
def toy_op(monkeypatch):
    """An op "toy" in the registry with backends reference and cpu (cpu: float32 only)."""
    monkeypatch.setitem(
        backends.OPS, "toy", {"reference": backends.Support(), "cpu": backends.Support((torch.float32,))}
    )
    monkeypatch.setattr(backends, "_warned", set())
    return "toy"


def test_backend_precedence(monkeypatch, toy_op):
    x = torch.randn(2)
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert backends.resolve(toy_op, None, x) == "reference"
    assert backends.resolve(toy_op, "auto", x) == ("cpu" if backends.cpu_extension() is not None else "reference")
    monkeypatch.setenv(backends.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.resolve(toy_op, None, x)
    with pytest.raises(ValueError, match="does not implement"):
        backends.resolve(toy_op, "cuda", x)


def test_auto_falls_back_with_one_warning(toy_op):
    x = torch.randn(2, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="falling back to backend 'reference'"):
        assert backends.resolve(toy_op, None, x) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backends.resolve(toy_op, None, x)


def test_limits_and_interpreter_dtypes_give_reasons():
    x = torch.randn(2, 3, 4, 4)
    cuda_limits = backends.OPS["dau_conv2d"]["cuda"].limits
    assert "rank 512" in cuda_limits(rank=512) and cuda_limits(rank=511) is None
    if backends.triton_importable() and backends.triton_interpreting():
        assert "Triton interpreter" in backends.call_reason("lwta", "triton", x.half())
        assert (
            backends.call_reason("dau_conv2d", "triton", x, pixels=2**31)
            == "more than 2**31 - 1 pixels (N*H*W) in one call"
        )
        assert backends.call_reason("dau_conv2d", "triton", x, pixels=4) is None


def test_explicit_unsupported_option_raises():
    if "cpu" not in bcos_kernels.available_backends("cpu"):
        with pytest.raises(ValueError, match="not built"):
            bcos_kernels.bcos_conv2d(X, W, backend="cpu")
    else:
        with pytest.raises(ValueError, match="float16 is not supported"):
            bcos_kernels.bcos_conv2d(X.half(), W.half(), backend="cpu")
        with warnings.catch_warnings():  # auto falls back to the reference for float16
            warnings.simplefilter("ignore")
            out = bcos_kernels.bcos_conv2d(X.half(), W.half())
        torch.testing.assert_close(out, ref.bcos_conv2d(X.half(), W.half()))


def test_available_backends_has_reference():
    assert bcos_kernels.available_backends()[0] == "reference"
    assert set(bcos_kernels.available_backends()) <= set(backends.BACKENDS)


def test_module_api_matches_original_attributes():
    m = bnn.BcosConv2d(4, 3, 3, padding=1, max_out=2, b=2.5)
    assert list(m.state_dict()) == ["linear.weight"]
    assert m.linear.weight.shape == (6, 4, 3, 3) and m.patch_size == 9 and m.bias is False
    m.set_explanation_mode(True)
    assert m.is_in_explanation_mode and m.detach
    assert list(bnn.BcosLinear(4, 3).state_dict()) == ["linear.weight"]
    with pytest.raises(ValueError, match="padding_mode"):
        bnn.BcosConv2d(4, 3, padding_mode="reflect")
    with pytest.raises(ValueError, match="bias=True"):
        bnn.BcosLinear(4, 3, bias=True)
    bc = bnn.BcosifyConv2d(4, 3, 3, bias=True)
    bc.b = torch.nn.Parameter(torch.tensor(1.5))
    assert sorted(bc.state_dict()) == ["b", "linear.bias", "linear.weight"]
    assert bc.weight is bc.linear.weight


def _small_net(backend):
    return torch.nn.Sequential(
        bnn.BcosConv2d(6, 8, 3, padding=1, max_out=2, backend=backend),
        bnn.BcosConv2d(8, 8, 3, stride=2, padding=1, groups=2, b=2.5, backend=backend),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        bnn.BcosLinear(8, 5, backend=backend),
    )


@pytest.mark.parametrize("backend", bcos_kernels.available_backends("cpu", "bcos_conv2d"))
def test_torch_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    net = _small_net(backend)
    x = torch.randn(2, 6, 8, 8, requires_grad=True)
    eager = net(x)
    (gx_eager,) = torch.autograd.grad(eager.sum(), x)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager" if backend == "reference" else "inductor")
    out = compiled(x)
    (gx,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, gx_eager, atol=1e-5, rtol=1e-5)


def test_op_backends_table_matches_the_front_doors():
    """backends.OPS (what benchmarks and available_backends(op=...) read) is what each op accepts."""
    calls = {
        "bcos_conv2d": lambda be: bcos_kernels.bcos_conv2d(X, W, backend=be),
        "bcos_linear": lambda be: bcos_kernels.bcos_linear(torch.randn(3, 4), torch.randn(5, 4), backend=be),
        "dau_conv2d": lambda be: bcos_kernels.dau_conv2d(
            X, torch.randn(3, 4, 3, 3), torch.randn(4 * 9 * 2, 3, 1, 1), kernel_size=3, backend=be
        ),
        "lwta": lambda be: bcos_kernels.lwta(X, 2, backend=be),
        "class_specific_gate": lambda be: bcos_kernels.class_specific_gate(
            X, torch.rand(4, 3), torch.tensor([0, 2]), backend=be
        ),
        "batch_norm_uncentered": lambda be: bcos_kernels.batch_norm_uncentered(
            X, torch.ones(4), None, None, training=True, backend=be
        ),
        "detachable_norm": lambda be: bcos_kernels.ops.detachable_group_norm(X, 2, detach=True, backend=be),
    }
    assert set(calls) == set(backends.OPS)
    for op, call in calls.items():
        for name in backends.BACKENDS:
            if name in backends.OPS[op]:
                continue
            with pytest.raises(ValueError, match="does not implement this op"):
                call(name)
        for name in bcos_kernels.available_backends("cpu", op):
            call(name)

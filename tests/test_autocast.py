"""Whole converted models under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (the ops one by one:
tests/ops/_util.py check_autocast): a training step's logits and parameter gradients are within BF16_MODEL_ERROR of
the fp64 model and no further from it than twice the original modules under the same autocast; the gradients come
back in the parameters' fp32; ``torch.compile`` of the model under autocast gives eager's results."""

import copy
import warnings

import pytest
import torch
from originals import SMALL_MODELS, small_bcos_model

import bcos_kernels
from bcos_kernels import ops

# The relative RMS error (each tensor's errors over its largest fp64 value, RMS over logits and all parameter
# gradients) that bf16 autocast may add to a small B-cos model's training step: bf16 keeps 8 mantissa bits (2**-9 =
# 2e-3 relative per rounding), and the errors of 8-20 layers add up. Measured: ours 0.13% (ViT) and 1.8% (ResNet-18),
# the original modules 0.07% and 1.3% (their outputs come back in fp32: the fp32 norm promotes each layer's).
BF16_MODEL_ERROR = 0.05


def _step(model, x, weights, autocast):
    """Logits and the parameters' gradients of a fixed projection of them, the forward under autocast or not."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    (out.float() * weights).sum().backward()
    parameters = getattr(model, "_orig_mod", model).named_parameters()  # a compiled model's are its module's
    return {"logits": out.detach(), **{name: p.grad for name, p in parameters if p.grad is not None}}


def _relative_rms(got, want):
    errors = [((got[k].double() - v) / v.abs().max()).flatten() for k, v in want.items()]
    return torch.cat(errors).square().mean().sqrt().item()


NORM_CALLS = {
    "batch_norm_train": lambda x, w, b, v: bcos_kernels.batch_norm_uncentered(x, v, w, b, training=True),
    "batch_norm_eval": lambda x, w, b, v: bcos_kernels.batch_norm_uncentered(x, v, w, b, training=False),
    "layer_norm_detached": lambda x, w, b, v: ops.detachable_layer_norm(x, (5,), w, b, detach=True),
    "group_norm_detached": lambda x, w, b, v: ops.detachable_group_norm(x, 1, w, b, detach=True),
}


@pytest.mark.parametrize("call", list(NORM_CALLS.values()), ids=list(NORM_CALLS))
def test_norms_run_in_x_dtype_with_fp32_parameters(call):
    """A bf16 activation with the fp32 parameters autocast leaves (and the fp32 running_var) is the call with them
    in bf16 -- not the reference's type promotion to fp32, which without autocast mixed dtypes get (with a fallback
    warning): no warning, a bf16 output, the parameters' gradients in fp32; the buffer updated in fp32."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 4, 5, generator=g).bfloat16().requires_grad_()
    w, b = torch.rand(5, generator=g).add(0.5).requires_grad_(), torch.randn(5, generator=g).requires_grad_()
    var = torch.rand(5, generator=g) + 0.5
    var_bf16 = var.bfloat16()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = call(x, w, b, var)
    want = call(x, w.bfloat16(), b.bfloat16(), var_bf16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, want)
    grads = torch.autograd.grad(out.float().square().sum(), [x, w, b])
    want_grads = torch.autograd.grad(want.float().square().sum(), [x, w, b])
    for got, expected in zip(grads, want_grads):
        assert got.dtype == expected.dtype and torch.equal(got, expected)
    assert var.dtype == torch.float32
    torch.testing.assert_close(var, var_bf16.float(), atol=2e-2, rtol=2e-2)  # both updated (train) or not (eval)


@pytest.fixture(scope="module", params=SMALL_MODELS)
def models(request):
    original = small_bcos_model(request.param).train()
    return request.param, original, bcos_kernels.convert(copy.deepcopy(original))


def _data(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return torch.rand(4, 6, 32, 32, generator=g).to(dtype), torch.randn(4, 10, generator=g).to(dtype)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_bf16_autocast_training_step_within_tolerance(models):
    name, original, ours = models
    x, weights = _data()
    exact = _step(copy.deepcopy(original).double(), x.double(), weights.double(), autocast=False)
    got = _step(ours, x, weights, autocast=True)
    baseline = _step(original, x, weights, autocast=True)
    assert got["logits"].dtype == torch.bfloat16  # the last B-cos linear/conv ran in bf16
    for key, grad in got.items():
        if key != "logits":
            assert grad.dtype == torch.float32, f"{name}: {key} got a {grad.dtype} gradient"
    assert set(got) == set(exact)
    error, original_error = _relative_rms(got, exact), _relative_rms(baseline, exact)
    assert error <= BF16_MODEL_ERROR, f"{name}: relative RMS error {error:.3g} under bf16 autocast"
    assert error <= 2 * original_error, (
        f"{name}: relative RMS error {error:.3g} under bf16 autocast, the original modules' {original_error:.3g}"
    )


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_compile_under_autocast_matches_eager(models):
    name, _, ours = models
    x, weights = _data()
    eager = _step(ours, x, weights, autocast=True)
    torch._dynamo.reset()
    compiled = _step(torch.compile(ours, fullgraph=True, backend="aot_eager"), x, weights, autocast=True)
    for key, value in eager.items():
        torch.testing.assert_close(compiled[key], value, atol=2e-2, rtol=2e-2, msg=lambda m: f"{name} {key}: {m}")

"""Front door of the B-cos models' uncentered batch norm (semantics: reference.py).

backend "reference" runs ``reference.batch_norm_uncentered_2d`` (the original's function, plain autograd). Backend
"torch" (torch.py, chosen by bcos_kernels.backends) runs the custom op ``bcos_kernels::batch_norm_uncentered``
with a hand-written backward; the running-variance update happens here, outside the op, with the original's
formula. Parameters and running_var in another dtype than x (e.g. fp32 parameters of a bf16 activation) are the
reference's case: "auto" takes it, an explicit "torch" refuses it.
"""

# The backend module "torch" (./torch.py) is imported before the library (see ops/dau_conv2d/__init__.py).
import bcos_kernels.ops.batch_norm_uncentered.torch  # noqa: I001, F401
import torch
from typing import NamedTuple, Optional

from bcos_kernels import backends
from bcos_kernels.ops import _autocast, _eager
from bcos_kernels.ops._checks import check_tensor
from bcos_kernels.ops._dtypes import compute_dtype
from bcos_kernels.ops._options import custom_op
from bcos_kernels.ops.batch_norm_uncentered import reference

__all__ = ["batch_norm_uncentered"]


def batch_norm_uncentered(
    x: torch.Tensor,
    running_var: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    *,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    detach: bool = False,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``x / sqrt(var + eps) * weight + bias`` per channel of x (N, C, H, W); var: the biased batch variance over
    (N, H, W) when ``training`` (running_var, if given, updated in place), else ``running_var``. ``detach``: the
    batch statistics are constants for autograd (explanation mode). Under autocast weight and bias (and an eval-mode
    running_var) are cast to x's dtype."""
    check_tensor("x", x, 4)
    weight, bias = _autocast.in_dtype_of(x, weight, bias)
    if not training:  # read only (training updates the buffer itself, in its own dtype)
        (running_var,) = _autocast.in_dtype_of(x, running_var)
    channels = x.shape[1]
    mixed = []  # the per-channel tensors the op reads that are not in x's dtype
    for name, t in (("running_var", running_var), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        check_tensor(name, t, 1)
        if t.shape[0] != channels:
            raise ValueError(f"{name} has {t.shape[0]} elements but x has {channels} channels")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; they must be on the same device")
        if t.dtype != x.dtype and not (name == "running_var" and training):  # training: the update casts
            mixed.append(name)
    if not training and running_var is None:
        raise ValueError("running_var must be tracked to evaluate the norm in eval mode")
    for name, value in (("momentum", momentum), ("eps", eps)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    name = backends.resolve("batch_norm_uncentered", backend, x, mixed_dtypes=tuple(mixed))
    if name == "reference":
        with _autocast.off(x):
            return reference.batch_norm_uncentered_2d(x, running_var, weight, bias, training, momentum, eps, detach)
    out, _, var, _ = _eager.call(
        batch_norm_uncentered_op,
        x,
        None if training else running_var,
        weight,
        bias,
        eps=float(eps),
        training=training,
        detach=detach,
        backend=name,
    )
    if training and running_var is not None:
        with torch.no_grad():
            running_var.copy_((1 - momentum) * running_var + momentum * var.to(running_var.dtype))
    return out


class NormOptions(NamedTuple):
    eps: float
    training: bool  # batch statistics (else running_var)
    detach: bool  # the batch statistics are constants for autograd
    backend: str


@custom_op(
    "bcos_kernels::batch_norm_uncentered",
    "Tensor x, Tensor? running_var, Tensor? weight, Tensor? bias",
    NormOptions,
    "(Tensor, Tensor, Tensor, Tensor)",
)
def batch_norm_uncentered_op(x, running_var, weight, bias, **options):
    """(out in x's layout and dtype, mean, var, inv_std per channel in the compute dtype: fp32 for half x). In
    eval mode var is running_var and mean 0. mean, var and inv_std are not differentiable."""
    opts = NormOptions(**options)
    return backends.checked_kernels("batch_norm_uncentered", opts.backend, x.device).forward(
        x, running_var, weight, bias, opts
    )


@batch_norm_uncentered_op.register_fake
def _(x, running_var, weight, bias, **options):
    stats = [x.new_empty((x.shape[1],), dtype=compute_dtype(x.dtype)) for _ in range(3)]
    return (torch.empty_like(x), *stats)


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    x, _, weight, _ = inputs
    _, mean, var, inv_std = output
    ctx.mark_non_differentiable(mean, var, inv_std)
    ctx.save_for_backward(x, weight, mean, inv_std)
    ctx.options = dict(keyword_only_inputs)


@torch.autograd.function.once_differentiable
def _backward(ctx, grad_out, _grad_mean, _grad_var, _grad_inv_std):
    need_x, _, need_w, need_b = ctx.needs_input_grad[:4]
    x, weight, mean, inv_std = ctx.saved_tensors
    opts = NormOptions(**ctx.options)
    grad_x, grad_w, grad_b = backends.kernels("batch_norm_uncentered", opts.backend).backward(
        grad_out, x, weight, mean, inv_std, opts, (need_x, need_w, need_b)
    )
    return grad_x, None, grad_w, grad_b


_eager.register_autograd(batch_norm_uncentered_op, _backward, _setup_context)

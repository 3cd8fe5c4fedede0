"""Front door of the B-cos ViTs' detachable norms, layer norm and group norm (semantics: reference.py).

Out of explanation mode (``detach=False``) every backend is ATen's own norm (``F.layer_norm``/``F.group_norm``,
what the original runs too). In explanation mode backend "reference" runs the original's operations and backend
"torch" (torch.py) the custom op ``bcos_kernels::detached_norm`` with a hand-written backward. Parameters in
another dtype than x are the reference's case: "auto" takes it, an explicit "torch" refuses it.
"""

# The backend module "torch" (./torch.py) is imported before the library (see ops/dau_conv2d/__init__.py).
import bcos_kernels.ops.detachable_norm.torch  # noqa: I001, F401
import torch
import torch.nn.functional as F
from typing import NamedTuple, Optional, Sequence

from bcos_kernels import backends
from bcos_kernels.ops import _autocast, _eager
from bcos_kernels.ops._checks import check_tensor, positive_int
from bcos_kernels.ops._dtypes import compute_dtype
from bcos_kernels.ops._options import custom_op
from bcos_kernels.ops.detachable_norm import reference

__all__ = ["detachable_group_norm", "detachable_layer_norm"]


def _check_affine(x: torch.Tensor, weight, bias, shape, what: str):
    """(weight, bias, the names of those not in x's dtype); raises on a wrong type, shape or device. Under autocast
    weight and bias are cast to x's dtype (_autocast.py)."""
    weight, bias = _autocast.in_dtype_of(x, weight, bias)
    mixed = []
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        check_tensor(name, t)
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name} has shape {tuple(t.shape)} but must be {tuple(shape)} ({what})")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; they must be on the same device")
        if t.dtype != x.dtype:
            mixed.append(name)
    return weight, bias, tuple(mixed)


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    return float(eps)


def detachable_layer_norm(
    x: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    *,
    detach: bool = False,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Layer norm over the trailing ``normalized_shape`` dims of x; ``detach``: the variance is a constant for
    autograd (explanation mode of `bcos.modules.norms.DetachableLayerNorm`)."""
    check_tensor("x", x)
    normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if not normalized_shape or any(isinstance(d, bool) or not isinstance(d, int) for d in normalized_shape):
        raise ValueError(f"normalized_shape must be an int or a non-empty sequence of ints, got {normalized_shape!r}")
    if x.dim() < len(normalized_shape) or tuple(x.shape[x.dim() - len(normalized_shape) :]) != normalized_shape:
        raise ValueError(f"x of shape {tuple(x.shape)} does not end in normalized_shape {normalized_shape}")
    weight, bias, mixed = _check_affine(x, weight, bias, normalized_shape, "normalized_shape")
    norm = NormOptions("layer", 1, len(normalized_shape), _check_eps(eps), "")
    return _normalise(x, weight, bias, norm, detach, backend, mixed, normalized_shape)


def detachable_group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    *,
    detach: bool = False,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Group norm of x (N, C, H, W), per sample over each of ``num_groups`` groups of channels; weight and bias
    per channel. ``detach``: the variance is a constant for autograd (explanation mode of
    `bcos.modules.norms.DetachableGroupNorm2d`)."""
    check_tensor("x", x, 4)
    num_groups = positive_int("num_groups", num_groups)
    if x.shape[1] % num_groups:
        raise ValueError(f"x has {x.shape[1]} channels, which num_groups={num_groups} does not divide")
    weight, bias, mixed = _check_affine(x, weight, bias, (x.shape[1],), "one value per channel of x")
    norm = NormOptions("group", num_groups, x.dim() - 1, _check_eps(eps), "")
    return _normalise(x, weight, bias, norm, detach, backend, mixed, num_groups)


def _normalise(x, weight, bias, norm: "NormOptions", detach: bool, backend, mixed, shape_or_groups):
    """The checked call: ATen's norm out of explanation mode, else the reference or the custom op."""
    name = backends.resolve("detachable_norm", backend, x, mixed_dtypes=mixed)
    layer = norm.kind == "layer"
    if not detach:
        aten = F.layer_norm if layer else F.group_norm
        return aten(x, shape_or_groups, weight, bias, norm.eps)
    if name == "reference":
        original = reference.layer_norm if layer else reference.group_norm
        with _autocast.off(x):
            return original(x, shape_or_groups, weight, bias, norm.eps, True)
    return _eager.call(detached_norm, x, weight, bias, **norm._replace(backend=name)._asdict())[0]


class NormOptions(NamedTuple):
    kind: str  # "layer": over the trailing norm_dims dims, affine over them; "group": per channel group
    groups: int
    norm_dims: int
    eps: float
    backend: str


@custom_op(
    "bcos_kernels::detached_norm", "Tensor x, Tensor? weight, Tensor? bias", NormOptions, "(Tensor, Tensor, Tensor)"
)
def detached_norm(x, weight, bias, **options):
    """(out, mean, 1/std per group in the compute dtype); mean and 1/std are not differentiable."""
    opts = NormOptions(**options)
    out, mean, rstd = backends.checked_kernels("detachable_norm", opts.backend, x.device).forward(x, weight, bias, opts)
    return out, mean, rstd


@detached_norm.register_fake
def _(x, weight, bias, **options):
    opts = NormOptions(**options)
    if opts.kind == "layer":
        shape = (*x.shape[: x.dim() - opts.norm_dims], *([1] * opts.norm_dims))
    else:
        shape = (x.shape[0], opts.groups)
    stat = x.new_empty(shape, dtype=compute_dtype(x.dtype))
    return torch.empty_like(x), stat, torch.empty_like(stat)


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    x, weight, _ = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.options = dict(keyword_only_inputs)


@torch.autograd.function.once_differentiable
def _backward(ctx, grad_out, _grad_mean, _grad_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    opts = NormOptions(**ctx.options)
    grad_x, grad_w, grad_b = backends.kernels("detachable_norm", opts.backend).backward(
        grad_out, x, weight, mean, rstd, opts, ctx.needs_input_grad[:3]
    )
    return grad_x, grad_w, grad_b


_eager.register_autograd(detached_norm, _backward, _setup_context)

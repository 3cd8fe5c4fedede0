"""Front door of the B-cos linear op (over the last dim, any leading shape).

backend "reference" runs reference.py; the fused backends (one file each
here) run the custom op ``bcos_kernels::bcos_linear_fused`` with a
hand-written backward op; tensors positional, options keyword-only.
"""

from typing import NamedTuple

import torch

from bcos_kernels import backends
from bcos_kernels.ops import _autocast, _eager
from bcos_kernels.ops import _bcos_common as common
from bcos_kernels.ops._checks import check_like, check_tensor
from bcos_kernels.ops._options import custom_op
from bcos_kernels.ops.bcos_linear import reference as ref


def bcos_linear(
    x, weight, bias=None, *, b=2.0, max_out=1, normalize_weight=True, scale=1.0, detach=False, backend=None
):
    """B-cos linear. x: (..., D); weight: (O*max_out, D); bias: (O*max_out,) or None. Returns (..., O).
    Under autocast x, weight and bias are cast to its dtype, as a linear's inputs."""
    x, weight, bias = _autocast.lower_precision(x, weight, bias)
    check_tensor("x", x, min_ndim=1)
    check_tensor("weight", weight, 2)
    check_like("weight", weight, "x", x)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight has {weight.shape[1]} input features but x has {x.shape[-1]} in its last dim")
    if bias is not None:
        check_tensor("bias", bias, 1)
        check_like("bias", bias, "x", x)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias has {bias.shape[0]} elements but weight has {weight.shape[0]} rows")
    common.check_max_out(max_out, weight.shape[0], "rows in weight")
    b_tensor, opts = common.check_options(x, b, max_out, normalize_weight, scale, detach)
    name = backends.resolve("bcos_linear", backend, x)
    if x.numel() == 0:  # the fused kernels read an empty norm as b == 1; the reference's ATen ops give the empty result
        name = "reference"
    if name == "reference":
        with _autocast.off(x):
            return ref.bcos_linear(x, weight, bias, **dict(opts, b=b))
    out, _, _, _ = _eager.call(bcos_linear_fused, x, weight, bias, b_tensor, **opts, backend=name)
    return out


# The options of the fused linear ops (keyword-only in their schemas; the backends get them as one object).
LinearOptions = NamedTuple("LinearOptions", common.BCOS_OPTIONS)


@custom_op(
    "bcos_kernels::bcos_linear_fused",
    "Tensor x, Tensor weight, Tensor? bias, Tensor? b_tensor",
    LinearOptions,
    common.FUSED_OUTPUTS,
)
def bcos_linear_fused(x, weight, bias, b_tensor, **options):
    """Returns (out, lin after MaxOut (R, O), ||x|| + 1e-12 (R,), winner uint8); R = rows of x."""
    opts = LinearOptions(**options)
    return backends.checked_kernels("bcos_linear", opts.backend, x.device).forward(x, weight, bias, b_tensor, opts)


@bcos_linear_fused.register_fake
def _(x, weight, bias, b_tensor, **options):
    opts = LinearOptions(**options)
    out_features = weight.shape[0] // opts.max_out
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    has_norm = b_tensor is not None or opts.b != 1
    norm = x.new_empty((rows,) if has_norm else (0,))
    winner = x.new_empty((rows, out_features) if opts.max_out > 1 else (0,), dtype=torch.uint8)
    return x.new_empty(*x.shape[:-1], out_features), x.new_empty(rows, out_features), norm, winner


bcos_linear_fused_backward = common.fused_backward_op("bcos_linear", LinearOptions, grad_x_in_layout_of_x=False)

_eager.register_autograd(
    bcos_linear_fused, common.fused_backward(bcos_linear_fused_backward), common.setup_fused_context
)

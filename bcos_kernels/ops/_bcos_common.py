"""What the B-cos conv and linear front doors share: checks of b/scale/max_out,
the backend capability test, and the pieces of the fused backward that sit
outside the kernels (weight normalisation, b as an optional tensor)."""

import math
from typing import Optional, Tuple

import torch

from bcos_kernels import backends
from bcos_kernels.ops import _eager
from bcos_kernels.ops._checks import is_finite_number, positive_int
from bcos_kernels.ops._layout import memory_format_of
from bcos_kernels.ops._options import custom_op


def check_b(b, x: torch.Tensor) -> Tuple[float, Optional[torch.Tensor]]:
    """(b as a float, b as a tensor or None). A tensor b (learnable) stays a tensor."""
    if isinstance(b, torch.Tensor):
        if b.numel() != 1 or not b.is_floating_point():
            raise ValueError(
                f"b must be a number >= 1 or a one-element floating point tensor, got a tensor of "
                f"shape {tuple(b.shape)} and dtype {b.dtype}"
            )
        if b.device != x.device:
            raise ValueError(f"b is on {b.device} but x is on {x.device}; they must be on the same device")
        # No value check: it would synchronise with the GPU on every call; the
        # B-cosification modules clamp b themselves.
        return math.nan, b
    if isinstance(b, bool) or not isinstance(b, (int, float)) or not is_finite_number(b) or b < 1:
        raise ValueError(f"b must be a finite number >= 1 (or a tensor), got {b!r}")
    return float(b), None


def check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not is_finite_number(scale) or scale == 0:
        raise ValueError(f"scale must be a finite non-zero number, got {scale!r}")
    return float(scale)


def check_max_out(max_out, rows: int, rows_name: str) -> int:
    positive_int("max_out", max_out)
    if rows % max_out:
        raise ValueError(
            f"max_out={max_out} must divide the number of {rows_name} ({rows}): "
            f"the weight holds out_channels * max_out filters"
        )
    return max_out


def check_options(
    x: torch.Tensor, b, max_out: int, normalize_weight, scale, detach
) -> Tuple[Optional[torch.Tensor], dict]:
    """(b_tensor, the options the conv and linear ops share, checked: b as a float -- NaN when b_tensor holds it
    --, max_out, normalize_weight, scale, detach). max_out is checked by the caller, against its filters."""
    b_float, b_tensor = check_b(b, x)
    options = dict(b=b_float, max_out=max_out, normalize_weight=bool(normalize_weight), scale=check_scale(scale))
    return b_tensor, dict(options, detach=bool(detach))


def output_memory_format(x: torch.Tensor, op: str, backend: str) -> torch.memory_format:
    """Layout of the outputs (out, lin, winner): channels_last for a channels_last x where the backend keeps it
    (the Triton kernels: a channels_last network stays channels_last), else NCHW (the ATen-GEMM paths)."""
    return memory_format_of(x) if backends.OPS[op][backend].keeps_channels_last else torch.contiguous_format


def b_value(b: float, b_tensor: Optional[torch.Tensor]) -> Tuple[float, bool]:
    """(b as a float, whether it came from a tensor) for the kernels."""
    if b_tensor is None:
        return b, False
    return float(b_tensor.detach().reshape(())), True


def scale_backward(grad_out, lin_max, norm, winner, shape, norm_channels: int, b_tensor, opts, needs):
    """(grad_lin, grad_norm, grad_b) of the extension's fused backward of MaxOut, |cos|^(b-1) and scale, on the
    (N, O, P) views ``shape`` of grad_out, lin_max and winner and the (N, norm_channels, P) view of norm."""
    n, _, p = shape
    b_val, b_is_tensor = b_value(opts.b, b_tensor)
    return torch.ops.bcos_kernels.bcos_scale_backward(
        grad_out.reshape(shape).contiguous(),
        lin_max.reshape(shape),
        norm.reshape(n, norm_channels, p) if norm.numel() else norm,
        winner.view(shape) if opts.max_out > 1 else winner,
        *(b_val, b_is_tensor, opts.max_out, opts.scale, opts.detach, needs[0], needs[3]),
    )


def _weight_kernels_for(weight: torch.Tensor) -> bool:
    """Whether the extension's one-pass weight normalisation kernels serve ``weight`` (CPU tensors)."""
    return weight.device.type == "cpu" and backends.cpu_extension() is not None


def weight_norm_backward(grad_w_hat: torch.Tensor, w_hat: torch.Tensor, w_norm: torch.Tensor) -> torch.Tensor:
    """Gradient through w_hat = w / ||w|| (per output filter): (g - w_hat <g, w_hat>) / ||w||.

    On the CPU one pass of the extension (each filter read once from memory); elsewhere three passes (dot
    products as one batched GEMV, one addcmul, one in-place scale): the weights of late ResNet layers and of ViT
    linears are as large as their activations."""
    if _weight_kernels_for(w_hat):
        return torch.ops.bcos_kernels.weight_normalize_backward(grad_w_hat, w_hat, w_norm)
    rows = w_hat.shape[0]
    dot = torch.bmm(grad_w_hat.reshape(rows, 1, -1), w_hat.reshape(rows, -1, 1))  # no (rows, K) temporary
    shape = (rows,) + (1,) * (w_hat.dim() - 1)
    return torch.addcmul(grad_w_hat, w_hat, dot.view(shape), value=-1).div_(w_norm)


def weight_and_norm(weight: torch.Tensor, normalize_weight: bool):
    """(w_hat, ||w|| per filter or None); on the CPU one pass of the extension."""
    if not normalize_weight:
        return weight, None
    if _weight_kernels_for(weight):
        return torch.ops.bcos_kernels.weight_normalize(weight)
    dims = tuple(range(1, weight.dim()))
    w_norm = torch.linalg.vector_norm(weight, dim=dims, keepdim=True)
    return weight / w_norm, w_norm


def grad_for_b(grad_b: torch.Tensor, b_tensor: torch.Tensor) -> torch.Tensor:
    return grad_b.to(b_tensor.dtype).reshape(b_tensor.shape)


def or_empty(grads, like: torch.Tensor):
    """Custom ops cannot return None: an empty tensor stands for a gradient that was not asked for."""
    return tuple(g if g is not None else like.new_empty(0) for g in grads)


def fake_grads(
    needs,
    x: torch.Tensor,
    weight: torch.Tensor,
    b_tensor: Optional[torch.Tensor],
    x_format: torch.memory_format = torch.contiguous_format,
):
    """Shapes of the (x, weight, bias, b) gradients of a fused backward, for its fake impl; grad x in
    ``x_format``."""
    shapes = (x.shape, weight.shape, (weight.shape[0],), b_tensor.shape if b_tensor is not None else (0,))
    dtypes = (x.dtype, x.dtype, x.dtype, b_tensor.dtype if b_tensor is not None else x.dtype)
    grads = [x.new_empty(shape if need else (0,), dtype=dtype) for need, shape, dtype in zip(needs, shapes, dtypes)]
    if needs[0]:
        grads[0] = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=x_format)
    if needs[1]:
        grads[1] = torch.empty(weight.shape, dtype=x.dtype, device=x.device, memory_format=memory_format_of(weight))
    return tuple(grads)


# The fused conv and linear ops share one autograd wiring: positional inputs (x, weight, bias, b_tensor, *extra)
# and keyword-only options; outputs (out, lin_max, norm, winner); their backward ops take (grad_out, x, weight,
# b_tensor, lin_max, norm, winner) plus the same options and ``needs``, and return the (x, weight, bias, b_tensor)
# gradients. The conv op's extra input (channel_scale) is saved as an ``extra`` tensor and handled by its own
# backward wrapper.

# The options every fused B-cos op has, after its own (the conv's geometry): b is NaN when the tensor b_tensor
# holds it; detach is for the backward only.
BCOS_OPTIONS = [
    ("b", float),
    ("max_out", int),
    ("normalize_weight", bool),
    ("scale", float),
    ("detach", bool),
    ("backend", str),
]

# The schemas' shared parts: the four outputs of the fused ops and the inputs of their backward ops.
FUSED_OUTPUTS = "(Tensor, Tensor, Tensor, Tensor)"
BACKWARD_INPUTS = (
    "Tensor grad_out, Tensor x, Tensor weight, Tensor? b_tensor, Tensor lin_max, Tensor norm, Tensor winner"
)


def fused_backward_op(op: str, options: type, grad_x_in_layout_of_x: bool):
    """The custom op ``bcos_kernels::<op>_fused_backward``: the gradients of (x, weight, bias, b_tensor) of the
    fused op, an empty tensor where ``needs`` is False, from the backend's ``backward``. A custom op of its own so
    that compiled graphs never look at the value of a tensor b. Its grad x is channels_last for a channels_last x
    if ``grad_x_in_layout_of_x``, else contiguous."""

    @custom_op(f"bcos_kernels::{op}_fused_backward", BACKWARD_INPUTS, options, FUSED_OUTPUTS, extra="bool[] needs")
    def backward_op(grad_out, x, weight, b_tensor, lin_max, norm, winner, *, needs, **kwargs):
        opts = options(**kwargs)
        backward = backends.checked_kernels(op, opts.backend, x.device).backward
        return or_empty(backward(grad_out, x, weight, b_tensor, lin_max, norm, winner, opts, needs), x)

    @backward_op.register_fake
    def _(grad_out, x, weight, b_tensor, lin_max, norm, winner, *, needs, **kwargs):
        x_format = memory_format_of(x) if grad_x_in_layout_of_x else torch.contiguous_format
        return fake_grads(needs, x, weight, b_tensor, x_format)

    return backward_op


def setup_fused_context(ctx, inputs, keyword_only_inputs, output, extra=()):
    x, weight, bias, b_tensor = inputs[:4]
    _, lin_max, norm, winner = output
    ctx.mark_non_differentiable(lin_max, norm, winner)
    ctx.save_for_backward(x, weight, b_tensor, lin_max, norm, winner, *extra)
    ctx.has_bias = bias is not None
    ctx.options = dict(keyword_only_inputs)


def fused_input_grads(ctx, backward_op, grad_out, saved):
    """Gradients of (x, weight, bias, b_tensor); ``saved``: the first six saved tensors. The backward op runs
    only when one of the four is needed."""
    x, weight, b_tensor, lin_max, norm, winner = saved
    needs = list(ctx.needs_input_grad[:4])
    needs[2] = needs[2] and ctx.has_bias
    needs[3] = needs[3] and b_tensor is not None
    if not any(needs):
        return (None,) * 4
    grads = _eager.call(backward_op, grad_out, x, weight, b_tensor, lin_max, norm, winner, **ctx.options, needs=needs)
    return tuple(g if need else None for g, need in zip(grads, needs))


def fused_backward(backward_op):
    """The autograd backward of a fused op whose backward custom op is ``backward_op``."""

    def backward(ctx, grad_out, _grad_lin_max, _grad_norm, _grad_winner):
        return fused_input_grads(ctx, backward_op, grad_out, ctx.saved_tensors)

    return backward

"""Front door of the B-cos linear op (over the last dim, any leading shape).

backend "torch" runs the reference; the fused backends run the custom op
``bcos_kernels::bcos_linear_fused``: one GEMM (ATen) plus one fused pass each
way for MaxOut, |cos|^(b-1) and scale, with a hand-written backward.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from bcos_kernels import backends
from bcos_kernels.ops import _bcos_common as common
from bcos_kernels.ops._checks import check_like, check_tensor
from bcos_kernels.ops.bcos_linear import reference as ref


def bcos_linear(x, weight, bias=None, *, b=2.0, max_out=1, normalize_weight=True, scale=1.0, detach=False,
                backend=None):
    """B-cos linear. x: (..., D); weight: (O*max_out, D); bias: (O*max_out,) or None. Returns (..., O)."""
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
    b_float, b_tensor = common.check_b(b, x)
    scale = common.check_scale(scale)
    name = backends.resolve("bcos_linear", backend, x.device, common.fused_backends(x))
    if name == "torch":
        return ref.bcos_linear(x, weight, bias, b=b, max_out=max_out, normalize_weight=normalize_weight, scale=scale,
                               detach=bool(detach))
    out, _, _, _ = bcos_linear_fused(x, weight, bias, b_tensor, b_float, max_out, bool(normalize_weight), scale,
                                     bool(detach), name)
    return out


@torch.library.custom_op("bcos_kernels::bcos_linear_fused", mutates_args=())
def bcos_linear_fused(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      b_tensor: Optional[torch.Tensor], b: float, max_out: int, normalize_weight: bool, scale: float,
                      detach: bool, backend: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out, lin after MaxOut (R, O), ||x|| + 1e-12 (R,), winner uint8); R = rows of x."""
    if backend == "triton":
        from bcos_kernels.ops.bcos_conv2d import triton as kernels
        rows = x.reshape(-1, x.shape[-1])
        geo = kernels.linear_geometry(rows.shape[0], rows.shape[1], weight.shape[0], max_out)
        out, lin_max, norm, winner = kernels.forward(rows, weight, bias, b_tensor, b, geo, normalize_weight, scale,
                                                     kernels.NORM_LINEAR, torch.contiguous_format)
        out_features = geo.outputs
        return (out.view(*x.shape[:-1], out_features), lin_max.view(-1, out_features), norm.view(-1),
                winner.view(-1, out_features) if max_out > 1 else winner)
    if backend not in ("cpu", "cuda"):  # both: the ATen GEMM and the extension's fused scale pass
        raise ValueError(f"bcos_linear_fused: unknown backend {backend!r}")
    b_val, b_is_tensor = common.b_value(b, b_tensor)
    w_hat, _ = common.weight_and_norm(weight, normalize_weight)
    rows = x.reshape(-1, x.shape[-1])
    lin = F.linear(rows, w_hat, bias)
    if b_val == 1 and not b_is_tensor:
        norm = x.new_empty(0)
    else:
        norm = torch.linalg.vector_norm(rows, dim=-1) + ref.LINEAR_NORM_EPS
    out, lin_max, winner = torch.ops.bcos_kernels.bcos_scale_forward(
        lin.unsqueeze(-1), norm.view(-1, 1, 1) if norm.numel() else norm, b_val, b_is_tensor, max_out, scale)
    if max_out == 1:
        lin_max = lin  # the kernel does not copy lin when there is no MaxOut
    out_features = weight.shape[0] // max_out
    if max_out > 1:
        winner = winner.view(-1, out_features)
    return out.view(*x.shape[:-1], out_features), lin_max.view(-1, out_features), norm, winner


@bcos_linear_fused.register_fake
def _(x, weight, bias, b_tensor, b, max_out, normalize_weight, scale, detach, backend):
    out_features = weight.shape[0] // max_out
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    has_norm = b_tensor is not None or b != 1
    norm = x.new_empty((rows,) if has_norm else (0,))
    winner = x.new_empty((rows, out_features) if max_out > 1 else (0,), dtype=torch.uint8)
    return x.new_empty(*x.shape[:-1], out_features), x.new_empty(rows, out_features), norm, winner


@torch.library.custom_op("bcos_kernels::bcos_linear_fused_backward", mutates_args=())
def bcos_linear_fused_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                               b_tensor: Optional[torch.Tensor], lin_max: torch.Tensor, norm: torch.Tensor,
                               winner: torch.Tensor, b: float, max_out: int, normalize_weight: bool, scale: float,
                               detach: bool, backend: str, needs: List[bool]
                               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for (x, weight, bias, b_tensor); an empty tensor where ``needs`` is False."""
    need_x, need_w, need_bias, need_b = needs
    if backend == "triton":
        from bcos_kernels.ops.bcos_conv2d import triton as kernels
        x_rows = x.reshape(-1, x.shape[-1])
        geo = kernels.linear_geometry(x_rows.shape[0], x_rows.shape[1], weight.shape[0], max_out)
        shape4 = (geo.n, geo.outputs, 1, 1)
        grad_x, grad_w, grad_bias, grad_b = kernels.backward(
            grad_out.reshape(shape4), x_rows, weight, b_tensor, lin_max.view(shape4),
            norm.view(geo.n, 1, 1, 1) if norm.numel() else norm, winner.view(shape4) if max_out > 1 else winner,
            b, geo, normalize_weight, scale, detach, needs, kernels.NORM_LINEAR)
        grad_x = grad_x.reshape(x.shape) if need_x else None
        return common.or_empty((grad_x, grad_w, grad_bias, common.grad_for_b(grad_b, b_tensor) if need_b else None), x)
    b_val, b_is_tensor = common.b_value(b, b_tensor)
    rows, out_features = lin_max.shape
    grad_lin, grad_norm, grad_b = torch.ops.bcos_kernels.bcos_scale_backward(
        grad_out.reshape(rows, out_features, 1).contiguous(), lin_max.unsqueeze(-1),
        norm.view(-1, 1, 1) if norm.numel() else norm, winner.view(rows, out_features, 1) if max_out > 1 else winner,
        b_val, b_is_tensor, max_out, scale, detach, need_x, need_b)
    grad_lin = grad_lin.view(rows, out_features * max_out)
    x_rows = x.reshape(rows, x.shape[-1])
    w_hat, w_norm = common.weight_and_norm(weight, normalize_weight)
    grad_x = grad_w = grad_bias = None
    if need_x:
        grad_x = grad_lin @ w_hat
        if grad_norm.numel():
            # d||x||/dx = x / ||x||; dividing by ||x|| + 1e-12 instead keeps a zero row at 0 (no 0/0) and
            # differs by a relative 1e-12 / ||x|| elsewhere.
            grad_x = grad_x + x_rows * (grad_norm.view(rows) / norm).unsqueeze(-1)
        grad_x = grad_x.view(x.shape)
    if need_w:
        grad_w_hat = grad_lin.t() @ x_rows
        grad_w = common.weight_norm_backward(grad_w_hat, w_hat, w_norm) if normalize_weight else grad_w_hat
    if need_bias:
        grad_bias = grad_lin.sum(0)
    grad_b = common.grad_for_b(grad_b, b_tensor) if need_b else None
    return common.or_empty((grad_x, grad_w, grad_bias, grad_b), x)


@bcos_linear_fused_backward.register_fake
def _(grad_out, x, weight, b_tensor, lin_max, norm, winner, b, max_out, normalize_weight, scale, detach, backend,
      needs):
    return common.fake_grads(needs, x, weight, b_tensor)


bcos_linear_fused.register_autograd(common.fused_backward(bcos_linear_fused_backward),
                                   setup_context=common.setup_fused_context)

"""Backend "cpu" of the B-cos linear: the ATen GEMM and the extension's fused scale pass (MaxOut, |cos|^(b-1),
scale) each way; the row norms and the GEMMs of the backward are ATen's. Backend "cuda" is the same code on
cuBLAS and the extension's CUDA kernels (cuda.py)."""

import torch
import torch.nn.functional as F

from bcos_kernels.ops import _bcos_common as common
from bcos_kernels.ops.bcos_linear import reference as ref


def forward(x, weight, bias, b_tensor, opts):
    max_out = opts.max_out
    b_val, b_is_tensor = common.b_value(opts.b, b_tensor)
    w_hat, _ = common.weight_and_norm(weight, opts.normalize_weight)
    rows = x.reshape(-1, x.shape[-1])
    lin = F.linear(rows, w_hat, bias)
    if b_val == 1 and not b_is_tensor:
        norm = x.new_empty(0)
    else:
        norm = torch.linalg.vector_norm(rows, dim=-1) + ref.LINEAR_NORM_EPS
    out, lin_max, winner = torch.ops.bcos_kernels.bcos_scale_forward(
        lin.unsqueeze(-1), norm.view(-1, 1, 1) if norm.numel() else norm, b_val, b_is_tensor, max_out, opts.scale
    )
    if max_out == 1:
        lin_max = lin  # the kernel does not copy lin when there is no MaxOut
    out_features = weight.shape[0] // max_out
    if max_out > 1:
        winner = winner.view(-1, out_features)
    return out.view(*x.shape[:-1], out_features), lin_max.view(-1, out_features), norm, winner


def backward(grad_out, x, weight, b_tensor, lin_max, norm, winner, opts, needs):
    max_out, normalize_weight = opts.max_out, opts.normalize_weight
    need_x, need_w, need_bias, need_b = needs
    rows, out_features = lin_max.shape
    grad_lin, grad_norm, grad_b = common.scale_backward(
        grad_out, lin_max, norm, winner, (rows, out_features, 1), 1, b_tensor, opts, needs
    )
    grad_lin = grad_lin.view(rows, out_features * max_out)
    x_rows = x.reshape(rows, x.shape[-1])
    w_hat, w_norm = common.weight_and_norm(weight, normalize_weight)
    grad_x = grad_w = grad_bias = None
    if need_x:
        grad_x = grad_lin @ w_hat
        if grad_norm.numel():
            # d||x||/dx = x / ||x||; dividing by ||x|| + 1e-12 instead keeps a zero row at 0 (no 0/0) and
            # differs by a relative 1e-12 / ||x|| elsewhere.
            grad_x.addcmul_(x_rows, (grad_norm.view(rows) / norm).unsqueeze(-1))  # in place, one pass
        grad_x = grad_x.view(x.shape)
    if need_w:
        grad_w_hat = grad_lin.t() @ x_rows
        grad_w = common.weight_norm_backward(grad_w_hat, w_hat, w_norm) if normalize_weight else grad_w_hat
    if need_bias:
        grad_bias = grad_lin.sum(0)
    grad_b = common.grad_for_b(grad_b, b_tensor) if need_b else None
    return grad_x, grad_w, grad_bias, grad_b

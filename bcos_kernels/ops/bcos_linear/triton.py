"""Backend "triton" of the B-cos linear: the B-cos conv kernels (bcos_kernels/ops/bcos_conv2d/triton.py) on the
rows of x as 1x1 images, with the linear's norm ||x|| + 1e-12."""

import torch

from bcos_kernels.ops._bcos_common import grad_for_b
from bcos_kernels.ops.bcos_conv2d import triton as kernels


def forward(x, weight, bias, b_tensor, opts):
    max_out = opts.max_out
    rows = x.reshape(-1, x.shape[-1])
    geo = kernels.linear_geometry(rows.shape[0], rows.shape[1], weight.shape[0], max_out)
    out, lin_max, norm, winner = kernels.fused_forward(rows, weight, bias, b_tensor, opts.b, geo,
                                                       opts.normalize_weight, opts.scale, kernels.NORM_LINEAR,
                                                       torch.contiguous_format)
    out_features = geo.outputs
    return (out.view(*x.shape[:-1], out_features), lin_max.view(-1, out_features), norm.view(-1),
            winner.view(-1, out_features) if max_out > 1 else winner)


def backward(grad_out, x, weight, b_tensor, lin_max, norm, winner, opts, needs):
    max_out = opts.max_out
    need_x, _, _, need_b = needs
    x_rows = x.reshape(-1, x.shape[-1])
    geo = kernels.linear_geometry(x_rows.shape[0], x_rows.shape[1], weight.shape[0], max_out)
    shape4 = (geo.n, geo.outputs, 1, 1)
    grad_x, grad_w, grad_bias, grad_b = kernels.fused_backward(
        grad_out.reshape(shape4), x_rows, weight, b_tensor, lin_max.view(shape4),
        norm.view(geo.n, 1, 1, 1) if norm.numel() else norm, winner.view(shape4) if max_out > 1 else winner,
        opts.b, geo, opts.normalize_weight, opts.scale, opts.detach, needs, kernels.NORM_LINEAR)
    grad_x = grad_x.reshape(x.shape) if need_x else None
    return grad_x, grad_w, grad_bias, grad_for_b(grad_b, b_tensor) if need_b else None

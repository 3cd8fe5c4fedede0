"""Backend "torch" of the uncentered batch norm: the same math in a few streaming passes with a hand-written
backward, instead of the reference's ``var`` (a Welford reduction over (N, H, W), several times slower than a
sum on CPU) and its autograd graph.

Per channel, with n = N*H*W, mean m, s = sqrt(var + eps) and a = weight / s (1 / s without weight):

    forward:   var = mean((x - m)^2) (two-pass: sum, then the centred squares), out = a x (+ bias)
    backward:  grad_x = a g - (a / (n s^2)) (sum g x) (x - m)   (the second term only through batch statistics)
               grad_weight = (sum g x) / s,  grad_bias = sum g

Statistics and per-channel factors are computed in fp32 for half inputs (fp64 stays fp64); the elementwise
passes read and write x's dtype and keep its layout (NCHW or channels_last).
"""

from __future__ import annotations

import torch

from bcos_kernels.ops._dtypes import compute_dtype

DIMS = (0, 2, 3)


def _per_channel(t: torch.Tensor) -> torch.Tensor:
    return t[None, :, None, None]


def statistics(x: torch.Tensor):
    """(mean, biased variance) per channel, in the compute dtype."""
    cdt = compute_dtype(x.dtype)
    xc = x.to(cdt)
    mean = xc.mean(DIMS)
    var = torch.square(xc - _per_channel(mean)).mean(DIMS)
    return mean, var


def forward(x, running_var, weight, bias, opts):
    """(out, mean, var, inv_std): the batch's mean and variance, or zeros and running_var in eval mode."""
    if opts.training:
        mean, var = statistics(x)
    else:
        var = running_var.to(compute_dtype(x.dtype), copy=True)  # an output may not alias an input
        mean = torch.zeros_like(var)
    inv_std = torch.rsqrt(var + opts.eps)
    scale = inv_std if weight is None else inv_std * weight.to(inv_std.dtype)
    out = x * _per_channel(scale).to(x.dtype)
    if bias is not None:
        out = out + _per_channel(bias)
    return out, mean, var, inv_std


def backward(grad_out, x, weight, mean, inv_std, opts, needs):
    """Gradients of (x, weight, bias), None where not needed."""
    need_x, need_w, need_b = needs
    cdt = inv_std.dtype
    scale = inv_std if weight is None else inv_std * weight.to(cdt)
    through_stats = opts.training and not opts.detach
    sum_gx = None
    if need_w or (need_x and through_stats):
        sum_gx = (grad_out.to(cdt) * x.to(cdt)).sum(DIMS)  # (einsum runs this as a slow batched GEMM on CPU)
    grad_x = grad_w = grad_b = None
    if need_x:
        grad_x = grad_out * _per_channel(scale).to(x.dtype)
        if through_stats:
            n = x.numel() // x.shape[1]
            coef = scale * inv_std * inv_std * sum_gx / n  # a / (n s^2) * sum g x
            # x - m formed first: coef x - coef m would cancel when the mean is large against the spread
            centred = x - _per_channel(mean).to(x.dtype)
            grad_x = torch.addcmul(grad_x, centred, _per_channel(-coef).to(x.dtype))
    if need_w:
        # an empty batch: a zero gradient (the sum is over nothing), not 0 times its NaN statistics
        grad_w = (sum_gx * inv_std if x.numel() else torch.zeros_like(sum_gx)).to(weight.dtype)
    if need_b:
        grad_b = grad_out.sum(DIMS).to(grad_out.dtype)
    return grad_x, grad_w, grad_b

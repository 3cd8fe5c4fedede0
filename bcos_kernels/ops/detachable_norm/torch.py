"""Backend "torch" of the detachable norms in explanation mode: ATen's one-pass norm forward (which keeps the
mean and 1/std) and a hand-written backward with the variance held constant, instead of the reference's six-op
autograd graph (var_mean, sqrt, sub, div, mul, add) and its saved intermediates.

Both norms are written as one: x viewed as (N, G, M...) normalised over the M dims, per group g, with the affine
parameters broadcast over the view (layer norm: G = the leading dims, the affine over M; group norm: the affine
per channel, channels = (G, C / G)). With s = 1/std and w the broadcast weight (1 without weight):

    out    = (x - m) s w + b
    grad_x = s (g w - mean_M(g w))       (the mean's path; the variance is a constant)
    grad_w = sum over the other dims of g (x - m) s,   grad_b = sum of g

Half inputs are computed in fp32 and written back in their dtype.
"""

from __future__ import annotations

import torch

from bcos_kernels.ops._dtypes import compute_dtype


def _grouped(t: torch.Tensor, opts) -> torch.Tensor:
    """x-shaped ``t`` as (N, G, M...): layer norm keeps its shape (the leading dims are the groups); group norm
    splits the channels into (G, C / G), a view for any strides."""
    return t if opts.kind == "layer" else t.unflatten(1, (opts.groups, t.shape[1] // opts.groups))


def _statistic(stat: torch.Tensor, x: torch.Tensor, opts) -> torch.Tensor:
    """ATen's per-group mean or 1/std, shaped to broadcast against ``_grouped(x)``."""
    if opts.kind == "layer":
        return stat  # (*leading, 1, ..., 1) already
    return stat.reshape(x.shape[0], opts.groups, *([1] * (x.dim() - 1)))


def _affine(t: torch.Tensor, x: torch.Tensor, opts) -> torch.Tensor:
    if opts.kind == "layer":
        return t
    return t.reshape(opts.groups, x.shape[1] // opts.groups, *([1] * (x.dim() - 2)))


def _reduced_dims(x: torch.Tensor, opts):
    """(dims normalised over, dims the affine parameters are summed over) of ``_grouped(x)``."""
    if opts.kind == "layer":
        first = x.dim() - opts.norm_dims
        return tuple(range(first, x.dim())), tuple(range(first))
    return tuple(range(2, x.dim() + 1)), (0, *range(3, x.dim() + 1))


def forward(x, weight, bias, opts):
    """(out, mean, rstd) with ATen's statistics (compute dtype)."""
    if opts.kind == "layer":
        return torch.native_layer_norm(x, x.shape[x.dim() - opts.norm_dims :], weight, bias, opts.eps)
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()  # ATen's group norm reads one of the two layouts only
    n, c = x.shape[:2]
    inner = x[0, 0].numel() if n and c else 0
    return torch.native_group_norm(x, weight, bias, n, c, inner, opts.groups, opts.eps)


def backward(grad_out, x, weight, mean, rstd, opts, needs):
    """Gradients of (x, weight, bias), None where not needed."""
    need_x, need_w, need_b = needs
    cdt = compute_dtype(x.dtype)
    g = _grouped(grad_out.to(cdt), opts)
    rstd_b = _statistic(rstd.to(cdt), x, opts)
    over, across = _reduced_dims(x, opts)
    grad_x = grad_w = grad_b = None
    if need_x:
        gw = g if weight is None else g * _affine(weight.to(cdt), x, opts)
        grad_x = torch.sub(gw, gw.mean(over, keepdim=True)).mul_(rstd_b)
        grad_x = (grad_x.flatten(1, 2) if opts.kind == "group" else grad_x).to(x.dtype)
    if need_w:
        x_hat = (_grouped(x.to(cdt), opts) - _statistic(mean.to(cdt), x, opts)) * rstd_b
        grad_w = (g * x_hat).sum(across).reshape(weight.shape).to(weight.dtype)
    if need_b:
        grad_b = g.sum(across)
        grad_b = (grad_b.flatten() if opts.kind == "group" else grad_b).to(grad_out.dtype)
    return grad_x, grad_w, grad_b

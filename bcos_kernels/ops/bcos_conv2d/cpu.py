"""Backend "cpu" of the B-cos conv2d: the ATen convolution (oneDNN) and the extension's fused passes
(csrc/cpu/bcos_cpu.cpp) for the patch norm, MaxOut, |cos|^(b-1), scale and channel_scale, each way.

Backend "cuda" runs the same path with cuDNN and its own forward scale pass (see cuda.py)."""

import torch
import torch.nn.functional as F

from bcos_kernels.ops import _bcos_common as common
from bcos_kernels.ops import _conv_layout
from bcos_kernels.ops._layout import memory_format_of

CL = torch.channels_last


def _measured_layout(x) -> bool:
    """Whether the convolution's layout is chosen by measurement (_conv_layout): NCHW x on the CPU. A
    channels_last x runs channels_last, and cuDNN (backend "cuda", which shares this path) chooses its own."""
    return x.device.type == "cpu" and memory_format_of(x) == torch.contiguous_format


def _conv_key(step, x, w_hat, opts):
    geometry = tuple(tuple(v) for v in (opts.stride, opts.padding, opts.dilation))
    return (step, tuple(x.shape), tuple(w_hat.shape), geometry, opts.groups, x.dtype)


def conv_forward(x, w_hat, bias, opts):
    """F.conv2d, returning NCHW-contiguous lin for an NCHW x, in the layout measured faster for the shape."""
    args = (bias, opts.stride, opts.padding, opts.dilation, opts.groups)
    if not _measured_layout(x):
        return F.conv2d(x, w_hat, *args)
    return _conv_layout.run_faster(
        _conv_key("forward", x, w_hat, opts),
        lambda: F.conv2d(x, w_hat, *args),
        lambda: F.conv2d(x.contiguous(memory_format=CL), w_hat.contiguous(memory_format=CL), *args).contiguous(),
    )


def conv_backward(grad_lin, x, w_hat, opts, mask):
    """aten.convolution_backward (grads of x, w_hat, bias), for an NCHW x in the layout measured faster; grad_x
    comes back in x's layout."""
    geometry = (opts.stride, opts.padding, opts.dilation, False, [0, 0], opts.groups, mask)

    def run(g, xx, w):
        return torch.ops.aten.convolution_backward(g, xx, w, [w_hat.shape[0]], *geometry)

    if not _measured_layout(x):
        return run(grad_lin, x, w_hat)

    def channels_last():
        grad_x, grad_w, grad_bias = run(
            grad_lin.contiguous(memory_format=CL), x.contiguous(memory_format=CL), w_hat.contiguous(memory_format=CL)
        )
        return (grad_x.contiguous() if grad_x is not None else None), grad_w, grad_bias

    return _conv_layout.run_faster(
        _conv_key("backward", x, w_hat, opts) + (tuple(mask),), lambda: run(grad_lin, x, w_hat), channels_last
    )


def scaled_forward(lin, x, weight, b_val, b_is_tensor, opts, channel_scale):
    """(out, lin_max, winner, norm) of the extension's separate patch-norm and scale passes."""
    stride, padding, dilation, groups = opts.stride, opts.padding, opts.dilation, opts.groups
    n, _, p = lin.shape
    if b_val == 1 and not b_is_tensor:
        norm = x.new_empty(0)
    else:
        norm = torch.ops.bcos_kernels.patch_norm(x, list(weight.shape[2:]), stride, padding, dilation, groups)
    norm_view = norm.reshape(n, groups, p) if norm.numel() else norm
    scalars = (b_val, b_is_tensor, opts.max_out, opts.scale)
    out, lin_max, winner = torch.ops.bcos_kernels.bcos_scale_forward(lin, norm_view, *scalars, channel_scale)
    return out, lin_max, winner, norm


def aten_forward(x, weight, bias, b_tensor, channel_scale, scaled, opts):
    """The ATen convolution, then ``scaled`` (the backend's scale pass) for the rest."""
    max_out = opts.max_out
    b_val, b_is_tensor = common.b_value(opts.b, b_tensor)
    w_hat, _ = common.weight_and_norm(weight, opts.normalize_weight)
    lin = conv_forward(x, w_hat, bias, opts)
    n, filters, ho, wo = lin.shape
    lin = lin.reshape(n, filters, ho * wo).contiguous()
    out, lin_max, winner, norm = scaled(lin, x, weight, b_val, b_is_tensor, opts, channel_scale)
    if max_out == 1:
        lin_max = lin  # the kernel does not copy lin when there is no MaxOut
    shape = (n, filters // max_out, ho, wo)
    # Outputs are NCHW-contiguous whatever the layout of x (see common.output_memory_format).
    # _unsafe_view: the outputs are not views for autograd (their bases are temporaries of this op), so that a
    # caller may modify them in place, e.g. ResNet's `out += identity` after a folded norm that returns its input.
    reshape = torch.ops.aten._unsafe_view
    return reshape(out, shape), reshape(lin_max, shape), norm, reshape(winner, shape) if max_out > 1 else winner


def forward(x, weight, bias, b_tensor, channel_scale, opts):
    return aten_forward(x, weight, bias, b_tensor, channel_scale, scaled_forward, opts)


def backward(grad_out, x, weight, b_tensor, lin_max, norm, winner, opts, needs):
    stride, padding, dilation, groups = opts.stride, opts.padding, opts.dilation, opts.groups
    max_out, normalize_weight = opts.max_out, opts.normalize_weight
    need_x, need_w, need_bias, need_b = needs
    n, out_channels, ho, wo = lin_max.shape
    grad_lin, grad_norm, grad_b = common.scale_backward(
        grad_out, lin_max, norm, winner, (n, out_channels, ho * wo), groups, b_tensor, opts, needs
    )
    grad_lin = grad_lin.view(n, out_channels * max_out, ho, wo)
    w_hat, w_norm = common.weight_and_norm(weight, normalize_weight)
    grad_x, grad_w_hat, grad_bias = conv_backward(grad_lin, x, w_hat, opts, [need_x, need_w, need_bias])
    if need_x and grad_norm.numel():
        args = (grad_norm.view(n, groups, ho, wo), x, norm, list(weight.shape[2:]), stride, padding, dilation, groups)
        # In place (grad_x is this op's own tensor); on the CPU added inside the patch-norm backward's pass.
        if x.device.type == "cpu" and grad_x.is_contiguous(memory_format=memory_format_of(x)):
            torch.ops.bcos_kernels.patch_norm_backward_add_(grad_x, *args)
        else:
            grad_x.add_(torch.ops.bcos_kernels.patch_norm_backward(*args))
    # The layouts the fake promises (copies only where convolution_backward chose another: it follows x's).
    if need_x:
        grad_x = grad_x.contiguous(memory_format=memory_format_of(x))
    grad_w = None
    if need_w:
        grad_w = common.weight_norm_backward(grad_w_hat, w_hat, w_norm) if normalize_weight else grad_w_hat
        grad_w = grad_w.contiguous(memory_format=memory_format_of(weight))
    grad_b = common.grad_for_b(grad_b, b_tensor) if need_b else None
    return grad_x, grad_w, grad_bias, grad_b

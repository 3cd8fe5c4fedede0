"""Backend "cpu" of the B-cos conv2d: the ATen convolution (oneDNN) and the extension's fused passes
(csrc/cpu/bcos_cpu.cpp) for the patch norm, MaxOut, |cos|^(b-1), scale and channel_scale, each way.

Backend "cuda" runs the same path with cuDNN and its own forward scale pass (see cuda.py)."""

import torch
import torch.nn.functional as F

from bcos_kernels.ops import _bcos_common as common
from bcos_kernels.ops import _conv_layout
from bcos_kernels.ops._layout import is_channels_last, memory_format_of

CL = torch.channels_last


def _nhwc(x, opts) -> bool:
    """Whether this call stays channels_last: a channels_last x on the CPU with this backend (the registry's
    keeps_channels_last). The conv then runs channels_last with no conversion, and the scale passes read its
    output as the (N*Ho*Wo, channels, 1) matrix of its memory: the outputs come back channels_last, so a
    channels_last network stays so (on this package's 2-core CPU a plain 1x1 64->256 conv at 56x56 runs 1.7x
    faster channels_last at 2 threads)."""
    return opts.backend == "cpu" and x.device.type == "cpu" and is_channels_last(x)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A channels_last (N, C, H, W) t as the (N*H*W, C, 1) matrix of its memory (a view)."""
    n, c, h, w = t.shape
    return t.permute(0, 2, 3, 1).reshape(n * h * w, c, 1)


def _unrows(t: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """The inverse of _rows for a kernel's (N*H*W, C, 1) output: channels_last (N, C, H, W), not an autograd view
    of the kernel's tensor (so that a caller may modify it in place)."""
    return t.view(n, h, w, t.shape[1]).permute(0, 3, 1, 2).detach()


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


def _patch_norm(x, weight, b_val, b_is_tensor, opts):
    """The patch norms (N, G, Ho, Wo), or an empty tensor where b = 1 needs none."""
    if b_val == 1 and not b_is_tensor:
        return x.new_empty(0)
    return torch.ops.bcos_kernels.patch_norm(
        x, list(weight.shape[2:]), opts.stride, opts.padding, opts.dilation, opts.groups
    )


def _norm_rows(norm: torch.Tensor) -> torch.Tensor:
    """norm (N, G, Ho, Wo) as the (N*Ho*Wo, G, 1) rows of the channels_last scale passes (a view for G = 1)."""
    return _rows(norm).contiguous() if norm.numel() else norm


def scaled_forward(lin, x, weight, b_val, b_is_tensor, opts, channel_scale):
    """(out, lin_max, winner, norm) of the extension's separate patch-norm and scale passes."""
    n, _, p = lin.shape
    norm = _patch_norm(x, weight, b_val, b_is_tensor, opts)
    norm_view = norm.reshape(n, opts.groups, p) if norm.numel() else norm
    scalars = (b_val, b_is_tensor, opts.max_out, opts.scale)
    out, lin_max, winner = torch.ops.bcos_kernels.bcos_scale_forward(lin, norm_view, *scalars, channel_scale)
    return out, lin_max, winner, norm


def _nhwc_forward(lin, x, weight, b_val, b_is_tensor, opts, channel_scale):
    """The outputs of aten_forward for a call that stays channels_last (_nhwc), lin the conv's (CL) output."""
    n, _, ho, wo = lin.shape
    lin = lin.contiguous(memory_format=CL)  # a copy only where oneDNN returned another layout
    norm = _patch_norm(x, weight, b_val, b_is_tensor, opts)
    scalars = (b_val, b_is_tensor, opts.max_out, opts.scale)
    out, lin_max, winner = torch.ops.bcos_kernels.bcos_scale_forward(
        _rows(lin), _norm_rows(norm), *scalars, channel_scale
    )
    if opts.max_out == 1:
        lin_max = lin  # the conv's own output, not a view
    else:
        lin_max, winner = _unrows(lin_max, n, ho, wo), _unrows(winner, n, ho, wo)
    return _unrows(out, n, ho, wo), lin_max, norm, winner


def aten_forward(x, weight, bias, b_tensor, channel_scale, scaled, opts):
    """The ATen convolution, then ``scaled`` (the backend's scale pass) for the rest."""
    max_out = opts.max_out
    b_val, b_is_tensor = common.b_value(opts.b, b_tensor)
    w_hat, _ = common.weight_and_norm(weight, opts.normalize_weight)
    lin = conv_forward(x, w_hat, bias, opts)
    if _nhwc(x, opts):
        return _nhwc_forward(lin, x, weight, b_val, b_is_tensor, opts, channel_scale)
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
    if _nhwc(x, opts):
        # the scale passes on the (N*Ho*Wo, channels, 1) rows of the channels_last memory
        rows = (_rows(grad_out.contiguous(memory_format=CL)), _rows(lin_max), _norm_rows(norm))
        winner_rows = _rows(winner) if max_out > 1 else winner
        grad_lin, grad_norm, grad_b = common.scale_backward(
            *rows, winner_rows, (n * ho * wo, out_channels, 1), groups, b_tensor, opts, needs
        )
        grad_lin = grad_lin.view(n, ho, wo, out_channels * max_out).permute(0, 3, 1, 2)
        if grad_norm.numel():
            grad_norm = grad_norm.view(n, ho, wo, groups).permute(0, 3, 1, 2).contiguous()
    else:
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

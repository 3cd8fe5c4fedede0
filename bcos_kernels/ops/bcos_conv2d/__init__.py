"""Front door of the B-cos conv2d op (v1, v2 and B-cosification in one).

backend "torch" runs the reference (plain autograd). The fused backends run
the custom op ``bcos_kernels::bcos_conv2d_fused``: the convolution (ATen) and
one fused pass each way for everything else (patch norm, MaxOut, |cos|^(b-1),
scale), with a hand-written backward.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from bcos_kernels import backends
from bcos_kernels.ops import _bcos_common as common
from bcos_kernels.ops._checks import check_like, check_tensor, int_pair, positive_int
from bcos_kernels.ops.bcos_conv2d import reference as ref


def bcos_conv2d(x, weight, bias=None, *, b=2.0, stride=1, padding=0, dilation=1, groups=1, max_out=1,
                normalize_weight=True, scale=1.0, detach=False, channel_scale=None, backend=None):
    """B-cos convolution. x: (N, C, H, W); weight: (O*max_out, C/groups, kh, kw); bias: (O*max_out,) or None.

    Returns (N, O, Ho, Wo). ``b`` is a number >= 1 or a one-element tensor (learnable b, gets a gradient).
    ``detach=True`` is explanation mode: the dynamic scale is a constant for the gradient.
    ``channel_scale``: None or an (O,) tensor multiplying output channel o after everything else (an eval-mode
    uncentered batch norm folded into the epilogue, see ``bcos_kernels.fold_batchnorm``); it gets a gradient.
    """
    check_tensor("x", x, 4)
    check_tensor("weight", weight, 4)
    check_like("weight", weight, "x", x)
    if bias is not None:
        check_tensor("bias", bias, 1)
        check_like("bias", bias, "x", x)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias has {bias.shape[0]} elements but weight has {weight.shape[0]} filters")
    stride = int_pair("stride", stride)
    padding = int_pair("padding", padding, minimum=0)
    dilation = int_pair("dilation", dilation)
    positive_int("groups", groups)
    channels, filters = x.shape[1], weight.shape[0]
    if channels % groups or filters % groups:
        raise ValueError(f"groups={groups} must divide the input channels of x ({channels}) and the number of "
                         f"filters in weight ({filters})")
    if weight.shape[1] * groups != channels:
        raise ValueError(f"weight expects {weight.shape[1] * groups} input channels (weight.shape[1]={weight.shape[1]}"
                         f" x groups={groups}) but x has {channels}")
    common.check_max_out(max_out, filters, "filters in weight")
    if (filters // max_out) % groups:
        raise ValueError(f"groups={groups} must divide out_channels = weight.shape[0] / max_out = {filters // max_out}"
                         f" (each MaxOut unit must lie inside one group)")
    for i, name in enumerate(("height", "width")):
        span = dilation[i] * (weight.shape[2 + i] - 1) + 1
        if x.shape[2 + i] + 2 * padding[i] < span:
            raise ValueError(f"x {name} {x.shape[2 + i]} plus padding is smaller than the kernel span {span}")
    b_float, b_tensor = common.check_b(b, x)
    scale = common.check_scale(scale)
    if channel_scale is not None:
        check_tensor("channel_scale", channel_scale, 1)
        check_like("channel_scale", channel_scale, "x", x)
        if channel_scale.shape[0] != filters // max_out:
            raise ValueError(f"channel_scale has {channel_scale.shape[0]} elements but the output has "
                             f"{filters // max_out} channels (weight.shape[0] / max_out)")
        channel_scale = channel_scale.contiguous()
    name = backends.resolve("bcos_conv2d", backend, x.device, common.fused_backends(x))
    if name == "torch":
        return ref.bcos_conv2d(x, weight, bias, b=b, stride=stride, padding=padding, dilation=dilation, groups=groups,
                               max_out=max_out, normalize_weight=normalize_weight, scale=scale, detach=bool(detach),
                               channel_scale=channel_scale)
    out, _, _, _ = bcos_conv2d_fused(x, weight, bias, b_tensor, b_float, list(stride), list(padding), list(dilation),
                                     groups, max_out, bool(normalize_weight), scale, bool(detach), name,
                                     channel_scale)
    return out


def _output_size(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation) -> List[int]:
    return [(x.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1) // stride[i] + 1
            for i in range(2)]


@torch.library.custom_op("bcos_kernels::bcos_conv2d_fused", mutates_args=())
def bcos_conv2d_fused(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      b_tensor: Optional[torch.Tensor], b: float, stride: List[int], padding: List[int],
                      dilation: List[int], groups: int, max_out: int, normalize_weight: bool, scale: float,
                      detach: bool, backend: str, channel_scale: Optional[torch.Tensor] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out, lin after MaxOut, patch norms (N, G, Ho, Wo), MaxOut winner index uint8); the last three
    are what the backward needs, are not differentiable and do not include ``channel_scale``."""
    if backend == "triton":
        from bcos_kernels.ops.bcos_conv2d import triton as kernels
        geo = kernels.conv_geometry(x, weight, stride, padding, dilation, groups, max_out)
        return kernels.forward(x, weight, bias, b_tensor, b, geo, normalize_weight, scale, kernels.NORM_CONV,
                               common.output_memory_format(x, backend), channel_scale=channel_scale)
    if backend not in ("cpu", "cuda"):
        raise ValueError(f"bcos_conv2d_fused: unknown backend {backend!r}")
    # "cpu" and "cuda": the ATen convolution (oneDNN / cuDNN) and the extension's fused passes for the rest.
    b_val, b_is_tensor = common.b_value(b, b_tensor)
    w_hat, _ = common.weight_and_norm(weight, normalize_weight)
    lin = F.conv2d(x, w_hat, bias, stride, padding, dilation, groups)
    n, filters, ho, wo = lin.shape
    lin = lin.reshape(n, filters, ho * wo).contiguous()
    if backend == "cuda":
        # one CUDA pass computes the patch norms and the scale together
        out, lin_max, winner, norm = torch.ops.bcos_kernels.bcos_conv_scale_forward(
            lin, x, list(weight.shape[2:]), stride, padding, dilation, groups, b_val, b_is_tensor, max_out, scale,
            channel_scale)
    else:
        if b_val == 1 and not b_is_tensor:
            norm = x.new_empty(0)
        else:
            norm = torch.ops.bcos_kernels.patch_norm(x, list(weight.shape[2:]), stride, padding, dilation, groups)
        out, lin_max, winner = torch.ops.bcos_kernels.bcos_scale_forward(
            lin, norm.reshape(n, groups, ho * wo) if norm.numel() else norm, b_val, b_is_tensor, max_out, scale,
            channel_scale)
    if max_out == 1:
        lin_max = lin  # the kernel does not copy lin when there is no MaxOut
    shape = (n, filters // max_out, ho, wo)
    # Outputs are NCHW-contiguous whatever the layout of x (see common.output_memory_format).
    # _unsafe_view: the outputs are not views for autograd (their bases are temporaries of this op), so that a
    # caller may modify them in place, e.g. ResNet's `out += identity` after a folded norm that returns its input.
    reshape = torch.ops.aten._unsafe_view
    return reshape(out, shape), reshape(lin_max, shape), norm, reshape(winner, shape) if max_out > 1 else winner


@bcos_conv2d_fused.register_fake
def _(x, weight, bias, b_tensor, b, stride, padding, dilation, groups, max_out, normalize_weight, scale, detach,
      backend, channel_scale=None):
    ho, wo = _output_size(x, weight, stride, padding, dilation)
    shape = (x.shape[0], weight.shape[0] // max_out, ho, wo)
    out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=common.output_memory_format(x, backend))
    has_norm = b_tensor is not None or b != 1
    norm = x.new_empty((x.shape[0], groups, ho, wo) if has_norm else (0,))
    winner = torch.empty_like(out, dtype=torch.uint8) if max_out > 1 else x.new_empty(0, dtype=torch.uint8)
    return out, torch.empty_like(out), norm, winner


@torch.library.custom_op("bcos_kernels::bcos_conv2d_fused_backward", mutates_args=())
def bcos_conv2d_fused_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                               b_tensor: Optional[torch.Tensor], lin_max: torch.Tensor, norm: torch.Tensor,
                               winner: torch.Tensor, b: float, stride: List[int], padding: List[int],
                               dilation: List[int], groups: int, max_out: int, normalize_weight: bool, scale: float,
                               detach: bool, backend: str, needs: List[bool]
                               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for (x, weight, bias, b_tensor); an empty tensor where ``needs`` is False. A custom op of its
    own so that compiled graphs never look at the value of a tensor b."""
    need_x, need_w, need_bias, need_b = needs
    if backend == "triton":
        from bcos_kernels.ops.bcos_conv2d import triton as kernels
        geo = kernels.conv_geometry(x, weight, stride, padding, dilation, groups, max_out)
        grads = kernels.backward(grad_out, x, weight, b_tensor, lin_max, norm, winner, b, geo, normalize_weight,
                                 scale, detach, needs, kernels.NORM_CONV)
        grad_x = grads[0].contiguous(memory_format=common.memory_format_of(x)) if need_x else None
        grad_w = grads[1].contiguous(memory_format=common.memory_format_of(weight)) if need_w else None
        return common.or_empty((grad_x, grad_w, grads[2], common.grad_for_b(grads[3], b_tensor) if need_b else None),
                               x)
    b_val, b_is_tensor = common.b_value(b, b_tensor)
    n, out_channels, ho, wo = lin_max.shape
    grad_lin, grad_norm, grad_b = torch.ops.bcos_kernels.bcos_scale_backward(
        grad_out.reshape(n, out_channels, ho * wo).contiguous(), lin_max.reshape(n, out_channels, ho * wo),
        norm.reshape(n, groups, ho * wo) if norm.numel() else norm,
        winner.view(n, out_channels, ho * wo) if max_out > 1 else winner, b_val, b_is_tensor, max_out, scale,
        detach, need_x, need_b)
    grad_lin = grad_lin.view(n, out_channels * max_out, ho, wo)
    w_hat, w_norm = common.weight_and_norm(weight, normalize_weight)
    grad_x, grad_w_hat, grad_bias = torch.ops.aten.convolution_backward(
        grad_lin, x, w_hat, [weight.shape[0]], stride, padding, dilation, False, [0, 0], groups,
        [need_x, need_w, need_bias])
    if need_x and grad_norm.numel():
        grad_x = grad_x + torch.ops.bcos_kernels.patch_norm_backward(
            grad_norm.view(n, groups, ho, wo), x, norm, list(weight.shape[2:]), stride, padding, dilation, groups)
    # The layouts the fake promises (copies only where convolution_backward chose another: it follows x's).
    if need_x:
        grad_x = grad_x.contiguous(memory_format=common.memory_format_of(x))
    grad_w = None
    if need_w:
        grad_w = common.weight_norm_backward(grad_w_hat, w_hat, w_norm) if normalize_weight else grad_w_hat
        grad_w = grad_w.contiguous(memory_format=common.memory_format_of(weight))
    grad_b = common.grad_for_b(grad_b, b_tensor) if need_b else None
    return common.or_empty((grad_x, grad_w, grad_bias, grad_b), x)


@bcos_conv2d_fused_backward.register_fake
def _(grad_out, x, weight, b_tensor, lin_max, norm, winner, b, stride, padding, dilation, groups, max_out,
      normalize_weight, scale, detach, backend, needs):
    return common.fake_grads(needs, x, weight, b_tensor, common.memory_format_of(x))


def _unscaled_output(lin_max, norm, b_tensor, b, scale):
    """The output before channel_scale, recomputed from what the forward saved (only for the gradient of
    channel_scale, i.e. when a folded norm's weight is trained in eval mode)."""
    b_val = b_tensor.reshape(()) if b_tensor is not None else b
    if not norm.numel():  # b == 1
        return lin_max / scale
    norm = norm.repeat_interleave(lin_max.shape[1] // norm.shape[1], dim=1)
    return ref.dynamic_scale(lin_max, norm, b_val, detach=True) * lin_max / scale


def _setup_context(ctx, inputs, output):
    *inputs, channel_scale = inputs
    common.setup_fused_context(ctx, inputs, output, extra=(channel_scale,))


def _backward(ctx, grad_out, _grad_lin_max, _grad_norm, _grad_winner):
    *saved, channel_scale = ctx.saved_tensors
    grad_channel_scale = None
    if channel_scale is not None:
        if ctx.needs_input_grad[-1]:
            _, _, b_tensor, lin_max, norm, _ = saved
            b, scale = ctx.options[0], ctx.options[7]
            unscaled = _unscaled_output(lin_max, norm, b_tensor, b, scale)
            grad_channel_scale = (grad_out * unscaled).sum((0, 2, 3)).to(channel_scale.dtype)
        grad_out = grad_out * channel_scale.view(1, -1, 1, 1)
    return common.fused_input_grads(ctx, bcos_conv2d_fused_backward, grad_out, saved) + (grad_channel_scale,)


bcos_conv2d_fused.register_autograd(_backward, setup_context=_setup_context)

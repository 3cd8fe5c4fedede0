"""Front door of the B-cos conv2d op (v1, v2 and B-cosification in one).

backend "reference" runs reference.py (plain autograd). The fused backends
("cpu", "cuda", "triton": one file each here, chosen by bcos_kernels.backends)
run the custom op ``bcos_kernels::bcos_conv2d_fused`` with a hand-written
backward op; tensors are positional, options keyword-only.
"""

from typing import List, NamedTuple

import torch

from bcos_kernels import backends
from bcos_kernels.ops import _autocast, _eager
from bcos_kernels.ops import _bcos_common as common
from bcos_kernels.ops._checks import check_like, check_tensor, int_pair, positive_int
from bcos_kernels.ops._layout import conv_output_size
from bcos_kernels.ops._options import custom_op
from bcos_kernels.ops.bcos_conv2d import reference as ref


def bcos_conv2d(
    x,
    weight,
    bias=None,
    *,
    b=2.0,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    max_out=1,
    normalize_weight=True,
    scale=1.0,
    detach=False,
    channel_scale=None,
    backend=None,
):
    """B-cos convolution. x: (N, C, H, W); weight: (O*max_out, C/groups, kh, kw); bias: (O*max_out,) or None.

    Returns (N, O, Ho, Wo). ``b`` is a number >= 1 or a one-element tensor (learnable b, gets a gradient).
    ``detach=True`` is explanation mode: the dynamic scale is a constant for the gradient.
    ``channel_scale``: None or an (O,) tensor multiplying output channel o after everything else (an eval-mode
    uncentered batch norm folded into the epilogue, see ``bcos_kernels.fold_batchnorm``); it gets a gradient.
    Under autocast x, weight, bias and channel_scale are cast to its dtype, as a conv2d's inputs.
    """
    x, weight, bias, channel_scale = _autocast.lower_precision(x, weight, bias, channel_scale)
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
        raise ValueError(
            f"groups={groups} must divide the input channels of x ({channels}) and the number of "
            f"filters in weight ({filters})"
        )
    if weight.shape[1] * groups != channels:
        raise ValueError(
            f"weight expects {weight.shape[1] * groups} input channels (weight.shape[1]={weight.shape[1]}"
            f" x groups={groups}) but x has {channels}"
        )
    common.check_max_out(max_out, filters, "filters in weight")
    if (filters // max_out) % groups:
        raise ValueError(
            f"groups={groups} must divide out_channels = weight.shape[0] / max_out = {filters // max_out}"
            f" (each MaxOut unit must lie inside one group)"
        )
    for i, name in enumerate(("height", "width")):
        span = dilation[i] * (weight.shape[2 + i] - 1) + 1
        if x.shape[2 + i] + 2 * padding[i] < span:
            raise ValueError(f"x {name} {x.shape[2 + i]} plus padding is smaller than the kernel span {span}")
    b_tensor, opts = common.check_options(x, b, max_out, normalize_weight, scale, detach)
    opts.update(stride=list(stride), padding=list(padding), dilation=list(dilation), groups=groups)
    if channel_scale is not None:
        check_tensor("channel_scale", channel_scale, 1)
        check_like("channel_scale", channel_scale, "x", x)
        if channel_scale.shape[0] != filters // max_out:
            raise ValueError(
                f"channel_scale has {channel_scale.shape[0]} elements but the output has "
                f"{filters // max_out} channels (weight.shape[0] / max_out)"
            )
        channel_scale = channel_scale.contiguous()
    name = backends.resolve("bcos_conv2d", backend, x)
    if x.numel() == 0:  # the fused kernels read an empty norm as b == 1; the reference's ATen ops give the empty result
        name = "reference"
    if name == "reference":
        with _autocast.off(x):
            return ref.bcos_conv2d(x, weight, bias, **dict(opts, b=b), channel_scale=channel_scale)
    out, _, _, _ = _eager.call(bcos_conv2d_fused, x, weight, bias, b_tensor, channel_scale, **opts, backend=name)
    return out


# The options of the fused conv ops (keyword-only in their schemas; the backends get them as one object).
ConvOptions = NamedTuple(
    "ConvOptions",
    [("stride", List[int]), ("padding", List[int]), ("dilation", List[int]), ("groups", int)] + common.BCOS_OPTIONS,
)


@custom_op(
    "bcos_kernels::bcos_conv2d_fused",
    "Tensor x, Tensor weight, Tensor? bias, Tensor? b_tensor, Tensor? channel_scale",
    ConvOptions,
    common.FUSED_OUTPUTS,
)
def bcos_conv2d_fused(x, weight, bias, b_tensor, channel_scale, **options):
    """Returns (out, lin after MaxOut, patch norms (N, G, Ho, Wo), MaxOut winner index uint8); the last three
    are what the backward needs, are not differentiable and do not include ``channel_scale``."""
    opts = ConvOptions(**options)
    kernels = backends.checked_kernels("bcos_conv2d", opts.backend, x.device)
    return kernels.forward(x, weight, bias, b_tensor, channel_scale, opts)


@bcos_conv2d_fused.register_fake
def _(x, weight, bias, b_tensor, channel_scale, **options):
    opts = ConvOptions(**options)
    ho, wo = conv_output_size(x.shape[2:], weight.shape[2:], opts.stride, opts.padding, opts.dilation)
    shape = (x.shape[0], weight.shape[0] // opts.max_out, ho, wo)
    out = torch.empty(
        shape, dtype=x.dtype, device=x.device, memory_format=common.output_memory_format(x, "bcos_conv2d", opts.backend)
    )
    has_norm = b_tensor is not None or opts.b != 1
    norm = x.new_empty((x.shape[0], opts.groups, ho, wo) if has_norm else (0,))
    winner = torch.empty_like(out, dtype=torch.uint8) if opts.max_out > 1 else x.new_empty(0, dtype=torch.uint8)
    return out, torch.empty_like(out), norm, winner


bcos_conv2d_fused_backward = common.fused_backward_op("bcos_conv2d", ConvOptions, grad_x_in_layout_of_x=True)


def _unscaled_output(lin_max, norm, b_tensor, b, scale):
    """The output before channel_scale, recomputed from what the forward saved (only for the gradient of
    channel_scale, i.e. when a folded norm's weight is trained in eval mode)."""
    b_val = b_tensor.reshape(()) if b_tensor is not None else b
    if not norm.numel():  # b == 1
        return lin_max / scale
    norm = norm.repeat_interleave(lin_max.shape[1] // norm.shape[1], dim=1)
    return ref.dynamic_scale(lin_max, norm, b_val, detach=True) * lin_max / scale


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    *inputs, channel_scale = inputs
    common.setup_fused_context(ctx, inputs, keyword_only_inputs, output, extra=(channel_scale,))


def _backward(ctx, grad_out, _grad_lin_max, _grad_norm, _grad_winner):
    *saved, channel_scale = ctx.saved_tensors
    grad_channel_scale = None
    if channel_scale is not None:
        if ctx.needs_input_grad[4]:
            _, _, b_tensor, lin_max, norm, _ = saved
            unscaled = _unscaled_output(lin_max, norm, b_tensor, ctx.options["b"], ctx.options["scale"])
            grad_channel_scale = (grad_out * unscaled).sum((0, 2, 3)).to(channel_scale.dtype)
        grad_out = grad_out * channel_scale.view(1, -1, 1, 1)
    return common.fused_input_grads(ctx, bcos_conv2d_fused_backward, grad_out, saved) + (grad_channel_scale,)


_eager.register_autograd(bcos_conv2d_fused, _backward, _setup_context)

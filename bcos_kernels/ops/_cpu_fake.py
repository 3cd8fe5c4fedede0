"""Fake (meta) implementations of the C++ ops registered by ``bcos_kernels._C``.

The C++ library defines the schemas; these functions tell FakeTensor /
torch.compile the shapes, dtypes and strides of the outputs.  They mirror the
CPU kernels exactly (csrc/cpu/bcos_cpu.cpp), including the layout rules:

- patch_norm: (N, G, Ho, Wo), contiguous.
- patch_norm_backward: the shape of x; channels_last when x is
  channels_last-contiguous but not NCHW-contiguous, else NCHW-contiguous.
- patch_norm_backward_add_: adds into its grad_x argument; returns nothing.
- weight_normalize: w_hat like weight (its layout kept where each filter is
  one block: NCHW or channels_last), norm (O, 1, ...) contiguous;
  weight_normalize_backward: grad like w_hat.
- bcos_scale_forward: out (N, O, P); with max_out > 1 lin_max (N, O, P) and
  winner uint8 (N, O, P); with max_out == 1 both are empty (0,) tensors (an op
  output may not alias its input, so lin_max is not ``lin``: use lin).  The
  optional ``channel_scale`` (O,) changes no output's shape; its checks are
  repeated here so that traced calls fail as the kernels would.
- bcos_scale_backward: grad_lin (N, O * max_out, P); grad_norm (N, G, P) or
  empty (0,); grad_b 0-dim float32 (float64 for float64 input) or empty (0,).

The LWTA sampling ops that keep the probabilities (CPU only) get theirs at the end too:
lwta_sample_forward (out and probs like x, contiguous) and lwta_sample_backward.

The ops with only a CUDA kernel (csrc/cuda_schemas.cpp) get fakes too, at the
end of this file: bcos_conv_scale_forward, dau_combine_forward/backward,
lwta_block_forward/backward, lwta_uniform, csg_gate_forward/backward.

Importing this module loads the extension (ImportError when it is not built)
and registers the fakes once.
"""

from __future__ import annotations

import torch

from bcos_kernels import _C  # noqa: F401  (defines torch.ops.bcos_kernels.*)
from bcos_kernels.ops._layout import block_shape, conv_output_size, memory_format_of


def _scale_mode(b: float, b_is_tensor: bool) -> str:
    """The forward mode of the dynamic scale, as in csrc/common/bcos_math.h."""
    if not b_is_tensor and b == 1.0:
        return "one"
    if not b_is_tensor and b == 2.0:
        return "two"
    return "general"


@torch.library.register_fake("bcos_kernels::patch_norm")
def _patch_norm_fake(x, kernel_size, stride, padding, dilation, groups):
    torch._check(x.dim() == 4, lambda: f"x must have 4 dimensions (N, C, H, W), got shape {tuple(x.shape)}")
    torch._check(
        groups >= 1 and x.shape[1] % groups == 0,
        lambda: f"x has {x.shape[1]} channels, which is not divisible by groups={groups}",
    )
    ho, wo = conv_output_size(x.shape[2:], kernel_size, stride, padding, dilation)
    torch._check(ho >= 1 and wo >= 1, lambda: "the (dilated) kernel is larger than the padded input of x")
    return x.new_empty((x.shape[0], groups, ho, wo))


@torch.library.register_fake("bcos_kernels::patch_norm_backward")
def _patch_norm_backward_fake(grad_norm, x, norm, kernel_size, stride, padding, dilation, groups):
    torch._check(x.dim() == 4, lambda: f"x must have 4 dimensions (N, C, H, W), got shape {tuple(x.shape)}")
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))


@torch.library.register_fake("bcos_kernels::patch_norm_backward_add_")
def _patch_norm_backward_add_fake(grad_x, grad_norm, x, norm, kernel_size, stride, padding, dilation, groups):
    return None


def _filter_block_format(w):
    """The layout the weight kernels keep: channels_last where w is that and not NCHW-contiguous, else NCHW."""
    return memory_format_of(w) if w.dim() == 4 else torch.contiguous_format


@torch.library.register_fake("bcos_kernels::weight_normalize")
def _weight_normalize_fake(weight):
    w_hat = torch.empty(
        weight.shape, dtype=weight.dtype, device=weight.device, memory_format=_filter_block_format(weight)
    )
    return w_hat, weight.new_empty((weight.shape[0],) + (1,) * (weight.dim() - 1))


@torch.library.register_fake("bcos_kernels::weight_normalize_backward")
def _weight_normalize_backward_fake(grad_w_hat, w_hat, norm):
    return torch.empty(w_hat.shape, dtype=w_hat.dtype, device=w_hat.device, memory_format=_filter_block_format(w_hat))


def _check_channel_scale(channel_scale, lin, out_channels):
    """The checks of check_channel_scale in csrc/cpu/bcos_cpu.cpp and csrc/cuda/ops_cuda.cpp."""
    if channel_scale is None:
        return
    torch._check(
        channel_scale.device == lin.device,
        lambda: f"channel_scale must be on the device of lin ({lin.device}), got {channel_scale.device}",
    )
    torch._check(
        channel_scale.dim() == 1,
        lambda: f"channel_scale must have 1 dimension (out_channels,), got shape {tuple(channel_scale.shape)}",
    )
    torch._check(
        channel_scale.shape[0] == out_channels,
        lambda: (
            f"channel_scale must have {out_channels} elements (lin's channels / max_out, the output "
            f"channels), got {channel_scale.shape[0]}"
        ),
    )
    torch._check(
        channel_scale.dtype == lin.dtype,
        lambda: f"channel_scale has dtype {channel_scale.dtype} but lin has dtype {lin.dtype}",
    )


@torch.library.register_fake("bcos_kernels::bcos_scale_forward")
def _bcos_scale_forward_fake(lin, norm, b, b_is_tensor, max_out, scale, channel_scale=None):
    torch._check(lin.dim() == 3, lambda: f"lin must have 3 dimensions, got shape {tuple(lin.shape)}")
    torch._check(1 <= max_out <= 255, lambda: f"max_out must be in [1, 255], got {max_out}")
    n, channels, p = lin.shape
    torch._check(
        channels % max_out == 0, lambda: f"lin has {channels} channels, which is not divisible by max_out={max_out}"
    )
    shape = (n, channels // max_out, p)
    _check_channel_scale(channel_scale, lin, shape[1])
    out = lin.new_empty(shape)
    if max_out > 1:
        return out, lin.new_empty(shape), lin.new_empty(shape, dtype=torch.uint8)
    return out, lin.new_empty((0,)), lin.new_empty((0,), dtype=torch.uint8)


@torch.library.register_fake("bcos_kernels::bcos_scale_backward")
def _bcos_scale_backward_fake(
    grad_out, lin_max, norm, winner, b, b_is_tensor, max_out, scale, detach, need_grad_norm, need_grad_b
):
    torch._check(lin_max.dim() == 3, lambda: f"lin_max must have 3 dimensions, got shape {tuple(lin_max.shape)}")
    mode = _scale_mode(b, b_is_tensor)
    n, o, p = lin_max.shape
    grad_lin = grad_out.new_empty((n, o * max_out, p))
    if need_grad_norm and not detach and mode != "one":
        grad_norm = grad_out.new_empty((n, norm.shape[1], p))
    else:
        grad_norm = grad_out.new_empty((0,))
    b_dtype = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    if need_grad_b and mode == "general":
        grad_b = grad_out.new_empty((), dtype=b_dtype)
    else:
        grad_b = grad_out.new_empty((0,), dtype=b_dtype)
    return grad_lin, grad_norm, grad_b


# ---------------------------------------------------------------------------
# Ops with only a CUDA kernel (schemas in csrc/cuda_schemas.cpp, kernels in
# csrc/cuda/).  Their fakes are registered where the op exists (an extension
# built before these schemas were added lacks them), so that torch.compile can
# trace calls to them on any machine.
# ---------------------------------------------------------------------------
def _has_op(name: str) -> bool:
    return hasattr(torch.ops.bcos_kernels, name)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the CUDA kernels: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


if _has_op("bcos_conv_scale_forward"):

    @torch.library.register_fake("bcos_kernels::bcos_conv_scale_forward")
    def _bcos_conv_scale_forward_fake(
        lin, x, kernel_size, stride, padding, dilation, groups, b, b_is_tensor, max_out, scale, channel_scale=None
    ):
        """bcos_scale_forward's outputs plus the norms (N, G, Ho, Wo) contiguous; (0,) in mode one (b == 1)."""
        out, lin_max, winner = _bcos_scale_forward_fake(lin, None, b, b_is_tensor, max_out, scale, channel_scale)
        if _scale_mode(b, b_is_tensor) == "one":
            return out, lin_max, winner, x.new_empty((0,))
        return out, lin_max, winner, _patch_norm_fake(x, kernel_size, stride, padding, dilation, groups)


if _has_op("dau_combine_forward"):

    @torch.library.register_fake("bcos_kernels::dau_combine_forward")
    def _dau_combine_forward_fake(y, z, gram, norm):
        """out (P, O) in y's dtype and s = ||w|| (P, O) in the accumulation dtype, both contiguous."""
        torch._check(z.dim() == 2 and gram.dim() == 3, lambda: "z must be (P, r) and gram (O, R, R)")
        shape = (z.shape[0], gram.shape[0])
        return y.new_empty(shape), y.new_empty(shape, dtype=_acc_dtype(y.dtype))

    @torch.library.register_fake("bcos_kernels::dau_combine_backward")
    def _dau_combine_backward_fake(grad_out, y, z, s, gram, norm, detach, need_dz, need_dy, need_m):
        """dz (P, r) and dy (P, O * R) in y's dtype, m (O, R, R) in the accumulation dtype; (0,) when not needed."""
        npix, rank = z.shape
        o, big_r = gram.shape[0], gram.shape[1]
        dz = y.new_empty((npix, rank) if need_dz else (0,))
        dy = y.new_empty((npix, o * big_r) if need_dy else (0,))
        m = y.new_empty((o, big_r, big_r) if need_m else (0,), dtype=_acc_dtype(y.dtype))
        return dz, dy, m


if _has_op("lwta_block_forward"):

    @torch.library.register_fake("bcos_kernels::lwta_block_forward")
    def _lwta_block_forward_fake(x, competitors, temperature, deterministic, noise, seed, offset):
        """out: x's shape and dtype, contiguous; winner: uint8 with the competition dim divided by competitors."""
        torch._check(2 <= x.dim() <= 4, lambda: f"x must have 2, 3 or 4 dimensions, got shape {tuple(x.shape)}")
        return x.new_empty(x.shape), x.new_empty(block_shape(x, competitors), dtype=torch.uint8)

    @torch.library.register_fake("bcos_kernels::lwta_block_backward")
    def _lwta_block_backward_fake(grad_out, x, winner, competitors, temperature, deterministic, noise, seed, offset):
        return x.new_empty(x.shape)

    @torch.library.register_fake("bcos_kernels::lwta_sample_forward")
    def _lwta_sample_forward_fake(x, competitors, temperature, noise, seed, offset):
        """out and probs: x's shape and dtype, contiguous."""
        torch._check(2 <= x.dim() <= 4, lambda: f"x must have 2, 3 or 4 dimensions, got shape {tuple(x.shape)}")
        return x.new_empty(x.shape), x.new_empty(x.shape)

    @torch.library.register_fake("bcos_kernels::lwta_sample_backward")
    def _lwta_sample_backward_fake(grad_out, x, probs, competitors, temperature):
        return x.new_empty(x.shape)

    @torch.library.register_fake("bcos_kernels::lwta_uniform")
    def _lwta_uniform_fake(x, seed, offset):
        return x.new_empty(x.shape, dtype=torch.float32)


if _has_op("csg_gate_forward"):

    @torch.library.register_fake("bcos_kernels::csg_gate_forward")
    def _csg_gate_forward_fake(x, mask, labels):
        """x's shape and dtype; channels_last when x is (and is not NCHW-contiguous), else contiguous."""
        return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))

    @torch.library.register_fake("bcos_kernels::csg_gate_backward")
    def _csg_gate_backward_fake(grad_out, x, mask, labels, num_classes, need_x, need_mask):
        """grad_x in grad_out's layout rule (as csg_gate_forward), grad_mask (C, num_classes); (0,) when not needed."""
        if need_x:
            grad_x = torch.empty(
                grad_out.shape, dtype=grad_out.dtype, device=grad_out.device, memory_format=memory_format_of(grad_out)
            )
        else:
            grad_x = grad_out.new_empty((0,))
        grad_mask = grad_out.new_empty((grad_out.shape[1], num_classes) if need_mask else (0,))
        return grad_x, grad_mask

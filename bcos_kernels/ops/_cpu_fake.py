"""Fake (meta) implementations of the C++ ops registered by ``bcos_kernels._C``.

The C++ library defines the schemas; these functions tell FakeTensor /
torch.compile the shapes, dtypes and strides of the outputs.  They mirror the
CPU kernels exactly (csrc/cpu/bcos_cpu.cpp), including the layout rules:

- patch_norm: (N, G, Ho, Wo), contiguous.
- patch_norm_backward: the shape of x; channels_last when x is
  channels_last-contiguous but not NCHW-contiguous, else NCHW-contiguous.
- bcos_scale_forward: out (N, O, P); with max_out > 1 lin_max (N, O, P) and
  winner uint8 (N, O, P); with max_out == 1 both are empty (0,) tensors (an op
  output may not alias its input, so lin_max is not ``lin``: use lin).
- bcos_scale_backward: grad_lin (N, O * max_out, P); grad_norm (N, G, P) or
  empty (0,); grad_b 0-dim float32 (float64 for float64 input) or empty (0,).

Importing this module loads the extension (ImportError when it is not built)
and registers the fakes once.
"""
from __future__ import annotations

import torch

from bcos_kernels import _C  # noqa: F401  (defines torch.ops.bcos_kernels.*)


def _scale_mode(b: float, b_is_tensor: bool) -> str:
    """The forward mode of the dynamic scale, as in csrc/common/bcos_math.h."""
    if not b_is_tensor and b == 1.0:
        return "one"
    if not b_is_tensor and b == 2.0:
        return "two"
    return "general"


def _out_size(size, k, s, p, d):
    span = size + 2 * p - d * (k - 1) - 1
    torch._check(span >= 0, lambda: "the (dilated) kernel is larger than the padded input of x")
    return span // s + 1


@torch.library.register_fake("bcos_kernels::patch_norm")
def _patch_norm_fake(x, kernel_size, stride, padding, dilation, groups):
    torch._check(x.dim() == 4, lambda: f"x must have 4 dimensions (N, C, H, W), got shape {tuple(x.shape)}")
    torch._check(groups >= 1 and x.shape[1] % groups == 0,
                 lambda: f"x has {x.shape[1]} channels, which is not divisible by groups={groups}")
    n, _, h, w = x.shape
    ho = _out_size(h, kernel_size[0], stride[0], padding[0], dilation[0])
    wo = _out_size(w, kernel_size[1], stride[1], padding[1], dilation[1])
    return x.new_empty((n, groups, ho, wo))


@torch.library.register_fake("bcos_kernels::patch_norm_backward")
def _patch_norm_backward_fake(grad_norm, x, norm, kernel_size, stride, padding, dilation, groups):
    torch._check(x.dim() == 4, lambda: f"x must have 4 dimensions (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        fmt = torch.channels_last
    else:
        fmt = torch.contiguous_format
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)


@torch.library.register_fake("bcos_kernels::bcos_scale_forward")
def _bcos_scale_forward_fake(lin, norm, b, b_is_tensor, max_out, scale):
    torch._check(lin.dim() == 3, lambda: f"lin must have 3 dimensions, got shape {tuple(lin.shape)}")
    torch._check(1 <= max_out <= 255, lambda: f"max_out must be in [1, 255], got {max_out}")
    n, channels, p = lin.shape
    torch._check(channels % max_out == 0,
                 lambda: f"lin has {channels} channels, which is not divisible by max_out={max_out}")
    shape = (n, channels // max_out, p)
    out = lin.new_empty(shape)
    if max_out > 1:
        return out, lin.new_empty(shape), lin.new_empty(shape, dtype=torch.uint8)
    return out, lin.new_empty((0,)), lin.new_empty((0,), dtype=torch.uint8)


@torch.library.register_fake("bcos_kernels::bcos_scale_backward")
def _bcos_scale_backward_fake(grad_out, lin_max, norm, winner, b, b_is_tensor, max_out, scale, detach,
                              need_grad_norm, need_grad_b):
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

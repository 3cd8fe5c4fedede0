"""Backend "cuda" of the B-cos conv2d: the path of backend "cpu" (cpu.py) with cuDNN, whose forward computes
the patch norms inside the scale pass (one CUDA kernel, csrc/cuda/bcos_cuda.cu); the backward is cpu.py's, on
the extension's CUDA kernels."""

import torch

from bcos_kernels.ops.bcos_conv2d import cpu
from bcos_kernels.ops.bcos_conv2d.cpu import backward  # noqa: F401  (the same ops, CUDA kernels)


def _scaled_forward(lin, x, weight, b_val, b_is_tensor, opts, channel_scale):
    geometry = (list(weight.shape[2:]), opts.stride, opts.padding, opts.dilation, opts.groups)
    scalars = (b_val, b_is_tensor, opts.max_out, opts.scale)
    out, lin_max, winner, norm = torch.ops.bcos_kernels.bcos_conv_scale_forward(
        lin, x, *geometry, *scalars, channel_scale
    )
    return out, lin_max, winner, norm


def forward(x, weight, bias, b_tensor, channel_scale, opts):
    return cpu.aten_forward(x, weight, bias, b_tensor, channel_scale, _scaled_forward, opts)

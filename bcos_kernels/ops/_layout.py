"""Layout and size facts every op shares: when an x is read as channels_last, per-block and conv output sizes."""

from __future__ import annotations

from typing import List, Sequence

import torch


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether a kernel reads x as channels_last: a 4-D x that is channels_last- but not NCHW-contiguous (an x
    that is both, e.g. with C == 1 or H == W == 1, counts as NCHW)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """x's layout as the kernels see it (:func:`is_channels_last`). Gradients take the layout of their input."""
    return memory_format(is_channels_last(x))


def block_shape(x: torch.Tensor, block: int) -> List[int]:
    """x's shape with its channel dim (1 of a 4-D x, else the last) divided by ``block``: one entry per block of
    ``block`` consecutive channels (LWTA's winner index)."""
    shape = list(x.shape)
    shape[1 if x.dim() == 4 else x.dim() - 1] //= block
    return shape


def conv_output_size(
    size: Sequence[int],
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int] = (1, 1),
) -> List[int]:
    """The spatial output size of a 2-D convolution (as torch.nn.functional.conv2d computes it)."""
    return [(size[i] + 2 * padding[i] - dilation[i] * (kernel_size[i] - 1) - 1) // stride[i] + 1 for i in range(2)]

"""Backend "triton" of the class-specific gate: out[n, c, s] = x[n, c, s] * mask[c, labels[n]].

x is read as [N, C, S] (S = H * W, or 1 for a 2-D x), either channels-outer
(NCHW contiguous, 2-D) or channels-inner (channels_last, read in place). A
program owns a [BLOCK_C, BLOCK_S] tile of one sample; the gate is gathered
once per tile (BLOCK_C values of mask[:, labels[n]]) and never materialised.

Backward, deterministic whatever the device (no atomics):

1. one pass over (grad_out, x): grad_x = g * mask[c, labels[n]] and the
   per-sample partial sums P[n, c] = sum_s g * x (fp32), each reduced in a
   fixed order inside one program;
2. a segmented sum by label: the samples are sorted by label (a stable sort,
   so the order inside each class is the batch order) and the program of
   class k adds the rows of P of its segment one after the other:
   d mask[c, k] = sum over samples n with labels[n] == k of P[n, c]. Classes
   without samples get 0.

fp32/fp16/bf16 (fp32 only under the Triton interpreter); a channels_last x is
read in place.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from bcos_kernels import backends
from bcos_kernels.ops._layout import is_channels_last, memory_format

TILE_ELEMENTS = 2048
TILE_ELEMENTS_INTERPRETED = 8192
MAX_BLOCK_C = 256
SEGMENT_BLOCK_C = 256


@triton.jit
def _offsets(n, c, s, C, S, CHANNELS_INNER: tl.constexpr):
    """int64 offsets of the [BLOCK_C, BLOCK_S] tile (c as a column, s as a row) of sample n."""
    base = n.to(tl.int64) * C * S
    c = c.to(tl.int64)[:, None]
    s = s.to(tl.int64)[None, :]
    if CHANNELS_INNER:
        return base + s * C + c
    else:
        return base + c * S + s


@triton.jit
def _gate(mask_ptr, labels_ptr, n, c, C, stride_mask_c, stride_mask_k):
    """mask[c, labels[n]] for the channels c of the tile, fp32, as a column."""
    label = tl.load(labels_ptr + n)
    gate = tl.load(mask_ptr + c.to(tl.int64) * stride_mask_c + label * stride_mask_k, mask=c < C, other=0.0)
    return gate.to(tl.float32)[:, None]


@triton.jit
def _gate_forward_kernel(x_ptr, mask_ptr, labels_ptr, out_ptr, C, S, stride_mask_c, stride_mask_k,
                         BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, CHANNELS_INNER: tl.constexpr):
    pid = tl.program_id(0)
    tiles_c = tl.cdiv(C, BLOCK_C)
    tiles_s = tl.cdiv(S, BLOCK_S)
    n = pid // (tiles_c * tiles_s)
    tile = pid % (tiles_c * tiles_s)
    c = (tile // tiles_s) * BLOCK_C + tl.arange(0, BLOCK_C)
    s = (tile % tiles_s) * BLOCK_S + tl.arange(0, BLOCK_S)
    valid = (c < C)[:, None] & (s < S)[None, :]
    offset = _offsets(n, c, s, C, S, CHANNELS_INNER)
    x = tl.load(x_ptr + offset, mask=valid, other=0.0)
    gate = _gate(mask_ptr, labels_ptr, n, c, C, stride_mask_c, stride_mask_k)
    tl.store(out_ptr + offset, (x.to(tl.float32) * gate).to(x.dtype), mask=valid)


@triton.jit
def _gate_backward_kernel(grad_ptr, x_ptr, mask_ptr, labels_ptr, grad_x_ptr, partial_ptr, C, S, stride_mask_c,
                          stride_mask_k, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                          CHANNELS_INNER: tl.constexpr, NEED_X: tl.constexpr, NEED_MASK: tl.constexpr):
    """grad_x = g * gate (if NEED_X) and P[n, c] = sum_s g * x in fp32 (if NEED_MASK), one (sample, channel tile)
    per program, walking s in a fixed order."""
    pid = tl.program_id(0)
    tiles_c = tl.cdiv(C, BLOCK_C)
    n = pid // tiles_c
    c = (pid % tiles_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    if NEED_X:
        gate = _gate(mask_ptr, labels_ptr, n, c, C, stride_mask_c, stride_mask_k)
    acc = tl.zeros((BLOCK_C, BLOCK_S), dtype=tl.float32)
    for s_start in range(0, S, BLOCK_S):
        s = s_start + tl.arange(0, BLOCK_S)
        valid = (c < C)[:, None] & (s < S)[None, :]
        offset = _offsets(n, c, s, C, S, CHANNELS_INNER)
        g = tl.load(grad_ptr + offset, mask=valid, other=0.0)
        if NEED_X:
            tl.store(grad_x_ptr + offset, (g.to(tl.float32) * gate).to(g.dtype), mask=valid)
        if NEED_MASK:
            x = tl.load(x_ptr + offset, mask=valid, other=0.0)
            acc += g.to(tl.float32) * x.to(tl.float32)
    if NEED_MASK:
        tl.store(partial_ptr + n.to(tl.int64) * C + c, tl.sum(acc, axis=1), mask=c < C)


@triton.jit
def _segment_sum_kernel(partial_ptr, order_ptr, starts_ptr, grad_mask_ptr, C, K, BLOCK_C: tl.constexpr):
    """grad_mask[c, k] = sum of P[order[i], c] for i in [starts[k], starts[k + 1]), added in that order."""
    pid = tl.program_id(0)
    tiles_c = tl.cdiv(C, BLOCK_C)
    k = pid // tiles_c
    c = (pid % tiles_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    start = tl.load(starts_ptr + k).to(tl.int32)  # batch sizes fit int32; an int32 loop counter
    end = tl.load(starts_ptr + k + 1).to(tl.int32)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for i in range(start, end):
        n = tl.load(order_ptr + i)
        acc += tl.load(partial_ptr + n * C + c, mask=c < C, other=0.0)
    tl.store(grad_mask_ptr + c.to(tl.int64) * K + k, acc.to(grad_mask_ptr.dtype.element_ty), mask=c < C)


# ---------------------------------------------------------------------------
# host side


def _sizes(x: torch.Tensor, nhwc: bool) -> Tuple[int, int, int]:
    """(N, C, S) of the [N, C, S] reading of x."""
    spatial = x.shape[2] * x.shape[3] if x.dim() == 4 else 1
    return x.shape[0], x.shape[1], spatial


def _blocks(channels: int, spatial: int, channels_inner: bool) -> Tuple[int, int]:
    """(BLOCK_C, BLOCK_S), powers of two, the tile longest along the contiguous axis."""
    tile = TILE_ELEMENTS_INTERPRETED if backends.triton_interpreting() else TILE_ELEMENTS
    if channels_inner:
        block_c = min(triton.next_power_of_2(channels), MAX_BLOCK_C, tile)
        return block_c, min(triton.next_power_of_2(spatial), max(1, tile // block_c))
    block_s = min(triton.next_power_of_2(spatial), tile)
    return min(triton.next_power_of_2(channels), max(1, tile // block_s)), block_s


def forward(x: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """x * mask[:, labels] per sample, like ``torch.empty_like(x)``. A 4-D channels_last (and not contiguous) x
    is read in place; any other x is read (or copied) as contiguous. labels: int64."""
    nhwc = is_channels_last(x)
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    layout = memory_format(nhwc)
    x_in = x.contiguous(memory_format=layout)
    direct = out.is_contiguous(memory_format=layout)  # empty_like keeps the strides of any dense x
    out_in = out if direct else torch.empty_like(x_in, memory_format=layout)
    n, channels, spatial = _sizes(x, nhwc)
    channels_inner = nhwc or x.dim() == 2
    block_c, block_s = _blocks(channels, spatial, channels_inner)
    grid = (n * triton.cdiv(channels, block_c) * triton.cdiv(spatial, block_s),)
    _gate_forward_kernel[grid](x_in, mask, labels.contiguous(), out_in, channels, spatial, mask.stride(0),
                               mask.stride(1), BLOCK_C=block_c, BLOCK_S=block_s, CHANNELS_INNER=channels_inner,
                               num_warps=4)
    if not direct:
        out.copy_(out_in)
    return out


def backward(grad_out, x, mask, labels, opts):
    """(grad_x or None, grad_mask or None). grad_x: channels_last if ``opts.nhwc`` else contiguous, grad_out's
    dtype; grad_mask: (C, num_classes) contiguous, grad_out's dtype. x is needed for grad_mask, mask for grad_x.
    opts: GateBackwardOptions (the op's __init__)."""
    num_classes, nhwc, need_x, need_mask = opts.num_classes, opts.nhwc, opts.need_x, opts.need_mask
    layout = memory_format(nhwc)
    grad_in = grad_out.contiguous(memory_format=layout)
    n, channels, spatial = _sizes(grad_in, nhwc)
    grad_x = torch.empty_like(grad_in, memory_format=layout) if need_x else None
    grad_mask = grad_in.new_empty((channels, num_classes)) if need_mask else None
    if not (need_x or need_mask):
        return grad_x, grad_mask
    if grad_in.numel() == 0:
        if grad_mask is not None:
            grad_mask.zero_()
        return grad_x, grad_mask
    labels = labels.contiguous()
    x_in = x.contiguous(memory_format=layout) if need_mask else grad_in  # placeholder when not read
    partial = torch.empty((n, channels), dtype=torch.float32, device=grad_in.device) if need_mask else grad_in
    channels_inner = nhwc or grad_in.dim() == 2
    block_c, block_s = _blocks(channels, spatial, channels_inner)
    mask_arg = mask if need_x else grad_in
    _gate_backward_kernel[(n * triton.cdiv(channels, block_c),)](
        grad_in, x_in, mask_arg, labels, grad_x if need_x else grad_in, partial, channels, spatial,
        mask.stride(0) if need_x else 0, mask.stride(1) if need_x else 0, BLOCK_C=block_c, BLOCK_S=block_s,
        CHANNELS_INNER=channels_inner, NEED_X=need_x, NEED_MASK=need_mask, num_warps=4)
    if need_mask:
        # Segments of the batch by label: a stable sort keeps batch order inside a class, so the sum order is
        # fixed by the labels alone. searchsorted rather than bincount: no atomics anywhere.
        sorted_labels, order = torch.sort(labels, stable=True)
        starts = torch.searchsorted(sorted_labels, torch.arange(num_classes + 1, device=labels.device))
        block_c = min(triton.next_power_of_2(channels), SEGMENT_BLOCK_C)
        _segment_sum_kernel[(num_classes * triton.cdiv(channels, block_c),)](
            partial, order, starts, grad_mask, channels, num_classes, BLOCK_C=block_c, num_warps=4)
    return grad_x, grad_mask

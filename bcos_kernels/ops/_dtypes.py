"""The dtype the ops compute per-channel and per-pixel factors in."""

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half inputs (fp16, bf16); fp32 and fp64 stay what they are."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

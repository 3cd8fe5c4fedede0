"""The seed of LWTA's in-kernel noise (backends "triton" and "cuda" draw it the same way, on different devices)."""

from __future__ import annotations

from typing import Optional

import torch

# Seeds are drawn uniformly in [0, SEED_HIGH): any 64-bit Philox key is as good as another.
SEED_HIGH = 2**63 - 1


def draw_seed(device: Optional[torch.device] = None) -> torch.Tensor:
    """A 1-element int64 tensor from torch's generator of ``device`` (None: the default device's), so that
    ``torch.manual_seed`` controls it. A tensor, not an int: torch.compile then keeps it a graph value (a Python
    int argument would be baked into the graph as a constant, giving every call the same noise)."""
    return torch.randint(0, SEED_HIGH, (1,), dtype=torch.int64, device=device)

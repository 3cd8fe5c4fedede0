"""The attention of the B-cos ViTs (`bcos.models.vit.Attention`, B-cos v2), on
``torch.nn.functional.scaled_dot_product_attention``.

The original forms the (tokens x tokens) attention matrix with two matmuls and a softmax, keeping it (per head)
for the backward; SDPA runs a fused kernel (flash/memory-efficient attention where the device and dtype have
one) with the same math. Explanation mode detaches q and k, as the original does: the attention matrix is then a
constant and the layer is linear in v (formed explicitly there: see ``_attend_constant``).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bcos_kernels.nn.bcos import DetachableModule

__all__ = ["Attention"]


class Attention(DetachableModule):
    """Same arguments, submodules (``norm``, ``to_qkv``, ``to_out``, ``attend``) and state_dict keys as
    `bcos.models.vit.Attention`: ``norm`` then a bias-free qkv projection (a plain linear, as in the original),
    ``heads`` heads of ``dim_head`` features, scaled by ``dim_head ** -0.5``, and the ``to_out`` projection (the
    model's linear layer, a B-cos linear in a B-cos ViT)."""

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        dim_head: int = 64,
        linear_layer: Optional[Callable[..., nn.Module]] = None,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
    ):
        if linear_layer is None or norm_layer is None:
            raise ValueError("Attention needs a linear_layer and a norm_layer (classes or factories)")
        super().__init__()
        inner_dim = dim_head * heads
        self.heads = heads
        self.scale = dim_head**-0.5
        self.norm = norm_layer(dim)
        self.attend = nn.Softmax(dim=-1)  # kept for the module tree; SDPA applies the softmax
        self.to_qkv = nn.Linear(dim, inner_dim * 3, bias=False)
        self.to_out = linear_layer(inner_dim, dim, bias=False)
        # attributes of the original that its forward never reads (kept so that code reading them still works)
        self.att = None
        self.pos_info = None
        self.attention_biases = None

    @classmethod
    def from_original(cls, original: nn.Module) -> "Attention":
        """Ours with ``original``'s submodules (shared, not copied), attributes and explanation mode."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name in ("heads", "scale", "att", "pos_info", "attention_biases"):
            setattr(new, name, getattr(original, name))
        for name in ("norm", "attend", "to_qkv", "to_out"):
            setattr(new, name, getattr(original, name))
        new.detach = bool(getattr(original, "detach", False))
        new.train(original.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        # (B, N, 3 h d) -> three (B, h, N, d) views
        q, k, v = self.to_qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
        if self.detach and torch.is_grad_enabled():
            out = self._attend_constant(q.detach(), k.detach(), v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.to_out(out.transpose(1, 2).flatten(2))

    def _attend_constant(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Explanation mode: q and k detached, so the attention matrix is the dynamic linear weight, a constant.
        SDPA's backward would still compute the q and k gradients (its kernels have no switch for them); formed
        explicitly, the backward is one matmul (attn^T grad), as in the original."""
        with torch.no_grad():
            attn = torch.softmax(q @ k.transpose(-1, -2) * self.scale, dim=-1)
        return attn @ v

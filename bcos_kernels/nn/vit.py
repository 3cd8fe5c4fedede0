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

__all__ = ["Attention", "DetachableGELU", "DetachableQuickGELU", "MultiheadAttention"]


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


class DetachableGELU(DetachableModule):
    """GELU as a gate, ``x * Phi(x)`` (the exact, erf form of ``nn.GELU``), whose gate ``Phi(x)`` is a constant in
    explanation mode (``detach``), so that the layer is dynamic linear: B-cosification's detachable GELU for
    ViTs. Out of explanation mode it is ``F.gelu``, the same function."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.detach:
            return F.gelu(x)
        with torch.no_grad():
            gate = 0.5 * (1 + torch.erf(x * _SQRT_HALF))
        return x * gate


class DetachableQuickGELU(DetachableModule):
    """CLIP's ``QuickGELU``, ``x * sigmoid(1.702 x)``, with its gate a constant in explanation mode."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.detach:
            return x * torch.sigmoid(1.702 * x)
        with torch.no_grad():
            gate = torch.sigmoid(1.702 * x)
        return x * gate


_SQRT_HALF = 0.5**0.5


class MultiheadAttention(DetachableModule):
    """``nn.MultiheadAttention`` in B-cos form, for B-cosified torchvision- and CLIP-style ViTs: the packed q/k/v
    projection stays a plain linear (as the original B-cosification keeps a ViT's ``to_qkv``), ``out_proj`` is
    the model's (B-cos) linear, the attention runs on ``scaled_dot_product_attention``, and explanation mode
    detaches q and k. Same call signature and returns as ``nn.MultiheadAttention``; built from one by
    :meth:`from_module` (parameters shared; same state_dict keys). Supported: one embedding size for q, k and v
    (``_qkv_same_embed_dim``), no ``bias_k``/``bias_v``/``add_zero_attn``."""

    @classmethod
    def from_module(cls, mha: nn.MultiheadAttention, out_proj: nn.Module) -> "MultiheadAttention":
        reason = cls.unsupported(mha)
        if reason is not None:
            raise ValueError(f"nn.MultiheadAttention with {reason} has no B-cos form here")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name in ("embed_dim", "num_heads", "dropout", "batch_first", "head_dim"):
            setattr(new, name, getattr(mha, name))
        new.in_proj_weight = mha.in_proj_weight
        new.in_proj_bias = mha.in_proj_bias
        new.out_proj = out_proj
        new.detach = False
        new.train(mha.training)
        return new

    @staticmethod
    def unsupported(mha: nn.MultiheadAttention) -> Optional[str]:
        """Why ``mha`` has no B-cos form here (None: it has)."""
        if not mha._qkv_same_embed_dim:
            return "kdim/vdim different from embed_dim"
        if mha.bias_k is not None or mha.bias_v is not None:
            return "bias_k/bias_v"
        if mha.add_zero_attn:
            return "add_zero_attn=True"
        return None

    def _merged_mask(self, attn_mask, key_padding_mask, q: Tensor, n: int, s: int):
        """One additive/boolean mask for SDPA of shape broadcasting to (N, h, L, S), from nn.MultiheadAttention's
        attn_mask ((L, S) or (N * h, L, S); True = not allowed) and key_padding_mask ((N, S); True = ignore)."""
        mask = None
        if attn_mask is not None:
            mask = attn_mask.view(n, self.num_heads, *attn_mask.shape[-2:]) if attn_mask.dim() == 3 else attn_mask
            mask = (
                torch.zeros_like(mask, dtype=q.dtype).masked_fill_(mask, float("-inf"))
                if mask.dtype == torch.bool
                else mask.to(q.dtype)
            )
        if key_padding_mask is not None:
            kpm = key_padding_mask.view(n, 1, 1, s)
            kpm = (
                torch.zeros_like(kpm, dtype=q.dtype).masked_fill_(kpm, float("-inf"))
                if kpm.dtype == torch.bool
                else kpm.to(q.dtype)
            )
            mask = kpm if mask is None else mask + kpm
        return mask

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ):
        batched = query.dim() == 3
        if not batched:  # unbatched (L, E): a batch of one
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if self.batch_first and batched:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        length, n, _ = query.shape
        s = key.shape[0]
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        if query is key and key is value:  # self-attention: one projection
            q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        else:
            q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

        def heads(t: Tensor, rows: int) -> Tensor:  # (rows, N, E) -> (N, h, rows, d)
            return t.reshape(rows, n, self.num_heads, self.head_dim).permute(1, 2, 0, 3)

        q, k, v = heads(q, length), heads(k, s), heads(v, s)
        if self.detach:
            q, k = q.detach(), k.detach()
        mask = self._merged_mask(attn_mask, key_padding_mask, q, n, s)
        if is_causal and mask is None:
            mask = torch.ones(length, s, dtype=torch.bool, device=q.device).tril().logical_not()
            mask = torch.zeros_like(mask, dtype=q.dtype).masked_fill_(mask, float("-inf"))
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights or (self.detach and torch.is_grad_enabled()):
            scores = q @ k.transpose(-1, -2) * self.head_dim**-0.5
            if mask is not None:
                scores = scores + mask
            attn = F.dropout(torch.softmax(scores, dim=-1), dropout, self.training)
            weights = attn.mean(1) if average_attn_weights else attn  # after dropout, as nn.MultiheadAttention
            out = attn @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(length, n, self.embed_dim))  # (L, N, E)
        if self.batch_first and batched:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(1)
            weights = weights.squeeze(0) if weights is not None else None
        return out, (weights if need_weights else None)

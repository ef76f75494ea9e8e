"""Encoders: the two-stream FmFormer encoder and the single-stream ViT encoder.

``layers.{i}.0`` is the attention stage and ``layers.{i}.1`` the feed-forward stage, as in
the reference, so ``transformer.*`` keys match its ``state_dict``."""
from __future__ import annotations

import torch
from torch import nn

from fmfast.nn.attention import Attention, FeedForward, MultiStreamAttention, MultiStreamFeedForward


class MultiStreamTransformer(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([MultiStreamAttention(dim, heads, dim_head, cross_attention=True),
                           MultiStreamFeedForward(dim, mlp_dim)])
            for _ in range(depth)
        )

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for attn, ff in self.layers:
            x1, x2 = attn(x1, x2)
            x1, x2 = ff(x1, x2)
        return x1, x2


class Transformer(nn.Module):
    """Single-stream pre-LN encoder; ``final_norm`` adds the ``norm`` the current ViT has."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int, final_norm: bool = False):
        super().__init__()
        # registered before ``layers`` so the state_dict order follows the reference's
        self.norm = nn.LayerNorm(dim) if final_norm else None
        self.layers = nn.ModuleList(
            nn.ModuleList([Attention(dim, heads, dim_head), FeedForward(dim, mlp_dim)]) for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, ff in self.layers:
            x = x + attn(x)
            x = x + ff(x)
        return x if self.norm is None else self.norm(x)

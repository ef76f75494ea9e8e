"""Single-modality baselines of the reference code: a video-only and a current-only ViT."""
from __future__ import annotations

import torch
from torch import nn

from fmfast.models.config import ModelConfig
from fmfast.models.heads import pool_tokens
from fmfast.models.interop import OfficialInterop
from fmfast.models.video import video_embed, video_head
from fmfast.nn.backend import BackendMixin
from fmfast.nn.embed import CurrentEmbed
from fmfast.nn.transformer import Transformer


class VideoViT(BackendMixin, OfficialInterop, nn.Module):
    """``model(video [B,3,T,H,W]) -> [B,classes]`` or ``[B,classes,H,W]``: same tokenizers as
    FmFormer, a plain encoder (no final norm), the same heads. ``backend`` as for FmFormer."""

    KIND = "video"

    def __init__(self, cfg: ModelConfig | None = None, backend: str = "auto"):
        super().__init__()
        cfg = cfg or ModelConfig()
        self.config = cfg
        self.video_embed = video_embed(cfg)
        self.transformer = Transformer(cfg.dim, cfg.depth, cfg.heads, cfg.dim_head, cfg.mlp_dim)
        self.head = video_head(cfg)
        self.set_backend(backend)

    def forward(self, video: torch.Tensor, frame_index: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.transformer(self.video_embed(video, frame_index)))


class CurrentViT(BackendMixin, OfficialInterop, nn.Module):
    """``model(current [B,L,3]) -> [B,classes]``: current tokens, encoder with a final
    LayerNorm, linear head on the pooled token. Classification only. ``backend`` as for FmFormer."""

    KIND = "current"

    def __init__(self, cfg: ModelConfig | None = None, backend: str = "auto"):
        super().__init__()
        cfg = cfg or ModelConfig()
        if cfg.task != "classification":
            raise ValueError(f"CurrentViT supports task='classification' only, got {cfg.task!r}")
        self.config = cfg
        self.current_embed = CurrentEmbed(cfg.current_len, cfg.current_channels, cfg.dim)
        self.transformer = Transformer(cfg.dim, cfg.depth, cfg.heads, cfg.dim_head, cfg.mlp_dim, final_norm=True)
        self.mlp_head = nn.Linear(cfg.dim, cfg.num_classes)
        self.set_backend(backend)

    def forward(self, current: torch.Tensor) -> torch.Tensor:
        x = self.transformer(self.current_embed(current))
        return self.mlp_head(pool_tokens(x, self.config.pool))

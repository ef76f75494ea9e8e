"""FmFormer (Wu et al., TCSVT 2025): two-stream video + current Transformer, plain PyTorch."""
from __future__ import annotations

import torch
from torch import nn

from fmfast.models.config import ModelConfig
from fmfast.models.interop import OfficialInterop
from fmfast.models.video import video_embed, video_head
from fmfast.nn.backend import BackendMixin
from fmfast.nn.embed import CurrentEmbed
from fmfast.nn.transformer import MultiStreamTransformer


class FmFormer(BackendMixin, OfficialInterop, nn.Module):
    """``model(video [B,3,T,H,W], current [B,L,3]) -> [B,classes]`` or ``[B,classes,H,W]``.

    ``video`` is uint8 or float 0..255; with ``frame_index`` ``[B,T]`` it is a frame store ``[N,3,H,W]``.
    ``backend``: "auto" (fast kernels on CUDA inputs), "reference" or "fast" (``fmfast.nn.backend``).
    """

    KIND = "fmformer"

    def __init__(self, cfg: ModelConfig | None = None, backend: str = "auto"):
        super().__init__()
        cfg = cfg or ModelConfig()
        self.config = cfg
        self.video_embed = video_embed(cfg)
        self.current_embed = CurrentEmbed(cfg.current_len, cfg.current_channels, cfg.dim)
        self.transformer = MultiStreamTransformer(cfg.dim, cfg.depth, cfg.heads, cfg.dim_head, cfg.mlp_dim)
        self.head = video_head(cfg)
        self.set_backend(backend)

    def forward(self, video: torch.Tensor, current: torch.Tensor, frame_index: torch.Tensor | None = None) -> torch.Tensor:
        x1 = self.video_embed(video, frame_index)
        x2 = self.current_embed(current)
        if x1.shape[0] != x2.shape[0]:
            raise ValueError(f"video batch {x1.shape[0]} and current batch {x2.shape[0]} differ")
        x1, x2 = self.transformer(x1, x2)
        return self.head(x1, x2)

"""FmFormer (Wu et al., TCSVT 2025): two-stream video + current Transformer, plain PyTorch."""
from __future__ import annotations

import torch
from torch import nn

from fmfast.backend import BackendMixin
from fmfast.config import ModelConfig
from fmfast.models.heads import ClassificationHead, SegmentationHead
from fmfast.nn.embed import CurrentEmbed, MultiscaleTubeletEmbed
from fmfast.nn.transformer import MultiStreamTransformer


def video_embed(cfg: ModelConfig) -> MultiscaleTubeletEmbed:
    return MultiscaleTubeletEmbed(
        cfg.frame_hw, cfg.num_frames, cfg.patch_size, cfg.frame_patch_size, cfg.dim,
        channels=cfg.channels, dilations=(1, 2) if cfg.dilated_tokens else (1,),
    )


def video_head(cfg: ModelConfig) -> nn.Module:
    if cfg.task == "classification":
        return ClassificationHead(cfg.pool, cfg.dim, cfg.num_classes)
    if cfg.patch_size != 8:
        # three 2x decoder stages bring the token grid back to pixels only for 8x8 patches
        raise ValueError(f"segmentation needs patch_size 8 (the decoder upsamples 8x), got {cfg.patch_size}")
    return SegmentationHead(cfg.dim, *cfg.grid, cfg.num_classes, cfg.seg_hidden_dims, cfg.dilated_tokens)


class OfficialInterop:
    """``from_official`` / ``to_official`` for a model whose ``KIND`` is a key of ``fmfast.interop.KEY_MAP``."""

    KIND: str

    @classmethod
    def from_official(cls, source, task: str | None = None, cfg: ModelConfig | None = None, **overrides):
        """Build the model from a reference-code ``state_dict`` (a dict or a file path).

        Sizes are read from the tensors (``task`` too, when not given). Two things cannot be:
        how the video token count splits into clip length and frame size (64x64 frames are
        assumed unless ``image_size`` or ``num_frames`` says otherwise) and how ``heads *
        dim_head`` splits (``dim_head`` 32 assumed, as in every published model). Config
        ``overrides`` or a full ``cfg`` settle them. Raises ``CheckpointMismatch``.
        """
        from fmfast.interop import load_official

        return load_official(cls, source, task=task, cfg=cfg, **overrides)

    def to_official(self) -> dict[str, torch.Tensor]:
        """This model's ``state_dict`` under the reference code's key names (shares storage)."""
        from fmfast.interop import to_official_keys

        return to_official_keys(self.state_dict(), self.KIND)


class FmFormer(BackendMixin, OfficialInterop, nn.Module):
    """``model(video [B,3,T,H,W], current [B,L,3]) -> [B,classes]`` or ``[B,classes,H,W]``.

    ``video`` is uint8 or float 0..255; with ``frame_index`` ``[B,T]`` it is a frame store ``[N,3,H,W]``.
    ``backend``: "auto" (fast kernels on CUDA inputs), "reference" or "fast" (``fmfast.backend``).
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

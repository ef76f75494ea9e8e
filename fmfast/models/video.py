"""The video side FmFormer and the video-only baseline share: the multiscale tokenizer and the
head (classification on the cls token, or the segmentation decoder), built from a ModelConfig."""
from __future__ import annotations

from torch import nn

from fmfast.models.config import ModelConfig
from fmfast.models.heads import ClassificationHead, SegmentationHead
from fmfast.nn.embed import MultiscaleTubeletEmbed


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

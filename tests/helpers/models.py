"""Inputs for the model tests: a uint8 clip and a current window shaped by a ModelConfig."""
from __future__ import annotations

import torch


def model_inputs(cfg, b: int = 2, seed: int = 0, device: str = "cpu"):
    """(video [b, C, T, H, W] uint8, current [b, L, 3] float32 amperes), seeded."""
    g = torch.Generator().manual_seed(seed)
    h, w = cfg.frame_hw
    video = torch.randint(0, 256, (b, cfg.channels, cfg.num_frames, h, w), generator=g, dtype=torch.uint8)
    current = 3000 + 800 * torch.randn(b, cfg.current_len, cfg.current_channels, generator=g)
    return video.to(device), current.to(device)

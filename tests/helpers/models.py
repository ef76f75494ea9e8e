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


def tiny_config(task: str = "classification", **kw):
    """A one-layer ModelConfig with non-square 32x16 frames (a swapped axis shows as a shape error)."""
    from fmfast.models.config import ModelConfig

    return ModelConfig(**{**dict(task=task, image_size=(32, 16), num_frames=4, dim=16, depth=1, heads=2, dim_head=8,
                                 mlp_dim=32, current_len=8, seg_hidden_dims=(8, 8, 8)), **kw})


def tiny_checkpoint(folder, name: str = "fmformer", task: str = "classification", data: dict | None = None,
                    threshold: float = 0.375, **kw):
    """A seeded tiny model, with non-trivial BatchNorm statistics (so eval vs train mode would
    show), saved as an fmfast checkpoint with data settings and a calibrated threshold
    -> (path, model in eval mode)."""
    from pathlib import Path

    from fmfast.engine import checkpoints
    from fmfast.models import build_model

    torch.manual_seed(0)
    m = build_model(name, tiny_config(task, **kw))
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    path = Path(folder) / f"{name}_{task}.pt"
    payload = checkpoints.model_payload(name, m, {"num_frames": 4, "stride": 2, "current_seconds": 4}
                                        if data is None else data)
    checkpoints.save(path, {**payload, "threshold": threshold})
    return path, m.eval()

"""Optimisers and learning-rate schedules of the reference configs, stepped per batch."""
from __future__ import annotations

import math

import torch


def build_optimizer(params, o: dict, fused: bool = False) -> torch.optim.Optimizer:
    kw = {"lr": o["lr"], "weight_decay": o["weight_decay"]}
    if o["name"] == "sgd":
        return torch.optim.SGD(params, momentum=o["momentum"], nesterov=bool(o["nesterov"]) and o["momentum"] > 0, **kw)
    cls = torch.optim.AdamW if o["name"] == "adamw" else torch.optim.Adam
    return cls(params, **kw, **({"fused": True} if fused else {}))


def lr_factor(s: dict, epochs: int, epoch_pos: float, base_lr: float) -> float:
    """Multiplier of the base learning rate at a fractional epoch position."""
    warm = float(s.get("warmup_epochs") or 0)
    if warm > 0 and epoch_pos < warm:
        return (epoch_pos + 1e-3) / warm
    if s["name"] == "cosine":
        end = s["end_lr"] / base_lr
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * min(epoch_pos / epochs, 1.0)))
    if s["name"] == "step":
        return s["gamma"] ** sum(epoch_pos >= m for m in s["steps"])
    return 1.0


def build_scheduler(opt, s: dict, epochs: int, steps_per_epoch: int, base_lr: float):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: lr_factor(s, epochs, step / max(steps_per_epoch, 1), base_lr)
    )

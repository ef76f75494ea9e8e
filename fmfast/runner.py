"""What training, evaluation and detection share: device and precision choice, moving a
batch onto the device, calling any of the three models the same way."""
from __future__ import annotations

import contextlib

import torch

from fmfast.cli import UserError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device: unknown device {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return dev


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """``None`` means full fp32. auto = bf16 on CUDA, fp32 on the CPU (CPU bf16 is slower)."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if amp == "off":
        return None
    if amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA device; use bf16 or off on the CPU")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def forward(model, model_name: str, clips: torch.Tensor, currents: torch.Tensor) -> torch.Tensor:
    """Call a model with the inputs it takes (video, current, or both)."""
    if model_name == "video":
        return model(clips)
    if model_name == "current":
        return model(currents)
    return model(clips, currents)


def to_device(batch, device: torch.device):
    return tuple(x.to(device, non_blocking=True) for x in batch)

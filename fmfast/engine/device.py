"""Where and in what precision training, evaluation and detection run: the one device
resolver and the one autocast helper."""
from __future__ import annotations

import torch

from fmfast.errors import SettingsError


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" -> CUDA when available, else the CPU; a named device must exist here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise SettingsError(f"device: unknown device {name!r} (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SettingsError(f"device {name}: CUDA is not available on this machine")
    return dev


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX-BF16 tiles or AVX512-BF16): where it
    does, bf16 autocast roughly doubles matmul throughput; where it does not, bf16 is emulated
    and slower than fp32, so fmfast stays in fp32."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, n, None) for n in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(bool(f()) for f in checks if f is not None)


def auto_dtype(device: torch.device) -> torch.dtype | None:
    """What "auto" precision means, for training and inference alike: bf16 on CUDA and on CPUs
    with native bf16 (there the main job trains ~10% faster at the same test F1, README), else
    fp32 (``None``: emulated bf16 is slower than fp32)."""
    return torch.bfloat16 if device.type == "cuda" or native_bf16() else None


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """``None`` means full fp32. auto: :func:`auto_dtype`."""
    if amp == "auto":
        return auto_dtype(device)
    if amp == "off":
        return None
    if amp == "fp16" and device.type != "cuda":
        raise SettingsError("amp fp16 needs a CUDA device; use bf16 or off on the CPU")
    if amp not in ("bf16", "fp16"):
        raise SettingsError(f"amp must be one of auto, bf16, fp16, off; got {amp!r}")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` (``None``: off). Without the weight-cast cache, whose entries would
    outlive a CUDA-graph capture (PyTorch's advice for autocast under CUDA graphs); eager code
    loses nothing measurable by it at these sizes."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None, cache_enabled=False)


def to_device(batch, device: torch.device):
    return tuple(x.to(device, non_blocking=True) for x in batch)

"""Reference models (plain PyTorch) with checkpoint interop to the published code."""
from __future__ import annotations

from fmfast.config import ModelConfig
from fmfast.models.baselines import CurrentViT, VideoViT
from fmfast.models.fmformer import FmFormer

MODELS = {"fmformer": FmFormer, "video": VideoViT, "current": CurrentViT}


def build_model(name: str, cfg: ModelConfig | None = None, backend: str = "auto"):
    """``name`` in {"fmformer", "video", "current"}; ``backend`` in {"auto", "reference", "fast"}."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](cfg or ModelConfig(), backend=backend)


__all__ = ["MODELS", "CurrentViT", "FmFormer", "VideoViT", "build_model"]

"""The three models by name: build one, load one from a published checkpoint, call one.

``MODELS`` maps the names used everywhere (settings, checkpoints, the command line) to classes:
"fmformer" (video + current), "video" and "current" (the single-modality baselines).
"""
from __future__ import annotations

import os

import torch

from fmfast.models.baselines import CurrentViT, VideoViT
from fmfast.models.config import ModelConfig
from fmfast.models.fmformer import FmFormer
from fmfast.errors import CheckpointMismatch
from fmfast.models.interop import _listing, load_official, read_official
from fmfast.models.official_config import guess_kind

MODELS = {"fmformer": FmFormer, "video": VideoViT, "current": CurrentViT}
INPUTS = {"fmformer": ("video", "current"), "video": ("video",), "current": ("current",)}


def build_model(name: str, cfg: ModelConfig | None = None, backend: str = "auto"):
    """``name`` in {"fmformer", "video", "current"}; ``backend`` in {"auto", "reference", "fast"}."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](cfg or ModelConfig(), backend=backend)


def call(model, name: str, video: torch.Tensor | None, current: torch.Tensor | None,
         frame_index: torch.Tensor | None = None) -> torch.Tensor:
    """Call model ``name`` with the inputs it takes: ``video`` is a clip ``[B,3,T,W,H]`` or, with
    ``frame_index [B,T]``, a frame store ``[N,3,W,H]``; ``current`` is ``[B,2S,3]``."""
    kw = {} if frame_index is None else {"frame_index": frame_index}
    if name == "current":
        return model(current)
    if name == "video":
        return model(video, **kw)
    return model(video, current, **kw)


def guess_official(source, task: str | None = None, **overrides):
    """Recognise a reference checkpoint (dict or path) -> ``(model name, loaded model)``."""
    name = str(source) if isinstance(source, (str, os.PathLike)) else "state_dict"
    sd = read_official(source, name)
    kind = guess_kind(sd)
    if kind is None:
        raise CheckpointMismatch(
            f"{name}: not a reference FMF-Benchmark state_dict (no known keys; first keys: {_listing(list(sd)[:5], 5)})"
        )
    return kind, load_official(MODELS[kind], sd, task=task, name=name, **overrides)

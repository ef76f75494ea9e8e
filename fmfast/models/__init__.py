"""The models: FmFormer and the reference code's two baselines, their heads, interop with the
published checkpoints, and ``swap_modules`` for models built from the published code.

May import: ``fmfast.nn``, ``fmfast.errors``. Not data/, engine/, detect/ or cli/.
"""
from __future__ import annotations

from fmfast.models.baselines import CurrentViT, VideoViT
from fmfast.models.config import ModelConfig
from fmfast.models.fmformer import FmFormer
from fmfast.models.registry import INPUTS, MODELS, build_model, call
from fmfast.models.swap import swap_modules

__all__ = ["INPUTS", "MODELS", "CurrentViT", "FmFormer", "ModelConfig", "VideoViT", "build_model", "call",
           "swap_modules"]

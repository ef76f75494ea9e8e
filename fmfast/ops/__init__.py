"""Ops: each op has a plain-PyTorch ``*_ref`` and a dispatch function the model calls."""
from fmfast.ops.attention import attention, attention_ref
from fmfast.ops.tokenize import (
    ScaleParams,
    current_tokens_ref,
    gather_clip,
    multiscale_tokens,
    multiscale_tokens_ref,
    patch_embed_ref,
    tubelets,
)

__all__ = [
    "ScaleParams",
    "attention",
    "attention_ref",
    "current_tokens_ref",
    "gather_clip",
    "multiscale_tokens",
    "multiscale_tokens_ref",
    "patch_embed_ref",
    "tubelets",
]

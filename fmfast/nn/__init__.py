"""Drop-in modules with the reference model's parameter names (``state_dict`` keys match the
published code), each dispatching inside its ``forward`` on a ``backend`` attribute
(``fmfast.nn.backend``: "auto" | "reference" | "fast").

May import: ``fmfast.kernels`` (the fast path and the tokenizer's reference twin),
``fmfast.errors``. Not data/, models/, engine/, detect/ or cli/.
"""
from fmfast.nn.attention import (Attention, CrossAttention, FeedForward, MultiStreamAttention, MultiStreamFeedForward,
                                 attention_ref)
from fmfast.nn.backend import BACKENDS, set_backend
from fmfast.nn.embed import CurrentEmbed, MultiscaleTubeletEmbed, ScaleParams, TubeletScale, multiscale_tokens
from fmfast.nn.transformer import MultiStreamTransformer, Transformer

__all__ = [
    "BACKENDS",
    "Attention",
    "CrossAttention",
    "CurrentEmbed",
    "FeedForward",
    "MultiStreamAttention",
    "MultiStreamFeedForward",
    "MultiStreamTransformer",
    "MultiscaleTubeletEmbed",
    "ScaleParams",
    "Transformer",
    "TubeletScale",
    "attention_ref",
    "multiscale_tokens",
    "set_backend",
]

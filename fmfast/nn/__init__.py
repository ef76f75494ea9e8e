"""Drop-in modules with the reference model's parameter names."""
from fmfast.nn.attention import Attention, CrossAttention, FeedForward, MultiStreamAttention, MultiStreamFeedForward
from fmfast.nn.embed import CurrentEmbed, MultiscaleTubeletEmbed, TubeletScale
from fmfast.nn.transformer import MultiStreamTransformer, Transformer

__all__ = [
    "Attention",
    "CrossAttention",
    "CurrentEmbed",
    "FeedForward",
    "MultiStreamAttention",
    "MultiStreamFeedForward",
    "MultiStreamTransformer",
    "MultiscaleTubeletEmbed",
    "Transformer",
    "TubeletScale",
]

"""Stand-ins for the published model classes (GaochangWu/FMF-Benchmark ``FMF/models``), written
here from their documented structure -- class names, attribute names, ``nn.Sequential``
indices and forward semantics -- so ``fmfast.swap_modules`` can be tested without the package.
Not the published code: only what a swap must recognise and reproduce."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops.layers.torch import Rearrange
from torch import nn

TUBELETS = "b c (f pf) (h p1) (w p2) -> b (f h w) (p1 p2 pf c)"


def _split_heads(t, heads):
    b, n, _ = t.shape
    return t.reshape(b, n, heads, -1).transpose(1, 2)


def _softmax_attention(module, q, k, v):
    probs = module.dropout(module.attend(q @ k.transpose(-1, -2) * module.scale))
    out = probs @ v
    return out.transpose(1, 2).flatten(2)


def _out(inner, dim, p):
    return nn.Sequential(nn.Linear(inner, dim), nn.Dropout(p))


class Attention(nn.Module):
    def __init__(self, dim, heads=8, dim_head=64, dropout=0.0):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.scale = heads, dim_head ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.attend = nn.Softmax(dim=-1)
        self.dropout = nn.Dropout(dropout)
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = _out(inner, dim, dropout)

    def forward(self, x):
        q, k, v = (_split_heads(t, self.heads) for t in self.to_qkv(self.norm(x)).chunk(3, dim=-1))
        return self.to_out(_softmax_attention(self, q, k, v))


class CrossAttention(nn.Module):
    def __init__(self, dim, heads=8, dim_head=64, dropout=0.0):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.scale = heads, dim_head ** -0.5
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attend = nn.Softmax(dim=-1)
        self.dropout = nn.Dropout(dropout)
        self.to_qkv1 = nn.Linear(dim, 3 * inner, bias=False)
        self.to_qkv2 = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out1, self.to_out2 = _out(inner, dim, dropout), _out(inner, dim, dropout)

    def forward(self, x1, x2):
        q1, k1, v1 = (_split_heads(t, self.heads) for t in self.to_qkv1(self.norm1(x1)).chunk(3, dim=-1))
        q2, k2, v2 = (_split_heads(t, self.heads) for t in self.to_qkv2(self.norm2(x2)).chunk(3, dim=-1))
        return (self.to_out1(_softmax_attention(self, q1, k2, v2)),
                self.to_out2(_softmax_attention(self, q2, k1, v1)))


class MultiStreamAttention(nn.Module):
    def __init__(self, dim, heads=8, dim_head=64, dropout=0.0, cross_attention=False):
        super().__init__()
        self.stream1 = Attention(dim, heads, dim_head, dropout)
        self.stream2 = Attention(dim, heads, dim_head, dropout)
        self.cross_attn = CrossAttention(dim, heads, dim_head, dropout) if cross_attention else None

    def forward(self, x1, x2):
        x1, x2 = x1 + self.stream1(x1), x2 + self.stream2(x2)
        if self.cross_attn is not None:
            r1, r2 = self.cross_attn(x1, x2)
            x1, x2 = x1 + r1, x2 + r2
        return x1, x2


class FeedForward(nn.Module):
    def __init__(self, dim, hidden, dropout=0.0):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, dim), nn.Dropout(dropout))

    def forward(self, x):
        return self.net(x)


class MultiStreamFeedForward(nn.Module):
    def __init__(self, dim, hidden, dropout=0.0):
        super().__init__()
        self.ff1, self.ff2 = FeedForward(dim, hidden, dropout), FeedForward(dim, hidden, dropout)

    def forward(self, x1, x2):
        return x1 + self.ff1(x1), x2 + self.ff2(x2)


class MultiStreamTransformer(nn.Module):
    def __init__(self, dim, depth, heads, dim_head, mlp_dim, dropout=0.0):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([MultiStreamAttention(dim, heads, dim_head, dropout, cross_attention=True),
                           MultiStreamFeedForward(dim, mlp_dim, dropout)]) for _ in range(depth))

    def forward(self, x1, x2):
        for attn, ff in self.layers:
            x1, x2 = ff(*attn(x1, x2))
        return x1, x2


class Transformer(nn.Module):
    def __init__(self, dim, depth, heads, dim_head, mlp_dim, dropout=0.0, final_norm=False):
        super().__init__()
        if final_norm:
            self.norm = nn.LayerNorm(dim)
        self.final_norm = final_norm
        self.layers = nn.ModuleList(
            nn.ModuleList([Attention(dim, heads, dim_head, dropout), FeedForward(dim, mlp_dim, dropout)])
            for _ in range(depth))

    def forward(self, x):
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return self.norm(x) if self.final_norm else x


class ClassificationHead(nn.Module):
    def __init__(self, pool, dim, num_classes):
        super().__init__()
        self.pool = pool
        self.to_latent1, self.to_latent2 = nn.Identity(), nn.Identity()
        self.mlp_head1 = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))
        self.mlp_head2 = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward(self, x1, x2=None):
        pick = (lambda x: x.mean(1)) if self.pool == "mean" else (lambda x: x[:, 0])
        out = self.mlp_head1(self.to_latent1(pick(x1)))
        return out if x2 is None else out + self.mlp_head2(self.to_latent2(pick(x2)))


def _tokenizer(patch_dim, dim, p, pf):
    return nn.Sequential(Rearrange(TUBELETS, p1=p, p2=p, pf=pf), nn.LayerNorm(patch_dim),
                         nn.Linear(patch_dim, dim), nn.LayerNorm(dim))


class AdditionalVideoTokens(nn.Module):
    """Dilated tokens: nearest interpolation to half size, then the tubelet tokenizer + positions."""

    def __init__(self, image_size, image_patch_size, frames, frame_patch_size, dim, channels=3, emb_dropout=0.0):
        super().__init__()
        half = image_size // 2
        n = (half // image_patch_size) ** 2 * (frames // frame_patch_size)
        self.image_size, self.frames = image_size, frames
        self.to_patch_embedding = _tokenizer(channels * image_patch_size ** 2 * frame_patch_size, dim,
                                             image_patch_size, frame_patch_size)
        self.pos_embedding = nn.Parameter(torch.randn(1, n, dim))
        self.dropout = nn.Dropout(emb_dropout)

    def forward(self, video):
        x = F.interpolate(video, (self.frames, self.image_size // 2, self.image_size // 2), mode="nearest")
        x = self.to_patch_embedding(x)
        return self.dropout(x + self.pos_embedding[:, :x.shape[1]])


class ViTForViCu(nn.Module):
    def __init__(self, image_size, image_patch_size, frames, frame_patch_size, num_classes, current_patches,
                 current_patch_dim, dim, depth, heads, mlp_dim, pool="cls", channels=3, dim_head=64,
                 dropout=0.0, emb_dropout=0.0, additional=False):
        super().__init__()
        n = (image_size // image_patch_size) ** 2 * (frames // frame_patch_size)
        self.additional = additional
        self.to_patch_embedding1 = _tokenizer(channels * image_patch_size ** 2 * frame_patch_size, dim,
                                              image_patch_size, frame_patch_size)
        self.pos_embedding1 = nn.Parameter(torch.randn(1, n + 1, dim))
        self.cls_token1 = nn.Parameter(torch.randn(1, 1, dim))
        self.dropout = nn.Dropout(emb_dropout)
        if additional:
            self.get_additional_tokens = AdditionalVideoTokens(image_size, image_patch_size, frames,
                                                               frame_patch_size, dim)
        self.to_patch_embedding2 = nn.Sequential(nn.LayerNorm(current_patch_dim), nn.Linear(current_patch_dim, dim),
                                                 nn.LayerNorm(dim))
        self.pos_embedding2 = nn.Parameter(torch.randn(1, current_patches + 1, dim))
        self.cls_token2 = nn.Parameter(torch.randn(1, 1, dim))
        self.transformer = MultiStreamTransformer(dim, depth, heads, dim_head, mlp_dim, dropout)
        self.pool = pool
        self.head = ClassificationHead(pool, dim, num_classes)

    def forward(self, video, current):
        x1 = self.to_patch_embedding1(video)
        b, n, _ = x1.shape
        x1 = torch.cat([self.cls_token1.expand(b, -1, -1), x1], 1) + self.pos_embedding1[:, :n + 1]
        x1 = self.dropout(x1)
        if self.additional:
            x1 = torch.cat([x1, self.get_additional_tokens(video)], 1)
        x2 = self.to_patch_embedding2(current)
        b, n, _ = x2.shape
        x2 = torch.cat([self.cls_token2.expand(b, -1, -1), x2], 1) + self.pos_embedding2[:, :n + 1]
        x2 = self.dropout(x2)
        return self.head(*self.transformer(x1, x2))


class PositionalEncoding(nn.Module):
    def __init__(self, dim, num_patches, PEType="learnable"):
        super().__init__()
        self.PEType = PEType
        if PEType == "learnable":
            self.pe = nn.Parameter(torch.randn(1, num_patches + 1, dim))
        else:  # fixed sinusoids
            pos = torch.arange(num_patches + 1)[:, None]
            freq = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
            pe = torch.zeros(num_patches + 1, dim)
            pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
            self.register_buffer("pe", pe[None])

    def forward(self, x):
        return x + (self.pe if self.PEType == "learnable" else self.pe[:, :x.shape[1]])


class ViTForVideo(nn.Module):
    def __init__(self, image_size, image_patch_size, frames, frame_patch_size, num_classes, dim, depth, heads,
                 mlp_dim, pool="cls", channels=3, dim_head=64, dropout=0.0, emb_dropout=0.0, PEType="learnable",
                 additional=False):
        super().__init__()
        n = (image_size // image_patch_size) ** 2 * (frames // frame_patch_size)
        self.additional, self.pool = additional, pool
        self.to_patch_embedding = _tokenizer(channels * image_patch_size ** 2 * frame_patch_size, dim,
                                             image_patch_size, frame_patch_size)
        self.pos_embedding = PositionalEncoding(dim, n, PEType)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.dropout = nn.Dropout(emb_dropout)
        if additional:
            self.get_additional_tokens = AdditionalVideoTokens(image_size, image_patch_size, frames,
                                                               frame_patch_size, dim)
        self.transformer = Transformer(dim, depth, heads, dim_head, mlp_dim, dropout)
        self.head = ClassificationHead(pool, dim, num_classes)

    def forward(self, video):
        x = self.to_patch_embedding(video)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)
        x = self.dropout(self.pos_embedding(x))
        if self.additional:
            x = torch.cat([x, self.get_additional_tokens(video)], 1)
        return self.head(self.transformer(x))


class ViTForCurrent(nn.Module):
    def __init__(self, num_patches, patch_dim, num_classes, dim, depth, heads, mlp_dim, pool="cls", dim_head=64,
                 dropout=0.0, emb_dropout=0.0):
        super().__init__()
        self.to_patch_embedding = nn.Sequential(nn.LayerNorm(patch_dim), nn.Linear(patch_dim, dim), nn.LayerNorm(dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, num_patches + 1, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.dropout = nn.Dropout(emb_dropout)
        self.transformer = Transformer(dim, depth, heads, dim_head, mlp_dim, dropout, final_norm=True)
        self.pool = pool
        self.to_latent = nn.Identity()
        self.mlp_head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.to_patch_embedding(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embedding[:, :x.shape[1] + 1]
        x = self.transformer(self.dropout(x))
        x = x.mean(1) if self.pool == "mean" else x[:, 0]
        return self.mlp_head(self.to_latent(x))

"""Attention and feed-forward blocks with the reference model's attribute names and
``nn.Sequential`` indices, so ``state_dict`` keys are the reference's. The math goes through
``fmfast.ops.attention`` (dispatch point for a fused kernel)."""
from __future__ import annotations

import torch
from torch import nn

from fmfast.ops.attention import attention, packed_attention, packed_layout_key, resolve_backend
from fmfast.ops.layout import cross_attention_layout, self_attention_layout


def _out_proj(inner_dim: int, dim: int, project_out: bool) -> nn.Module:
    # Identity stands where the reference has Dropout(0): keeps the Linear at index 0.
    return nn.Sequential(nn.Linear(inner_dim, dim), nn.Identity()) if project_out else nn.Identity()


def _qkv_heads(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[B, N, 3*H*Dh]`` -> q, k, v each ``[B, H, N, Dh]``."""
    b, n, _ = qkv.shape
    return qkv.view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, N, Dh]`` -> ``[B, N, H*Dh]``."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class Attention(nn.Module):
    """Pre-LN multi-head self-attention branch: ``to_out(attn(to_qkv(norm(x))))`` (no residual)."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.scale = heads, dim_head ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = _out_proj(inner, dim, not (heads == 1 and dim_head == dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = _qkv_heads(self.to_qkv(self.norm(x)), self.heads)
        return self.to_out(_merge_heads(attention(q, k, v, self.scale)))


class CrossAttention(nn.Module):
    """Bidirectional cross-attention branches: stream 1 queries stream 2 and vice versa,
    both from the same inputs. Returns ``(r1, r2)`` (no residual)."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64):
        super().__init__()
        inner = heads * dim_head
        project_out = not (heads == 1 and dim_head == dim)
        self.heads, self.scale = heads, dim_head ** -0.5
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_qkv1 = nn.Linear(dim, inner * 3, bias=False)
        self.to_qkv2 = nn.Linear(dim, inner * 3, bias=False)
        self.to_out1 = _out_proj(inner, dim, project_out)
        self.to_out2 = _out_proj(inner, dim, project_out)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q1, k1, v1 = _qkv_heads(self.to_qkv1(self.norm1(x1)), self.heads)
        q2, k2, v2 = _qkv_heads(self.to_qkv2(self.norm2(x2)), self.heads)
        r1 = _merge_heads(attention(q1, k2, v2, self.scale))
        r2 = _merge_heads(attention(q2, k1, v1, self.scale))
        return self.to_out1(r1), self.to_out2(r2)


class MultiStreamAttention(nn.Module):
    """One FmFormer attention stage on streams (x1 video, x2 current), residuals included:
    self-attention per stream, then the bidirectional cross-attention on the updated streams.

    ``backend``: "auto" (default) packs both streams into one sequence on CUDA and runs each
    phase as one block-sparse Triton launch (self: block-diagonal layout, cross: off-diagonal);
    "triton" forces that path on any device (CPU: the Triton interpreter, for tests); "torch"
    always runs the reference path (four separate attentions)."""

    _PACKED_HEAD_DIMS = (16, 32, 64, 128)

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, cross_attention: bool = True,
                 backend: str = "auto", block_size: int = 64):
        super().__init__()
        self.stream1 = Attention(dim, heads, dim_head)
        self.stream2 = Attention(dim, heads, dim_head)
        self.cross_attn = CrossAttention(dim, heads, dim_head) if cross_attention else None
        resolve_backend(backend, torch.device("cpu"))  # validate early
        self.backend, self.block_size = backend, block_size

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dim_head = self.stream1.to_qkv.out_features // (3 * self.stream1.heads)
        if resolve_backend(self.backend, x1.device) == "triton" and dim_head in self._PACKED_HEAD_DIMS \
                and x1.dtype != torch.float64:  # the kernel takes fp16/bf16/fp32
            return self._forward_packed(x1, x2)
        x1 = x1 + self.stream1(x1)
        x2 = x2 + self.stream2(x2)
        if self.cross_attn is not None:
            r1, r2 = self.cross_attn(x1, x2)
            x1, x2 = x1 + r1, x2 + r2
        return x1, x2

    def _forward_packed(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Same math, one attention launch per phase over the packed [x1 tokens | x2 tokens]."""
        n1, n2 = x1.shape[1], x2.shape[1]
        s1, s2, heads, scale = self.stream1, self.stream2, self.stream1.heads, self.stream1.scale
        bs = self.block_size
        qkv = torch.cat([s1.to_qkv(s1.norm(x1)), s2.to_qkv(s2.norm(x2))], 1)
        o = _merge_heads(packed_attention(*_qkv_heads(qkv, heads), _stage_layout_key(n1, n2, bs, False), scale,
                                          "triton"))
        x1, x2 = x1 + s1.to_out(o[:, :n1]), x2 + s2.to_out(o[:, n1:])
        ca = self.cross_attn
        if ca is not None:
            qkv = torch.cat([ca.to_qkv1(ca.norm1(x1)), ca.to_qkv2(ca.norm2(x2))], 1)
            o = _merge_heads(packed_attention(*_qkv_heads(qkv, heads), _stage_layout_key(n1, n2, bs, True), ca.scale,
                                              "triton"))
            x1, x2 = x1 + ca.to_out1(o[:, :n1]), x2 + ca.to_out2(o[:, n1:])
        return x1, x2


@torch.compiler.assume_constant_result
def _stage_layout_key(n1: int, n2: int, block: int, cross: bool) -> int:
    """Key of the packed [n1 | n2] layout: a constant for torch.compile, which so never traces
    layout construction (the sequence lengths of a model are static)."""
    make = cross_attention_layout if cross else self_attention_layout
    return packed_layout_key(make((n1, n2), block, block))


def set_attention_backend(model: nn.Module, backend: str) -> nn.Module:
    """Set ``backend`` ("auto" | "triton" | "torch") on every MultiStreamAttention in ``model``."""
    resolve_backend(backend, torch.device("cpu"))
    for m in model.modules():
        if isinstance(m, MultiStreamAttention):
            m.backend = backend
    return model


class FeedForward(nn.Module):
    """Pre-LN MLP branch ``LN -> Linear -> GELU -> Linear`` (no residual).
    ``net`` indices 0, 1, 4 hold the weights, as in the reference (3 and 5 were Dropout(0))."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, hidden_dim), nn.GELU(), nn.Identity(),
            nn.Linear(hidden_dim, dim), nn.Identity(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MultiStreamFeedForward(nn.Module):
    """Per-stream feed-forward with residuals: ``(x1 + ff1(x1), x2 + ff2(x2))``."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.ff1 = FeedForward(dim, hidden_dim)
        self.ff2 = FeedForward(dim, hidden_dim)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x1 + self.ff1(x1), x2 + self.ff2(x2)

"""Scaled dot-product attention: the plain-PyTorch reference and its dispatch point."""
from __future__ import annotations

import torch


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` on ``[B, H, N, D]`` tensors (q: N queries, k/v: M keys).

    Same operation order as the reference model (scale applied to the logits, not to q).
    """
    dots = torch.matmul(q, k.transpose(-1, -2)) * scale
    return torch.matmul(dots.softmax(dim=-1), v)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Dispatch point for attention (plain PyTorch for now)."""
    return attention_ref(q, k, v, scale)

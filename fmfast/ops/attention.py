"""Scaled dot-product attention: the plain-PyTorch reference and its dispatch points."""
from __future__ import annotations

import torch

BACKENDS = ("auto", "triton", "torch")


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` on ``[B, H, N, D]`` tensors (q: N queries, k/v: M keys).

    Same operation order as the reference model (scale applied to the logits, not to q).
    """
    dots = torch.matmul(q, k.transpose(-1, -2)) * scale
    return torch.matmul(dots.softmax(dim=-1), v)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Dispatch point for attention (plain PyTorch for now)."""
    return attention_ref(q, k, v, scale)


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' -> 'triton' on CUDA, 'torch' elsewhere; 'triton' on CPU runs the Triton
    interpreter (tests set TRITON_INTERPRET=1 before the kernel is first imported)."""
    if backend not in BACKENDS:
        raise ValueError(f"fmfast.ops.attention: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return backend


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout, scale: float,
                     backend: str = "auto") -> torch.Tensor:
    """Attention over a packed sequence of segments ``[B, H, N, D]`` under a block layout
    (``fmfast.ops.layout``, or its ``packed_layout_key``): the block-sparse Triton kernel, or its
    dense masked twin."""
    from fmfast.kernels.attention import block_sparse_attention, block_sparse_attention_ref

    if resolve_backend(backend, q.device) == "triton":
        return block_sparse_attention(q, k, v, layout, scale)
    return block_sparse_attention_ref(q, k, v, layout, scale)


def packed_layout_key(layout) -> int:
    """Register ``layout`` with the kernel; the int key stands for it inside compiled code."""
    from fmfast.kernels.attention import register_layout

    return register_layout(layout)

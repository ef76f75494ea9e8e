"""Video and current tokenization: the plain-PyTorch reference.

``multiscale_tokens`` is the dispatch point (the fused Triton kernel on CUDA tensors);
``multiscale_tokens_ref`` is the fp32-faithful twin every fast path is checked against.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

LN_EPS = 1e-5  # nn.LayerNorm's default, as in the reference model


class ScaleParams(NamedTuple):
    """Weights of one tokenizer scale: LayerNorm(patch) -> Linear -> LayerNorm(dim) -> + pos."""

    norm_in_weight: torch.Tensor
    norm_in_bias: torch.Tensor
    proj_weight: torch.Tensor
    proj_bias: torch.Tensor
    norm_out_weight: torch.Tensor
    norm_out_bias: torch.Tensor
    pos_embedding: torch.Tensor  # [1, n, D]; scale 0: [1, 1 + n, D], row 0 belongs to cls


def patch_embed_ref(x: torch.Tensor, p: ScaleParams, eps: float = LN_EPS) -> torch.Tensor:
    """LayerNorm -> Linear -> LayerNorm over the last axis (no position embedding)."""
    x = F.layer_norm(x, p.norm_in_weight.shape, p.norm_in_weight, p.norm_in_bias, eps)
    x = F.linear(x, p.proj_weight, p.proj_bias)
    return F.layer_norm(x, p.norm_out_weight.shape, p.norm_out_weight, p.norm_out_bias, eps)


def split_frame_index(frame_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A frame table -> ``(frames, mirrored)``: entry ``i`` is frame ``i``, entry ``~i`` (= -1-i)
    frame ``i`` mirrored along W (see :func:`gather_clip`). No host sync (capturable)."""
    fi = frame_index.long()
    mirrored = fi < 0
    return torch.where(mirrored, -1 - fi, fi), mirrored


def gather_clip(store: torch.Tensor, frame_index: torch.Tensor) -> torch.Tensor:
    """Frame store ``[N,C,H,W]`` + frame table ``[B,T]`` -> clip ``[B,C,T,H,W]``.

    Entry ``i`` is frame ``i``; entry ``~i`` (= -1-i) is frame ``i`` mirrored along W (how a
    training flip is asked for without a flipped copy of the store). Frames are clamped into
    ``[0, N-1]``, as the Triton kernel does, so both paths agree on any table."""
    frames, flip = split_frame_index(frame_index)
    clip = store[frames.clamp(max=store.shape[0] - 1)]  # [B, T, C, H, W]
    if flip.device.type != "cpu" or flip.any():  # (a GPU must not read flip back: capturable)
        clip = torch.where(flip[:, :, None, None, None], clip.flip(-1), clip)
    return clip.permute(0, 2, 1, 3, 4)


def tubelets(video: torch.Tensor, patch_size: int, frame_patch_size: int, dilation: int = 1) -> torch.Tensor:
    """``[B,C,T,H,W]`` -> ``[B, t*h*w, p*p*pf*C]``: tubelets in (t, h, w) order, each flattened
    as (row-in-patch, column-in-patch, frame-in-tubelet, channel), the reference's ordering.

    ``dilation`` d first keeps rows and columns 0, d, 2d, ... (what the reference's nearest
    interpolation to H/d x W/d selects when d divides H and W).
    """
    if dilation != 1:
        video = video[..., ::dilation, ::dilation]
    b, c, t, h, w = video.shape
    p, pf = patch_size, frame_patch_size
    x = video.reshape(b, c, t // pf, pf, h // p, p, w // p, p)
    x = x.permute(0, 2, 4, 6, 5, 7, 3, 1)  # b, t, h, w, p1, p2, pf, c
    return x.reshape(b, (t // pf) * (h // p) * (w // p), p * p * pf * c)


def multiscale_tokens_ref(
    video: torch.Tensor,
    cls_token: torch.Tensor,
    scales: Sequence[ScaleParams],
    *,
    patch_size: int,
    frame_patch_size: int,
    dilations: Sequence[int],
    frame_index: torch.Tensor | None = None,
    eps: float = LN_EPS,
) -> torch.Tensor:
    """Video -> ``[B, 1 + sum_i n_i, D]``: cls, then the tokens of scale 0, 1, ... in (t, h, w) order.

    ``video`` is ``[B,C,T,H,W]`` (uint8 or float, 0..255, not normalised) or, with
    ``frame_index`` ``[B,T]``, a frame store ``[N,C,H,W]`` read by :func:`gather_clip` (entry
    ``i``: frame ``i``; ``~i``: frame ``i`` mirrored; clamped into ``[0, N-1]``).
    Pixels are cast to the parameters' dtype (exact for uint8 -> fp32); under autocast the
    LayerNorms stay in fp32 and the projection runs in the autocast dtype. The cls token gets
    row 0 of scale 0's position embedding, as in the reference (cls concat, then add).
    """
    if frame_index is not None:
        video = gather_clip(video, frame_index)
    dtype = cls_token.dtype
    out = [None]
    for i, (p, d) in enumerate(zip(scales, dilations)):
        x = tubelets(video, patch_size, frame_patch_size, d).to(dtype)
        x = patch_embed_ref(x, p, eps)
        pos = p.pos_embedding[:, 1:] if i == 0 else p.pos_embedding
        out.append(x + pos.to(x.dtype))
    b = out[1].shape[0]
    cls = (cls_token + scales[0].pos_embedding[:, :1]).to(out[1].dtype)
    out[0] = cls.expand(b, -1, -1)
    return torch.cat(out, dim=1)


TOKENIZE_BACKENDS = ("auto", "triton", "torch")


def multiscale_tokens(video, cls_token, scales, *, backend: str = "auto", **kw) -> torch.Tensor:
    """Dispatch point for the video tokenizer; same arguments as :func:`multiscale_tokens_ref`.

    ``backend``: "auto" runs the fused Triton kernel (``fmfast.kernels.tokenize``, one launch for
    all scales, parameter gradients only: the video is data) on CUDA tensors and the reference
    elsewhere or when a gradient to the video is wanted; "triton" forces the kernel (on CPU it needs TRITON_INTERPRET=1, for tests);
    "torch" forces the reference. Both read frame tables alike (see :func:`gather_clip`): a
    negative entry ``~i`` is frame ``i`` mirrored, not an index to clamp.
    """
    if backend not in TOKENIZE_BACKENDS:
        raise ValueError(f"fmfast.ops.tokenize: backend must be one of {TOKENIZE_BACKENDS}, got {backend!r}")
    wants_video_grad = video.requires_grad and torch.is_grad_enabled()  # the kernel has none
    if backend == "triton" or (backend == "auto" and video.device.type == "cuda" and not wants_video_grad):
        from fmfast.kernels.tokenize import multiscale_tokenize  # imports triton: only when used

        return multiscale_tokenize(video, cls_token, scales, **kw)
    return multiscale_tokens_ref(video, cls_token, scales, **kw)


def current_tokens_ref(current: torch.Tensor, cls_token: torch.Tensor, p: ScaleParams, eps: float = LN_EPS) -> torch.Tensor:
    """Current ``[B,L,C]`` -> ``[B, 1+L, D]``: cls, then one token per time step, plus positions."""
    x = patch_embed_ref(current.to(cls_token.dtype), p, eps)
    x = torch.cat([cls_token.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
    return x + p.pos_embedding.to(x.dtype)

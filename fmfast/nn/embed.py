"""Tokenizers: multiscale video tubelets and current time steps, with cls token and positions.

Each scale is ``LayerNorm(patch) -> Linear -> LayerNorm(dim)``, then a learnable position
embedding is added. Tubelets are flattened in the reference's order ``(p1, p2, pf, c)``
(row-in-patch, column-in-patch, frame-in-tubelet, channel), which the published weights need.
The video tokenizer dispatches on its ``backend``: the fused Triton kernel
(``fmfast.kernels.tokenize.multiscale_tokenize``, one launch for all scales) or its plain-PyTorch
twin ``multiscale_tokenize_ref``, which is the reference math."""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fmfast.kernels import cpu_patch_norm
from fmfast.nn.backend import Dispatching, check_backend, implementation

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


def multiscale_tokens(video: torch.Tensor, cls_token: torch.Tensor, scales: Sequence[ScaleParams], *,
                      backend: str = "auto", **kw) -> torch.Tensor:
    """Video ``[B,C,T,H,W]`` (or a frame store ``[N,C,H,W]`` with ``frame_index=[B,T]``) ->
    ``[B, 1 + sum_i n_i, D]``; the arguments are ``fmfast.kernels.tokenize.multiscale_tokenize``'s.

    The fast path has gradients for the parameters only (the video is data): under "auto" a
    video that wants a gradient runs the reference, under "fast" it is an error. Both read frame tables alike: an entry ``~i`` is frame
    ``i`` mirrored along W, and entries are clamped into ``[0, N-1]``."""
    from fmfast.kernels import tokenize  # imports Triton, which the reference twin sits beside

    check_backend(backend)
    wants_video_grad = video.requires_grad and torch.is_grad_enabled()
    impl = implementation(backend, video.device)
    if impl == "triton" and (backend == "fast" or not wants_video_grad):
        return tokenize.multiscale_tokenize(video, cls_token, scales, **kw)
    # bf16 inference on a CPU: the tubelet LayerNorm in fmfast's C kernel where it runs (see
    # fmfast.kernels.cpu_patch_norm); under torch.compile otherwise the fused path writes it out by
    # dims, which inductor vectorises; eagerly F.layer_norm is faster (see multiscale_tokenize_ref)
    patch_dim = scales[0][0].shape[0]
    fast_norm = (impl == "fused" and kw.get("frame_index") is None and cpu_patch_norm.takes(video, patch_dim))
    compiled = impl == "fused" and torch.compiler.is_compiling()
    return tokenize.multiscale_tokenize_ref(video, cls_token, scales, for_compiler=compiled,
                                            patch_norm=cpu_patch_norm.patch_norm if fast_norm else None, **kw)


def current_tokens(current: torch.Tensor, cls_token: torch.Tensor, p: ScaleParams, eps: float = LN_EPS) -> torch.Tensor:
    """Current ``[B,L,C]`` -> ``[B, 1+L, D]``: cls, then one token per time step, plus positions."""
    x = F.layer_norm(current.to(cls_token.dtype), p.norm_in_weight.shape, p.norm_in_weight, p.norm_in_bias, eps)
    x = F.linear(x, p.proj_weight, p.proj_bias)
    x = F.layer_norm(x, p.norm_out_weight.shape, p.norm_out_weight, p.norm_out_bias, eps)
    x = torch.cat([cls_token.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
    return x + p.pos_embedding.to(x.dtype)


def _hw(frame_hw) -> tuple[int, int]:
    return (frame_hw, frame_hw) if isinstance(frame_hw, int) else (int(frame_hw[0]), int(frame_hw[1]))


class TubeletScale(nn.Module):
    """Weights of one video scale: LayerNorm(patch_dim) -> Linear -> LayerNorm(dim), + positions."""

    def __init__(self, patch_dim: int, dim: int, num_pos: int):
        super().__init__()
        self.norm_in = nn.LayerNorm(patch_dim)
        self.proj = nn.Linear(patch_dim, dim)
        self.norm_out = nn.LayerNorm(dim)
        self.pos_embedding = nn.Parameter(torch.randn(1, num_pos, dim))

    def params(self) -> ScaleParams:
        return ScaleParams(
            self.norm_in.weight, self.norm_in.bias, self.proj.weight, self.proj.bias,
            self.norm_out.weight, self.norm_out.bias, self.pos_embedding,
        )


class MultiscaleTubeletEmbed(Dispatching, nn.Module):
    """Video ``[B,C,T,H,W]`` (uint8 or float 0..255) -> tokens ``[B, 1 + sum_i n_i, D]``.

    Scale i tokenizes the clip subsampled by ``dilations[i]`` (rows/columns 0, d, 2d, ...) into
    ``pf x p x p`` tubelets with its own weights; ``n_i = T/pf * H/(d p) * W/(d p)``. Output order:
    cls token, then the scales' tokens, each in (t, h, w) order. Scale 0's position embedding
    has ``1 + n_0`` rows (row 0 is the cls token's), the others ``n_i``, as in the reference.

    Supported: H, W divisible by ``d * p`` for every dilation d, T divisible by ``pf``, and the
    input's C, T, H, W equal to the constructor's. ``forward(store, frame_index)`` reads the clip
    from a frame store ``[N,C,H,W]`` uint8 with a ``[B,T]`` int64 frame table (entry ``i``: frame
    ``i``; ``~i`` = -1-i: frame ``i`` mirrored along W, how training flips are asked for).

    ``backend`` (see ``fmfast.nn.backend``): the fused Triton tokenizer or its plain-PyTorch
    twin (same results, see :func:`multiscale_tokens`).
    """

    def __init__(
        self,
        frame_hw: int | tuple[int, int],
        num_frames: int,
        patch_size: int,
        frame_patch_size: int,
        dim: int,
        channels: int = 3,
        dilations: Sequence[int] = (1, 2),
        backend: str = "auto",
    ):
        super().__init__()
        self.backend = check_backend(backend)
        h, w = _hw(frame_hw)
        p, pf = patch_size, frame_patch_size
        dilations = tuple(int(d) for d in dilations)
        if not dilations or dilations[0] != 1 or any(d < 1 for d in dilations):
            raise ValueError(f"dilations must start with 1 and be positive, got {dilations}")
        if num_frames % pf:
            raise ValueError(f"num_frames {num_frames} must be divisible by frame_patch_size {pf}")
        for d in dilations:
            if h % (d * p) or w % (d * p):
                raise ValueError(
                    f"frame size {h}x{w} must be divisible by dilation*patch_size = {d}*{p} for dilation {d}"
                )
        self.frame_hw, self.num_frames, self.channels = (h, w), num_frames, channels
        self.patch_size, self.frame_patch_size, self.dilations, self.dim = p, pf, dilations, dim
        t = num_frames // pf
        self.grids = tuple((t, h // (d * p), w // (d * p)) for d in dilations)
        self.num_tokens = tuple(a * b * c for a, b, c in self.grids)
        patch_dim = channels * p * p * pf
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.scales = nn.ModuleList(
            TubeletScale(patch_dim, dim, n + (1 if i == 0 else 0)) for i, n in enumerate(self.num_tokens)
        )

    @property
    def seq_len(self) -> int:
        return 1 + sum(self.num_tokens)

    def _check(self, video: torch.Tensor, frame_index: torch.Tensor | None) -> None:
        c, (h, w), t = self.channels, self.frame_hw, self.num_frames
        if frame_index is None:
            if video.dim() != 5 or tuple(video.shape[1:]) != (c, t, h, w):
                raise ValueError(
                    f"video: expected shape [B, {c}, {t}, {h}, {w}] (uint8 or float 0..255), got {list(video.shape)}"
                )
            return
        if video.dim() != 4 or tuple(video.shape[1:]) != (c, h, w):
            raise ValueError(f"frame store: expected shape [N, {c}, {h}, {w}], got {list(video.shape)}")
        if frame_index.dim() != 2 or frame_index.shape[1] != t:
            raise ValueError(f"frame_index: expected shape [B, {t}], got {list(frame_index.shape)}")
        if frame_index.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"frame_index: expected an integer (int64) tensor, got {frame_index.dtype}")

    def forward(self, video: torch.Tensor, frame_index: torch.Tensor | None = None) -> torch.Tensor:
        self._check(video, frame_index)
        return multiscale_tokens(
            video, self.cls_token, [s.params() for s in self.scales],
            patch_size=self.patch_size, frame_patch_size=self.frame_patch_size,
            dilations=self.dilations, frame_index=frame_index, backend=self.backend,
        )


class CurrentEmbed(nn.Module):
    """Current ``[B, L, C]`` -> ``[B, 1+L, D]``: cls, then one token per time step, + positions."""

    def __init__(self, length: int, channels: int, dim: int):
        super().__init__()
        self.length, self.channels, self.dim = length, channels, dim
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.norm_in = nn.LayerNorm(channels)
        self.proj = nn.Linear(channels, dim)
        self.norm_out = nn.LayerNorm(dim)
        self.pos_embedding = nn.Parameter(torch.randn(1, 1 + length, dim))

    @property
    def seq_len(self) -> int:
        return 1 + self.length

    def forward(self, current: torch.Tensor) -> torch.Tensor:
        if current.dim() != 3 or tuple(current.shape[1:]) != (self.length, self.channels):
            raise ValueError(f"current: expected shape [B, {self.length}, {self.channels}], got {list(current.shape)}")
        p = ScaleParams(
            self.norm_in.weight, self.norm_in.bias, self.proj.weight, self.proj.bias,
            self.norm_out.weight, self.norm_out.bias, self.pos_embedding,
        )
        return current_tokens(current, self.cls_token, p)

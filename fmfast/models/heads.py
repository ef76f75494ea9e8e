"""Output heads with the reference's module names (``head.mlp_head1.0``, ``head.decode1.1.conv1`` ...)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def pool_tokens(x: torch.Tensor, pool: str) -> torch.Tensor:
    return x.mean(dim=1) if pool == "mean" else x[:, 0]


class ClassificationHead(nn.Module):
    """``LN -> Linear`` on each stream's pooled token; the logits are summed.

    Single-stream models (the video ViT) call it with ``x2=None``; ``mlp_head2`` then goes
    unused but stays, because the reference model has it (parameter count, state_dict keys).
    """

    def __init__(self, pool: str, dim: int, num_classes: int):
        super().__init__()
        self.pool = pool
        self.mlp_head1 = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))
        self.mlp_head2 = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor | None = None) -> torch.Tensor:
        out = self.mlp_head1(pool_tokens(x1, self.pool))
        if x2 is not None:
            out = out + self.mlp_head2(pool_tokens(x2, self.pool))
        return out


class TokensToMap(nn.Module):
    """``[B, t*h*w, C]`` -> ``[B, t*C, h, w]`` (frames stacked on channels, t-major)."""

    def __init__(self, t: int, h: int, w: int):
        super().__init__()
        self.t, self.h, self.w = t, h, w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        x = x.reshape(b, self.t, self.h, self.w, c).permute(0, 1, 4, 2, 3)
        return x.reshape(b, self.t * c, self.h, self.w)


class ResidualConvUnit(nn.Module):
    """``relu(x) + conv3x3(bn(relu(x)))``.

    The reference writes ``x + conv(bn(relu(x)))`` but its ReLU is ``inplace=True`` and
    overwrites ``x`` first, so the skip path carries ``relu(x)``; trained checkpoints expect that.
    """

    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, stride=1, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)
        return self.conv1(self.bn1(x)) + x


def _up(cin: int, cout: int) -> nn.Sequential:
    """2x upsampling stage: transposed conv 2x2/2, then a residual conv unit."""
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, kernel_size=2, stride=2, bias=True), ResidualConvUnit(cout))


class SegmentationHead(nn.Module):
    """Video tokens (cls first) -> ``[B, num_classes, 8h, 8w]`` logits.

    The standard tokens become a ``(t*dim) x h x w`` map -> 1x1 conv to ``dim``; the dilated
    tokens (grid h/2 x w/2) likewise, then 2x up; the two maps are added, then three 2x stages.
    """

    def __init__(self, dim: int, t: int, h: int, w: int, num_classes: int,
                 hidden_dims=(128, 64, 32), dilated: bool = True):
        super().__init__()
        self.num_patches = t * h * w
        self.dilated = dilated
        self.de_patch_embedding = nn.Sequential(TokensToMap(t, h, w), nn.Conv2d(t * dim, dim, kernel_size=1))
        if dilated:
            self.de_patch_embedding_dilated = nn.Sequential(
                TokensToMap(t, h // 2, w // 2), nn.Conv2d(t * dim, dim, kernel_size=1)
            )
            self.decode_dilated = _up(dim, dim)
        h0, h1, h2 = hidden_dims
        self.decode1 = _up(dim, h0)
        self.decode2 = _up(h0, h1)
        self.decode3 = _up(h1, h2)
        self.decode_out = nn.Conv2d(h2, num_classes, kernel_size=1)

    def forward(self, tokens: torch.Tensor, *unused) -> torch.Tensor:
        tokens = tokens[:, 1:]  # drop cls
        x = self.de_patch_embedding(tokens[:, : self.num_patches])
        if self.dilated:
            x = x + self.decode_dilated(self.de_patch_embedding_dilated(tokens[:, self.num_patches :]))
        return self.decode_out(self.decode3(self.decode2(self.decode1(x))))

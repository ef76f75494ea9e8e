"""Model configuration. Defaults are the paper's FmFormer (Wu et al., TCSVT 2025)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

TASKS = ("classification", "segmentation")


@dataclass
class ModelConfig:
    task: str = "classification"
    num_classes: int = 2
    # video: [B, 3, T, H, W]; H and W are the two spatial axes as stored: h5py reads the MATLAB
    # files with axes reversed ([T, C, W, H]) and the reference feeds them untransposed, so
    # published checkpoints expect that order; transpose only to display
    image_size: int | tuple[int, int] = 64
    num_frames: int = 10
    channels: int = 3
    patch_size: int = 8  # spatial tubelet side
    frame_patch_size: int = 2  # frames per tubelet
    dilated_tokens: bool = True  # the "multiscale" dilation-2 tokens (reference: ADDITIONAL_TOKENS)
    # transformer
    dim: int = 96
    depth: int = 6
    heads: int = 3
    dim_head: int = 32
    mlp_dim: int = 384
    pool: str = "cls"
    # current: [B, current_len, current_channels] (2 samples/s x 120 s, phases A, B, C)
    current_len: int = 240
    current_channels: int = 3
    # segmentation decoder widths
    seg_hidden_dims: tuple[int, int, int] = (128, 64, 32)

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {self.pool!r}")
        if isinstance(self.image_size, list):
            self.image_size = tuple(self.image_size)
        self.seg_hidden_dims = tuple(self.seg_hidden_dims)
        h, w = self.frame_hw
        p, pf = self.patch_size, self.frame_patch_size
        if h % p or w % p:
            raise ValueError(f"frame size {h}x{w} must be divisible by patch_size {p}")
        if self.num_frames % pf:
            raise ValueError(f"num_frames {self.num_frames} must be divisible by frame_patch_size {pf}")
        if self.dilated_tokens and ((h // 2) % p or (w // 2) % p):
            raise ValueError(f"dilated tokens need the half-size frame {h // 2}x{w // 2} divisible by patch_size {p}")

    @property
    def frame_hw(self) -> tuple[int, int]:
        s = self.image_size
        return (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))

    @property
    def grid(self) -> tuple[int, int, int]:
        """(t, h, w) token grid of the standard video tokens."""
        h, w = self.frame_hw
        return self.num_frames // self.frame_patch_size, h // self.patch_size, w // self.patch_size

    @property
    def num_video_tokens(self) -> int:
        """Video stream length: cls + standard tokens (+ dilated tokens)."""
        t, h, w = self.grid
        n = 1 + t * h * w
        if self.dilated_tokens:
            n += t * (h // 2) * (w // 2)
        return n

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)

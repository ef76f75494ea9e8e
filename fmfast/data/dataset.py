"""FMFDataset: the FMF benchmark as tensors, gathered a whole batch at a time.

Sample ``i`` is a labelled frame ``f`` of one recording:

- clip ``[3, T, W, H]`` uint8: frames ``f-(T-1)s .. f`` (clamped at 0), axes as h5py reads them;
- current ``[2S, 3]`` float32: the rows of the S seconds ending at f's second (window.py);
- label: int64 class (1 if any mask pixel of frame f is > 0), or the int64 ``[W, H]`` 0/1 mask.

In training mode clip and mask are flipped on their last axis (H) with p = 0.5, as the
reference's HorizontalFlip does (``x[..., ::-1]``). The decision for sample i in epoch e is a
fixed function of (seed, e, i); ``set_epoch`` picks the epoch.

Storage: one frame store ``frames [N, 3, W, H]`` uint8 for all recordings (recording r's
frames are rows ``frame_offsets[r]:frame_offsets[r+1]``). ``frame_index`` gives a flipped
sample's frames as ``~i`` (= -1-i), which the tokenizer (``fmfast.data.gather.gather_clip``,
the Triton kernel) reads mirrored: flips need no mirrored copy of the store, on the host or
the GPU. ``batch`` is the one gather; ``ds[i]`` is ``batch([i])``'s only sample.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from fmfast.errors import DataError

from .gather import flip_rows
from .v1 import load_v1
from .v2 import is_v2, load_v2
from .window import clip_offsets, resample_table

TASKS = ("classification", "segmentation")
SPLITS = ("train", "test")

Indices = int | Sequence[int] | np.ndarray | torch.Tensor


class FMFDataset:
    def __init__(self, root: str | Path, split: str = "train", num_frames: int = 10, stride: int = 1,
                 current_seconds: int = 120, task: str = "classification", train: bool | None = None,
                 seed: int = 0):
        if split not in SPLITS:
            raise ValueError(f"FMFDataset: split must be one of {SPLITS}, got {split!r}")
        if task not in TASKS:
            raise ValueError(f"FMFDataset: task must be one of {TASKS}, got {task!r}")
        for arg, v in (("num_frames", num_frames), ("stride", stride), ("current_seconds", current_seconds)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"FMFDataset: {arg} must be a positive int, got {v!r}")
        self.root = Path(root)
        if not self.root.exists():
            raise DataError(self.root, "dataset not found")
        self.split, self.task = split, task
        self.num_frames, self.stride, self.current_seconds = num_frames, stride, current_seconds
        self.train = split == "train" if train is None else bool(train)
        self.seed, self.epoch = int(seed), 0

        self.layout = "v2" if is_v2(self.root) else "v1"
        load = load_v2 if self.layout == "v2" else load_v1
        c = load(self.root, split, masks=task == "segmentation")
        self.names = c.names
        self.frames = c.frames                        # [N, 3, W, H] uint8
        self.masks = c.masks                          # [N, W, H] uint8 or None
        self.currents = c.currents                    # [rows, 3] float32
        self.frame_offsets = torch.from_numpy(c.frame_offsets)
        self.row_offsets = torch.from_numpy(c.row_offsets)
        self.num_store_frames = int(c.frame_offsets[-1])  # N

        # Per-sample index, precomputed so that a batch is pure tensor gathers.
        rec, frame = c.sample_recording, c.sample_frame
        first = c.frame_offsets[rec]
        end = c.row_end[first + frame]
        n = np.minimum(end - c.row_offsets[rec], 2 * current_seconds)
        self.sample_recording = torch.from_numpy(rec)
        self.sample_frame = torch.from_numpy(frame)
        self._first = torch.from_numpy(first)          # clamp floor of the clip (frame 0 of its recording)
        self._gframe = torch.from_numpy(first + frame)  # labelled frame, index into frames
        self._cur_n = torch.from_numpy(n)              # history rows available (<= 2S)
        self._cur_start = torch.from_numpy(end - n)
        self._back = clip_offsets(num_frames, stride)
        self._table = resample_table(2 * current_seconds)
        self.labels = torch.from_numpy(c.frame_labels[first + frame].astype(np.int64))
        self.flips = torch.zeros(len(rec), dtype=torch.bool)
        self.frames_per_row = _frames_per_row(c.row_end, c.frame_offsets)  # [R], for guard gaps (splits.py)
        # host copies for sample_key and len: numpy scalars are far cheaper than tensor items
        self._h_rec, self._h_frame = rec, frame
        self.set_epoch(0)

    # ---- sampling state ----------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's flips: a fixed function of (seed, epoch, sample index)."""
        self.epoch = int(epoch)
        if self.train:
            flips = np.random.default_rng([self.seed, self.epoch]).random(len(self)) < 0.5
            self.flips = torch.from_numpy(flips).to(self.device)

    @property
    def device(self) -> torch.device:
        return self.frames.device

    def to(self, device) -> "FMFDataset":
        """Move the stores and the sample index; batches are then gathered on ``device``."""
        for k, v in vars(self).items():
            if isinstance(v, torch.Tensor):
                setattr(self, k, v.to(device))
        return self

    def subset(self, indices: Indices, train: bool) -> "FMFDataset":
        """The samples ``indices`` (in that order) as a dataset of their own, sharing the frame,
        mask and current stores (no copy); ``train`` decides whether it flips."""
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        out = copy.copy(self)
        for k in ("sample_recording", "sample_frame", "_first", "_gframe", "_cur_n", "_cur_start", "labels"):
            setattr(out, k, getattr(self, k)[idx.to(self.device)])
        out._h_rec, out._h_frame = self._h_rec[idx.numpy()], self._h_frame[idx.numpy()]
        out.train, out.flips = bool(train), torch.zeros(len(idx), dtype=torch.bool, device=self.device)
        out.set_epoch(self.epoch)
        return out

    def __len__(self) -> int:
        return len(self._h_frame)

    def sample_key(self, i: int) -> tuple[str, int]:
        """(recording name, labelled frame index) of sample i."""
        i = self._check(i)
        return self.names[int(self._h_rec[i])], int(self._h_frame[i])

    def __getitem__(self, i: int):
        """(clip [3,T,W,H] uint8, current [2S,3] float32, label): sample i of :meth:`batch`."""
        clip, current, label = self.batch([self._check(i)])
        return clip[0], current[0], label[0]

    # ---- a whole batch, vectorised -----------------------------------------------------
    def frame_index(self, indices: Indices) -> torch.Tensor:
        """``[B, T]`` indices into ``frames`` of each sample's clip; a flipped sample's as ``~i``
        (read mirrored by ``fmfast.data.gather.gather_clip`` and the tokenizer kernel)."""
        idx = self._index(indices)
        g = self._clip_frames(idx)
        return torch.where(self.flips[idx, None], -1 - g, g)

    def current_index(self, indices: Indices) -> torch.Tensor:
        """``[B, 2S]`` indices into ``currents`` of each sample's current window."""
        idx = self._index(indices)
        return self._cur_start[idx, None] + self._table.index_select(0, self._cur_n[idx] - 1)

    def batch(self, indices: Indices):
        """(clips [B,3,T,W,H] uint8, currents [B,2S,3] float32, labels [B] or [B,W,H] int64),
        gathered on the dataset's device."""
        idx = self._index(indices)
        g = self._clip_frames(idx)
        B, T = g.shape
        _, C, W, H = self.frames.shape
        # One row gather straight into [B, C, T] order: row (g*C + c) of the [N*C, W*H] plane view.
        rows = (g[:, None, :] * C + torch.arange(C, device=g.device)[None, :, None]).reshape(-1)
        clips = _planes(self.frames).index_select(0, rows).view(torch.uint8).view(B, C, T, W, H)
        return flip_rows(clips, self.flips[idx]), self._currents(idx), self._labels(idx)

    def inputs(self, indices: Indices):
        """(frame_index [B,T], currents, labels): :meth:`batch` with the clips left in the store
        (``fmfast.data.gather.gather_clip(ds.frames, frame_index)`` builds them; the Triton
        tokenizer reads the table itself). No host sync: on a GPU-resident dataset this can run
        inside a captured CUDA graph whose only input is ``indices``."""
        idx = self._index(indices)
        return self.frame_index(idx), self._currents(idx), self._labels(idx)

    # ---- helpers -------------------------------------------------------------------------
    def _currents(self, idx: torch.Tensor) -> torch.Tensor:
        return self.currents.index_select(0, self.current_index(idx).reshape(-1)).view(len(idx), -1, 3)

    def _labels(self, idx: torch.Tensor) -> torch.Tensor:
        if self.task == "classification":
            return self.labels.index_select(0, idx)
        _, W, H = self.masks.shape  # the labelled frame's mask, flipped with its clip
        masks = _planes(self.masks.unsqueeze(1)).index_select(0, self._gframe[idx]).view(torch.uint8).view(-1, W, H)
        return flip_rows(masks, self.flips[idx]).long()

    def _clip_frames(self, idx: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` store indices of the clips' frames, clamped at each recording's frame 0."""
        return torch.maximum(self._gframe[idx, None] - self._back, self._first[idx, None])

    def _check(self, i) -> int:
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"FMFDataset: sample {i} out of range for {n} samples")
        return i % n

    def _index(self, indices: Indices) -> torch.Tensor:
        idx = torch.as_tensor(indices, dtype=torch.int64, device=self.device).reshape(-1)
        n = len(self)
        if idx.device.type == "cpu" and len(idx) and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"FMFDataset: sample indices must lie in [-{n}, {n}), got {idx.min()}..{idx.max()}")
        return idx % n

    def __repr__(self) -> str:
        return (f"FMFDataset(root={str(self.root)!r}, layout={self.layout}, split={self.split!r}, task={self.task!r}, "
                f"samples={len(self)}, recordings={len(self.names)}, frames={self.num_store_frames}, "
                f"frame_shape={tuple(self.frames.shape[1:])}, num_frames={self.num_frames}, stride={self.stride}, "
                f"current_seconds={self.current_seconds}, train={self.train}, device={self.device})")


def _frames_per_row(row_end: np.ndarray, frame_offsets: np.ndarray) -> np.ndarray:
    """``[R]`` frames per current row of each recording, from the span of frames and of rows its
    frames end their current windows at (V2: fps/2, rows come in pairs per second; V1: 1)."""
    rates = np.ones(len(frame_offsets) - 1)
    for r in range(len(rates)):
        ends = row_end[frame_offsets[r]:frame_offsets[r + 1]]
        have = np.flatnonzero(ends >= 0)
        if len(have) > 1 and ends[have[-1]] > ends[have[0]]:
            rates[r] = (have[-1] - have[0]) / (ends[have[-1]] - ends[have[0]])
        elif len(have):
            rates[r] = len(have)
    return rates


def _planes(store: torch.Tensor) -> torch.Tensor:
    """A ``[N, C, W, H]`` uint8 store as ``[N*C, W*H]`` rows, viewed as int64 words when the
    row length allows (a row gather of 8-byte words is several times faster than of bytes)."""
    n, c, w, h = store.shape
    planes = store.view(n * c, w * h)
    return planes.view(torch.int64) if (w * h) % 8 == 0 else planes

"""What a layout reader hands the dataset: every recording's frames, masks and currents in
concatenated stores, plus the labelled samples of one split."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import matfile
from fmfast.errors import DataError


@dataclass
class Corpus:
    names: list[str]              # recordings, ordered by name
    frame_offsets: np.ndarray     # [R + 1] int64: recording r owns frames [off[r], off[r+1])
    frames: torch.Tensor          # [N, 3, W, H] uint8, all recordings concatenated
    masks: torch.Tensor | None    # [N, W, H] uint8 in {0, 1}, segmentation only
    frame_labels: np.ndarray      # [N] uint8: 1 if any mask pixel of the frame is > 0
    currents: torch.Tensor        # [rows, 3] float32, all recordings concatenated
    row_offsets: np.ndarray       # [R + 1] int64: recording r owns rows [off[r], off[r+1])
    row_end: np.ndarray           # [N] int64: one past the last current row of each frame's second
    sample_recording: np.ndarray  # [M] int64
    sample_frame: np.ndarray      # [M] int64, frame index within its recording


def allocate(shapes: list[tuple[int, ...]]) -> tuple[torch.Tensor, np.ndarray]:
    """One uint8 tensor for several first-axis-concatenated arrays, and the offsets of each part."""
    counts = [s[0] for s in shapes]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return torch.empty((int(offsets[-1]), *shapes[0][1:]), dtype=torch.uint8), offsets


def check_split_indices(path, name: str, indices, n: int) -> np.ndarray:
    """A split file's labelled frame list for one recording, as int64, checked against ``n`` frames."""
    if not isinstance(indices, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise DataError(path, f"'{name}': expected a list of integer frame indices")
    for i in indices:  # before the int64 conversion, which overflows on 10**30
        if not 0 <= i < n:
            raise DataError(path, f"'{name}': frame {i} out of range (recording has {n} frames)")
    a = np.asarray(indices, dtype=np.int64).reshape(-1)
    return a


def read_stores(files: list, data_key: str, shapes: list[tuple[int, ...]], masks: bool):
    """Bulk-read every recording's frames (and masks) straight into concatenated stores.

    Returns (frames, frame_offsets [R+1], masks or None, frame_labels [N]); frames is
    [N,3,W,H] uint8 and masks [N,W,H] uint8 in {0,1}, each frame once (training flips are read
    mirrored by index, see ``FMFDataset.frame_index``). The class label of a frame is 1 when any
    mask pixel is > 0.
    """
    frames, offsets = allocate(shapes)
    mask_store = allocate([s[:1] + s[2:] for s in shapes])[0] if masks else None
    frame_labels = np.empty(len(frames), dtype=np.uint8)
    for r, path in enumerate(files):
        a, b = offsets[r], offsets[r + 1]
        with matfile.open_mat(path) as f:
            matfile.read_into(matfile.dataset(f, path, data_key, 4), frames[a:b].numpy())
            if mask_store is not None:
                m = mask_store[a:b].numpy()
                matfile.read_into(matfile.dataset(f, path, "label", 3), m)
                frame_labels[a:b] = (m.reshape(len(m), -1) > 0).any(axis=1)
                np.minimum(m, 1, out=m)
            else:
                frame_labels[a:b] = matfile.any_positive(matfile.dataset(f, path, "label", 3))
    return frames, offsets, mask_store, frame_labels


def samples(labelled: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(recording, frame) of every labelled frame, recordings in order."""
    rec = np.concatenate([np.full(len(l), r, dtype=np.int64) for r, l in enumerate(labelled)])
    return rec, np.concatenate(labelled).astype(np.int64)

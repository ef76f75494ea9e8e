"""Reader for the FMF-Benchmark V1 layout: one MATLAB v7.3 .mat per recording holding

    video             MATLAB [H, W, 3, N] -> h5py [N, 3, W, H] uint8
    current           MATLAB [3, N]       -> h5py [N, 3]  (one sample per frame)
    label             MATLAB [H, W, N]    -> h5py [N, W, H] (>0 = abnormal)
    train_test_index  MATLAB [1, N]       -> h5py [N, 1]  (0 = train, 1 = test)

Clips therefore come out as [3, T, W, H], the same order as V2. V1 has no timestamps: the
current log is one row per frame, so frame f's history ends at row f (inclusive) and the
window is the 2S rows up to it, stretched like V2 when shorter (see window.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import matfile
from .corpus import Corpus, read_stores, samples
from .csvfiles import F32_MAX
from fmfast.errors import DataError

SPLIT_CODE = {"train": 0, "test": 1}


def v1_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    files = sorted(root.glob("*.mat"), key=lambda p: p.stem)
    if not files:
        raise DataError(root, "no V1 .mat files (and no videos/ folder of the V2 layout)")
    return files


def load_v1(root: Path, split: str, masks: bool) -> Corpus:
    files = v1_files(root)
    shapes, currents, labelled = [], [], []
    for path in files:
        with matfile.open_mat(path) as f:
            video = matfile.dataset(f, path, "video", 4)
            label = matfile.dataset(f, path, "label", 3)
            cur = matfile.dataset(f, path, "current", 2)
            index = matfile.dataset(f, path, "train_test_index", 2)
            n, c, w, h = video.shape
            if c != 3 or n == 0:
                raise DataError(path, f"'video' has shape {video.shape}, expected [N, 3, W, H] (MATLAB [H, W, 3, N])")
            if label.shape != (n, w, h):
                raise DataError(path, f"'label' has shape {label.shape}, expected {(n, w, h)} to match 'video'")
            if cur.shape != (n, 3):
                raise DataError(path, f"'current' has shape {cur.shape}, expected {(n, 3)} (MATLAB [3, N])")
            if index.size != n:
                raise DataError(path, f"'train_test_index' has {index.size} entries, expected {n}")
            if shapes and video.shape[1:] != shapes[0][1:]:
                raise DataError(path, f"frame shape {video.shape[1:]} differs from {files[0].name}'s {shapes[0][1:]}")
            values = matfile.read_all(cur, np.float64)
            bad = ~np.isfinite(values).all(axis=1)
            if bad.any():
                raise DataError(path, f"'current' is NaN or infinite at frame {int(np.argmax(bad))}")
            big = (np.abs(values) > F32_MAX).any(axis=1)
            if big.any():
                raise DataError(path, f"'current' out of range at frame {int(np.argmax(big))} "
                                      f"({values[int(np.argmax(big))].tolist()}; float32 holds at most {F32_MAX:.3g})")
            codes = matfile.read_all(index).reshape(-1)
            if not np.isin(codes, (0, 1)).all():
                raise DataError(path, "'train_test_index' must hold only 0 (train) and 1 (test)")
        shapes.append(video.shape)
        currents.append(values.astype(np.float32))
        labelled.append(np.flatnonzero(codes == SPLIT_CODE[split]).astype(np.int64))

    frames, offsets, mask_store, frame_labels = read_stores(files, "video", shapes, masks)
    rec, frame = samples(labelled)
    if len(rec) == 0:
        raise DataError(root, f"no frames marked {split} ({SPLIT_CODE[split]}) in 'train_test_index'")
    # one current row per frame: frame offsets double as row offsets
    return Corpus(names=[p.stem for p in files], frame_offsets=offsets, frames=frames, masks=mask_store,
                  frame_labels=frame_labels, currents=torch.from_numpy(np.concatenate(currents)),
                  row_offsets=offsets.copy(), row_end=np.arange(1, len(frames) + 1, dtype=np.int64),
                  sample_recording=rec, sample_frame=frame)

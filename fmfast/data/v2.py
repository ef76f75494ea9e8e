"""Reader for the FMF-Benchmark V2 layout (what the reference code reads)::

    <root>/videos/<name>.mat      'data' uint8 [T,3,W,H], 'label' uint8 [T,W,H] (h5py axis order)
    <root>/currents/<name>.csv    header; timestamp, phase A, B, C; 2 rows per second
    <root>/timestamps/<name>.csv  header; one timestamp per frame
    <root>/train.json, test.json  {"<name>.mat": [labelled frame indices]}
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from . import matfile
from .corpus import Corpus, check_split_indices, read_stores, samples
from .csvfiles import read_currents, read_timestamps
from fmfast.errors import DataError

FOLDERS = ("videos", "currents", "timestamps")


def is_v2(root: Path) -> bool:
    return root.is_dir() and (root / "videos").is_dir()


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list) -> dict:
    """json object hook: a key given twice is an error (json keeps the last one silently)."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _read_split(path: Path, names: list[str]) -> dict:
    if not path.is_file():
        raise DataError(path, "split file not found")
    try:
        split = json.loads(path.read_bytes().decode("utf-8-sig"), object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise DataError(path, f"recording '{e.args[0]}' is listed twice (which list is meant is ambiguous)") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise DataError(path, f"not valid JSON ({str(e)[:160]})") from None
    except OSError as e:
        raise DataError(path, f"cannot read the split file ({e.strerror or e})") from None
    if not isinstance(split, dict):
        raise DataError(path, 'expected an object {"<name>.mat": [frame indices]}')
    known = {n + ".mat" for n in names}
    for key in split:
        if key not in known:
            raise DataError(path, f"unknown recording '{key}' (videos/ holds: {sorted(known)})")
    return split


def _frame_rows(ts_path: Path, cur_path: Path, stamps: list[str], seconds: list[str], labelled: np.ndarray,
                row0: int) -> np.ndarray:
    """Global end row of each frame's second (first pair with that timestamp); -1 where absent."""
    first = {}
    for i, s in enumerate(seconds):
        first.setdefault(s, i)
    pair = np.fromiter((first.get(s, -1) for s in stamps), dtype=np.int64, count=len(stamps))
    missing = labelled[pair[labelled] < 0]
    if len(missing):
        f = int(missing[0])
        raise DataError(cur_path, f"no current rows for second '{stamps[f]}' of labelled frame {f} "
                                  f"(from {ts_path.name}); {len(missing)} labelled frames lack currents")
    return np.where(pair >= 0, row0 + 2 * (pair + 1), -1)


def load_v2(root: Path, split: str, masks: bool) -> Corpus:
    for sub in FOLDERS:
        if not (root / sub).is_dir():
            raise DataError(root / sub, "missing folder (V2 layout needs videos/, currents/, timestamps/)")
    names = sorted(p.stem for p in (root / "videos").glob("*.mat"))
    if not names:
        raise DataError(root / "videos", "no .mat files")
    split_path = root / f"{split}.json"
    split_map = _read_split(split_path, names)

    # Pass 1: shapes, timestamps, currents, splits -- every check before the bulk read.
    shapes, stamps_all, seconds_all, currents, labelled_all = [], [], [], [], []
    for name in names:
        mat = root / "videos" / f"{name}.mat"
        with matfile.open_mat(mat) as f:
            data = matfile.dataset(f, mat, "data", 4)
            label = matfile.dataset(f, mat, "label", 3)
            t, c, w, h = data.shape
            if c != 3 or t == 0:
                raise DataError(mat, f"'data' has shape {data.shape}, expected [T, 3, W, H] with T > 0")
            if label.shape != (t, w, h):
                raise DataError(mat, f"'label' has shape {label.shape}, expected {(t, w, h)} to match 'data'")
            if shapes and data.shape[1:] != shapes[0][1:]:
                raise DataError(mat, f"frame shape {data.shape[1:]} differs from {names[0]}.mat's {shapes[0][1:]}")
            shapes.append(data.shape)
        ts_path = root / "timestamps" / f"{name}.csv"
        stamps = read_timestamps(ts_path)
        if len(stamps) != t:
            raise DataError(ts_path, f"{len(stamps)} timestamps but {mat.name} has {t} frames")
        seconds, cur = read_currents(root / "currents" / f"{name}.csv")
        labelled_all.append(check_split_indices(split_path, f"{name}.mat", split_map.get(f"{name}.mat", []), t))
        stamps_all.append(stamps)
        seconds_all.append(seconds)
        currents.append(cur)

    row_offsets = np.concatenate([[0], np.cumsum([len(c) for c in currents])]).astype(np.int64)
    row_end = np.concatenate([
        _frame_rows(root / "timestamps" / f"{n}.csv", root / "currents" / f"{n}.csv", st, se, lab, int(r0))
        for n, st, se, lab, r0 in zip(names, stamps_all, seconds_all, labelled_all, row_offsets)])

    # Pass 2: the bulk read, straight into the concatenated stores.
    mats = [root / "videos" / f"{n}.mat" for n in names]
    frames, frame_offsets, mask_store, frame_labels = read_stores(mats, "data", shapes, masks)
    rec, frame = samples(labelled_all)
    if len(rec) == 0:
        raise DataError(split_path, "no labelled frames")
    return Corpus(names=names, frame_offsets=frame_offsets, frames=frames, masks=mask_store,
                  frame_labels=frame_labels, currents=torch.from_numpy(np.concatenate(currents)),
                  row_offsets=row_offsets, row_end=row_end, sample_recording=rec,
                  sample_frame=frame)

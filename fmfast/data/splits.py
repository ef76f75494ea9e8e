"""The validation split: samples carved out of a train split without leakage.

A sample's inputs reach back one clip span (``num_frames * stride`` frames) and one current
window (``2 * current_seconds`` rows, converted to frames per recording) from its labelled
frame, so a training sample closer than their sum to a validation sample would share inputs
with it. Every carving here keeps training samples at least that **guard gap** (in frames, per
recording) away from every validation sample of the same recording, dropping the ones in it.

- ``carve(ds, fraction)``: the last ``fraction`` of each recording's train samples (a
  contiguous block at the end: validation is later in time than training, as deployment is),
  the guard gap before it. On the synthetic benchmark (``synthetic.json`` beside the splits)
  the block is made of whole event segments, so no event is split between the two. A recording
  too short to keep at least as many training samples as it gives to validation is left whole
  in training (named in the summary).
- ``from_file(ds, path)``: an explicit list, ``{"<name>.mat": [labelled frames]}`` of train
  frames, the same guard gap around them.

Both return ``(train_indices, val_indices, summary)``: int64 arrays into ``ds`` and a dict of
counts for the run log.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from fmfast.errors import DataError


def guard_frames(ds) -> np.ndarray:
    """``[R]`` the guard gap of each recording of ``ds``, in frames."""
    window = np.ceil(2 * ds.current_seconds * np.asarray(ds.frames_per_row) - 1e-9).astype(np.int64)
    return ds.num_frames * ds.stride + window


def carve(ds, fraction: float):
    """The end block of each recording's samples -> ``(train, val, summary)`` (see the module doc)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"carve: fraction must lie in [0, 1), got {fraction}")
    rec, frame = np.asarray(ds._h_rec), np.asarray(ds._h_frame)
    guard, units = guard_frames(ds), _synthetic_segments(ds)
    train, val, skipped = [], [], []
    for r in range(len(ds.names)):
        pos = np.flatnonzero(rec == r)
        pos = pos[np.argsort(frame[pos], kind="stable")]
        want = math.ceil(fraction * len(pos)) if fraction > 0 else 0
        if want == 0:
            train.append(pos)
            continue
        f = frame[pos]
        cut = f[-want]  # the block starts at the want-th sample from the end ...
        starts = units.get(ds.names[r])
        if starts is not None:  # ... or at the start of the segment holding it
            cut = starts[np.searchsorted(starts, cut, side="right") - 1]
        v, t = pos[f >= cut], pos[f <= cut - guard[r]]
        if len(t) < len(v):
            skipped.append(ds.names[r])
            train.append(pos)
        else:
            train.append(t)
            val.append(v)
    return _result(ds, train, val, guard, skipped)


def from_file(ds, path: str | Path):
    """Validation samples listed in ``path`` -> ``(train, val, summary)`` (see the module doc)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "validation split file not found")
    try:
        listed = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(path, f"not valid JSON ({e})") from None
    if not isinstance(listed, dict):
        raise DataError(path, 'expected an object {"<name>.mat": [frame indices]}')
    rec, frame = np.asarray(ds._h_rec), np.asarray(ds._h_frame)
    names = {n + ".mat": r for r, n in enumerate(ds.names)}
    guard, train, val = guard_frames(ds), [], []
    for key in listed:
        if key not in names:
            raise DataError(path, f"unknown recording '{key}' (the data holds: {sorted(names)})")
    for key, r in names.items():
        pos = np.flatnonzero(rec == r)
        frames = listed.get(key, [])
        if not isinstance(frames, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in frames):
            raise DataError(path, f"'{key}': expected a list of integer frame indices")
        want = np.unique(np.asarray(frames, dtype=np.int64))
        is_val = np.isin(frame[pos], want)
        missing = np.setdiff1d(want, frame[pos])
        if len(missing):
            raise DataError(path, f"'{key}': frame {int(missing[0])} is not a sample of the train split")
        v = pos[is_val]
        vf = np.sort(frame[v])
        if len(vf):  # distance of each remaining sample to its nearest validation frame
            j = np.searchsorted(vf, frame[pos])
            near = np.minimum(np.abs(frame[pos] - vf[np.clip(j, 0, len(vf) - 1)]),
                              np.abs(frame[pos] - vf[np.clip(j - 1, 0, len(vf) - 1)]))
            t = pos[near >= guard[r]]
        else:
            t = pos
        train.append(t)
        val.append(v)
    return _result(ds, train, val, guard, [])


def _synthetic_segments(ds) -> dict:
    """Recording name -> sorted segment start frames, for data written by fmfast.data.synthetic."""
    meta = Path(ds.root) / "synthetic.json"
    if not meta.is_file():
        return {}
    try:
        info = json.loads(meta.read_text())
        return {name: np.sort(np.asarray([s["start"] for s in rec["segments"]], dtype=np.int64))
                for name, rec in info["recordings"].items()}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise DataError(meta, f"unreadable segment list ({type(e).__name__}: {e})") from None


def _result(ds, train: list, val: list, guard: np.ndarray, skipped: list):
    t = np.sort(np.concatenate(train)) if train else np.zeros(0, np.int64)
    v = np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)
    summary = {"train": len(t), "val": len(v), "dropped": len(ds) - len(t) - len(v),
               "guard_frames": [int(g) for g in guard], "whole_in_train": skipped}
    return t.astype(np.int64), v.astype(np.int64), summary

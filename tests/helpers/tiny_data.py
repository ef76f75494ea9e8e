"""Tiny FMF datasets for the data tests (the ``tiny_v2`` fixture in tests/conftest.py writes one per session).

``tiny_v2``: two hand-made recordings whose pixel and current values encode where they came
from, so clip frames, current rows and flips can be checked against hand-computed indices:

- frame t of recording r: channel 0 = t, channel 1 = 16*w + h (asymmetric in h), channel 2 = r;
- current row j (local) of recording r: [j, r, 7];
- 10 frames per second. "a" (30 frames, seconds 0..2) has a log from second -2 to 3 (12 rows);
  "b" (20 frames, seconds 0..1) has a log that starts at its first frame's second (seconds 0..2,
  6 rows), so its early samples have short histories;
- frames 12..17 of "a" are abnormal (one mask pixel at w=1, h=0; frame 12's value is 255).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fmfast.data.matfile import write_mat

W, H = 8, 6  # deliberately not square: a swapped axis shows up as a shape error
FPS = 10
TINY_TRAIN = {"a.mat": [0, 1, 5, 12, 29], "b.mat": [0, 3, 19]}
TINY_TEST = {"a.mat": [20, 21, 13], "b.mat": [10]}


def stamp(sec: int) -> str:
    return f"2023-05-10 21:{30 + sec // 60:02d}:{sec % 60:02d}"


def tiny_frames(n: int, r: int) -> np.ndarray:
    data = np.empty((n, 3, W, H), np.uint8)
    data[:, 0] = np.arange(n)[:, None, None]
    data[:, 1] = (16 * np.arange(W)[:, None] + np.arange(H)[None, :])[None]
    data[:, 2] = r
    return data


def write_recording(root: Path, name: str, data, label, frame_stamps, row_stamps, currents) -> None:
    for sub in ("videos", "currents", "timestamps"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    write_mat(root / "videos" / f"{name}.mat", {"data": data, "label": label}, created="Wed May 10 21:30:00 2023")
    (root / "timestamps" / f"{name}.csv").write_text("timestamp\n" + "".join(f"{s}\n" for s in frame_stamps))
    (root / "currents" / f"{name}.csv").write_text(
        "timestamp,a,b,c\n" + "".join(f"{s},{x},{y},{z}\n" for s, (x, y, z) in zip(row_stamps, currents)))


def write_tiny_v2(root: Path) -> Path:
    for r, (name, n, first_sec) in enumerate((("a", 30, -2), ("b", 20, 0))):
        label = np.zeros((n, W, H), np.uint8)
        if name == "a":
            label[12:18, 1, 0] = 1
            label[12, 1, 0] = 255
        secs = list(range(first_sec, (n - 1) // FPS + 2))
        rows = 2 * len(secs)
        write_recording(root, name, tiny_frames(n, r), label,
                        [stamp(t // FPS) for t in range(n)],
                        [stamp(s) for s in secs for _ in range(2)],
                        [(j, r, 7) for j in range(rows)])
    (root / "train.json").write_text(json.dumps(TINY_TRAIN))
    (root / "test.json").write_text(json.dumps(TINY_TEST))
    return root

"""``fmfast check``'s library part: every problem in a dataset or a recording, not just the first.

``check(path)`` runs the same readers (and so the same rules) that training, ingest and detect
use, one file at a time, and collects each file's DataError instead of stopping at it:

- a V2 root: each recording's .mat (arrays, shapes, every frame's pixel values), timestamps
  and current files, their agreement, and each split file with its frame indices;
- a V1 root or .mat file: each .mat as the V1 reader reads it;
- a current log or a frame timestamps CSV (told apart by their columns);
- a video file: the probe (header, first frame, in a child process), then every frame decoded.

-> ``Report``: what was looked at and the problems found (one line each, naming file and place).
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

from fmfast.errors import DataError

from . import matfile
from .corpus import check_split_indices
from .csvfiles import _decode, read_current_csv, read_currents, read_frame_times, read_timestamps

VIDEO_EXT = (".mp4", ".mkv", ".avi", ".mov", ".ts", ".m4v", ".webm", ".flv", ".mpg", ".mpeg", ".h264", ".hevc")


@dataclass


class Report:
    path: Path
    kind: str = ""
    checked: list[str] = field(default_factory=list)  # what was read, e.g. "a.mat: 30 frames"
    problems: list[str] = field(default_factory=list)

    def run(self, fn, *args):
        """``fn(*args)``, its DataError recorded as a problem -> its result or None."""
        try:
            return fn(*args)
        except DataError as e:
            self.problems.append(str(e))
            return None


def check(path: str | Path) -> Report:
    path = Path(path)
    r = Report(path)
    if not path.exists():
        r.problems.append(f"{path}: no such file or folder")
    elif path.is_dir() and (path / "videos").is_dir():
        _v2(path, r)
    elif path.is_dir():
        mats = sorted(path.glob("*.mat"))
        r.kind = "V1 dataset"
        if not mats:
            r.problems.append(f"{path}: no videos/ folder (V2) and no .mat files (V1)")
        for m in mats:
            r.run(_v1_file, m, r)
    elif path.suffix.lower() == ".mat":
        r.kind = "V1 recording"
        r.run(_v1_file, path, r)
    elif path.suffix.lower() == ".csv":
        r.run(_csv, path, r)
    elif path.suffix.lower() in VIDEO_EXT:
        r.kind = "video"
        r.run(_video, path, r)
    else:
        r.problems.append(f"{path}: not a dataset folder, .mat, .csv or video file")
    return r


def _frames(path: Path, f, key: str, ndim: int) -> int:
    """Every frame of ``key`` read once (values checked), in chunks -> the frame count."""
    d = matfile.dataset(f, path, key, ndim)
    for i in range(0, d.shape[0], 256):
        matfile.read_slice(d, i, i + 256)
    return d.shape[0]


def _v1_file(path: Path, r: Report) -> None:
    from .v1 import load_v1

    n = None
    for split in ("train", "test"):
        try:
            load_v1(path, split, masks=False)
        except DataError as e:
            if "no frames marked" not in str(e):
                raise
    with matfile.open_mat(path) as f:
        n = _frames(path, f, "video", 4)
    r.checked.append(f"{path.name}: {n} frames")


def _v2(root: Path, r: Report) -> None:
    r.kind = "V2 dataset"
    from .v2 import FOLDERS, _read_split

    for sub in FOLDERS:
        if not (root / sub).is_dir():
            r.problems.append(f"{root / sub}: missing folder (V2 layout needs videos/, currents/, timestamps/)")
    names = sorted(p.stem for p in (root / "videos").glob("*.mat"))
    if not names:
        r.problems.append(f"{root / 'videos'}: no .mat files")
    counts = {}
    for name in names:
        mat = root / "videos" / f"{name}.mat"
        n = r.run(_v2_mat, mat)
        stamps = r.run(read_timestamps, root / "timestamps" / f"{name}.csv")
        cur = r.run(read_currents, root / "currents" / f"{name}.csv")
        if n is not None and stamps is not None and len(stamps) != n:
            r.problems.append(f"{root / 'timestamps' / f'{name}.csv'}: {len(stamps)} timestamps but {mat.name} has {n} frames")
        if stamps is not None and cur is not None:
            have = set(cur[0])
            lacking = [i for i, s in enumerate(stamps) if s not in have]
            if lacking:
                r.problems.append(f"{root / 'currents' / f'{name}.csv'}: no current rows for second "
                                  f"'{stamps[lacking[0]]}' of frame {lacking[0]} ({len(lacking)} frames lack currents)")
        counts[name] = n
        if n is not None:
            r.checked.append(f"{name}: {n} frames")
    for split in ("train", "test"):
        p = root / f"{split}.json"
        m = r.run(_read_split, p, names)
        for key, idx in (m or {}).items():
            n = counts.get(key[:-4])
            if n is not None:
                r.run(check_split_indices, p, key, idx, n)


def _v2_mat(mat: Path) -> int:
    with matfile.open_mat(mat) as f:
        t = _frames(mat, f, "data", 4)
        d = matfile.dataset(f, mat, "data", 4)
        label = matfile.dataset(f, mat, "label", 3)
        if d.shape[1] != 3:
            raise DataError(mat, f"'data' has shape {d.shape}, expected [T, 3, W, H]")
        if label.shape != (t, *d.shape[2:]):
            raise DataError(mat, f"'label' has shape {label.shape}, expected {(t, *d.shape[2:])} to match 'data'")
        matfile.any_positive(label)
    return t


def _csv(path: Path, r: Report) -> None:
    """A current log (>= 4 columns in its header) or a frame timestamps file."""
    with open(path, "rb") as f:
        first = f.readline()
    header = next(csv.reader(io.StringIO(_decode(first, path, "CSV"))), [])
    if len(header) >= 4:
        r.kind = "current log"
        t, v = read_current_csv(path)
        r.checked.append(f"{path.name}: {len(t)} rows, {float(t[-1] - t[0]):.1f} s")
    else:
        r.kind = "frame timestamps"
        t = read_frame_times(path)
        r.checked.append(f"{path.name}: {len(t)} frame times, {float(t[-1] - t[0]):.1f} s")


def _video(path: Path, r: Report) -> None:
    from .video import VideoReader

    reader = VideoReader(path)
    n = 0
    for _, frames in reader.chunks(None, 64, allow_truncated=False):
        n += len(frames)
    r.checked.append(f"{path.name}: {n} frames decoded, {reader.info.width}x{reader.info.height} "
                     f"at {reader.info.fps:g} fps")

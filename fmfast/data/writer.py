"""Write one recording in the FMF-Benchmark V2 layout, frames streamed in chunks, published
atomically: everything is built in a hidden staging folder and only renamed into place once
complete, so a failure leaves no partial recording behind.

    <root>/videos/<name>.mat      MATLAB v7.3: 'data' uint8 [T,3,W,H], 'label' uint8 [T,W,H]
    <root>/currents/<name>.csv    2 rows per second
    <root>/timestamps/<name>.csv  one row per frame
    <root>/train.json, test.json  {"<name>.mat": [frame indices]}; every recording is a key
                                  of both (the reference loader looks each one up in both)
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from fmfast.errors import DataError, SettingsError
from fmfast.files import atomic_write, pid_alive
from fmfast.data.matfile import USERBLOCK, mat_header

SUBDIRS = ("videos", "currents", "timestamps")


class MatAppender:
    """A v7.3 .mat with 'data' [T,3,W,H] and 'label' [T,W,H] uint8 that grows by chunks."""

    def __init__(self, path: Path, size_wh: tuple[int, int], chunk: int = 16):
        w, h = size_wh
        self.path = Path(path)
        self._f = h5py.File(self.path, "w", userblock_size=USERBLOCK, libver="earliest")
        self._data = self._f.create_dataset("data", shape=(0, 3, w, h), maxshape=(None, 3, w, h),
                                            dtype=np.uint8, chunks=(chunk, 3, w, h), track_times=False)
        self._label = self._f.create_dataset("label", shape=(0, w, h), maxshape=(None, w, h),
                                             dtype=np.uint8, chunks=(chunk, w, h), track_times=False)
        for d in (self._data, self._label):
            d.attrs.create("MATLAB_class", np.bytes_("uint8"))
        self.frames = 0

    def append(self, frames: np.ndarray, labels: np.ndarray | None = None) -> None:
        n = frames.shape[0]
        if n == 0:
            return
        a, b = self.frames, self.frames + n
        self._data.resize(b, axis=0)
        self._label.resize(b, axis=0)
        self._data[a:b] = frames
        self._label[a:b] = 0 if labels is None else (labels > 0).astype(np.uint8)
        self.frames = b

    def close(self) -> None:
        if self._f:
            f, self._f = self._f, None
            f.close()
            with open(self.path, "r+b") as f:  # MATLAB recognises a v7.3 file by this header
                f.write(mat_header(time.strftime("%a %b %d %H:%M:%S %Y")))


class Staging:
    """A staging folder for one recording named ``name`` under ``root``; ``publish()`` moves
    its files into place, ``discard()`` (or an exception inside ``with``) removes all of it."""

    def __init__(self, root: str | os.PathLike, name: str, overwrite: bool = False):
        self.root, self.name = Path(root), name
        if "." in name or "/" in name or not name:
            raise SettingsError(f"recording name {name!r} must be non-empty without '.' or '/' "
                            f"(the reference loader cuts names at the first dot)")
        if self.root.exists() and not self.root.is_dir():
            raise SettingsError(f"{self.root}: exists and is not a folder")
        target = self.root / "videos" / f"{name}.mat"
        if target.exists() and not overwrite:
            raise SettingsError(f"{target}: already exists (ask to overwrite it to replace it)")
        self._new_root = not self.root.exists()
        parent = self.root.parent if self._new_root else self.root
        parent.mkdir(parents=True, exist_ok=True)
        for old in parent.glob(".*.ingest.*"):  # staging folders of killed ingests: .NAME.ingest.PID.XXXX
            pid = old.name.rsplit(".", 2)[-2]
            if old.is_dir() and pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
        self.dir = Path(tempfile.mkdtemp(prefix=f".{self.root.name if self._new_root else name}.ingest.{os.getpid()}.",
                                         dir=parent))
        for d in SUBDIRS:
            (self.dir / d).mkdir()

    def path(self, kind: str) -> Path:
        return self.dir / kind / (f"{self.name}.mat" if kind == "videos" else f"{self.name}.csv")

    def publish(self, train: list[int], test: list[int]) -> None:
        """Write the split files and move everything into ``root``."""
        key = f"{self.name}.mat"
        if self._new_root:
            for split, idx in (("train", train), ("test", test)):
                (self.dir / f"{split}.json").write_text(json.dumps({key: idx}))
            os.replace(self.dir, self.root)  # one rename: the new root appears complete
            return
        splits = {}
        for split, idx in (("train", train), ("test", test)):
            p = self.root / f"{split}.json"
            try:
                cur = json.loads(p.read_text()) if p.is_file() else {}
            except (OSError, ValueError) as e:
                raise DataError(f"{p}: cannot update the split file ({e})") from None
            if not isinstance(cur, dict):
                raise DataError(f"{p}: expected a JSON object mapping recordings to frame indices")
            for other in (self.root / "videos").glob("*.mat") if (self.root / "videos").is_dir() else []:
                cur.setdefault(other.name, [])  # every recording must be a key of both files
            cur[key] = idx
            splits[p] = cur
        # split files first: an extra key is harmless to every reader, a recording missing
        # from them is not; the .mat goes last, as readers list recordings by their videos
        for p, cur in splits.items():
            with atomic_write(p) as tmp:
                tmp.write_text(json.dumps(cur))
        for d in ("currents", "timestamps", "videos"):
            (self.root / d).mkdir(exist_ok=True)
            os.replace(self.path(d), self.root / d / self.path(d).name)
        shutil.rmtree(self.dir, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.discard()
        return False

"""Targeted corruption of the synthetic test data: small edits that each break one rule a
reader must enforce (used by the bad-input corpus, tests/*/test_bad_inputs.py)."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from fmfast.data.matfile import write_mat


def rewrite_mat(path: Path, **change) -> None:
    """Rewrite a .mat with some arrays replaced (None drops one)."""
    with h5py.File(path, "r") as f:
        arrays = {k: f[k][()] for k in f}
    arrays.update(change)
    path.unlink()
    write_mat(path, {k: v for k, v in arrays.items() if v is not None})


def edit_lines(path: Path, fn, newline: str = "\n") -> None:
    lines = path.read_text().splitlines()
    path.write_text(newline.join(fn(lines)) + newline)


def edit_line(path: Path, i: int, fn) -> None:
    """Apply ``fn`` to line ``i`` (0 = the header) of a text file."""
    edit_lines(path, lambda ls: ls[:i] + [fn(ls[i])] + ls[i + 1:])


def set_cell(path: Path, i: int, col: int, value: str) -> None:
    """Put ``value`` (verbatim, commas and all) into field ``col`` of CSV line ``i``."""
    def f(line):
        cells = line.split(",")
        cells[col] = value
        return ",".join(cells)
    edit_line(path, i, f)


def set_split_text(root: Path, split: str, text: str | bytes) -> None:
    p = root / f"{split}.json"
    (p.write_bytes if isinstance(text, bytes) else p.write_text)(text)


def set_split(root: Path, split: str, **entries) -> None:
    m = json.loads((root / f"{split}.json").read_text())
    m.update({f"{k}.mat": v for k, v in entries.items()})
    (root / f"{split}.json").write_text(json.dumps(m))


def flip_bytes(path: Path, offset: int, n: int = 8) -> None:
    """XOR ``n`` bytes at ``offset`` with 0xFF (damage a heap, a B-tree node or a chunk)."""
    b = bytearray(path.read_bytes())
    for i in range(offset, min(offset + n, len(b))):
        b[i] ^= 0xFF
    path.write_bytes(bytes(b))


def float_video(path: Path, bad=None, where=(3, 0, 0, 0)) -> np.ndarray:
    """Rewrite a .mat's 'data' as float64 (same values), one value set to ``bad``; -> the data."""
    with h5py.File(path, "r") as f:
        data = f["data"][()].astype(np.float64)
    if bad is not None:
        data[where] = bad
    rewrite_mat(path, data=data)
    return data

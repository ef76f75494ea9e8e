"""The two CSV files of an FMF V2 recording: frame timestamps and the 3-phase current log.

Both have one header row and the timestamp (``YYYY-MM-DD HH:MM:SS``) in column 0. Timestamps
are matched as text, as the reference does, so frames and currents must use the same format.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .errors import DataError


def _rows(path: Path) -> list[list[str]]:
    if not path.is_file():
        raise DataError(path, "file not found")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) < 2:
        raise DataError(path, "no data rows (expected a header row, then one row per sample)")
    return rows[1:]


def read_timestamps(path: Path) -> list[str]:
    """Column 0 of every row after the header: one timestamp per video frame."""
    out = []
    for i, r in enumerate(_rows(path)):
        if not r or not r[0].strip():
            raise DataError(path, f"line {i + 2}: empty timestamp")
        out.append(r[0].strip())
    return out


def read_currents(path: Path) -> tuple[list[str], np.ndarray]:
    """The current log as (second of each row pair, values float32 [rows, 3]).

    Rows come two per second; like the reference, rows are paired by position (0-1, 2-3, ...)
    and a pair is keyed by its first row's timestamp.
    """
    rows = _rows(path)
    if len(rows) % 2:
        raise DataError(path, f"{len(rows)} data rows; expected 2 rows per second (an even count)")
    for i, r in enumerate(rows):
        if len(r) < 4:
            raise DataError(path, f"line {i + 2}: {len(r)} columns, expected timestamp + phases A, B, C")
    text = np.array([r[1:4] for r in rows])
    try:
        values = text.astype(np.float64)
    except ValueError:
        for i, r in enumerate(rows):
            for v in r[1:4]:
                try:
                    float(v)
                except ValueError:
                    raise DataError(path, f"line {i + 2}: non-numeric current {v!r}") from None
        raise
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(path, f"line {i + 2}: current is NaN or infinite ({', '.join(rows[i][1:4])})")
    seconds = [rows[i][0].strip() for i in range(0, len(rows), 2)]
    return seconds, values.astype(np.float32)

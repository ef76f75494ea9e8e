"""Timestamps as the data files and the command line give them: naive ISO local times
("YYYY-MM-DD HH:MM:SS[.fff]", 'T' allowed) <-> float64 seconds since the Unix epoch of that
local clock, and the order rules a timestamp column must follow."""
from __future__ import annotations

import re

import numpy as np

from fmfast.errors import DataError

_STAMP = re.compile(r"\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?")
_ZONE = re.compile(r".*\d(Z|[+-]\d{2}(:?\d{2})?)$")


def _stamp_problem(v: str) -> str | None:
    """Why ``v`` is not a naive ISO timestamp, or None. Stamps with a UTC offset or 'Z' are
    refused: the other clocks (--start, the other file) are naive local times, and mixing the
    two would shift one against the other by hours without notice."""
    if _STAMP.fullmatch(v):
        return None
    if _ZONE.fullmatch(v) and _STAMP.fullmatch(re.sub(r"(Z|[+-]\d{2}(:?\d{2})?)$", "", v)):
        return (f"timestamp {v!r} carries a time zone; fmfast reads naive local times "
                f"(write every stamp, and --start, in one local clock without an offset)")
    return f"unparseable timestamp {v!r} (expected YYYY-MM-DD HH:MM:SS[.fff])"


def parse_times(values: list[str], where: str, first_line: int = 2) -> np.ndarray:
    """ISO-like timestamp strings ("YYYY-MM-DD HH:MM:SS[.fff]", 'T' allowed) -> epoch seconds."""
    values = [v.strip() for v in values]
    for i, v in enumerate(values):
        if not v:
            raise DataError(f"{where}: line {first_line + i}: empty timestamp")
        problem = _stamp_problem(v)
        if problem:
            raise DataError(f"{where}: line {first_line + i}: {problem}")
    try:
        t = np.array(values, dtype="datetime64[us]")
    except ValueError:  # the right shape but not a date (month 13, Feb 30)
        for i, v in enumerate(values):
            try:
                np.datetime64(v, "us")
            except ValueError:
                raise DataError(f"{where}: line {first_line + i}: unparseable timestamp {v!r} (no such date or time)") from None
        raise
    return t.astype(np.int64).astype(np.float64) * 1e-6


def parse_time(value: str, where: str) -> float:
    """One timestamp (e.g. the --start argument) -> epoch seconds."""
    problem = _stamp_problem(value.strip())
    if problem:
        raise DataError(f"{where}: {problem}")
    try:
        t = np.datetime64(value.strip(), "us")
    except ValueError:
        raise DataError(f"{where}: unparseable timestamp {value!r} (no such date or time)") from None
    return float(t.astype(np.int64)) * 1e-6


def check_order(t: np.ndarray, where: str, what: str, first_line: int = 2) -> None:
    """Timestamps must not go backwards, and a stamp finer than a second must not repeat (two
    equal ones cannot be told apart); whole-second stamps may repeat (the rows of a second in a
    log written to the second, like the V2 layout)."""
    d = np.diff(t)
    bad = np.flatnonzero((d < 0) | ((d == 0) & (t[:-1] != np.floor(t[:-1]))))
    if bad.size:
        i = int(bad[0])
        how = "go backwards" if d[i] < 0 else "repeat (the same time twice)"
        raise DataError(f"{where}: line {first_line + i + 1}: {what} {how} "
                        f"({format_seconds(t[i], frac=True)} then {format_seconds(t[i + 1], frac=True)})")


def format_seconds(t: np.ndarray | float, frac: bool = False) -> np.ndarray:
    """Epoch seconds -> "YYYY-MM-DD HH:MM:SS" strings (truncated to the second unless ``frac``)."""
    t = np.asarray(t, dtype=np.float64)
    if frac:
        d = np.round(t * 1e3).astype(np.int64).astype("datetime64[ms]")
        return np.char.replace(np.datetime_as_string(d, unit="ms"), "T", " ")
    d = np.floor(t).astype(np.int64).astype("datetime64[s]")
    return np.char.replace(np.datetime_as_string(d, unit="s"), "T", " ")


"""The CSV files of the data path: 3-phase arc-current logs and frame timestamps.

Two readers share one row parser (``parse_current_rows`` / ``_values``):

- own recordings (``read_current_csv``, ``read_frame_times``, ``CurrentTail`` for a growing log):
  timestamps parsed to float64 seconds since the Unix epoch of the log's own (naive, local)
  clock, then ``resample`` to the benchmark's 2 rows per second;
- the FMF V2 layout (``read_currents``, ``read_timestamps``): one header row, the timestamp
  ``YYYY-MM-DD HH:MM:SS`` in column 0, currents two rows per second. Timestamps are matched as
  text, as the reference does, so frames and currents must use the same format.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np

from fmfast.errors import DataError

from .stamps import check_order, format_seconds, parse_time, parse_times  # noqa: F401 (re-exported)

RATE = 2  # rows per second in the V2 layout


def _spread_duplicates(t: np.ndarray) -> np.ndarray:
    """Logs with second-resolution stamps (the V2 layout: two rows share one second) put their
    k-th of n rows in a second at s + k/n, so a V2 file resamples onto itself exactly."""
    if t.size == 0:
        return t
    new = np.ones(t.size, dtype=bool)
    new[1:] = t[1:] != t[:-1]
    starts = np.flatnonzero(new)
    counts = np.diff(np.append(starts, t.size))
    group = np.cumsum(new) - 1
    k = np.arange(t.size) - starts[group]
    n = counts[group]
    whole = t == np.floor(t)
    # only runs of identical whole-second stamps are spread; sub-second stamps are kept
    return np.where(whole & (n > 1), t + k / n, t)


def parse_current_rows(rows: list[list[str]], where: str, first_line: int = 2,
                       spread: bool = True, columns: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """CSV rows (header removed) -> (times [N] float64 epoch seconds, values [N,3] float64).
    Every row has the header's ``columns`` fields: a row with more is most likely a decimal
    comma (``10142,81``) that split one value across two columns, and is refused."""
    for i, r in enumerate(rows):
        if len(r) != columns:
            hint = "; a decimal comma? write 10142.81, not 10142,81" if len(r) > columns else ""
            raise DataError(f"{where}: line {first_line + i}: {len(r)} fields but the header names {columns} "
                            f"(timestamp, phase A, B, C{', ...' if columns > 4 else ''}){hint}")
    times = parse_times([r[0] for r in rows], where, first_line)
    vals = _values(rows, where, first_line)
    check_order(times, where, "timestamps", first_line)
    return (_spread_duplicates(times) if spread else times), vals.reshape(-1, 3)


F32_MAX = float(np.finfo(np.float32).max)


def _values(rows: list[list[str]], where: str, first_line: int = 2) -> np.ndarray:
    """Columns 1-3 (phases A, B, C) of CSV rows -> float64 ``[N, 3]``; a non-numeric or
    non-finite value, or one float32 (the model's precision) cannot hold, is an error naming
    its line."""
    try:
        vals = np.array([r[1:4] for r in rows], dtype=np.float64)
    except ValueError:
        for i, r in enumerate(rows):
            for x in r[1:4]:
                try:
                    float(x)
                except ValueError:
                    hint = " (a decimal comma? write 10142.81)" if "," in x else ""
                    raise DataError(f"{where}: line {first_line + i}: non-numeric current {x!r}{hint}") from None
        raise
    if rows and not np.isfinite(vals).all():
        i = int(np.flatnonzero(~np.isfinite(vals).all(1))[0])
        raise DataError(f"{where}: line {first_line + i}: current is NaN or infinite ({', '.join(rows[i][1:4])})")
    big = np.abs(vals) > F32_MAX
    if big.any():
        i = int(np.flatnonzero(big.any(1))[0])
        raise DataError(f"{where}: line {first_line + i}: current out of range ({', '.join(rows[i][1:4])}; "
                        f"float32 holds at most {F32_MAX:.3g})")
    return vals.reshape(-1, 3)


def _decode(data: bytes, path, what: str) -> str:
    """File bytes -> text: UTF-8 (a leading BOM is dropped), else an error naming the byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(path, f"line {line}: the {what} file is not UTF-8 text (byte 0x{data[e.start]:02x} "
                              f"at offset {e.start}); save it as UTF-8") from None


def _read_csv(path: str | os.PathLike, what: str, skip_blank: bool = True) -> list[list[str]]:
    """Every row of a CSV file (header included); blank rows dropped unless ``skip_blank`` is off."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, f"{what} file not found")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(path, f"cannot read the {what} file ({e.strerror or e})") from None
    try:
        rows = list(csv.reader(io.StringIO(_decode(data, path, what), newline="")))
    except csv.Error as e:
        raise DataError(path, f"malformed CSV ({e})") from None
    return [r for r in rows if r and any(c.strip() for c in r)] if skip_blank else rows


def read_current_csv(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a current log: header row, then timestamp, phase A, B, C per row."""
    rows = _read_csv(path, "current log")
    if not rows:
        raise DataError(path, "empty current log")
    header, rows = rows[0], rows[1:]
    if len(header) < 4:
        raise DataError(path, f"missing columns: expected a header with 4 columns (timestamp, phase A, B, C), "
                              f"found {header}")
    if not rows:
        raise DataError(path, "current log has a header but no rows")
    return parse_current_rows(rows, str(path), columns=len(header))


def resample(times: np.ndarray, values: np.ndarray, first_second: int, last_second: int,
             max_gap: float, where: str) -> np.ndarray:
    """Resample a log onto 2 rows per second for the whole seconds ``first_second..last_second``.

    Row 2k+j stands for the half second starting at ``first_second + k + j/2``: the mean of the
    samples inside it (decimation of faster logs), else the linear interpolation at its start
    (slower logs, small gaps). Values before the first / after the last sample hold the edge
    value (less than a second; the caller clips the range to the log). A gap between samples
    longer than ``max_gap`` seconds inside the range is an error, never interpolated over.
    -> float64 [2 * (last_second - first_second + 1), 3].
    """
    n_bins = RATE * (last_second - first_second + 1)
    if n_bins <= 0:
        raise DataError(f"{where}: no current samples in the needed time range")
    lo, hi = first_second, last_second + 1
    inside = np.flatnonzero((times >= lo) & (times < hi))
    gaps = np.diff(times)
    bad = np.flatnonzero((times[1:] > lo) & (times[:-1] < hi) & (gaps > max_gap))
    if bad.size:
        g = int(bad[np.argmax(gaps[bad])])
        t0, t1 = format_seconds(times[g], frac=True), format_seconds(times[g + 1], frac=True)
        raise DataError(f"{where}: gap of {gaps[g]:.1f} s in the current log between {t0} and {t1} "
                        f"(longer than the allowed gap of {max_gap:g} s)")
    edges = lo + np.arange(n_bins + 1) / RATE
    out = np.empty((n_bins, values.shape[1]), dtype=np.float64)
    starts = edges[:-1]
    for c in range(values.shape[1]):
        out[:, c] = np.interp(starts, times, values[:, c])  # holds edge values outside the log
    # bin means where a bin holds samples (identity for a log already at 2 rows/second)
    sel = times[inside] if inside.size else times[:0]
    if sel.size:
        bins = np.floor((sel - lo) * RATE).astype(np.int64)
        cnt = np.bincount(bins, minlength=n_bins)[:n_bins]
        full = cnt > 0
        for c in range(values.shape[1]):
            s = np.bincount(bins, weights=values[inside, c], minlength=n_bins)[:n_bins]
            out[full, c] = s[full] / cnt[full]
    return out


def write_current_csv(path: str | os.PathLike, first_second: int, rows: np.ndarray) -> None:
    """Write the V2 current file: header, then 2 rows per second sharing the second's timestamp."""
    n_sec = rows.shape[0] // RATE
    stamps = np.repeat(format_seconds(first_second + np.arange(n_sec)), RATE)
    with open(path, "w", newline="") as f:
        f.write("timestamp,A,B,C\n")
        f.writelines(f"{s},{a:.7g},{b:.7g},{c:.7g}\n" for s, (a, b, c) in zip(stamps, rows.tolist()))


def read_frame_times(path: str | os.PathLike) -> np.ndarray:
    """A frame timestamps file (header row, col 0 the time of each frame) -> epoch seconds [N]."""
    rows = [r for r in _read_csv(path, "timestamps") if r[0].strip()]
    if len(rows) < 2:
        raise DataError(path, "timestamps file has no rows after its header")
    t = parse_times([r[0] for r in rows[1:]], str(path))
    check_order(t, str(path), "frame timestamps")
    return t


def write_frame_times(path: str | os.PathLike, times: np.ndarray) -> None:
    """The V2 timestamps file: the second of each frame (the key into the current file)."""
    with open(path, "w", newline="") as f:
        f.write("timestamp\n")
        f.writelines(f"{s}\n" for s in format_seconds(times).tolist())


class CurrentTail:
    """Follow a growing current log: each ``poll()`` parses only the complete lines added since
    the last one; ``times``/``values`` hold every sample so far.

    A log that shrinks or is replaced (another inode: rotation, a rewrite) is read again from
    its start; rows up to the last time already seen are skipped, so the samples continue at
    the right time, and a log that restarts earlier than that is refused (``rotated`` counts
    the reopenings)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._offset = 0
        self._line = 1
        self._columns = 0  # fields of the header, 0 until it was read
        self._ino = None
        self.rotated = 0
        self._raw = np.zeros(0)  # stamps as written; spread again over the whole log each poll,
        self.times = np.zeros(0)  # because the two rows of one second may arrive in two polls
        self.values = np.zeros((0, 3))

    def _reopened(self, st: os.stat_result) -> bool:
        """True when the file is not the one (or no longer as long as) what was read so far."""
        replaced = self._ino is not None and st.st_ino != self._ino
        self._ino = st.st_ino
        if replaced or st.st_size < self._offset:
            self._offset, self._line, self._columns = 0, 1, 0
            self.rotated += 1
            return True
        return False

    def poll(self) -> bool:
        """Read new complete lines; True when samples were added."""
        try:
            with open(self.path, "rb") as f:
                reopened = self._reopened(os.fstat(f.fileno()))
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return False  # between a rotation's rename and the new file's creation
        except OSError as e:
            raise DataError(self.path, f"cannot read the current log ({e.strerror or e})") from None
        end = chunk.rfind(b"\n")
        if end < 0:
            return False
        text = _decode(chunk[:end + 1], self.path, "current log")
        self._offset += end + 1
        lines = text.splitlines()
        first = self._line
        self._line += len(lines)
        if not self._columns:
            self._columns = len(next(csv.reader([lines[0]]), []))
            if self._columns < 4:
                raise DataError(f"{self.path}: missing columns: expected a header with 4 columns "
                                f"(timestamp, phase A, B, C)")
            lines, first = lines[1:], first + 1
        try:
            rows = [r for r in csv.reader(lines) if r and any(c.strip() for c in r)]
        except csv.Error as e:
            raise DataError(self.path, f"malformed CSV ({e})") from None
        if not rows:
            return False
        t, v = parse_current_rows(rows, str(self.path), first, spread=False, columns=self._columns)
        if reopened and self._raw.size:  # the new file may repeat what was read: continue after it
            keep = t > self._raw[-1]
            t, v = t[keep], v[keep]
            if not t.size:
                return False
        if self._raw.size and t[0] < self._raw[-1]:
            raise DataError(f"{self.path}: line {first}: timestamps go backwards "
                            f"({format_seconds(t[0], frac=True)} after {format_seconds(self._raw[-1], frac=True)})")
        self._raw = np.concatenate([self._raw, t])
        self.values = np.concatenate([self.values, v])
        self.times = _spread_duplicates(self._raw)
        return True


# ---- the V2 layout's files ---------------------------------------------------------------
def _v2_rows(path: Path, header: bool = False):
    rows = _read_csv(path, "V2", skip_blank=False)
    if len(rows) < 2:
        raise DataError(path, "no data rows (expected a header row, then one row per sample)")
    return (rows[0], rows[1:]) if header else rows[1:]


def read_timestamps(path: Path) -> list[str]:
    """Column 0 of every row after the header: one timestamp per video frame (checked to be
    timestamps that never go backwards; kept as text, the key into the current file)."""
    out = []
    for i, r in enumerate(_v2_rows(path)):
        if not r or not r[0].strip():
            raise DataError(path, f"line {i + 2}: empty timestamp")
        out.append(r[0].strip())
    check_order(parse_times(out, str(path)), str(path), "frame timestamps")
    return out


def read_currents(path: Path) -> tuple[list[str], np.ndarray]:
    """The current log as (second of each row pair, values float32 [rows, 3]).

    Rows come two per second; like the reference, rows are paired by position (0-1, 2-3, ...)
    and a pair is keyed by its first row's timestamp.
    """
    header, rows = _v2_rows(path, header=True)
    if len(rows) % 2:
        raise DataError(path, f"{len(rows)} data rows; expected 2 rows per second (an even count)")
    for i, r in enumerate(rows):
        if len(r) < 4:
            raise DataError(path, f"line {i + 2}: {len(r)} columns, expected timestamp + phases A, B, C")
        if len(r) > max(4, len(header)):
            raise DataError(path, f"line {i + 2}: {len(r)} fields but the header names {len(header)}; "
                                  f"a decimal comma? write 10142.81, not 10142,81")
    values = _values(rows, str(path))
    check_order(parse_times([r[0] for r in rows], str(path)), str(path), "timestamps")
    seconds = [rows[i][0].strip() for i in range(0, len(rows), 2)]
    return seconds, values.astype(np.float32)

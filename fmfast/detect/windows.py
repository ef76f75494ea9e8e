"""The window engine: frames and current rows go in as they arrive, windows are scored in
batches as soon as both are there, and alarms are tracked on the scores.

A window ends every ``hop`` frames (the first one at the first frame with a full clip history);
its clip and current window are exactly what the model was trained on (``fmfast.data.window``),
read from a bounded frame buffer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from fmfast.data.csvfiles import RATE
from fmfast.data.window import clip_offsets, resample_table
from fmfast.detect.alarms import Alarm, AlarmTracker
from fmfast.detect.scorer import Scorer
from fmfast.errors import DataError, SettingsError


class _Grow:
    """A numpy array that grows at the end in amortised O(1) (long --follow sessions)."""

    def __init__(self, dtype, width: int | None = None):
        self._a = np.zeros((64,) + ((width,) if width else ()), dtype)
        self.n = 0

    def extend(self, x) -> None:
        x = np.asarray(x, self._a.dtype)
        if self.n + len(x) > len(self._a):
            a = np.zeros((max(2 * len(self._a), self.n + len(x)),) + self._a.shape[1:], self._a.dtype)
            a[: self.n] = self._a[: self.n]
            self._a = a
        self._a[self.n:self.n + len(x)] = x
        self.n += len(x)

    @property
    def view(self) -> np.ndarray:
        return self._a[: self.n]


@dataclass
class Results:
    frames: list = field(default_factory=list)
    times: list = field(default_factory=list)
    probs: list = field(default_factory=list)
    alarms: list = field(default_factory=list)
    overlays: list = field(default_factory=list)  # (alarm number, frame index, frame [3,W,H], map [W,H])
    skipped: int = 0


class WindowEngine:
    """Frames and current rows go in as they arrive; windows are scored as soon as both are there.

    Current rows form one table starting at ``first_second`` (2 rows per second) unless the
    caller gives each frame's ``row_end`` (one past its second's last row) itself.
    """

    def __init__(self, scorer: Scorer, hop: int = 10, batch: int = 64, tracker: AlarmTracker | None = None,
                 on_event=None, on_windows=None, max_overlays: int = 20):
        if hop < 1 or batch < 1:
            raise SettingsError(f"window hop and batch must be >= 1, got {hop} and {batch}")
        self.s = scorer
        self.hop, self.batch = hop, batch
        self.back = clip_offsets(scorer.num_frames, scorer.stride)
        self.need = int(self.back[0])  # frames of history a clip reaches back
        self.L = RATE * scorer.current_seconds
        self.table = resample_table(self.L)
        self.tracker = tracker or AlarmTracker()
        self.on_event, self.on_windows = on_event, on_windows
        self.max_overlays = max_overlays
        self.buf: torch.Tensor | None = None  # frames [k,3,W,H]; buf[0] is frame `base`
        self.base = 0
        self.n = 0
        self._times = _Grow(np.float64)
        self._row_end = _Grow(np.int64)
        self.first_second: int | None = None
        self._current = _Grow(np.float32, 3)
        self._current_times = _Grow(np.float64)
        self.next = self.need
        self.out = Results()
        self._best = None  # (alarm, frame, map) of the active alarm's peak window
        self.scored = 0

    times = property(lambda self: self._times.view)  # of every frame so far
    row_end = property(lambda self: self._row_end.view)
    current = property(lambda self: self._current.view)  # rows [R, 3] float32
    current_times = property(lambda self: self._current_times.view)

    # -- input -------------------------------------------------------------------------------
    def add_current(self, rows: np.ndarray, first_second: int | None = None, times: np.ndarray | None = None):
        if self.first_second is None:
            self.first_second = first_second
        if times is None:
            times = self.first_second + (len(self.current) + np.arange(len(rows))) / RATE
        self._current.extend(rows)
        self._current_times.extend(times)

    def add_frames(self, frames: torch.Tensor, times: np.ndarray, row_end: np.ndarray | None = None):
        if frames.shape[2:] != self.s.size_wh:
            raise DataError(f"frames are {tuple(frames.shape[2:])} (W,H) but the model takes {self.s.size_wh}")
        if row_end is None:
            row_end = np.full(len(frames), np.iinfo(np.int64).max, np.int64)  # fixed once the log starts
        self.buf = frames if self.buf is None else torch.cat([self.buf, frames])
        self._times.extend(times)
        self._row_end.extend(row_end)
        self.n += len(frames)

    def _row_ends(self, f: np.ndarray) -> np.ndarray:
        r = self.row_end[f]
        unset = r == np.iinfo(np.int64).max
        if unset.any():
            if self.first_second is None:
                return np.where(unset, np.iinfo(np.int64).max, r)
            sec = np.floor(self.times[f[unset]]).astype(np.int64)
            r[unset] = RATE * (sec - self.first_second + 1)
            self.row_end[f[unset]] = r[unset]
        return r

    # -- scoring -----------------------------------------------------------------------------
    def run(self, partial: bool = True, final: bool = False) -> int:
        """Score the windows whose frames and current rows have arrived. Returns how many.
        ``partial``: also a last batch smaller than ``batch`` (offline feeding waits for full
        ones); ``final``: no more data will come, windows still lacking current are skipped."""
        done = 0
        while self.next < self.n:
            f = np.arange(self.next, self.n, self.hop)[: self.batch]
            if len(f) < self.batch and not (partial or final):
                break
            r = np.zeros(len(f), np.int64)
            if self.s.uses_current:
                r = self._row_ends(f)
                ready = r <= len(self.current)
                k = len(f) if ready.all() else int(np.argmin(ready))  # rows end in frame order
                if k == 0 or (k < self.batch and not (partial or final)):
                    if final and k == 0:
                        rest = np.arange(self.next, self.n, self.hop)
                        self.out.skipped += len(rest)
                        self.next = int(rest[-1]) + self.hop
                    break
                f, r = f[:k], r[:k]
            self.next = int(f[-1]) + self.hop
            has = r > 0 if self.s.uses_current else np.ones(len(f), bool)
            self.out.skipped += int((~has).sum())  # frames before the log's first second
            if has.any():
                self._score(f[has], r[has])
                done += int(has.sum())
            self._trim()
        return done

    def _score(self, f: np.ndarray, r: np.ndarray):
        ft = torch.from_numpy(f)
        idx = (ft[:, None] - self.back[None, :]).clamp_(min=0) - self.base  # [B, T] into the buffer
        if self.s.uses_current:
            rt = torch.from_numpy(r)
            n = rt.clamp(max=self.L)
            rows = (rt - n)[:, None] + self.table[n - 1]
            cur = torch.from_numpy(self.current)[rows]
        else:
            cur = torch.zeros(len(f), self.L, 3)
        prob, pmap = self.s(self.buf, idx, cur)
        times = self.times[f]
        first = len(self.out.probs)
        self.out.frames += f.tolist()
        self.out.times += times.tolist()
        self.out.probs += prob.tolist()
        if self.on_windows:
            self.on_windows(first, f, times, prob.numpy())
        for j, (p, t) in enumerate(zip(prob.tolist(), times.tolist())):
            for kind, a in self.tracker.update(p, t):
                if kind == "off":
                    self._close(a)
                if self.on_event:
                    self.on_event(kind, a, self)
            a = self.tracker.current
            if pmap is not None and a is not None and a.peak == first + j:
                self._best = (a, self.buf[int(f[j]) - self.base].clone(), pmap[j].clone())
        self.scored += len(f)

    def _close(self, a: Alarm):
        self.out.alarms.append(a)
        if self._best is not None and self._best[0] is a and len(self.out.overlays) < self.max_overlays:
            self.out.overlays.append((len(self.out.alarms), self.out.frames[a.peak], self._best[1], self._best[2]))
        self._best = None

    def _trim(self):
        keep_from = min(max(self.next - self.need, 0), self.n)  # never past the frames held
        if keep_from > self.base and self.buf is not None:
            self.buf = self.buf[keep_from - self.base:]
            self.base = keep_from

    def finish(self):
        self.run(partial=True, final=True)
        for kind, a in self.tracker.finish():
            self._close(a)
            if self.on_event:
                self.on_event(kind, a, self)
        return self.out

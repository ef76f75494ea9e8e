"""Slide a trained model over a whole recording and raise alarms.

    python -m fmfast.detect --checkpoint CKPT VIDEO CURRENT.csv --out DIR [--start T | --timestamps F]
    python -m fmfast.detect --checkpoint CKPT --recording V2ROOT NAME --out DIR
    python -m fmfast.detect --checkpoint CKPT VIDEO CURRENT.csv --start T --out DIR --follow

A window ends every --hop frames (the first one at the first frame with a full clip history);
its clip and current window are exactly what the model was trained on (fmfast.data.window).
Windows are scored in batches straight from a bounded frame buffer. Writes to DIR:
windows.csv (per-window probability), alarms.csv (hysteresis --on/--off, --min-duration),
timeline.png, and for segmentation models overlays/alarm_NNN_frame_F.png (the predicted hot
spot on each alarm's peak frame). A window's probability is p(abnormal) for classification and
the largest per-pixel p(abnormal) for segmentation.

--follow watches a live recording: VIDEO is either a folder of video segments (as a camera
recorder or `ffmpeg -f segment` writes them, read in name order, hidden names skipped; a
segment is read once a newer one exists or it has not changed for --settle seconds) or one growing file in a format readable while written
(mkv, ts, avi; re-opened and re-indexed whenever it grows, so segments suit long sessions
better); CURRENT.csv (and --timestamps, if given) grow by appended rows. Alarms are printed
the moment they are confirmed; windows.csv and alarms.csv grow as a live log. It ends on
Ctrl-C or after --follow-timeout seconds without new data.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fmfast.alarms import Alarm, AlarmTracker
from fmfast.cli import Parser, UserError, atomic_write, run_main
from fmfast.current_io import RATE, CurrentTail, format_seconds, parse_time, parse_times, read_frame_times, resample
from fmfast.detect_report import (ALARM_HEADER, WINDOW_HEADER, alarm_line, overlay_png, timeline_png,
                                  window_lines)
from fmfast.video_io import VideoReader, _DecodeFailure, resize_frames

VIDEO_EXT = (".mp4", ".mkv", ".avi", ".mov", ".ts", ".m4v", ".webm", ".flv", ".mpg", ".mpeg", ".h264", ".hevc")


class Scorer:
    """A model as a function: a batch of windows -> p(abnormal) per window (and per pixel)."""

    def __init__(self, model, meta: dict, device: str = "cpu", batch: int = 64, cuda_graphs: bool = True):
        cfg = model.config
        self.name, self.task = meta["model_name"], meta["task"]
        data = meta.get("data") or {}
        self.num_frames = cfg.num_frames
        self.stride = int(data.get("stride", 1) or 1)
        self.current_seconds = cfg.current_len // RATE
        for key, want in (("num_frames", self.num_frames), ("current_seconds", self.current_seconds)):
            if data.get(key) not in (None, want):
                raise UserError(f"checkpoint: data setting {key}={data[key]} disagrees with the model's {want}")
        self.size_wh = tuple(cfg.frame_hw)  # the stored (W, H) frame axes
        self.uses_video, self.uses_current = self.name != "current", self.name != "video"
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        # on CUDA: a forward captured for `batch` windows (fmfast.graphs), built at the first call
        self.batch, self.graphed = batch, None
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"

    @torch.inference_mode()
    def __call__(self, frames: torch.Tensor, frame_index: torch.Tensor, current: torch.Tensor):
        """frames: a store [N,3,W,H] uint8; frame_index [B,T] into it; current [B,2S,3] float32.
        -> (prob [B] float32, prob_map [B,W,H] float32 or None), on the CPU."""
        dev = self.device
        if self.cuda_graphs:
            out = self._replay(frames, frame_index, current)
        elif self.name == "fmformer":
            out = self.model(frames.to(dev), current.to(dev), frame_index=frame_index.to(dev))
        elif self.name == "video":
            out = self.model(frames.to(dev), frame_index=frame_index.to(dev))
        else:
            out = self.model(current.to(dev))
        p = out.float().softmax(1)[:, 1]
        if p.ndim == 3:
            return p.flatten(1).amax(1).cpu(), p.cpu()
        return p.cpu(), None

    def _replay(self, frames: torch.Tensor, frame_index: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        """The captured forward; only the windows' clips go to the GPU, not the frame buffer."""
        from fmfast.graphs import CaptureError, GraphedForward

        inputs = []
        if self.uses_video:
            b, t = frame_index.shape
            clip = frames.index_select(0, frame_index.reshape(-1).to(frames.device)).view(b, t, *frames.shape[1:])
            inputs.append(clip.transpose(1, 2).to(self.device))  # [B, 3, T, W, H]
        if self.uses_current:
            inputs.append(current.to(self.device))
        if self.graphed is None:
            try:
                self.graphed = GraphedForward(self.model, [x[:1].expand(self.batch, *x.shape[1:]) for x in inputs])
            except CaptureError as e:
                print(f"detect: CUDA graph capture failed, scoring eagerly ({e})", file=sys.stderr)
                self.cuda_graphs = False
                return self.model(*inputs)
        return self.graphed(*inputs)


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
        from fmfast.data.window import clip_offsets, resample_table

        if hop < 1 or batch < 1:
            raise UserError("--hop and --batch must be >= 1")
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
            raise UserError(f"frames are {tuple(frames.shape[2:])} (W,H) but the model takes {self.s.size_wh}")
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
            a = self.tracker._active
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


# -- sources ----------------------------------------------------------------------------------
def feed_file(engine: WindowEngine, a, console=None):
    """Own video + current log, offline."""
    from fmfast.ingest import align, frame_progress

    al = align(a.video, a.current, a.start, a.timestamps, a.max_gap, engine.s.current_seconds, a.decode_timeout)
    engine.add_current(al.current, al.first_second)
    bar = frame_progress(console, "detect") if console is not None else contextlib.nullcontext()
    with bar:
        task = bar.add_task("frames", total=al.stop - al.first) if console is not None else None
        for s, frames in al.reader.chunks(engine.s.size_wh, a.chunk, a.allow_truncated):
            lo, hi = max(s, al.first), min(s + len(frames), al.stop)
            if lo < hi:
                engine.add_frames(frames[lo - s:hi - s], al.times[lo:hi])
                engine.run(partial=False)  # full batches while decoding; finish() does the rest
                if task is not None:
                    bar.advance(task, hi - lo)
            if s + len(frames) >= al.stop:
                break
    if engine.n <= engine.need:
        raise UserError(f"{a.video}: {engine.n} frames inside the current log; the model's clip needs "
                        f"{engine.need + 1}")


def feed_v2(engine: WindowEngine, root: str, name: str, chunk: int = 256):
    """A recording in the V2 layout (the benchmark's, or one made by fmfast.ingest)."""
    from fmfast.data import matfile
    from fmfast.data.csvfiles import read_currents, read_timestamps

    root = Path(root)
    mat = root / "videos" / f"{name}.mat"
    stamps = read_timestamps(root / "timestamps" / f"{name}.csv")
    seconds, cur = read_currents(root / "currents" / f"{name}.csv")
    times = parse_times(stamps, str(root / "timestamps" / f"{name}.csv"))
    first = {}
    for i, s in enumerate(seconds):
        first.setdefault(s, i)
    pair = np.array([first.get(s, -1) for s in stamps], np.int64)
    row_end = np.where(pair >= 0, RATE * (pair + 1), 0)  # 0: no current for that second -> skipped
    sec_t = parse_times(seconds, str(root / "currents" / f"{name}.csv"))
    engine.add_current(cur, int(sec_t[0]), np.repeat(sec_t, RATE) + np.tile(np.arange(RATE) / RATE, len(sec_t)))
    with matfile.open_mat(mat) as f:
        data = matfile.dataset(f, mat, "data", 4)
        if data.shape[0] != len(stamps):
            raise UserError(f"{mat}: {data.shape[0]} frames but {len(stamps)} timestamps")
        if data.shape[0] <= engine.need:
            raise UserError(f"{mat}: {data.shape[0]} frames; the model's clip needs {engine.need + 1}")
        for s in range(0, data.shape[0], chunk):
            x = torch.from_numpy(np.asarray(data[s:s + chunk], dtype=np.uint8))
            if tuple(x.shape[2:]) != engine.s.size_wh:  # stored [n,3,W,H] -> decoded order to resize
                x = resize_frames(x.permute(0, 3, 2, 1), engine.s.size_wh)
            engine.add_frames(x, times[s:s + len(x)], row_end[s:s + len(x)])
            engine.run(partial=False)


class FollowFeed:
    """A live recording: a folder of video segments or one growing file, plus a growing log."""

    def __init__(self, a, size_wh, max_gap: float):
        self.video, self.size_wh, self.max_gap = Path(a.video), size_wh, max_gap
        self.settle, self.chunk, self.timeout = a.settle, a.chunk, a.decode_timeout
        self.start = parse_time(a.start, "--start") if a.start else None
        self.timestamps = a.timestamps
        if self.start is None and self.timestamps is None:
            raise UserError("frame times unknown: pass --start (time of the first frame) or --timestamps")
        self.tail = CurrentTail(a.current)
        self.rows_done = 0  # resampled current rows handed out
        self.frames_done = 0  # frames handed out (global index)
        self.offset = 0.0  # seconds of video before the current segment
        self.segments_done: set[str] = set()
        self._seen = None  # (size, settled) of the growing file at its last decode
        self._pts0 = None  # its first frame's presentation time
        self.pending: list[tuple[torch.Tensor, np.ndarray | None]] = []

    # current
    def poll_current(self, engine: WindowEngine, final: bool) -> bool:
        self.tail.poll()
        t = self.tail.times
        if not t.size:
            return False
        first = int(np.floor(t[0]))
        last = int(np.floor(t[-1])) - (0 if final else 1)  # a second is final once the next one began
        if last < first + self.rows_done // RATE:
            return False
        rows = resample(t, self.tail.values, first, last, self.max_gap, str(self.tail.path))
        new = rows[self.rows_done:]
        if not len(new):
            return False
        engine.add_current(new, first)
        self.rows_done = len(rows)
        return True

    # frames
    def _times(self, n: int, pts: np.ndarray | None, fps: float) -> np.ndarray | None:
        if self.timestamps is not None:
            return None  # looked up when handed out
        if pts is None:
            pts = np.arange(n) / max(fps, 1e-9)
        return np.round((self.start + self.offset + pts) * 1e4) / 1e4

    def _decode(self, path: Path, lo: int, quiet: bool, leave_last: bool = False):
        """Decode frames lo.. of ``path`` (but the last listed one if ``leave_last``: it may be
        half written) -> (frames, pts, fps, n listed), or None when ``quiet`` and unreadable."""
        try:
            r = VideoReader(path, timeout=self.timeout)
        except UserError:
            if quiet:
                return None
            raise
        n = len(r)
        hi = n - 1 if leave_last else n
        out = []
        for s in range(lo, hi, self.chunk):
            try:
                out.append(resize_frames(r._batch(list(range(s, min(s + self.chunk, hi)))), self.size_wh).cpu())
            except _DecodeFailure:
                if quiet:
                    break
                raise UserError(f"{path}: truncated or corrupt video segment") from None
        frames = torch.cat(out) if out else torch.zeros(0, 3, *self.size_wh, dtype=torch.uint8)
        pts = r.pts(lo, lo + len(frames))
        fps = r.info.fps
        return frames, pts, fps, n

    def poll_frames(self, final: bool) -> bool:
        got = False
        now = time.time()
        if self.video.is_dir():
            segs = sorted(p for p in self.video.iterdir()  # hidden names: files still being written
                          if p.suffix.lower() in VIDEO_EXT and not p.name.startswith(".") and p.is_file())
            for k, p in enumerate(segs):
                if p.name in self.segments_done:
                    continue
                if not (final or k < len(segs) - 1 or now - p.stat().st_mtime > self.settle):
                    break  # the newest segment may still be being written
                frames, pts, fps, _ = self._decode(p, 0, quiet=False)
                rel = None if pts is None else pts - pts[0]
                self.pending.append((frames, self._times(len(frames), rel, fps)))
                dur = (rel[-1] if rel is not None and len(rel) else (len(frames) - 1) / max(fps, 1e-9)) + 1 / max(fps, 1e-9)
                self.offset += dur
                self.segments_done.add(p.name)
                got = True
        elif self.video.is_file():
            st = self.video.stat()
            settled = final or now - st.st_mtime > self.settle
            if (st.st_size, settled) != self._seen:  # re-open only when it grew or came to rest
                self._seen = (st.st_size, settled)
                lo = self.frames_done + self._pending_frames()
                r = self._decode(self.video, lo, quiet=not settled, leave_last=not settled)
                if r is not None and len(r[0]):
                    frames, pts, fps, _ = r
                    if pts is None:
                        pts = (lo + np.arange(len(frames))) / max(fps, 1e-9)
                    if self._pts0 is None:
                        self._pts0 = float(pts[0]) if lo == 0 else 0.0
                    self.pending.append((frames, self._times(len(frames), pts - self._pts0, fps)))
                    got = True
        return got

    def _pending_frames(self) -> int:
        return sum(len(f) for f, _ in self.pending)

    def hand_out(self, engine: WindowEngine) -> bool:
        got = False
        if self.timestamps is not None and self.pending:
            try:
                ts = read_frame_times(self.timestamps)
            except UserError:
                ts = np.zeros(0)
        while self.pending:
            frames, times = self.pending[0]
            if times is None:
                avail = len(ts) - self.frames_done
                if avail <= 0:
                    break
                if avail < len(frames):
                    self.pending[0] = (frames[avail:], None)
                    frames = frames[:avail]
                else:
                    self.pending.pop(0)
                times = ts[self.frames_done:self.frames_done + len(frames)]
            else:
                self.pending.pop(0)
            engine.add_frames(frames, times)
            self.frames_done += len(frames)
            got = True
        return got


def follow(engine: WindowEngine, feed: FollowFeed, a, log) -> None:
    idle_since = time.monotonic()
    try:
        while True:
            got = feed.poll_current(engine, final=False)
            got |= feed.poll_frames(final=False)
            got |= feed.hand_out(engine)
            if got:
                engine.run()
                log.flush()
                idle_since = time.monotonic()
            elif a.follow_timeout is not None and time.monotonic() - idle_since > a.follow_timeout:
                break
            time.sleep(a.poll)
    except KeyboardInterrupt:
        pass
    feed.poll_current(engine, final=True)
    feed.poll_frames(final=True)
    feed.hand_out(engine)


# -- command line ---------------------------------------------------------------------------------
def build_parser() -> Parser:
    p = Parser(prog="python -m fmfast.detect", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("video", nargs="?", help="video file (or, with --follow, a folder of segments)")
    p.add_argument("current", nargs="?", help="current log CSV")
    p.add_argument("--checkpoint", required=True, help="fmfast checkpoint or reference-code state_dict")
    p.add_argument("--recording", nargs=2, metavar=("V2ROOT", "NAME"), help="score a recording of a V2 root instead")
    p.add_argument("--out", required=True, help="folder for windows.csv, alarms.csv, timeline.png, overlays/")
    p.add_argument("--start", help='time of the first frame, "YYYY-MM-DD HH:MM:SS[.fff]"')
    p.add_argument("--timestamps", help="CSV with a header and the time of each frame in column 0")
    p.add_argument("--max-gap", type=float, default=5.0, help="longest tolerated gap in the current log, s")
    p.add_argument("--hop", type=int, default=10, help="frames between window ends (default 10)")
    p.add_argument("--batch", type=int, default=64, help="windows per forward pass")
    p.add_argument("--on", type=float, default=0.6, help="probability that starts an alarm")
    p.add_argument("--off", type=float, default=0.4, help="probability below which it ends")
    p.add_argument("--min-duration", type=float, default=2.0, help="seconds an alarm must last to count")
    p.add_argument("--max-overlays", type=int, default=20, help="segmentation overlays written at most")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--chunk", type=int, default=64, help="frames decoded per batch")
    p.add_argument("--decode-timeout", type=float, default=60.0, help="seconds one chunk may take to decode")
    p.add_argument("--allow-truncated", action="store_true", help="score the decodable part of a cut-off video")
    p.add_argument("--follow", action="store_true", help="watch a growing recording (see above)")
    p.add_argument("--poll", type=float, default=1.0, help="--follow: seconds between looks for new data")
    p.add_argument("--settle", type=float, default=2.0, help="--follow: seconds unchanged before a file counts as complete")
    p.add_argument("--follow-timeout", type=float, help="--follow: stop after this many seconds without new data")
    return p


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available")
    return name


def main(argv=None) -> int:
    from fmfast.checkpoint import load_model

    a = build_parser().parse_args(argv)
    if a.recording and (a.video or a.current):
        raise UserError("give either VIDEO CURRENT.csv or --recording V2ROOT NAME, not both")
    if not a.recording and not (a.video and a.current):
        raise UserError("give VIDEO and CURRENT.csv, or --recording V2ROOT NAME")
    if a.follow and a.recording:
        raise UserError("--follow watches VIDEO and CURRENT.csv; a V2 recording cannot grow")
    model, meta = load_model(a.checkpoint)
    scorer = Scorer(model, meta, _device(a.device), batch=a.batch)
    tracker = AlarmTracker(a.on, a.off, a.min_duration)
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {out} exists and is not a folder")
    t_begin = time.perf_counter()

    if a.follow:
        if not Path(a.video).exists():
            raise UserError(f"{a.video}: no such video file or folder of segments")
        feed = FollowFeed(a, scorer.size_wh, a.max_gap)  # checks the arguments before any output exists
        out.mkdir(parents=True, exist_ok=True)
        wlog = open(out / "windows.csv", "w")
        alog = open(out / "alarms.csv", "w")
        wlog.write(WINDOW_HEADER)
        alog.write(ALARM_HEADER)
        t0 = [None]

        def on_windows(first, f, times, probs):
            t0[0] = times[0] if t0[0] is None else t0[0]
            wlog.writelines(window_lines(first, f, times, probs, t0[0]))
            wlog.flush()

        def on_event(kind, al, eng):
            stamp = format_seconds(al.start_time, frac=True)
            if kind == "on":
                print(f"ALARM  {stamp}  p={al.peak_prob:.3f}  frame {eng.out.frames[al.start]}", flush=True)
            else:
                print(f"alarm over  {stamp} .. {format_seconds(al.last_time, frac=True)}  "
                      f"({al.duration:.1f} s, peak p={al.peak_prob:.3f}{', still open' if al.open else ''})", flush=True)
                alog.write(alarm_line(len(eng.out.alarms), al, eng.out.frames))
                alog.flush()
                _write_overlays(out / "overlays", eng.out.overlays[-1:] if eng.out.overlays and
                                eng.out.overlays[-1][0] == len(eng.out.alarms) else [])

        engine = WindowEngine(scorer, a.hop, a.batch, tracker, on_event, on_windows, a.max_overlays)
        try:
            follow(engine, feed, a, wlog)
            res = engine.finish()
        finally:
            wlog.close()
            alog.close()
        wall = time.perf_counter() - t_begin
        _write_timeline(out, engine, res, a, meta)
        print(f"followed {a.video}: {len(res.probs)} windows, {len(res.alarms)} alarms -> {out}")
        return 0

    engine = WindowEngine(scorer, a.hop, a.batch, tracker, max_overlays=a.max_overlays)
    if a.recording:
        feed_v2(engine, *a.recording, chunk=max(a.chunk, 256))
        title = f"{a.recording[1]}"
    else:
        from fmfast.ingest import _console

        feed_file(engine, a, _console())
        title = Path(a.video).name
    res = engine.finish()
    wall = time.perf_counter() - t_begin
    if not res.probs:
        raise UserError("no window could be scored (no frame has current rows)")
    _publish(out, engine, res, a, meta, title)
    span = _span(np.asarray(engine.times))
    n_alarm = len(res.alarms)
    print(f"{title}: {len(res.probs)} windows (hop {a.hop}), {n_alarm} alarm{'s' * (n_alarm != 1)}"
          + (f", {res.skipped} windows without current skipped" if res.skipped else "") + f" -> {out}")
    for k, al in enumerate(res.alarms[:20], 1):
        print(f"  alarm {k}: {format_seconds(al.start_time, frac=True)} .. {format_seconds(al.last_time, frac=True)} "
              f"({al.duration:.1f} s, peak p={al.peak_prob:.3f} at frame {res.frames[al.peak]})")
    if len(res.alarms) > 20:
        print(f"  ... {len(res.alarms) - 20} more in alarms.csv")
    print(f"{span:.1f} s of recording in {wall:.2f} s: {span / wall:.1f}x faster than real time "
          f"({len(res.probs) / wall:.0f} windows/s, {engine.n / wall:.0f} frames/s on {scorer.device})")
    return 0


def _span(times: np.ndarray) -> float:
    """Recording duration: first to last frame plus one frame period."""
    if len(times) < 2:
        return 0.0
    d = np.diff(times)
    period = float(np.median(d[d > 0])) if (d > 0).any() else 0.0
    return float(times[-1] - times[0]) + period


def _write_overlays(folder: Path, overlays) -> None:
    for k, frame_idx, frame, pmap in overlays:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_write(folder / f"alarm_{k:03d}_frame_{frame_idx:07d}.png") as tmp:
            overlay_png(tmp, frame.numpy(), pmap.numpy())


def _write_timeline(out: Path, engine: WindowEngine, res: Results, a, meta, title: str = "") -> None:
    t0 = float(engine.times[0]) if len(engine.times) else 0.0
    with atomic_write(out / "timeline.png") as tmp:
        timeline_png(tmp, t0, res.times, res.probs, res.alarms, engine.current_times, engine.current,
                     a.on, a.off, f"{title} {meta['model_name']} ({meta['task']})".strip())


def _publish(out: Path, engine: WindowEngine, res: Results, a, meta, title: str) -> None:
    """Write every output into a staging folder, then move them into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".detect.", dir=out))
    try:
        t0 = float(engine.times[0])
        (stage / "windows.csv").write_text(WINDOW_HEADER + "".join(
            window_lines(0, res.frames, res.times, res.probs, t0)))
        (stage / "alarms.csv").write_text(ALARM_HEADER + "".join(
            alarm_line(k + 1, al, res.frames) for k, al in enumerate(res.alarms)))
        _write_timeline(stage, engine, res, a, meta, title)
        if res.overlays:
            _write_overlays(stage / "overlays", res.overlays)
        if (out / "overlays").is_dir():
            shutil.rmtree(out / "overlays")
        for p in stage.iterdir():
            os.replace(p, out / p.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(run_main(main))

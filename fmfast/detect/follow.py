"""A live recording: a folder of video segments (as a camera recorder or ``ffmpeg -f segment``
writes them, read in name order, hidden names skipped; a segment is read once a newer one exists
or it has not changed for ``settle`` seconds) or one growing file in a format readable while
written (mkv, ts, avi; re-opened and re-indexed whenever it grows), plus a current log (and
optionally a frame timestamps file) that grow by appended rows."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from fmfast.data.csvfiles import RATE, CurrentTail, parse_time, read_frame_times, resample
from fmfast.data.decoders import resolve
from fmfast.data.video import VideoReader, resize_frames
from fmfast.detect.windows import WindowEngine
from fmfast.errors import DataError, DecodeError, SettingsError

VIDEO_EXT = (".mp4", ".mkv", ".avi", ".mov", ".ts", ".m4v", ".webm", ".flv", ".mpg", ".mpeg", ".h264", ".hevc")


class FollowFeed:
    """A live recording: a folder of video segments or one growing file, plus a growing log."""

    def __init__(self, video: str, current: str, size_wh: tuple[int, int], start: str | None = None,
                 timestamps: str | None = None, max_gap: float = 5.0, settle: float = 2.0, chunk: int = 64,
                 decode_timeout: float = 60.0, decoder: str = "auto"):
        self.video, self.size_wh, self.max_gap = Path(video), size_wh, max_gap
        self.decoder = resolve(decoder)  # decord or pyav, for every file of the recording
        self.settle, self.chunk, self.timeout = settle, chunk, decode_timeout
        self.start = parse_time(start, "start time") if start else None
        self.timestamps = timestamps
        if self.start is None and self.timestamps is None:
            raise SettingsError("frame times unknown: give the time of the first frame or a file of frame timestamps")
        self.tail = CurrentTail(current)
        self.rows_done = 0  # resampled current rows handed out
        self.frames_done = 0  # frames handed out (global index)
        self.offset = 0.0  # seconds of video before the current segment
        self.segments_done: set[str] = set()
        self._seen = None  # (size, settled) of the growing file at its last decode
        self._ino = None  # its inode: another one means it was replaced (rewritten, rotated)
        self._probed: set = set()  # (path, inode) of the video files already probed
        self._ts = np.zeros(0)  # the last frame timestamps read whole
        self._last_t = None  # the time of the last frame handed out
        self.notes: list[str] = []  # what the follower had to work around, for the user
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
        key = (path, path.stat().st_ino) if path.exists() else None
        try:  # the header is probed once per file, not at every re-open of a growing one
            r = VideoReader(path, timeout=self.timeout, probe=key not in self._probed, decoder=self.decoder)
            self._probed.add(key)
        except DataError:
            if quiet:
                return None
            raise
        n = len(r)
        hi = n - 1 if leave_last else n
        out = []
        for s in range(lo, hi, self.chunk):
            try:
                out.append(resize_frames(r.decode(list(range(s, min(s + self.chunk, hi)))), self.size_wh).cpu())
            except DecodeError:
                if quiet:
                    break
                raise DataError(f"{path}: truncated or corrupt video segment") from None
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
            if self._ino is not None and (st.st_ino != self._ino or (self._seen and st.st_size < self._seen[0])):
                # rewritten or rotated: the same recording written again -- keep counting frames
                # from where we are (frames already scored are not scored twice)
                self.notes.append(f"{self.video}: replaced while followed; continued at frame "
                                  f"{self.frames_done + self._pending_frames()}")
                self._seen = None
            self._ino = st.st_ino
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

    def hand_out(self, engine: WindowEngine, final: bool = False) -> bool:
        got = False
        if self.timestamps is not None and self.pending:
            try:
                self._ts = read_frame_times(self.timestamps)
            except DataError:
                if final:
                    raise
                # (a line being written); the last complete read still holds
            if len(self._ts) < self.frames_done or (self.frames_done and self._ts[self.frames_done - 1] != self._last_t):
                raise DataError(f"{self.timestamps}: no longer starts with the times of the {self.frames_done} frames "
                                f"already placed by it (truncated or rotated?); the frame times of the rest "
                                f"are unknown, so scoring cannot continue")
            ts = self._ts
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
            self._last_t = float(times[-1]) if len(times) else self._last_t
            got = True
        return got


def follow(engine: WindowEngine, feed: FollowFeed, log, poll: float = 1.0, timeout: float | None = None) -> None:
    """Feed ``engine`` from ``feed`` until Ctrl-C or ``timeout`` seconds without new data,
    looking every ``poll`` seconds; ``log`` (the live windows file) is flushed after each batch."""
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
            elif timeout is not None and time.monotonic() - idle_since > timeout:
                break
            time.sleep(poll)
    except KeyboardInterrupt:
        pass
    feed.poll_current(engine, final=True)
    feed.poll_frames(final=True)
    feed.hand_out(engine, final=True)
    left = feed._pending_frames()
    if left:  # frames that never got a time: say so, never end as if all were scored
        raise DataError(f"{feed.timestamps}: {left} decoded frames never got a frame time (the timestamps file "
                        f"ended after {feed.frames_done} frames)")

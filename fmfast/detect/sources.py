"""Where a detection's frames and current come from, offline: an own video with its current
log, or a recording in the V2 layout. (A live, growing recording: ``fmfast.detect.follow``.)"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from fmfast.data import matfile
from fmfast.data.csvfiles import RATE, parse_times, read_currents, read_timestamps
from fmfast.data.ingest import align
from fmfast.data.video import resize_frames
from fmfast.detect.windows import WindowEngine
from fmfast.errors import DataError
from fmfast.progress import frame_progress


def feed_file(engine: WindowEngine, video: str, current: str, start: str | None = None, timestamps: str | None = None,
              max_gap: float = 5.0, chunk: int = 64, allow_truncated: bool = False, decode_timeout: float = 60.0,
              console=None, decoder: str = "auto") -> str:
    """Own video + current log, offline: frames are aligned with the log by time
    (``fmfast.data.ingest.align``), decoded in chunks (by ``decoder``) and scored as they come.
    Returns the decoder that ran (decord or pyav)."""
    al = align(video, current, start, timestamps, max_gap, engine.s.current_seconds, decode_timeout, decoder)
    engine.add_current(al.current, al.first_second)
    bar = frame_progress(console, f"detect ({al.reader.backend})") if console is not None else contextlib.nullcontext()
    with bar:
        task = bar.add_task("frames", total=al.stop - al.first) if console is not None else None
        for s, frames in al.reader.chunks(engine.s.size_wh, chunk, allow_truncated):
            lo, hi = max(s, al.first), min(s + len(frames), al.stop)
            if lo < hi:
                engine.add_frames(frames[lo - s:hi - s], al.times[lo:hi])
                engine.run(partial=False)  # full batches while decoding; finish() does the rest
                if task is not None:
                    bar.advance(task, hi - lo)
            if s + len(frames) >= al.stop:
                break
    if engine.n <= engine.need:
        raise DataError(f"{video}: {engine.n} frames inside the current log; the model's clip needs "
                        f"{engine.need + 1}")
    return al.reader.backend


def feed_v2(engine: WindowEngine, root: str, name: str, chunk: int = 256):
    """A recording in the V2 layout (the benchmark's, or one made by ``fmfast ingest``)."""
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
            raise DataError(f"{mat}: {data.shape[0]} frames but {len(stamps)} timestamps")
        if data.shape[0] <= engine.need:
            raise DataError(f"{mat}: {data.shape[0]} frames; the model's clip needs {engine.need + 1}")
        for s in range(0, data.shape[0], chunk):
            x = torch.from_numpy(matfile.read_slice(data, s, s + chunk))
            if tuple(x.shape[2:]) != engine.s.size_wh:  # stored [n,3,W,H] -> decoded order to resize
                x = resize_frames(x.permute(0, 3, 2, 1), engine.s.size_wh)
            engine.add_frames(x, times[s:s + len(x)], row_end[s:s + len(x)])
            engine.run(partial=False)

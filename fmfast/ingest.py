"""Turn an own recording (a video file + a 3-phase current log) into the V2 layout.

    python -m fmfast.ingest VIDEO CURRENT.csv --out DIR [--start "YYYY-MM-DD HH:MM:SS"]
        [--timestamps FRAMES.csv] [--labels MASKS] [--size 64] [--max-gap 5] [--name NAME]

Frames are decoded by decord in bounded chunks, resized (antialiased bilinear) to the model's
frame size and stored in the V2 axis order [T,3,W,H]. Each frame's time comes from the
timestamps file (one row per frame, header first) or from --start plus the frame's
presentation time in the video. The current log (any rate; stamps to the second or finer) is
resampled to 2 rows per second over the seconds the frames need, with up to --current-seconds
of history before the first frame: each half second is the mean of the samples in it, or the
linear interpolation between its neighbours when it holds none; a gap longer than --max-gap
seconds is an error. Frames outside the log's time span are dropped. Labels (optional): a .npy [N,H,W] or a folder of
mask images, one per frame in name order, >0 = hot spot; without labels the masks are zeros.

Splits: the recording's key lists every frame with a full clip history (index >=
num_frames*stride - 1, the frames the reference loader uses as they are) in test.json
(--split test, the default: data to evaluate or detect on), in train.json (--split train),
or in neither (--split none). It is a key of both files either way. Ingesting into an
existing root adds the recording to it.
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fmfast.cli import Parser, UserError, run_main
from fmfast.current_io import (RATE, format_seconds, parse_time, read_current_csv, read_frame_times, resample,
                               write_current_csv, write_frame_times)
from fmfast.video_io import VideoReader, parse_size


@dataclass
class Aligned:
    """A video aligned with its current log."""

    reader: VideoReader
    times: np.ndarray  # epoch seconds of every frame the container lists
    first: int  # frames first..stop-1 fall inside the current log
    stop: int
    first_second: int  # the current rows cover these whole seconds, 2 rows each
    current: np.ndarray  # float64 [2 * seconds, 3]
    raw_rate: float  # samples per second of the log as given

    @property
    def frame_seconds(self) -> np.ndarray:
        return np.floor(self.times[self.first:self.stop]).astype(np.int64)


def frame_times(reader: VideoReader, start: float | None, timestamps: str | None) -> np.ndarray:
    n = len(reader)
    if timestamps is not None:
        t = read_frame_times(timestamps)
        if len(t) != n:
            raise UserError(f"{timestamps}: has {len(t)} frame timestamps but {reader.path} has {n} frames")
        return t
    if start is None:
        raise UserError("frame times unknown: pass --start \"YYYY-MM-DD HH:MM:SS\" (the time of the first frame) "
                        "or --timestamps FRAMES.csv")
    pts = reader.pts(0, n)
    if pts is None:
        if reader.info.fps <= 0:
            raise UserError(f"{reader.path}: no frame rate or presentation times; pass --timestamps")
        pts = np.arange(n) / reader.info.fps
    # container times are float32-rounded: snap to 0.1 ms so frame 25 at 25 fps lands on second 1
    return np.round((start + pts - pts[0]) * 1e4) / 1e4


def align(video: str, current: str, start: str | None = None, timestamps: str | None = None,
          max_gap: float = 5.0, history_seconds: int = 120, decode_timeout: float = 60.0) -> Aligned:
    """Open the video and the log, check they overlap, resample the log. Decodes no frames."""
    ct, cv = read_current_csv(current)
    t0 = parse_time(start, "--start") if start is not None else None
    reader = VideoReader(video, timeout=decode_timeout)
    ft = frame_times(reader, t0, timestamps)
    c_first, c_last = int(np.floor(ct[0])), int(np.floor(ct[-1]))
    sec = np.floor(ft).astype(np.int64)
    inside = np.flatnonzero((sec >= c_first) & (sec <= c_last))
    if inside.size == 0:
        v0, v1 = format_seconds(ft[0]), format_seconds(ft[-1])
        raise UserError(f"{current}: the current log ({format_seconds(ct[0])} .. {format_seconds(ct[-1])}) "
                        f"does not overlap the video {video} ({v0} .. {v1}) in time")
    first, stop = int(inside[0]), int(inside[-1]) + 1
    first_second = max(c_first, int(sec[first]) - history_seconds + 1)
    rows = resample(ct, cv, first_second, int(sec[stop - 1]), max_gap, current)
    rate = (len(ct) - 1) / (ct[-1] - ct[0]) if len(ct) > 1 and ct[-1] > ct[0] else float("nan")
    return Aligned(reader, ft, first, stop, first_second, rows, rate)


def load_labels(path: str, n: int, size_wh: tuple[int, int]):
    """Masks -> a function giving uint8 [k, W, H] (stored order, 0/1) for frames a..b-1."""
    p = Path(path)
    w, h = size_wh
    if p.is_dir():
        from matplotlib.image import imread

        files = sorted(f for f in p.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"))
        if len(files) != n:
            raise UserError(f"{p}: {len(files)} mask images for a video of {n} frames")

        def read(i):
            try:
                m = np.asarray(imread(files[i]))
            except Exception as e:
                raise UserError(f"{files[i]}: cannot read mask image ({e})") from None
            return m[..., :3].max(axis=2) if m.ndim == 3 else m  # colour: any channel; alpha ignored

        def get(a, b):
            return _fit_masks(np.stack([read(i) for i in range(a, b)]), w, h)
    elif p.suffix == ".npy" and p.is_file():
        try:
            arr = np.load(p, mmap_mode="r")
        except Exception as e:
            raise UserError(f"{p}: cannot read masks ({e})") from None
        if arr.ndim != 3 or arr.shape[0] != n:
            raise UserError(f"{p}: expected masks [N={n}, height, width], found shape {list(arr.shape)}")

        def get(a, b):
            return _fit_masks(np.asarray(arr[a:b]), w, h)
    else:
        raise UserError(f"--labels: {p} is neither a .npy file nor a folder of mask images")
    return get


def _fit_masks(m: np.ndarray, w: int, h: int) -> np.ndarray:
    """Display-order masks [k, H', W'] -> 0/1 uint8 [k, W, H] (nearest neighbour)."""
    x = torch.from_numpy((np.asarray(m) > 0).astype(np.uint8))[:, None]
    if x.shape[2:] != (h, w):
        x = F.interpolate(x, size=(h, w), mode="nearest")
    return x[:, 0].transpose(1, 2).contiguous().numpy()


@functools.lru_cache(maxsize=1)
def _console():
    import os

    from rich.console import Console

    # a private copy of stderr: video_io silences fd 2 while decord runs
    return Console(file=os.fdopen(os.dup(2), "w"), stderr=True)


def frame_progress(console, what: str, unit: str = "frames"):
    """A transient rich bar (shown only on a terminal) counting frames with their rate."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task):
            speed = task.finished_speed or task.speed
            return Text(f"{speed:8.0f} {unit}/s" if speed else f"     ... {unit}/s")

    return Progress(TextColumn(f"[bold]{what}"), BarColumn(), MofNCompleteColumn(), Rate(), TimeRemainingColumn(),
                    console=console, transient=True, disable=not console.is_terminal)


@dataclass
class IngestResult:
    root: Path
    name: str
    frames: int
    first_second: int
    seconds: int
    dropped: int
    wall: float


def ingest(video: str, current: str, out: str, start: str | None = None, timestamps: str | None = None,
           labels: str | None = None, size="64", max_gap: float = 5.0, name: str | None = None,
           split: str = "test", num_frames: int = 10, stride: int = 1, current_seconds: int = 120,
           chunk: int = 64, overwrite: bool = False, allow_truncated: bool = False,
           decode_timeout: float = 60.0, console=None) -> IngestResult:
    from fmfast.v2_writer import MatAppender, Staging

    t_begin = time.perf_counter()
    size_wh = parse_size(size)
    if max_gap <= 0:
        raise UserError(f"--max-gap must be positive, got {max_gap}")
    if split not in ("test", "train", "none"):
        raise UserError(f"--split must be test, train or none, got {split!r}")
    name = name or Path(video).stem.replace(".", "_")
    al = align(video, current, start, timestamps, max_gap, current_seconds, decode_timeout)
    n_all = len(al.reader)
    get_labels = load_labels(labels, n_all, size_wh) if labels else None
    console = console or _console()
    with Staging(out, name, overwrite) as st:
        mat = MatAppender(st.path("videos"), size_wh)
        try:
            with frame_progress(console, f"ingest {name}") as bar:
                task = bar.add_task("decode", total=al.stop - al.first)
                for s, frames in al.reader.chunks(size_wh, chunk, allow_truncated):
                    a, b = max(s, al.first), min(s + len(frames), al.stop)
                    if a < b:
                        mat.append(frames[a - s:b - s].numpy(), get_labels(a, b) if get_labels else None)
                        bar.advance(task, b - a)
                    if s + len(frames) >= al.stop:
                        break
        finally:
            mat.close()
        kept = mat.frames
        if kept == 0:
            raise UserError(f"{video}: no decodable frames inside the current log's time span")
        stop = al.first + kept
        times = al.times[al.first:stop]
        last_second = int(np.floor(times[-1]))
        rows = al.current[:RATE * (last_second - al.first_second + 1)]
        write_current_csv(st.path("currents"), al.first_second, rows)
        write_frame_times(st.path("timestamps"), times)
        eligible = list(range(num_frames * stride - 1, kept))
        st.publish(train=eligible if split == "train" else [], test=eligible if split == "test" else [])
    return IngestResult(Path(out), name, kept, al.first_second, len(rows) // RATE, n_all - kept,
                        time.perf_counter() - t_begin)


def build_parser() -> Parser:
    p = Parser(prog="python -m fmfast.ingest", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("video", help="video file (mp4, avi, mkv, ... anything FFmpeg in decord reads)")
    p.add_argument("current", help="current log CSV: header, then timestamp, phase A, B, C per row")
    p.add_argument("--out", required=True, help="V2 root folder to create or add to")
    p.add_argument("--start", help='time of the first frame, "YYYY-MM-DD HH:MM:SS[.fff]"')
    p.add_argument("--timestamps", help="CSV with a header and the time of each frame in column 0")
    p.add_argument("--labels", help="hot-spot masks: .npy [N,H,W] or a folder of mask images")
    p.add_argument("--size", default="64", help="stored frame size: N or WIDTHxHEIGHT (default 64)")
    p.add_argument("--max-gap", type=float, default=5.0, help="longest tolerated gap in the current log, s")
    p.add_argument("--name", help="recording name (default: the video's file name)")
    p.add_argument("--split", default="test", choices=("test", "train", "none"),
                   help="which split lists the frames (default test)")
    p.add_argument("--num-frames", type=int, default=10, help="clip length T, for the split lists")
    p.add_argument("--stride", type=int, default=1, help="clip stride s, for the split lists")
    p.add_argument("--current-seconds", type=int, default=120, help="current history S kept before the first frame")
    p.add_argument("--chunk", type=int, default=64, help="frames decoded per batch (bounds memory)")
    p.add_argument("--decode-timeout", type=float, default=60.0, help="seconds one chunk may take to decode")
    p.add_argument("--allow-truncated", action="store_true", help="keep the decodable frames of a cut-off video")
    p.add_argument("--overwrite", action="store_true", help="replace a recording of the same name")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    for flag in ("chunk", "num_frames", "stride"):
        if getattr(a, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1")
    if a.current_seconds < 1:
        raise UserError("--current-seconds must be >= 1")
    r = ingest(a.video, a.current, a.out, a.start, a.timestamps, a.labels, a.size, a.max_gap, a.name, a.split,
               a.num_frames, a.stride, a.current_seconds, a.chunk, a.overwrite, a.allow_truncated, a.decode_timeout)
    msg = (f"{r.root}/videos/{r.name}.mat: {r.frames} frames, current {format_seconds(r.first_second)} "
           f"+ {r.seconds} s at 2 rows/s")
    if r.dropped:
        msg += f"; {r.dropped} frames outside the current log's time span dropped"
    print(f"{msg} ({r.frames / max(r.wall, 1e-9):.0f} frames/s)")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))

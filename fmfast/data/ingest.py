"""Turn an own recording (a video file + a 3-phase current log) into the V2 layout.

Frames are decoded by decord or PyAV (``decoder``) in bounded chunks, resized (antialiased
bilinear) to the model's frame size and stored in the V2 axis order [T,3,W,H]. Each frame's time comes from the
timestamps file (one row per frame, header first) or from a start time plus the frame's
presentation time in the video. The current log (any rate; stamps to the second or finer) is
resampled to 2 rows per second over the seconds the frames need, with up to ``current_seconds``
of history before the first frame: each half second is the mean of the samples in it, or the
linear interpolation between its neighbours when it holds none; a gap longer than ``max_gap``
seconds is an error. Frames outside the log's time span are dropped. Labels (optional): a .npy
[N,H,W] or a folder of mask images, one per frame in name order, >0 = hot spot; without labels
the masks are zeros.

Splits: the recording's key lists every frame with a full clip history (index >=
num_frames*stride - 1, the frames the reference loader uses as they are) in test.json
(``split="test"``, the default: data to evaluate or detect on), in train.json (``"train"``), or
in neither (``"none"``). It is a key of both files either way. Ingesting into an existing root
adds the recording to it.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fmfast.errors import DataError, OutputError, SettingsError
from fmfast.files import check_output, output_error
from fmfast.progress import frame_progress, stderr_console
from fmfast.data.csvfiles import (RATE, format_seconds, parse_time, read_current_csv, read_frame_times, resample,
                               write_current_csv, write_frame_times)
from fmfast.data.video import VideoReader, parse_size


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
            raise DataError(f"{timestamps}: has {len(t)} frame timestamps but {reader.path} has {n} frames")
        return t
    if start is None:
        raise SettingsError("frame times unknown: give the time of the first frame (\"YYYY-MM-DD HH:MM:SS\") "
                            "or a file of frame timestamps")
    pts = reader.pts(0, n)
    if pts is None:
        if reader.info.fps <= 0:
            raise DataError(f"{reader.path}: no frame rate or presentation times; give a file of frame timestamps")
        pts = np.arange(n) / reader.info.fps
    # container times are float32-rounded: snap to 0.1 ms so frame 25 at 25 fps lands on second 1
    return np.round((start + pts - pts[0]) * 1e4) / 1e4


def align(video: str, current: str, start: str | None = None, timestamps: str | None = None,
          max_gap: float = 5.0, history_seconds: int = 120, decode_timeout: float = 60.0,
          decoder: str = "auto") -> Aligned:
    """Open the video (with ``decoder``: auto, decord or pyav) and the log, check they
    overlap, resample the log. Decodes no frames."""
    ct, cv = read_current_csv(current)
    t0 = parse_time(start, "start time") if start is not None else None
    reader = VideoReader(video, timeout=decode_timeout, decoder=decoder)
    ft = frame_times(reader, t0, timestamps)
    c_first, c_last = int(np.floor(ct[0])), int(np.floor(ct[-1]))
    sec = np.floor(ft).astype(np.int64)
    inside = np.flatnonzero((sec >= c_first) & (sec <= c_last))
    if inside.size == 0:
        v0, v1 = format_seconds(ft[0]), format_seconds(ft[-1])
        raise DataError(f"{current}: the current log ({format_seconds(ct[0])} .. {format_seconds(ct[-1])}) "
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
            raise DataError(f"{p}: {len(files)} mask images for a video of {n} frames")

        def read(i):
            try:
                m = np.asarray(imread(files[i]))
            except Exception as e:
                raise DataError(f"{files[i]}: cannot read mask image ({e})") from None
            return m[..., :3].max(axis=2) if m.ndim == 3 else m  # colour: any channel; alpha ignored

        def get(a, b):
            return _fit_masks(np.stack([read(i) for i in range(a, b)]), w, h)
    elif p.suffix == ".npy" and p.is_file():
        try:
            arr = np.load(p, mmap_mode="r")
        except Exception as e:
            raise DataError(f"{p}: cannot read masks ({e})") from None
        if arr.ndim != 3 or arr.shape[0] != n:
            raise DataError(f"{p}: expected masks [N={n}, height, width], found shape {list(arr.shape)}")

        def get(a, b):
            return _fit_masks(np.asarray(arr[a:b]), w, h)
    else:
        raise DataError(f"{p}: labels must be a .npy file or a folder of mask images")
    return get


def _fit_masks(m: np.ndarray, w: int, h: int) -> np.ndarray:
    """Display-order masks [k, H', W'] -> 0/1 uint8 [k, W, H] (nearest neighbour)."""
    x = torch.from_numpy((np.asarray(m) > 0).astype(np.uint8))[:, None]
    if x.shape[2:] != (h, w):
        x = F.interpolate(x, size=(h, w), mode="nearest")
    return x[:, 0].transpose(1, 2).contiguous().numpy()


@dataclass
class IngestResult:
    root: Path
    name: str
    frames: int
    first_second: int
    seconds: int
    dropped: int
    wall: float
    decoder: str  # the decoder that ran: decord or pyav


def ingest(video: str, current: str, out: str, start: str | None = None, timestamps: str | None = None,
           labels: str | None = None, size="64", max_gap: float = 5.0, name: str | None = None,
           split: str = "test", num_frames: int = 10, stride: int = 1, current_seconds: int = 120,
           chunk: int = 64, overwrite: bool = False, allow_truncated: bool = False,
           decode_timeout: float = 60.0, console=None, decoder: str = "auto") -> IngestResult:
    t_begin = time.perf_counter()
    size_wh = parse_size(size)
    if max_gap <= 0:
        raise SettingsError(f"max_gap must be positive, got {max_gap}")
    if split not in ("test", "train", "none"):
        raise SettingsError(f"split must be test, train or none, got {split!r}")
    name = name or Path(video).stem.replace(".", "_")
    check_output(out, "folder")  # not a file/symlink/FIFO, and writable: before any decoding
    al = align(video, current, start, timestamps, max_gap, current_seconds, decode_timeout, decoder)
    n_all = len(al.reader)
    get_labels = load_labels(labels, n_all, size_wh) if labels else None
    console = console or stderr_console()
    _check_space(Path(out), (al.stop - al.first) * 4 * size_wh[0] * size_wh[1])
    try:
        kept, first_second, n_rows = _write(al, out, name, overwrite, size_wh, chunk, allow_truncated, get_labels,
                                            console, video, num_frames, stride, split)
    except OSError as e:  # a full or read-only disk while writing: one line; Staging removed its folder
        if isinstance(e, OutputError):
            raise
        raise output_error(Path(out), e) from None
    return IngestResult(Path(out), name, kept, first_second, n_rows // RATE, n_all - kept,
                        time.perf_counter() - t_begin, al.reader.backend)


def _check_space(out: Path, frame_bytes: int) -> None:
    """Refuse to start when the disk cannot hold the recording: HDF5 meeting a full disk
    mid-write can take the process down (a segfault in its close), not just raise."""
    folder = out
    while not folder.exists():
        folder = folder.parent
    st = os.statvfs(folder)
    free, need = st.f_bavail * st.f_frsize, frame_bytes + (1 << 20)  # + the CSVs and HDF5 metadata
    if free < need:
        raise OutputError(f"{out}: cannot write (no space left on the device: the recording needs about "
                          f"{need / 1e6:.1f} MB, {free / 1e6:.1f} MB are free)")


def _write(al, out, name, overwrite, size_wh, chunk, allow_truncated, get_labels, console, video, num_frames,
           stride, split):
    """Decode, resize and write the recording into a staging folder, then publish it."""
    from fmfast.data.writer import MatAppender, Staging

    with Staging(out, name, overwrite) as st:
        mat = MatAppender(st.path("videos"), size_wh)
        try:
            with frame_progress(console, f"ingest {name} ({al.reader.backend})") as bar:
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
            raise DataError(f"{video}: no decodable frames inside the current log's time span")
        stop = al.first + kept
        times = al.times[al.first:stop]
        last_second = int(np.floor(times[-1]))
        rows = al.current[:RATE * (last_second - al.first_second + 1)]
        write_current_csv(st.path("currents"), al.first_second, rows)
        write_frame_times(st.path("timestamps"), times)
        eligible = list(range(num_frames * stride - 1, kept))
        st.publish(train=eligible if split == "train" else [], test=eligible if split == "test" else [])
    return kept, al.first_second, len(rows)

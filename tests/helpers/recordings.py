"""Small real recordings for the ingest/detect tests: videos encoded with PyAV's FFmpeg,
current logs as CSV, and the broken files the bad-input tests need."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av", reason="PyAV (dev extra 'av') encodes the test videos")

T0 = np.datetime64("2024-03-01T08:00:00")


def frames(n: int, h: int = 48, w: int = 80) -> np.ndarray:
    """uint8 [n, h, w, 3]: frame i has red = 5*i everywhere (its index survives lossy coding)
    and a bright green band over the top quarter (shows the axis order)."""
    f = np.zeros((n, h, w, 3), np.uint8)
    f[..., 0] = (5 * np.arange(n) % 255)[:, None, None]
    f[:, : h // 4, :, 1] = 220
    f[..., 2] = 40
    return f


def frame_index(stored: np.ndarray) -> np.ndarray:
    """Recover the index of stored frames [n, 3, W, H] from their red level."""
    return np.round(stored[:, 0].reshape(len(stored), -1).mean(1) / 5).astype(int)


def write_video(path, fr: np.ndarray, fps: int = 25, codec: str = "libx264", crf: int = 4, gop: int | None = None,
                **options) -> Path:
    """``gop``: a keyframe every ``gop`` frames, with B-frames (x264: seeking has keyframes to go to)."""
    path = Path(path)
    c = av.open(str(path), "w", options=options)
    s = c.add_stream(codec, rate=fps)
    s.width, s.height, s.pix_fmt = fr.shape[2], fr.shape[1], "yuv420p"
    if codec == "libx264":
        s.options = {"crf": str(crf)}  # default near-lossless: frame contents are checked after decoding
        if gop:
            s.options |= {"g": str(gop), "keyint_min": str(gop), "bf": "3"}
    for f in fr:
        for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()
    return path


def stamp(seconds: float, frac: bool = False) -> str:
    t = T0 + np.timedelta64(int(round(seconds * 1000)), "ms")
    s = str(t).replace("T", " ")
    return s if frac else s[:19]


def write_current(path, times: np.ndarray, values: np.ndarray, frac: bool = False,
                  header: str = "time,A,B,C") -> Path:
    """A log with samples at ``times`` (seconds after T0)."""
    path = Path(path)
    lines = [header] + [f"{stamp(t, frac)},{a},{b},{c}" for t, (a, b, c) in zip(times, values)]
    path.write_text("\n".join(lines) + "\n")
    return path


def v2_current(path, first: int, seconds: int) -> tuple[Path, np.ndarray]:
    """A log already in the V2 form: 2 rows per second sharing the second's stamp."""
    t = np.repeat(np.arange(first, first + seconds), 2).astype(float)
    v = np.stack([1000 + np.arange(t.size), 2000 + 2 * np.arange(t.size), 3000 - np.arange(t.size)], 1).astype(float)
    return write_current(path, t, v), v


def corrupt_tail(src: Path, dst: Path) -> Path:
    """Zero the second half of an mp4's frame data, keeping its index: the container lists
    frames it no longer holds."""
    d = bytearray(src.read_bytes())
    i, j = d.find(b"mdat"), d.find(b"moov")
    assert 0 < i < j, "expected an mp4 with moov after mdat"
    s = i + 4 + (j - i) // 2
    d[s:j - 8] = bytes(j - 8 - s)
    dst.write_bytes(bytes(d))
    return dst


def audio_only(path) -> Path:
    c = av.open(str(path), "w")
    s = c.add_stream("aac", rate=8000)
    fr = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
    fr.sample_rate = 8000
    for p in s.encode(fr):
        c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()
    return Path(path)


def lying_avi(path, n_frames: int = 20, claims: int = 2_000_000_000) -> Path:
    """An MPEG-4 AVI whose headers (avih dwTotalFrames, strh dwLength) claim ``claims`` frames."""
    import struct

    src = write_video(Path(path).with_suffix(".src.avi"), frames(n_frames), fps=10, codec="mpeg4")
    b = bytearray(src.read_bytes())
    i, j = b.find(b"avih"), b.find(b"strh")
    assert i > 0 and j > 0, "expected an AVI with avih and strh chunks"
    struct.pack_into("<I", b, i + 8 + 16, claims)  # MainAVIHeader.dwTotalFrames
    struct.pack_into("<I", b, j + 8 + 32, claims)  # AVIStreamHeader.dwLength
    Path(path).write_bytes(bytes(b))
    src.unlink()
    return Path(path)


def cut_file(src: Path, dst: Path, fraction: float = 0.5) -> Path:
    """The first ``fraction`` of a file's bytes (a recording cut off while being written)."""
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * fraction)])
    return Path(dst)

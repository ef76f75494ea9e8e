"""Video decoders behind one interface: an opened file with ``frames`` (as its index lists
them), ``fps``, ``height``, ``width``, ``device``, ``decode(idx)`` -> uint8 [n, H, W, 3] (frame
i is the i-th frame in presentation order) and ``pts(start, stop)`` -> float64 [n] seconds.

decord is the primary decoder (random access by index, GPU decoding in CUDA builds); PyAV,
already a dependency (the probe reads headers with it), is the fallback where no decord wheel
installs. ``resolve("auto")`` picks decord when it imports, else PyAV. Both run FFmpeg on the
same bitstream, so they give the same frames (the tests hold them to one grey level).

Decoders raise their own exceptions; ``fmfast.data.video`` turns them into DataError.
"""
from __future__ import annotations

import numpy as np
import torch

from fmfast.data.probe import decord_first_frame_size, pyav_index
from fmfast.errors import SettingsError

NAMES = ("auto", "decord", "pyav")
LABEL = {"decord": "decord", "pyav": "PyAV"}  # as the user knows them, in messages
INSTALL = {"decord": "pip install decord2", "pyav": "pip install av"}


def importable(backend: str) -> bool:
    try:
        __import__("decord" if backend == "decord" else "av")
        return True
    except Exception:  # ImportError, or a wheel whose native library does not load (OSError)
        return False


def resolve(name: str = "auto", where: str = "decoder") -> str:
    """"auto" -> "decord" when it imports, else "pyav"; a named one that does not import is a
    SettingsError (``where`` names the setting in it)."""
    if name not in NAMES:
        raise SettingsError(f"{where}: expected one of {', '.join(NAMES)}, got {name!r}")
    if name == "auto":
        for backend in ("decord", "pyav"):
            if importable(backend):
                return backend
        raise SettingsError(f"{where} auto: no video decoder is installed ({INSTALL['decord']}, or {INSTALL['pyav']})")
    if not importable(name):
        raise SettingsError(f"{where} {name}: {LABEL[name]} is not installed ({INSTALL[name]})")
    return name


def devices(backend: str) -> list[str]:
    """Where ``backend`` may decode, best first: decord on the GPU when torch has CUDA (its
    open fails on a build without CUDA and the CPU is next), PyAV on the CPU."""
    return (["cuda"] if backend == "decord" and torch.cuda.is_available() else []) + ["cpu"]


def open_decoder(backend: str, path: str, device: str = "cpu", threads: bool = True):
    """``threads=False``: PyAV without frame threads (a corrupt packet fails at the same frame
    on any machine; frame threads hold back as many frames as there are threads)."""
    return DecordDecoder(path, device) if backend == "decord" else PyAVDecoder(path, threads)


class DecordDecoder:
    name = "decord"

    def __init__(self, path: str, device: str = "cpu"):
        import decord

        decord.logging.set_level(decord.logging.QUIET)
        self.device = device
        self._vr = decord.VideoReader(path, ctx=decord.gpu(0) if device == "cuda" else decord.cpu(0))
        self.frames = len(self._vr)
        self.height, self.width = decord_first_frame_size(self._vr, path) if self.frames else (0, 0)
        self.fps = float(self._vr.get_avg_fps() or 0.0)

    def decode(self, idx: list[int]) -> torch.Tensor:
        b = self._vr.get_batch(idx)
        if self.device == "cpu":
            return torch.from_numpy(b.asnumpy())
        return torch.utils.dlpack.from_dlpack(b.to_dlpack())

    def pts(self, start: int, stop: int) -> np.ndarray | None:
        ts = np.asarray(self._vr.get_frame_timestamp(range(start, stop)), dtype=np.float64)
        return ts[:, 0] if ts.shape == (stop - start, 2) else None


class PyAVDecoder:
    """Random access by index on a sequential decoder: a request at or shortly after the last
    frame decoded continues from there (chunks are mostly sequential); one further back, or
    past a keyframe, seeks to the keyframe at or before it and decodes forward. A decoded
    frame's index is its place among the packets' presentation times, as decord counts."""

    name = "pyav"
    device = "cpu"

    def __init__(self, path: str, threads: bool = True):
        import av

        self._c = av.open(path)
        if not self._c.streams.video:
            raise ValueError("cannot find video stream")
        self._s = s = self._c.streams.video[0]
        s.thread_type = "AUTO" if threads else "SLICE"
        pts, keys, self.frames = pyav_index(self._c, s)  # (None, None, n): a stream without times
        self._pts = np.asarray(pts, np.int64) if pts is not None else None
        self._keys = np.asarray(keys, np.int64) if pts is not None else None
        self._tb = float(s.time_base) if s.time_base else 0.0
        self.fps = float(s.average_rate or s.guessed_rate or 0.0)
        self._it, self._next = None, 0  # the decoding generator and the index it yields next
        self.height, self.width = self.decode([0]).shape[1:3] if self.frames else (0, 0)

    def _seek(self, i: int) -> None:
        if self._pts is not None:  # the keyframe at or before frame i (by presentation time)
            k = self._keys[max(0, int(np.searchsorted(self._keys, self._pts[i], side="right")) - 1)]
            self._c.seek(int(k), stream=self._s, backward=True, any_frame=False)
            self._next = None  # known from the first frame's time
        else:  # no times to seek by: count from the start
            self._c.seek(0, stream=self._s)
            self._next = 0
        self._it = self._c.decode(self._s)

    def _far(self, i: int) -> bool:
        if self._it is None or self._next is None or i < self._next:
            return True
        if self._pts is None or self._next >= self.frames:
            return False
        # a keyframe between the next frame and frame i: seeking there skips decoding work
        return bool(np.searchsorted(self._keys, self._pts[i], "right") > np.searchsorted(self._keys, self._pts[self._next], "right"))

    def _frame(self, i: int) -> np.ndarray:
        if self._far(i):
            self._seek(i)
        for f in self._it:
            if self._pts is not None and f.pts is not None:
                k = int(np.searchsorted(self._pts, f.pts))
            else:
                k = self._next if self._next is not None else 0
            self._next = k + 1
            if k == i:
                return f.to_ndarray(format="rgb24")
            if k > i:
                break
        self._it = None
        raise IndexError(f"Out of bound: frame {i} is listed in the index but not in the stream")

    def decode(self, idx: list[int]) -> torch.Tensor:
        out = {}
        try:
            for i in sorted(set(idx)):
                if not 0 <= i < self.frames:
                    raise IndexError(f"Out of bound: frame {i} of {self.frames}")
                out[i] = self._frame(i)
        except BaseException:
            self._it = None  # the decoder's state after an error is unknown: seek next time
            raise
        return torch.from_numpy(np.stack([out[i] for i in idx]))

    def pts(self, start: int, stop: int) -> np.ndarray | None:
        if self._pts is None or not self._tb:
            return None
        return self._pts[start:stop].astype(np.float64) * self._tb

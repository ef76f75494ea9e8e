"""Video decoding with decord or PyAV (``fmfast.data.decoders``, chosen by ``decoder``):
bounded-memory chunks, a time limit per chunk, frames resized to the model's size and laid out
in the V2 axis order [N, 3, W, H].

The decoders print FFmpeg's and their own log lines straight to file descriptor 2; they are
captured around each call and boiled down to one reason in the error message instead. Where a
chunk fails, the rest is decoded by PyAV without frame threads, up to the first frame that
fails: decord reports a corrupt packet from its read-ahead thread, at a frame that varies from
run to run (and frame threads hold back as many frames as a machine has threads).
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from fmfast.data import decoders
from fmfast.data.probe import _reason
from fmfast.data.probe import probe as _probe
from fmfast.errors import DataError, DataWarning, DecodeError, SettingsError


@contextlib.contextmanager
def _captured_fd2():
    """Send fd 2 to a temp file for the duration; yields a list that receives its text."""
    out: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        try:
            os.dup2(tmp.fileno(), 2)
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode(errors="replace"))


def _run_bounded(fn, timeout: float, what: str):
    """Run ``fn()`` in a daemon thread; a decoder that stalls past ``timeout`` seconds is
    abandoned (the thread cannot be killed, but the process can exit) instead of hanging."""
    box: dict = {}

    def work():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller
            box["error"] = e

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise DataError(f"{what}: decoding stalled for more than {timeout:g} s (corrupt or truncated video?)")
    if "error" in box:
        raise box["error"]
    return box["value"]


@dataclass
class VideoInfo:
    path: Path
    frames: int  # as the container's index reports it
    fps: float
    height: int
    width: int
    device: str  # "cpu" or "cuda": where the decoder decodes
    decoder: str = "decord"  # "decord" or "pyav"


class VideoReader:
    """One opened video file."""

    def __init__(self, path: str | os.PathLike, timeout: float = 60.0, probe: bool = True, decoder: str = "auto"):
        """``probe``: read the header and the first frame in a child process first
        (``fmfast.data.probe``), so that a decoder crash on a lying header is an error here.
        ``decoder``: auto (decord where it imports, else PyAV), decord or pyav."""
        self.path = Path(path)
        self.timeout = timeout
        self.backend = decoders.resolve(decoder)
        if not self.path.is_file():
            raise DataError(f"{self.path}: no such video file")
        if self.path.stat().st_size == 0:
            raise DataError(f"{self.path}: empty file (zero frames)")
        self.declared = _probe(self.path, timeout, self.backend).declared if probe else 0
        self._dec, err, log = self._open(self.backend, decoders.devices(self.backend))
        if self._dec is None:
            label = decoders.LABEL[self.backend]
            raise DataError(f"{self.path}: {label} cannot open this video ({_reason(err, ''.join(log))})")
        d = self._dec
        if d.frames == 0:
            raise DataError(f"{self.path}: the video holds zero frames")
        self.info = VideoInfo(self.path, d.frames, d.fps, d.height, d.width, d.device, self.backend)

    def _open(self, backend: str, devices: list[str]):
        """(decoder, None, log) opened on the first device that works, or (None, error, log)."""
        err = None
        for device in devices:
            with _captured_fd2() as log:
                try:
                    return _run_bounded(lambda d=device: decoders.open_decoder(backend, str(self.path), d),
                                        self._open_limit(), str(self.path)), None, log
                except DataError:
                    raise
                except Exception as e:  # DECORDError, av.error.*, RuntimeError, IndexError ...
                    err = e
        return None, err, log

    def _open_limit(self) -> float:
        """Seconds an open may take: opening indexes every packet, so allow reading at >= 20 MB/s."""
        return self.timeout + self.path.stat().st_size / 20e6

    def __len__(self) -> int:
        return self.info.frames

    def decode(self, idx: list[int], dec=None) -> torch.Tensor:
        """Frames ``idx`` as a uint8 tensor [n, H, W, 3] on the decode device; a frame that
        cannot be decoded raises DecodeError. ``dec``: another decoder of the file than ours."""
        err = None
        with _captured_fd2() as log:
            try:
                b = _run_bounded(lambda: (dec or self._dec).decode(idx), self.timeout, str(self.path))
            except DataError:
                raise
            except Exception as e:
                err = e
        if err is not None:
            raise DecodeError(self.path, _reason(err, "".join(log)))
        return b

    def pts(self, start: int, stop: int) -> np.ndarray | None:
        """Presentation times (seconds from the first frame) of frames start..stop-1, or None."""
        try:
            with _captured_fd2():
                return self._dec.pts(start, stop)
        except Exception:
            return None

    def _sequential(self):
        """A decoder that finds a failing chunk's good frames the same way every run and on any
        machine: PyAV without frame threads (None without PyAV: ours, frame by frame)."""
        if not decoders.importable("pyav"):
            return None
        with _captured_fd2():
            try:
                return _run_bounded(lambda: decoders.open_decoder("pyav", str(self.path), threads=False),
                                    self._open_limit(), str(self.path))
            except Exception:  # (PyAV cannot read it: ours says why)
                return None

    def chunks(self, size_wh: tuple[int, int] | None, chunk: int = 64, allow_truncated: bool = False
               ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(first_index, frames)`` with frames uint8 [n, 3, W, H] on the CPU, resized to
        ``size_wh`` = (W, H) (None keeps the decoded size).

        A chunk that fails to decode (a container whose index lists frames it does not hold) is
        decoded again, and the rest after it, by the sequential decoder, frame by frame from the
        chunk that fails there too, to find the first bad frame; that is an error unless
        ``allow_truncated``, in which case decoding stops there.
        """
        n = len(self)
        if self.declared > n + max(1, n // 200):  # the header's duration says more than the file holds
            self._truncated(allow_truncated,
                            f"truncated video: the container header declares {self.declared} frames but the file "
                            f"holds {n} (cut off while recording?); allow truncated videos (--allow-truncated) to "
                            f"keep the first {n}",
                            f"truncated video: kept the {n} frames in the file of the {self.declared} its header "
                            f"declares")
        seq = None  # the sequential decoder, from the first chunk that fails on
        for s in range(0, n, chunk):
            idx = list(range(s, min(s + chunk, n)))
            frames, err = None, None
            try:
                frames = self.decode(idx, seq)
            except DecodeError as e:
                err = e
            if err is not None and seq is None and (seq := self._sequential()) is not None:
                try:  # decord's read-ahead can fail a chunk before the bad packet: decode on sequentially
                    frames, err = self.decode(idx, seq), None
                except DecodeError as e:
                    err = e
            if err is None:
                yield s, resize_frames(frames, size_wh).cpu()
                continue
            good = []
            for i in idx:
                try:
                    good.append(self.decode([i], seq))
                except DecodeError:
                    break
            k = s + len(good)
            self._truncated(allow_truncated,
                            f"truncated or corrupt video: the container lists {n} frames but decoding fails at "
                            f"frame {k} ({err.problem}); allow truncated videos to keep the first {k}",
                            f"truncated or corrupt video: kept the first {k} of the {n} frames its index lists "
                            f"(decoding fails at frame {k})")
            if good:
                yield s, resize_frames(torch.cat(good), size_wh).cpu()
            self.truncated_at = k
            return

    def _truncated(self, allowed: bool, refusal: str, kept: str) -> None:
        """A video that holds fewer frames than it says: an error, or where ``allowed`` a warning."""
        if not allowed:
            raise DataError(f"{self.path}: {refusal}")
        warnings.warn(f"{self.path}: {kept}", DataWarning, stacklevel=3)


def resize_frames(frames: torch.Tensor, size_wh: tuple[int, int] | None) -> torch.Tensor:
    """uint8 [n, H, W, 3] (as decoded) -> uint8 [n, 3, W, H] (V2 order), antialiased bilinear."""
    x = frames.permute(0, 3, 1, 2)  # [n, 3, H, W]
    if size_wh is not None and (x.shape[3], x.shape[2]) != tuple(size_wh):
        w, h = size_wh
        if x.device.type == "cpu":  # PyTorch's native uint8 antialiased path: ~10x the float one
            x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        else:  # (within one grey level of it)
            x = F.interpolate(x.float(), size=(h, w), mode="bilinear", antialias=True, align_corners=False)
            x = x.round_().clamp_(0, 255).to(torch.uint8)
    return x.transpose(2, 3).contiguous()


def parse_size(text: str | int | tuple, where: str = "frame size") -> tuple[int, int]:
    """"64" -> (64, 64); "80x48" -> (80, 48): width x height, which is also the stored [W, H] order.
    ``where`` names the setting in the error."""
    if isinstance(text, int):
        return (text, text)
    if isinstance(text, (tuple, list)):
        return (int(text[0]), int(text[1]))
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", str(text))
    if not m or int(m.group(1)) <= 0 or (m.group(2) and int(m.group(2)) <= 0):
        raise SettingsError(f"{where}: expected N or WIDTHxHEIGHT, got {text!r}")
    w = int(m.group(1))
    return (w, int(m.group(2)) if m.group(2) else w)

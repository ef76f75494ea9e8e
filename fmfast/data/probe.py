"""A video's header read and its first frame decoded in a child process, before the video is
opened for decoding here: the decoders (FFmpeg through decord and PyAV) are native code that
trusts the file, and a lying header (an AVI that claims 2e9 frames) makes decord abort with
``std::bad_alloc`` -- in a child that is one error line naming the file and what the decoder
said on stderr, not a dead process with nothing on the screen.

``probe(path, backend="decord")`` -> ``Probe``: the frame count the container header declares
(frames, or duration x rate; 0 when it says nothing), the frames the decoder (decord or PyAV:
``pyav``) indexes in the file, rate and size. A header that declares more frames than the file
has bytes is refused before the decoder sees it. Run as a script (``python
fmfast/data/probe.py FILE [BACKEND]``) it prints the probe as one JSON line. ``pyav_index`` is
how PyAV counts frames: one per packet of the stream, as decord does.

``probe_ahead(path, ...)`` starts the same probe in a background thread; the next ``probe`` of
that file (unchanged: same inode, size and mtime) with the same backend takes its answer or
its error. ``fmfast detect`` starts it before it builds the model, so the child's ~0.2 s (its
Python start and the decoder's import) overlaps the compile instead of preceding the decoding.
"""
from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+\.(cc|h):\d+: ")
_REASONS = (  # what decord/PyAV/FFmpeg say -> what it means for the user (first match)
    ("cannot find video stream", "no video stream in the file (zero frames)"),
    ("avcodec_send_packet", "the decoder rejected the stream data (corrupt or missing frame data)"),
    ("End of file", "no frames before the end of the file"),
    ("moov atom not found", "the container index is missing (file cut off while recording?)"),
    ("Invalid data", "invalid data: not a container FFmpeg can read, or cut off"),
    ("av_read_frame failed", "reading packets failed (file cut off?)"),
    ("Input/output error", "reading the file failed before a frame (cut off, or a disk error)"),
    ("Out of bound", "frames listed in the index are missing"),
    ("No such file", "no such file"),
)


def _reason(exc: BaseException | None, log: str) -> str:
    """A short reason from a decoder's exception and the captured log."""
    text = str(exc or "") + "\n" + log
    for key, meaning in _REASONS:
        if key in text:
            return meaning
    lines = [_LOG_PREFIX.sub("", ln.strip()) for ln in text.splitlines() if ln.strip()]
    return lines[0][:160] if lines else type(exc).__name__


# The child runs this file as a script (not ``-m``): it imports neither fmfast nor torch, so it
# starts fast and its address-space limit only has the decoder and FFmpeg to hold.
MEMORY_LIMIT = 8 << 30  # address space of the child: a runaway allocation fails there, fast


@dataclass
class Probe:
    declared: int  # frames the container header declares (0: it does not say)
    indexed: int  # frames the decoder finds in the file
    fps: float
    height: int
    width: int


def _header(path: str) -> tuple[int, float]:
    """(declared frames, rate) from the container header via PyAV, (0, 0.0) without it (or
    with FMFAST_PROBE_HEADER=0: a container PyAV misreads; the tests' crash case)."""
    if os.environ.get("FMFAST_PROBE_HEADER") == "0":
        return 0, 0.0
    try:
        import av
    except ImportError:
        return 0, 0.0
    try:
        with av.open(path) as c:
            if not c.streams.video:
                return 0, 0.0
            s = c.streams.video[0]
            rate = float(s.average_rate or s.guessed_rate or 0)
            n = int(s.frames or 0)
            if not n and rate:  # containers that give a duration instead (mkv, webm)
                dur = (float(s.duration * s.time_base) if s.duration and s.time_base else
                       (c.duration / 1e6 if c.duration else 0.0))
                n = int(round(dur * rate))
            return n, rate
    except (av.error.FFmpegError, ValueError, OverflowError, ZeroDivisionError):
        return 0, 0.0  # the decoder says what is wrong, below


def pyav_index(container, stream) -> tuple[list[int] | None, list[int] | None, int]:
    """Demux every packet of ``stream``: (their presentation times sorted, the keyframes' times
    sorted, the packet count); the times are None when a packet has none (raw H.264)."""
    pts, keys, n = [], [], 0
    for pk in container.demux(stream):
        if pk.size == 0:  # the demuxer's end-of-stream marker, not a frame
            continue
        n += 1
        if pts is not None and pk.pts is None:
            pts = keys = None
        elif pts is not None:
            pts.append(pk.pts)
            if pk.is_keyframe:
                keys.append(pk.pts)
    if pts is not None and not keys and pts:  # no packet flagged: only the first is safe to start at
        keys = [min(pts)]
    return (sorted(pts), sorted(keys), n) if pts is not None else (None, None, n)


def _index(path: str, backend: str) -> tuple[int, float, int, int]:
    """(frames indexed, rate, height, width) as ``backend`` sees the file; frame 0 is decoded."""
    if backend == "pyav":
        import av

        with av.open(path) as c:
            if not c.streams.video:
                raise ValueError("cannot find video stream")
            s = c.streams.video[0]
            n = pyav_index(c, s)[2]
            h, w = first_frame_size(path) if n else (0, 0)
            return n, float(s.average_rate or s.guessed_rate or 0.0), h, w
    import decord

    decord.logging.set_level(decord.logging.QUIET)
    vr = decord.VideoReader(path, ctx=decord.cpu(0))
    n = len(vr)
    h, w = decord_first_frame_size(vr, path) if n else (0, 0)
    return n, float(vr.get_avg_fps() or 0.0), h, w


def first_frame_size(path: str) -> tuple[int, int]:
    """(height, width) of frame 0 decoded by PyAV, without frame threads."""
    import av

    with av.open(path) as c:
        s = c.streams.video[0]
        s.thread_type = "SLICE"
        return next(iter(c.decode(s))).to_ndarray(format="rgb24").shape[:2]


def decord_first_frame_size(vr, path: str) -> tuple[int, int]:
    """(height, width) of frame 0 decoded by decord; where that fails, by PyAV: decord's
    read-ahead thread can report a corrupt packet further on while frame 0 is asked for (now
    and then, on a file with corrupt frames), which the chunks then find at the right frame."""
    try:
        return vr[0].shape[:2]
    except Exception as e:
        try:
            return first_frame_size(path)
        except Exception:
            raise e from None


def _child(path: str, backend: str = "decord") -> Probe:
    declared, rate = _header(path)
    size = os.path.getsize(path)
    if declared > size:  # every frame takes at least a byte: the header lies
        raise SystemExit(f"the container header declares {declared} frames in a file of {size} bytes "
                         f"(a corrupt or patched header)")
    n, fps, h, w = _index(path, backend)
    return Probe(declared, n, fps or rate or 0.0, int(h), int(w))


_AHEAD: dict[tuple, tuple[threading.Thread, dict]] = {}  # file key -> (thread, its answer)


def _key(path: Path, backend: str) -> tuple:
    st = path.stat()
    return os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns, backend


def probe_ahead(path: str | os.PathLike, timeout: float = 60.0, backend: str = "decord") -> None:
    """Start ``probe(path, timeout, backend)`` in a background thread (see the module's
    docstring). A path that cannot be stat'ed starts nothing: ``probe`` names the problem."""
    try:
        key = _key(Path(path), backend)
    except OSError:
        return
    box: dict = {}

    def run():
        try:
            box["probe"] = _run_child(Path(path), timeout, backend)
        except BaseException as e:  # re-raised by the probe() that takes it
            box["error"] = e

    t = threading.Thread(target=run, name="fmfast-probe", daemon=True)
    t.start()
    _AHEAD[key] = (t, box)


def probe(path: str | os.PathLike, timeout: float = 60.0, backend: str = "decord") -> Probe:
    """Probe ``path`` in a child process with ``backend`` (decord or pyav, resolved by the
    caller); a crash, a stall or a lying header is a DataError. Takes the answer of a
    ``probe_ahead`` of the same, unchanged file where one was started."""
    path = Path(path)
    try:
        ahead = _AHEAD.pop(_key(path, backend), None)
    except OSError:
        ahead = None
    if ahead is None:
        return _run_child(path, timeout, backend)
    thread, box = ahead
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["probe"]


def _run_child(path: Path, timeout: float, backend: str) -> Probe:
    from fmfast.errors import DataError

    limit = timeout + path.stat().st_size / 20e6  # indexing reads the file: allow >= 20 MB/s
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        p = subprocess.run([sys.executable, __file__, str(path), backend], capture_output=True, text=True,
                           timeout=limit, env=env)
    except subprocess.TimeoutExpired:
        raise DataError(path, f"reading the video header stalled for more than {limit:.0f} s "
                              f"(corrupt or truncated video?)") from None
    said = " ".join(ln.strip() for ln in p.stderr.splitlines() if ln.strip() and not ln.startswith("Traceback"))
    if p.returncode < 0:
        sig = signal.Signals(-p.returncode).name
        raise DataError(path, f"the video decoder crashed ({sig}) reading this file"
                              + (f": {said[-200:]}" if said else " and printed nothing") + " (corrupt header?)")
    if p.returncode != 0:
        what = _reason(None, said) if said else f"exit code {p.returncode}"
        raise DataError(path, f"{'PyAV' if backend == 'pyav' else 'decord'} cannot open this video ({what})")
    try:
        return Probe(**json.loads(p.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError, TypeError):
        raise DataError(path, f"the video probe gave no answer ({p.stdout[-120:]!r})") from None


if __name__ == "__main__":
    # set here, before the decoder is imported, rather than in a preexec_fn: that runs Python
    # between fork and exec, which can deadlock in a parent with threads (the model's, a probe_ahead)
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    try:
        result = _child(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "decord")
    except MemoryError:
        raise SystemExit("the decoder ran out of memory (a header that claims far more frames than the file holds?)") \
            from None
    except Exception as e:  # DECORDError, av.error.*, RuntimeError ...: reported by the parent as one line
        text = " ".join(str(e).split())
        raise SystemExit(f"{type(e).__name__}: {text[:300]}") from None
    print(json.dumps(asdict(result)))

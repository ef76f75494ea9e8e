"""What detection writes: per-window probabilities and alarm intervals as CSV, a timeline PNG
(probability, alarms shaded, the three current phases), hot-spot overlays for segmentation."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from fmfast.data.csvfiles import format_seconds
from fmfast.detect.alarms import Alarm
from fmfast.errors import OutputError
from fmfast.files import atomic_write, output_error

WINDOW_HEADER = "window,frame,timestamp,seconds,probability\n"
ALARM_HEADER = "alarm,start,end,duration_s,peak_probability,start_frame,end_frame,peak_frame,open\n"


def window_lines(first: int, frames, times, probs, t0: float) -> list[str]:
    stamps = format_seconds(np.asarray(times), frac=True)
    return [f"{first + k},{f},{s},{t - t0:.3f},{p:.6f}\n"
            for k, (f, s, t, p) in enumerate(zip(np.asarray(frames).tolist(), stamps.tolist(),
                                                 np.asarray(times).tolist(), np.asarray(probs).tolist()))]


def alarm_line(k: int, a: Alarm, frames) -> str:
    s, e = format_seconds(np.array([a.start_time, a.last_time]), frac=True).tolist()
    return (f"{k},{s},{e},{a.duration:.3f},{a.peak_prob:.6f},{frames[a.start]},{frames[a.last]},"
            f"{frames[a.peak]},{int(a.open)}\n")


def timeline_png(path: str | os.PathLike, t0: float, win_times, probs, alarms: list[Alarm], cur_times, cur_rows,
                 on: float, off: float, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    win_times, probs = np.asarray(win_times) - t0, np.asarray(probs)
    cur_times, cur_rows = np.asarray(cur_times) - t0, np.asarray(cur_rows)
    if len(win_times):  # the current around the scored span only, thinned to a plottable size
        keep = (cur_times >= win_times[0] - 1) & (cur_times <= win_times[-1] + 1)
        cur_times, cur_rows = cur_times[keep], cur_rows[keep]
    step = max(1, len(cur_times) // 20000)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 5), sharex=True, gridspec_kw={"height_ratios": [1, 1]})
    ax1.plot(win_times, probs, lw=0.8, color="k", label="anomaly probability")
    ax1.axhline(on, color="r", ls="--", lw=0.7, label=f"on {on:g}")
    ax1.axhline(off, color="orange", ls=":", lw=0.7, label=f"off {off:g}")
    for ax in (ax1, ax2):
        for a in alarms:
            ax.axvspan(a.start_time - t0, max(a.last_time, a.start_time + 1e-3) - t0, color="r", alpha=0.2, lw=0)
    ax1.set_ylim(-0.02, 1.02)
    ax1.set_ylabel("p(abnormal)")
    ax1.legend(loc="upper right", fontsize=7)
    for c, name in enumerate("ABC"):
        ax2.plot(cur_times[::step], cur_rows[::step, c], lw=0.6, drawstyle="steps-post", label=f"phase {name}")
    ax2.set_ylabel("current (A)")
    ax2.set_xlabel(f"seconds after {format_seconds(t0, frac=True)}")
    ax2.legend(loc="upper right", fontsize=7)
    n = f"{len(alarms)} alarm" + "s" * (len(alarms) != 1)
    ax1.set_title(f"{title}  ({n})" if title else n, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def overlay_png(path: str | os.PathLike, frame: np.ndarray, prob_map: np.ndarray, threshold: float = 0.5,
                scale: int = 4) -> None:
    """Frame [3,W,H] uint8 and hot-spot probability [W,H] (stored order) -> PNG of the picture
    with the predicted mask in red. Transposed to [H,W] here, for display only."""
    from matplotlib.image import imsave

    img = np.asarray(frame).transpose(2, 1, 0).astype(np.float32) / 255.0  # [H, W, 3]
    m = (np.asarray(prob_map).T >= threshold)[..., None]
    red = np.array([1.0, 0.0, 0.0], np.float32)
    out = np.where(m, 0.45 * img + 0.55 * red, img)
    out = np.repeat(np.repeat(out, scale, 0), scale, 1)
    imsave(Path(path), np.clip(out, 0, 1), format="png")


def recording_span(times: np.ndarray) -> float:
    """Recording duration: first to last frame plus one frame period."""
    if len(times) < 2:
        return 0.0
    d = np.diff(times)
    period = float(np.median(d[d > 0])) if (d > 0).any() else 0.0
    return float(times[-1] - times[0]) + period


def write_overlays(folder: Path, overlays) -> None:
    for k, frame_idx, frame, pmap in overlays:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_write(folder / f"alarm_{k:03d}_frame_{frame_idx:07d}.png") as tmp:
            overlay_png(tmp, frame.numpy(), pmap.numpy())


def write_timeline(out: Path, engine, res, on: float, off: float, meta: dict, title: str = "") -> None:
    """``timeline.png`` of a finished detection (``engine`` a WindowEngine, ``res`` its Results)."""
    t0 = float(engine.times[0]) if len(engine.times) else 0.0
    with atomic_write(out / "timeline.png") as tmp:
        timeline_png(tmp, t0, res.times, res.probs, res.alarms, engine.current_times, engine.current,
                     on, off, f"{title} {meta['model_name']} ({meta['task']})".strip())


def publish(out: Path, engine, res, on: float, off: float, meta: dict, title: str) -> None:
    """Write every output into a staging folder, then move them into ``out`` (earlier results
    are replaced only once every new file is complete; a full disk is one line)."""
    try:
        _publish(out, engine, res, on, off, meta, title)
    except OSError as e:
        if isinstance(e, OutputError):
            raise
        raise output_error(out, e) from None


class LiveLog:
    """A live results file (``--follow``): created, replacing an earlier run's, only when the
    first line is written -- so a run that fails on its inputs leaves earlier results alone."""

    def __init__(self, path: Path, header: str):
        self.path, self.header, self._f = Path(path), header, None

    def write(self, text: str) -> None:
        try:
            if self._f is None:
                self._f = open(self.path, "w")  # noqa: SIM115 (closed by close())
                self._f.write(self.header)
            self._f.write(text)
            self._f.flush()
        except OSError as e:
            raise output_error(self.path, e) from None

    def writelines(self, lines) -> None:
        self.write("".join(lines))

    def flush(self) -> None:
        pass  # every write is flushed

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


def _publish(out: Path, engine, res, on: float, off: float, meta: dict, title: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".detect.", dir=out))
    try:
        t0 = float(engine.times[0])
        (stage / "windows.csv").write_text(WINDOW_HEADER + "".join(
            window_lines(0, res.frames, res.times, res.probs, t0)))
        (stage / "alarms.csv").write_text(ALARM_HEADER + "".join(
            alarm_line(k + 1, al, res.frames) for k, al in enumerate(res.alarms)))
        write_timeline(stage, engine, res, on, off, meta, title)
        if res.overlays:
            write_overlays(stage / "overlays", res.overlays)
        if (out / "overlays").is_dir():
            shutil.rmtree(out / "overlays")
        for p in stage.iterdir():
            os.replace(p, out / p.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)

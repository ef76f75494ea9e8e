"""Slide a trained model over a whole recording and raise alarms.

    fmfast detect --checkpoint CKPT VIDEO CURRENT.csv --out DIR [--start T | --timestamps F]
    fmfast detect --checkpoint CKPT --recording V2ROOT NAME --out DIR
    fmfast detect --checkpoint CKPT VIDEO CURRENT.csv --start T --out DIR --follow

A window ends every --hop frames (the first one at the first frame with a full clip history);
its clip and current window are exactly what the model was trained on (fmfast.data.window).
Windows are scored in batches straight from a bounded frame buffer. Writes to DIR:
windows.csv (per-window probability), alarms.csv (hysteresis --on/--off, --min-duration; by default
on at the threshold calibrated on validation stored in the checkpoint, off at 2/3 of it),
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

import sys
import time
from pathlib import Path

import numpy as np

from fmfast.cli.common import Parser, add_predictor_flags
from fmfast.data.csvfiles import format_seconds
from fmfast.data.decoders import LABEL
from fmfast.data.decoders import NAMES as DECODERS
from fmfast.data.decoders import resolve as resolve_decoder
from fmfast.data.probe import probe_ahead
from fmfast.detect.alarms import AlarmTracker, default_levels
from fmfast.detect.follow import FollowFeed, follow
from fmfast.detect.report import (ALARM_HEADER, WINDOW_HEADER, LiveLog, alarm_line, publish, recording_span, window_lines,
                                  write_overlays, write_timeline)
from fmfast.detect.scorer import Scorer
from fmfast.detect.sources import feed_file, feed_v2
from fmfast.detect.windows import WindowEngine
from fmfast.engine.checkpoints import load_model
from fmfast.errors import SettingsError
from fmfast.files import FolderLock, check_output
from fmfast.progress import stderr_console


def build_parser(prog: str = "fmfast detect") -> Parser:
    p = Parser(prog=prog, description=__doc__)
    p.add_argument("video", nargs="?", help="video file (or, with --follow, a folder of segments)")
    p.add_argument("current", nargs="?", help="current log CSV")
    p.add_argument("--checkpoint", required=True, help="fmfast checkpoint, reference-code state_dict or fmfast export (.onnx, .xml, .pt2)")
    p.add_argument("--recording", nargs=2, metavar=("V2ROOT", "NAME"), help="score a recording of a V2 root instead")
    p.add_argument("--out", required=True, help="folder for windows.csv, alarms.csv, timeline.png, overlays/")
    p.add_argument("--start", help='time of the first frame, "YYYY-MM-DD HH:MM:SS[.fff]"')
    p.add_argument("--timestamps", help="CSV with a header and the time of each frame in column 0")
    p.add_argument("--max-gap", type=float, default=5.0, help="longest tolerated gap in the current log, s")
    p.add_argument("--hop", type=int, default=10, help="frames between window ends")
    p.add_argument("--batch", type=int, default=64, help="windows gathered per scoring call (on a CPU the model runs them in chunks of at most 16)")
    p.add_argument("--on", type=float, default=None, help="probability that starts an alarm (default: the threshold "
                   "calibrated on validation stored in the checkpoint, else 0.6)")
    p.add_argument("--off", type=float, default=None, help="probability below which it ends (default: 2/3 of --on)")
    p.add_argument("--min-duration", type=float, default=2.0, help="seconds an alarm must last to count")
    p.add_argument("--max-overlays", type=int, default=20, help="segmentation overlays written at most")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    add_predictor_flags(p, " (compiled once before scoring)")
    p.add_argument("--chunk", type=int, default=64, help="frames decoded per batch")
    p.add_argument("--decode-timeout", type=float, default=60.0, help="seconds one chunk may take to decode")
    p.add_argument("--allow-truncated", action="store_true", help="score the decodable part of a cut-off video")
    p.add_argument("--decoder", default="auto", choices=DECODERS,
                   help="video decoder: decord, pyav (PyAV), or auto: decord where it is installed, else PyAV")
    p.add_argument("--follow", action="store_true", help="watch a growing recording (see above)")
    p.add_argument("--poll", type=float, default=1.0, help="--follow: seconds between looks for new data")
    p.add_argument("--settle", type=float, default=2.0, help="--follow: seconds unchanged before a file counts as complete")
    p.add_argument("--follow-timeout", type=float, help="--follow: stop after this many seconds without new data")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if a.recording and (a.video or a.current):
        raise SettingsError("give either VIDEO CURRENT.csv or --recording V2ROOT NAME, not both")
    if not a.recording and not (a.video and a.current):
        raise SettingsError("give VIDEO and CURRENT.csv, or --recording V2ROOT NAME")
    if a.follow and a.recording:
        raise SettingsError("--follow watches VIDEO and CURRENT.csv; a V2 recording cannot grow")
    for flag in ("hop", "batch", "chunk"):
        if getattr(a, flag) < 1:
            raise SettingsError(f"--{flag} must be >= 1, got {getattr(a, flag)}")
    if not a.recording:  # named by its flag, before any work
        a.decoder = resolve_decoder(a.decoder, "--decoder")
    out = Path(a.out)
    check_output(out, "folder")  # a file, symlink, FIFO or device is refused; writable, before any work
    return _run(a, out)


def _run(a, out: Path) -> int:
    if a.video and not a.follow and Path(a.video).is_file():  # the video's probe runs while the model loads and compiles
        probe_ahead(a.video, a.decode_timeout, a.decoder)
    model, meta = load_model(a.checkpoint)
    scorer = Scorer(model, meta, a.device, batch=a.batch, precision=a.precision,
                    compile=a.compile)
    a.on, a.off, levels = default_levels(a.on, a.off, meta.get("threshold"))
    try:
        tracker = AlarmTracker(a.on, a.off, a.min_duration)
    except SettingsError as e:
        raise SettingsError(f"--on/--off/--min-duration: {e}") from None
    t_begin = time.perf_counter()

    if a.follow:
        if not Path(a.video).exists():
            raise SettingsError(f"{a.video}: no such video file or folder of segments")
        if a.start is None and a.timestamps is None:
            raise SettingsError("frame times unknown: pass --start (time of the first frame) or --timestamps")
        # checks the arguments before any output exists
        feed = FollowFeed(a.video, a.current, scorer.size_wh, a.start, a.timestamps, a.max_gap, a.settle, a.chunk,
                          a.decode_timeout, a.decoder)
        out.mkdir(parents=True, exist_ok=True)
        lock = FolderLock(out, "detection").acquire()  # a second live detection into it is refused
        # created at their first line: a run that fails on its inputs leaves earlier results alone
        wlog, alog = LiveLog(out / "windows.csv", WINDOW_HEADER), LiveLog(out / "alarms.csv", ALARM_HEADER)
        t0 = [None]

        def on_windows(first, f, times, probs):
            t0[0] = times[0] if t0[0] is None else t0[0]
            wlog.writelines(window_lines(first, f, times, probs, t0[0]))
            alog.write("")  # both files belong to this run from its first window on

        def on_event(kind, al, eng):
            stamp = format_seconds(al.start_time, frac=True)
            if kind == "on":
                print(f"ALARM  {stamp}  p={al.peak_prob:.3f}  frame {eng.out.frames[al.start]}", flush=True)
            else:
                print(f"alarm over  {stamp} .. {format_seconds(al.last_time, frac=True)}  "
                      f"({al.duration:.1f} s, peak p={al.peak_prob:.3f}{', still open' if al.open else ''})", flush=True)
                alog.write(alarm_line(len(eng.out.alarms), al, eng.out.frames))
                write_overlays(out / "overlays", eng.out.overlays[-1:] if eng.out.overlays and
                                eng.out.overlays[-1][0] == len(eng.out.alarms) else [])

        engine = WindowEngine(scorer, a.hop, a.batch, tracker, on_event, on_windows, a.max_overlays)
        try:
            follow(engine, feed, wlog, a.poll, a.follow_timeout)
            res = engine.finish()
        finally:
            wlog.close()
            alog.close()
            lock.release()
        wall = time.perf_counter() - t_begin
        for note in feed.notes + ([f"{a.current}: truncated or replaced while followed ({feed.tail.rotated}x); "
                                   f"reopened and continued after the last row already read"] if feed.tail.rotated else []):
            print(f"warning: {note}", file=sys.stderr)
        write_timeline(out, engine, res, a.on, a.off, meta)
        print(f"followed {a.video}: {len(res.probs)} windows, {len(res.alarms)} alarms -> {out} "
              f"(decoded with {LABEL[feed.decoder]})")
        print(levels)
        return 0

    engine = WindowEngine(scorer, a.hop, a.batch, tracker, max_overlays=a.max_overlays)
    decoded = None  # the decoder that ran, when a video was decoded
    if a.recording:
        feed_v2(engine, *a.recording, chunk=max(a.chunk, 256))
        title = f"{a.recording[1]}"
    else:
        if a.start is None and a.timestamps is None:
            raise SettingsError('frame times unknown: pass --start "YYYY-MM-DD HH:MM:SS" (the time of the first frame) '
                                "or --timestamps FRAMES.csv")
        decoded = LABEL[feed_file(engine, a.video, a.current, a.start, a.timestamps, a.max_gap, a.chunk,
                                  a.allow_truncated, a.decode_timeout, stderr_console(), a.decoder)]
        title = Path(a.video).name
    res = engine.finish()
    wall = time.perf_counter() - t_begin
    if not res.probs:
        raise SettingsError("no window could be scored (no frame has current rows)")
    out.mkdir(parents=True, exist_ok=True)
    with FolderLock(out, "detection"):
        publish(out, engine, res, a.on, a.off, meta, title)
    span = recording_span(np.asarray(engine.times))
    n_alarm = len(res.alarms)
    print(f"{title}: {len(res.probs)} windows (hop {a.hop}), {n_alarm} alarm{'s' * (n_alarm != 1)}"
          + (f", {res.skipped} windows without current skipped" if res.skipped else "") + f" -> {out}")
    print(f"  {levels}")
    for k, al in enumerate(res.alarms[:20], 1):
        print(f"  alarm {k}: {format_seconds(al.start_time, frac=True)} .. {format_seconds(al.last_time, frac=True)} "
              f"({al.duration:.1f} s, peak p={al.peak_prob:.3f} at frame {res.frames[al.peak]})")
    if len(res.alarms) > 20:
        print(f"  ... {len(res.alarms) - 20} more in alarms.csv")
    print(f"{span:.1f} s of recording in {wall:.2f} s: {span / wall:.1f}x faster than real time "
          f"({len(res.probs) / wall:.0f} windows/s, {engine.n / wall:.0f} frames/s, decoding included"
          f"{f' ({decoded})' if decoded else ''}; {scorer.path})")
    return 0

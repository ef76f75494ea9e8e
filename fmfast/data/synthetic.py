"""Synthetic FMF data in the V2 layout: ``python -m fmfast.data.synthetic OUT [--recordings N]
[--frames N] [--seed S] [--size PX]``, or ``generate(out, ...)`` from Python.

Each recording is a furnace (furnace.py) filmed at ~25 fps with a current log at 2 rows per
second. The timeline is cut into ~8 s segments, each with one scenario; whole segments go to
train or test (about a fifth of each scenario to test), so no event straddles the split.
``synthetic.json`` beside the split files records every segment, for per-scenario analysis.
Same arguments, same bytes.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

import numpy as np

from .furnace import ABNORMAL, SCENARIOS, Furnace, current_log, schedule, severity
from .matfile import write_mat

VERSION = 7  # bump when the output for given arguments changes (caches key on it)
TEST_FRACTION = 0.2
_CHUNK = 256
_T0 = dt.datetime(2023, 5, 10, 21, 0, 0)


def _recording(seed: int, r: int, frames: int, size: int, tick=None):
    rng = np.random.default_rng([seed, r])
    fur = Furnace(rng, size, frames)
    segs = schedule(rng, frames)
    spots, mists = [], []
    phase_decks: dict[str, list] = {}  # per scenario, so no phase is a tell of the label
    imbalance = np.zeros(frames)
    phase = np.zeros(frames, dtype=np.int64)
    for s in segs:
        a, b = s.event
        if s.kind in ("anomaly", "hidden", "glare"):
            d, rmax = fur.spot_shape(rng)
            spots.append((a, b, d, rmax, s.kind in ABNORMAL))
        if s.kind in ("hidden", "mist"):
            pad = (s.end - s.start) // 10
            m0, m1 = max(s.start, a - pad), min(s.end, b + pad)
            mists.append((m0, m1, fur.mist_opacity(rng, m1 - m0)))
        if s.kind in ("anomaly", "hidden", "disturbance"):
            # the arc reacts first: the imbalance starts with the segment, before the spot shows,
            # so every labelled frame already has a few seconds of it in its current window
            imbalance[s.start:b] = severity(b - s.start)
            deck = phase_decks.setdefault(s.kind, [])
            if not deck:
                deck.extend(rng.permutation(3).tolist())
            s.phase = deck.pop()
            phase[s.start:b] = s.phase

    video = np.empty((frames, 3, size, size), np.uint8)
    label = np.empty((frames, size, size), np.uint8)
    for t0 in range(0, frames, _CHUNK):
        t1 = min(frames, t0 + _CHUNK)
        video[t0:t1], label[t0:t1] = fur.render(t0, t1, spots, mists)
        if tick:
            tick(t1 - t0)

    # clocks: frames at ~25 fps from a random sub-second phase; the current log starts 90-130 s
    # before the first frame (so nearly every frame has a full 120 s history; the first few
    # seconds' are stretched a little) and runs a little past the last one
    fps = rng.uniform(24.6, 25.4)
    t = rng.uniform(0, 1) + np.arange(frames) / fps
    sec = np.floor(t).astype(np.int64)
    pre, post = int(rng.integers(90, 131)), int(rng.integers(0, 3))
    slots = 2 * (int(sec[-1]) + 1 + pre + post)
    slot = np.floor(2 * t).astype(np.int64) + 2 * pre
    slot_imb = np.zeros(slots)
    np.maximum.at(slot_imb, slot, imbalance)
    slot_phase = np.zeros(slots, dtype=np.int64)
    hit = imbalance > 0
    slot_phase[slot[hit]] = phase[hit]
    amps = current_log(rng, slots, slot_imb, slot_phase)

    start = _T0 + dt.timedelta(hours=2 * r, seconds=int(rng.integers(0, 3600)))
    stamp = lambda k: (start + dt.timedelta(seconds=int(k))).strftime("%Y-%m-%d %H:%M:%S")
    frame_stamps = [stamp(k) for k in sec]
    row_stamps = [stamp(j // 2 - pre) for j in range(slots)]
    return dict(video=video, label=label, fps=fps, segments=segs, frame_stamps=frame_stamps,
                row_stamps=row_stamps, amps=amps, created=start.strftime("%a %b %d %H:%M:%S %Y"))


def _split(seed: int, segments: list[list]) -> set[tuple[int, int]]:
    """(recording, segment) pairs that go to test: about TEST_FRACTION of each scenario."""
    rng = np.random.default_rng([seed, 1_000_003])
    test = set()
    for kind in SCENARIOS:
        group = [(r, i) for r, segs in enumerate(segments) for i, s in enumerate(segs) if s.kind == kind]
        k = int(round(TEST_FRACTION * len(group)))
        if len(group) >= 2:
            k = max(k, 1)
        for j in rng.permutation(len(group))[:k]:
            test.add(group[j])
    return test


def generate(out: str | Path, recordings: int = 3, frames: int = 12000, seed: int = 0, size: int = 64,
             progress: bool = False) -> Path:
    """Write a synthetic FMF V2 dataset to ``out`` and return its path."""
    if recordings < 1 or frames < 40:
        raise ValueError(f"generate: need recordings >= 1 and frames >= 40, got {recordings}, {frames}")
    if size < 16 or size % 8:
        raise ValueError(f"generate: size must be a multiple of 8 and >= 16, got {size}")
    out = Path(out)
    for sub in ("videos", "currents", "timestamps"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    names = [f"furnace_{r:03d}" for r in range(recordings)]

    bar = None
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("frames"), TimeRemainingColumn())
        bar.start()
    meta, all_segments = {}, []
    try:
        for r, name in enumerate(names):
            task = bar.add_task(name, total=frames) if bar else None
            rec = _recording(seed, r, frames, size, tick=(lambda n: bar.advance(task, n)) if bar else None)
            write_mat(out / "videos" / f"{name}.mat", {"data": rec["video"], "label": rec["label"]},
                      created=rec["created"], compress=("label",))
            (out / "timestamps" / f"{name}.csv").write_text(
                "timestamp\n" + "".join(s + "\n" for s in rec["frame_stamps"]))
            (out / "currents" / f"{name}.csv").write_text(
                "timestamp,phase_a,phase_b,phase_c\n"
                + "".join(f"{s},{a:.2f},{b:.2f},{c:.2f}\n" for s, (a, b, c) in zip(rec["row_stamps"], rec["amps"])))
            all_segments.append(rec["segments"])
            abnormal = rec["label"].reshape(frames, -1).any(axis=1)
            meta[name] = dict(fps=round(rec["fps"], 4), frames=frames, abnormal_frames=int(abnormal.sum()))
    finally:
        if bar:
            bar.stop()

    test = _split(seed, all_segments)
    splits = {"train": {}, "test": {}}
    for r, name in enumerate(names):
        idx = {"train": [], "test": []}
        segs = []
        for i, s in enumerate(all_segments[r]):
            which = "test" if (r, i) in test else "train"
            idx[which].extend(range(s.start, s.end))
            segs.append(dict(kind=s.kind, start=s.start, end=s.end, event=list(s.event), split=which))
            if s.phase is not None:
                segs[-1]["phase"] = s.phase
        for which in splits:
            splits[which][f"{name}.mat"] = idx[which]
        meta[name]["segments"] = segs
    for which, m in splits.items():
        (out / f"{which}.json").write_text(json.dumps(m))
    info = dict(generator="fmfast.data.synthetic", version=VERSION, seed=seed, size=size, frames=frames,
                recordings=meta)
    (out / "synthetic.json").write_text(json.dumps(info, indent=1))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m fmfast.data.synthetic",
                                description="Write a synthetic fused-magnesium-furnace dataset (FMF V2 layout).")
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--recordings", type=int, default=3, help="number of recordings (default 3)")
    p.add_argument("--frames", type=int, default=12000,
                   help="frames per recording at ~25 fps (default 12000: 8 min, ~60 events)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--size", type=int, default=64, help="frame side in pixels (default 64)")
    a = p.parse_args(argv)
    try:
        out = generate(a.out, recordings=a.recordings, frames=a.frames, seed=a.seed, size=a.size, progress=True)
    except ValueError as e:
        p.error(str(e))
    print(f"wrote {out} ({a.recordings} recordings x {a.frames} frames, seed {a.seed})")


if __name__ == "__main__":
    main()

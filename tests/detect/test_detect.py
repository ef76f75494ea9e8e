"""Detection: alarm logic on hand-made series, end to end on a tiny model and real video files,
parity of the scored windows with the training data path, --follow on a growing recording."""
from __future__ import annotations

import csv
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.recordings import frames, stamp, v2_current, write_video
from fmfast.engine import checkpoints as checkpoint
from fmfast.detect.alarms import AlarmTracker, alarm_intervals
from fmfast.cli.common import run_main
from fmfast.errors import FmfastError
from fmfast.models.config import ModelConfig
from fmfast.cli.detect import main
from fmfast.data.decoders import LABEL, importable
from fmfast.models import build_model

T, S, HOP = 4, 4, 2  # tiny model: 4-frame clips at stride 2, 4 s of current


def tiny(task: str, tmp: Path, name: str = "fmformer") -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(task=task, image_size=32, num_frames=T, dim=16, depth=1, heads=2, dim_head=8, mlp_dim=32,
                      current_len=2 * S, seg_hidden_dims=(8, 8, 8))
    m = build_model(name, cfg)
    path = tmp / f"{name}_{task}.pt"
    checkpoint.save(path, checkpoint.model_payload(name, m, {"num_frames": T, "stride": 2, "current_seconds": S,
                                                              "frame_size": 32}))
    return path


@pytest.fixture(scope="module")
def rec(tmp_path_factory):
    d = tmp_path_factory.mktemp("rec")
    video = write_video(d / "cam.mp4", frames(40), fps=10)  # 4 s
    cur, _ = v2_current(d / "cur.csv", first=-6, seconds=12)
    return d, video, cur, tiny("classification", d), tiny("segmentation", d)


def detect(*argv):
    """``fmfast detect`` in-process, exact and quick by default (fp32, eager: these tests check the
    windows, alarms and files, not the compiled bf16 path, which tests/engine/test_predictor.py does)."""
    argv = [str(a) for a in argv]
    for flag, value in (("--precision", "fp32"), ("--compile", "off")):
        if flag not in argv:
            argv += [flag, value]
    return run_main(main, argv)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


# -- alarm logic --------------------------------------------------------------------------------
def test_alarm_hysteresis_and_min_duration():
    p = [0.1, 0.7, 0.5, 0.45, 0.3, 0.8, 0.9, 0.2, 0.65, 0.62]
    t = np.arange(len(p), dtype=float)
    a = alarm_intervals(p, t, on=0.6, off=0.4)
    # 0.5 and 0.45 keep the first alarm on (>= off); 0.3 ends it; the last one is still open
    assert [(x.start, x.last, x.peak, x.open) for x in a] == [(1, 3, 1, False), (5, 6, 6, False), (8, 9, 8, True)]
    assert [x.duration for x in a] == [2.0, 1.0, 1.0] and a[1].peak_prob == 0.9
    # a minimum duration drops the short ones
    assert [(x.start, x.last) for x in alarm_intervals(p, t, 0.6, 0.4, min_duration=1.5)] == [(1, 3)]
    # without hysteresis (off == on) the wavering series splits into pieces
    w = [0.7, 0.55, 0.7, 0.55, 0.7]
    assert len(alarm_intervals(w, np.arange(5.0), 0.6, 0.6)) == 3
    assert len(alarm_intervals(w, np.arange(5.0), 0.6, 0.5)) == 1


def test_alarm_stream_emits_on_confirmation():
    tr = AlarmTracker(on=0.6, off=0.4, min_duration=1.0)
    ev = [(i, k) for i, p in enumerate([0.2, 0.9, 0.8, 0.7, 0.1, 0.9, 0.1])
          for k, _ in tr.update(p, i * 0.5)]
    # confirmed when it has lasted 1 s (at window 3), reported over at window 4; the 2nd is too short
    assert ev == [(3, "on"), (4, "off")]
    with pytest.raises(FmfastError, match="0 <= off <= on <= 1, got on 0.3, off 0.5"):
        AlarmTracker(on=0.3, off=0.5)


# -- end to end -----------------------------------------------------------------------------------
@pytest.mark.parametrize("decoder", [b for b in ("decord", "pyav") if importable(b)])
def test_detect_classification_end_to_end(rec, tmp_path, capsys, decoder):
    d, video, cur, cls, _ = rec
    out = tmp_path / "out"
    assert detect("--checkpoint", cls, video, cur, "--start", stamp(0), "--out", out, "--hop", HOP,
                  "--on", 0.0, "--off", 0.0, "--min-duration", 0, "--decoder", decoder) == 0
    printed = capsys.readouterr().out
    assert "faster than real time" in printed and "4.0 s of recording" in printed
    assert f"decoding included ({LABEL[decoder]})" in printed
    w = read_csv(out / "windows.csv")
    need = (T - 1) * 2
    assert [int(r["frame"]) for r in w] == list(range(need, 40, HOP))
    assert [r["timestamp"] for r in w[:2]] == [stamp(0.6, frac=True), stamp(0.8, frac=True)]
    p = np.array([float(r["probability"]) for r in w])
    assert ((p > 0) & (p < 1)).all()
    a = read_csv(out / "alarms.csv")  # thresholds 0: one alarm over everything, still open
    assert len(a) == 1 and a[0]["start_frame"] == str(need) and a[0]["end_frame"] == "38" and a[0]["open"] == "1"
    assert (out / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "overlays").exists()  # classification: no masks
    assert not [q for q in out.iterdir() if q.name.startswith(".")]


def test_detect_probes_the_video_while_the_model_is_built(rec, tmp_path, monkeypatch):
    """The video's probe child starts before the checkpoint is loaded (in probe_ahead's thread),
    and the reader takes its answer instead of running a second child."""
    import fmfast.cli.detect as cli
    import fmfast.data.probe as probe_mod
    d, video, cur, cls, _ = rec
    seen, children = [], []
    run_child, ahead, load = probe_mod._run_child, cli.probe_ahead, cli.load_model
    monkeypatch.setattr(probe_mod, "_run_child", lambda *a: children.append(threading.current_thread().name)
                        or run_child(*a))
    monkeypatch.setattr(cli, "probe_ahead", lambda *a: seen.append("probe_ahead") or ahead(*a))
    monkeypatch.setattr(cli, "load_model", lambda *a: seen.append("load_model") or load(*a))
    assert detect("--checkpoint", cls, video, cur, "--start", stamp(0), "--out", tmp_path / "out", "--hop", HOP) == 0
    assert seen == ["probe_ahead", "load_model"] and children == ["fmfast-probe"]
    assert not probe_mod._AHEAD


def test_windows_match_the_training_data_path(rec, tmp_path):
    """The probability of each window equals the model on FMFDataset's sample for that frame
    (the ingested recording, same clip offsets and current window)."""
    from fmfast.data import FMFDataset
    from fmfast.cli.ingest import main as ingest_main

    d, video, cur, cls, _ = rec
    root = tmp_path / "root"
    run_main(ingest_main, [str(video), str(cur), "--out", str(root), "--start", stamp(0), "--size", "32",
                           "--num-frames", str(T), "--stride", "2", "--current-seconds", str(S)])
    detect("--checkpoint", cls, video, cur, "--start", stamp(0), "--out", tmp_path / "a", "--hop", 1)
    detect("--checkpoint", cls, "--recording", root, "cam", "--out", tmp_path / "b", "--hop", 1)
    wa, wb = read_csv(tmp_path / "a" / "windows.csv"), read_csv(tmp_path / "b" / "windows.csv")
    assert [r["frame"] for r in wa] == [r["frame"] for r in wb] == [str(f) for f in range(6, 40)]
    pa = np.array([float(r["probability"]) for r in wa])
    np.testing.assert_allclose(pa, [float(r["probability"]) for r in wb], atol=1e-6)

    # a hop larger than the decode chunk: the frame buffer is trimmed past what it holds
    detect("--checkpoint", cls, video, cur, "--start", stamp(0), "--out", tmp_path / "c", "--hop", 13, "--chunk", 4)
    wc = read_csv(tmp_path / "c" / "windows.csv")
    assert [int(r["frame"]) for r in wc] == [6, 19, 32]
    np.testing.assert_allclose([float(r["probability"]) for r in wc], pa[::13], atol=1e-6)

    ds = FMFDataset(root, "test", num_frames=T, stride=2, current_seconds=S, task="classification")
    assert [ds.sample_key(i)[1] for i in range(len(ds))] == list(range(7, 40))
    model, _ = checkpoint.load_model(cls)
    clips, currents, _ = ds.batch(list(range(len(ds))))
    with torch.no_grad():
        ref = model.eval()(clips, currents).softmax(1)[:, 1].numpy()
    np.testing.assert_allclose(pa[1:], ref, atol=1e-5)  # windows from frame 7 on


def test_detect_segmentation_overlays(rec, tmp_path):
    d, video, cur, _, seg = rec
    out = tmp_path / "out"
    detect("--checkpoint", seg, video, cur, "--start", stamp(0), "--out", out, "--hop", 4,
           "--on", 0.0, "--off", 0.0, "--min-duration", 0)
    w = read_csv(out / "windows.csv")
    a = read_csv(out / "alarms.csv")
    assert len(a) == 1
    pngs = sorted((out / "overlays").iterdir())
    assert [q.name for q in pngs] == [f"alarm_001_frame_{int(a[0]['peak_frame']):07d}.png"]
    from matplotlib.image import imread

    img = imread(pngs[0])
    assert img.shape[:2] == (4 * 32, 4 * 32)
    # the picture's bright green band is on top: displayed [H, W], not the stored [W, H]
    assert img[:16, :, 1].mean() > 0.3 and img[-32:, :, 1].mean() < 0.05
    # the window probability of a segmentation model is its largest pixel probability
    assert max(float(r["probability"]) for r in w) == pytest.approx(float(a[0]["peak_probability"]), abs=1e-6)


def test_overlay_transposes_for_display(tmp_path):
    from matplotlib.image import imread

    from fmfast.detect.report import overlay_png

    frame = np.zeros((3, 16, 8), np.uint8)  # stored [3, W=16, H=8]
    pmap = np.zeros((16, 8), np.float32)
    pmap[:4, 6:] = 0.9  # stored x < 4 (left columns), y >= 6 (bottom rows)
    overlay_png(tmp_path / "o.png", frame, pmap, scale=1)
    img = imread(tmp_path / "o.png")
    assert img.shape[:2] == (8, 16)  # displayed [H, W]
    red = img[..., 0] > 0.5
    assert red[6:, :4].all() and red.sum() == 8


def test_alarms_follow_the_probability_series(rec, tmp_path):
    """Real thresholds between the observed probabilities: the alarms written are the ones the
    batch alarm logic finds in windows.csv."""
    d, video, cur, cls, _ = rec
    out = tmp_path / "out"
    detect("--checkpoint", cls, video, cur, "--start", stamp(0), "--out", out, "--hop", 1)
    w = read_csv(out / "windows.csv")
    p = np.array([float(r["probability"]) for r in w])
    t = np.array([float(r["seconds"]) for r in w])
    on = float(np.quantile(p, 0.6))
    off = float(np.quantile(p, 0.4))
    detect("--checkpoint", cls, video, cur, "--start", stamp(0), "--out", out, "--hop", 1,
           "--on", on, "--off", off, "--min-duration", 0.2)
    got = [(r["start_frame"], r["end_frame"]) for r in read_csv(out / "alarms.csv")]
    want = [(w[x.start]["frame"], w[x.last]["frame"]) for x in alarm_intervals(p, t, on, off, 0.2)]
    assert got == want and len(want) >= 1


# -- follow ----------------------------------------------------------------------------------------
def _append_current(path: Path, first: int, last: int):
    with open(path, "a") as f:
        f.writelines(f"{stamp(s)},{1000 + s},{2000 + s},{3000 + s}\n" for s in range(first, last + 1) for _ in "ab")


def test_follow_segment_folder_alarm_while_growing(rec, tmp_path):
    """A subprocess follows a folder of 1-s segments; the writer adds segments 2 and 3 only
    after the alarm from segment 1 was printed."""
    d, _, _, cls, _ = rec
    seg_dir, cur = tmp_path / "segs", tmp_path / "cur.csv"
    seg_dir.mkdir()
    cur.write_text("time,A,B,C\n")
    _append_current(cur, -5, 1)
    fr = frames(30)
    write_video(seg_dir / "seg_000.mp4", fr[:10], fps=10)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "fmfast.detect", "--checkpoint", str(cls), str(seg_dir), str(cur),
                             "--start", stamp(0), "--out", str(out), "--hop", str(HOP), "--follow", "--poll", "0.05",
                             "--settle", "0.3", "--follow-timeout", "2", "--on", "0", "--off", "0",
                             "--min-duration", "0", "--precision", "fp32", "--compile", "off"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # blocks until the first alarm (or the process ends)
        assert line.startswith("ALARM") and stamp(0.6, frac=True) in line, (line, proc.stderr.read())
        for k in (1, 2):
            write_video(seg_dir / f".tmp_{k}.mp4", fr[10 * k:10 * k + 10], fps=10)
            (seg_dir / f".tmp_{k}.mp4").rename(seg_dir / f"seg_{k:03d}.mp4")
            _append_current(cur, k + 1, k + 1)
            time.sleep(0.3)
        _append_current(cur, 4, 4)  # a row of the next second makes second 3 final
        rest, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "alarm over" in rest and "still open" in rest
    w = read_csv(out / "windows.csv")
    assert [int(r["frame"]) for r in w] == list(range(6, 30, HOP))
    assert w[-1]["timestamp"] == stamp(2.8, frac=True)  # segment times follow on from each other
    assert (out / "timeline.png").is_file() and len(read_csv(out / "alarms.csv")) == 1


def test_follow_growing_file(rec, tmp_path, capsys):
    """One mkv file growing on disk (copied in pieces by a thread), a growing log and a growing
    frame timestamps file."""
    d, _, _, cls, _ = rec
    full = write_video(tmp_path / "full.mkv", frames(30), fps=10).read_bytes()
    live, cur, ts = tmp_path / "live.mkv", tmp_path / "cur.csv", tmp_path / "ts.csv"
    cur.write_text("time,A,B,C\n")
    ts.write_text("time\n")
    _append_current(cur, -5, 0)

    def grow():
        for k in range(1, 5):
            with open(live, "ab") as f:
                f.write(full[len(full) * (k - 1) // 4: len(full) * k // 4])
            _append_current(cur, k, k)
            with open(ts, "a") as f:  # frame times arrive in their own pieces
                f.writelines(f"{stamp(i / 10, frac=True)}\n" for i in range(8 * (k - 1), min(8 * k, 30)))
            time.sleep(0.4)

    th = threading.Thread(target=grow)
    th.start()
    try:
        detect("--checkpoint", cls, live, cur, "--timestamps", ts, "--out", tmp_path / "out", "--hop", HOP,
               "--follow", "--poll", 0.05, "--settle", 0.5, "--follow-timeout", 1.5)
    finally:
        th.join()
    w = read_csv(tmp_path / "out" / "windows.csv")
    assert [int(r["frame"]) for r in w] == list(range(6, 30, HOP))
    assert w[-1]["timestamp"] == stamp(2.8, frac=True)
    # same windows as scoring the finished file offline
    detect("--checkpoint", cls, tmp_path / "full.mkv", cur, "--start", stamp(0), "--out", tmp_path / "off",
           "--hop", HOP)
    ref = read_csv(tmp_path / "off" / "windows.csv")
    np.testing.assert_allclose([float(r["probability"]) for r in w], [float(r["probability"]) for r in ref],
                               atol=1e-6)


# -- bad input --------------------------------------------------------------------------------------
def test_a_decoder_that_is_not_installed_is_one_line(rec, tmp_path, capfd, monkeypatch):
    d, video, cur, cls, _ = rec
    monkeypatch.setitem(sys.modules, "decord", None)  # `import decord` raises ImportError
    for extra in ([], ["--follow"]):
        with pytest.raises(SystemExit) as e:
            detect("--checkpoint", cls, video, cur, "--start", stamp(0), "--out", tmp_path / "out", "--decoder",
                   "decord", *extra)
        err = capfd.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and err == ["error: --decoder decord: decord is not installed (pip install decord2)"]
        assert not (tmp_path / "out").exists()


def test_bad_inputs(rec, tmp_path, capfd):
    d, video, cur, cls, _ = rec
    (tmp_path / "junk.pt").write_bytes(b"junk")
    (tmp_path / "junk.mp4").write_bytes(b"junk" * 100)
    cases = [
        (["--checkpoint", tmp_path / "junk.pt", video, cur, "--start", stamp(0)], "junk.pt"),
        (["--checkpoint", cls, tmp_path / "junk.mp4", cur, "--start", stamp(0)], "junk.mp4"),
        (["--checkpoint", cls, "--recording", tmp_path, "nothing"], "nothing"),
        (["--checkpoint", cls, video], "CURRENT.csv"),
        (["--checkpoint", cls, video, cur, "--start", stamp(0), "--on", "0.3", "--off", "0.5"], "--on/--off"),
        (["--checkpoint", cls, video, cur, "--start", stamp(0), "--hop", "0"], "--hop"),
    ]
    for argv, says in cases:
        capfd.readouterr()
        with pytest.raises(SystemExit) as e:
            detect(*argv, "--out", tmp_path / "out")
        err = capfd.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and says in err[0], (argv, err)
        assert not (tmp_path / "out").exists()

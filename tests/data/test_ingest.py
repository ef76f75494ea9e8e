"""Ingestion of own recordings: real (tiny) video files encoded here, decoded by decord (and,
where it matters, by PyAV: the same frames)."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from helpers.recordings import (audio_only, corrupt_tail, frame_index, frames, stamp, v2_current, write_current,
                         write_video)
from fmfast.cli.common import run_main
from fmfast.errors import FmfastError
from fmfast.data.csvfiles import read_current_csv, resample
from fmfast.data.decoders import importable
from fmfast.cli.ingest import main

DECODERS = [b for b in ("decord", "pyav") if importable(b)]  # every installed decoder


def ingest(*argv):
    return run_main(main, [str(a) for a in argv])


def start(seconds=0.0):
    return stamp(seconds)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    d = tmp_path_factory.mktemp("video")
    return write_video(d / "cam.mp4", frames(50), fps=25)


def read_root(root, name):
    with h5py.File(root / "videos" / f"{name}.mat", "r") as f:
        data, label = f["data"][:], f["label"][:]
    ts = (root / "timestamps" / f"{name}.csv").read_text().splitlines()
    cur = (root / "currents" / f"{name}.csv").read_text().splitlines()
    return data, label, ts, cur


@pytest.mark.parametrize("decoder", DECODERS)
def test_ingest_v2_layout(video, tmp_path, decoder):
    cur, v = v2_current(tmp_path / "cur.csv", first=-5, seconds=10)
    root = tmp_path / "root"
    assert ingest(video, cur, "--out", root, "--start", start(), "--size", "40x24", "--decoder", decoder) == 0
    data, label, ts, rows = read_root(root, "cam")
    # frame count, resize to [W=40, H=24] in the stored [T,3,W,H] order, frames in order
    assert data.shape == (50, 3, 40, 24) and data.dtype == np.uint8
    assert label.shape == (50, 40, 24) and not label.any()
    np.testing.assert_array_equal(frame_index(data), np.arange(50))
    # the green band over the top quarter of the picture lies along the stored H axis (last)
    assert data[:, 1, :, :5].min() > 180 and data[:, 1, :, 7:].max() < 40
    # 25 fps from the start time: 25 frames in each of the two seconds
    assert ts[0] == "timestamp" and ts[1:] == [start(0)] * 25 + [start(1)] * 25
    # the log was already at 2 rows/s: resampling is the identity over seconds -5..1
    assert rows[0].split(",")[0] == "timestamp" and len(rows) == 1 + 14
    got = np.array([[float(x) for x in r.split(",")[1:]] for r in rows[1:]])
    np.testing.assert_array_equal(got, v[:14])
    assert [r.split(",")[0] for r in rows[1:3]] == [start(-5)] * 2
    # splits: every frame with a full 10-frame history, in test.json; key present in both
    assert json.loads((root / "test.json").read_text()) == {"cam.mat": list(range(9, 50))}
    assert json.loads((root / "train.json").read_text()) == {"cam.mat": []}
    # a MATLAB v7.3 file: HDF5 behind MATLAB's 128-byte header text
    head = (root / "videos" / "cam.mat").read_bytes()[:128]
    assert head.startswith(b"MATLAB 7.3 MAT-file") and head[124:128] == b"\x00\x02IM"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # staging folder gone


def test_timestamps_file_aligns_and_trims_to_the_log(tmp_path):
    vid = write_video(tmp_path / "v.mkv", frames(30), fps=10)
    # irregular frame times, fractional: frames 0..9 fall in second 2, 10..19 in 3, 20..29 in 4
    t = 2.0 + np.arange(30) * 0.1 + 0.03
    (tmp_path / "ts.csv").write_text("time\n" + "\n".join(stamp(x, frac=True) for x in t) + "\n")
    cur, v = v2_current(tmp_path / "cur.csv", first=3, seconds=8)  # log starts at second 3
    root = tmp_path / "root"
    ingest(vid, cur, "--out", root, "--timestamps", tmp_path / "ts.csv", "--size", "16")
    data, _, ts, rows = read_root(root, "v")
    np.testing.assert_array_equal(frame_index(data), np.arange(10, 30))  # second 2 dropped
    assert ts[1:] == [start(3)] * 10 + [start(4)] * 10
    assert len(rows) == 1 + 4 and rows[1].startswith(start(3))
    assert json.loads((root / "test.json").read_text()) == {"v.mat": list(range(9, 20))}


def test_current_history_kept_before_first_frame(video, tmp_path):
    cur, v = v2_current(tmp_path / "cur.csv", first=-300, seconds=310)
    root = tmp_path / "root"
    ingest(video, cur, "--out", root, "--start", start(), "--current-seconds", "120")
    _, _, _, rows = read_root(root, "cam")
    # 120 s of history up to the first frame's second (0), then second 1
    assert rows[1].startswith(start(-119)) and len(rows) == 1 + 2 * 121


def test_resample_faster_and_slower_logs():
    # 10 rows/s, value = time: each half second becomes the mean of its five samples
    t = np.arange(0, 10, 0.1)
    out = resample(t, np.stack([t, t, t], 1), 2, 4, max_gap=1.0, where="x")
    np.testing.assert_allclose(out[:, 0], np.arange(2, 5, 0.5) + 0.2, atol=1e-9)
    # 1 row/s: the half seconds between samples are interpolated
    t = np.arange(0, 10.0)
    out = resample(t, np.stack([t, 2 * t, 3 * t], 1), 2, 4, max_gap=1.0, where="x")
    np.testing.assert_allclose(out, np.stack([np.arange(2, 5, 0.5) * k for k in (1, 2, 3)], 1))
    # one row every 3 s with a 3-s limit is fine, with a 2-s limit an error naming the gap
    t = np.arange(0, 30, 3.0)
    resample(t, np.ones((t.size, 3)), 5, 20, max_gap=3.0, where="x")
    with pytest.raises(FmfastError, match=r"x: gap of 3.0 s .* allowed gap of 2 s"):
        resample(t, np.ones((t.size, 3)), 5, 20, max_gap=2.0, where="x")


def test_gaps_only_matter_where_frames_need_current():
    t = np.concatenate([np.arange(0, 10, 0.5), np.arange(100, 120, 0.5)])  # 90-s hole at 10..100
    resample(t, np.ones((t.size, 3)), 102, 110, max_gap=5, where="x")
    with pytest.raises(FmfastError, match="gap of 90.5 s"):
        resample(t, np.ones((t.size, 3)), 5, 110, max_gap=5, where="x")


def test_ingest_resamples_a_fast_fractional_log(video, tmp_path):
    t = np.arange(-3, 4, 0.2)  # 5 rows/s with millisecond stamps
    cur = write_current(tmp_path / "cur.csv", t, np.stack([t, t + 10, t + 20], 1), frac=True)
    root = tmp_path / "root"
    ingest(video, cur, "--out", root, "--start", start(), "--size", "16")
    ct, cv = read_current_csv(root / "currents" / "cam.csv")
    # seconds -3..1; first half second holds samples at .0, .2, .4 -> mean .2; second .6, .8 -> .7
    expect = np.repeat(np.arange(-3, 2), 2) + np.tile([0.2, 0.7], 5)
    np.testing.assert_allclose(cv[:, 0], expect, atol=1e-5)
    np.testing.assert_allclose(cv[:, 2] - cv[:, 0], 20, atol=1e-4)


def test_gap_in_log_is_an_error(video, tmp_path, capfd):
    t = np.array([-2, -1, 0, 0.5, 8, 9, 10], float)
    cur = write_current(tmp_path / "cur.csv", t, np.ones((t.size, 3)))
    with pytest.raises(SystemExit) as e:
        ingest(video, cur, "--out", tmp_path / "root", "--start", start())
    assert e.value.code == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gap of 7.5 s" in err[0] and "cur.csv" in err[0]
    ingest(video, cur, "--out", tmp_path / "root", "--start", start(), "--max-gap", "8")
    assert (tmp_path / "root" / "videos" / "cam.mat").is_file()


def test_labels_npy_resized_and_transposed(video, tmp_path):
    masks = np.zeros((50, 48, 80), np.uint8)
    masks[10:, :12, :40] = 255  # top-left quarter of the picture, frames 10..
    np.save(tmp_path / "m.npy", masks)
    cur, _ = v2_current(tmp_path / "cur.csv", first=-5, seconds=10)
    root = tmp_path / "root"
    ingest(video, cur, "--out", root, "--start", start(), "--size", "40x24", "--labels", tmp_path / "m.npy")
    _, label, _, _ = read_root(root, "cam")
    assert set(np.unique(label)) == {0, 1}
    assert not label[:10].any()
    assert label[10:, :20, :6].all() and not label[10:, 20:].any() and not label[10:, :, 6:].any()


def test_labels_png_folder(video, tmp_path):
    from matplotlib.image import imsave

    (tmp_path / "masks").mkdir()
    for i in range(50):
        m = np.zeros((48, 80), np.float32)
        if i >= 40:
            m[24:, 40:] = 1.0  # bottom-right quarter of the picture
        imsave(tmp_path / "masks" / f"m{i:03d}.png", m, cmap="gray", vmin=0, vmax=1)
    cur, _ = v2_current(tmp_path / "cur.csv", first=-5, seconds=10)
    root = tmp_path / "root"
    ingest(video, cur, "--out", root, "--start", start(), "--size", "40x24", "--labels", tmp_path / "masks")
    _, label, _, _ = read_root(root, "cam")
    assert not label[:40].any()
    assert label[40:, 20:, 12:].all() and label[40:].sum() == 10 * 20 * 12


def test_add_second_recording_to_root(video, tmp_path):
    cur, _ = v2_current(tmp_path / "cur.csv", first=-5, seconds=10)
    root = tmp_path / "root"
    ingest(video, cur, "--out", root, "--start", start())
    ingest(video, cur, "--out", root, "--start", start(), "--name", "second", "--split", "train")
    assert json.loads((root / "train.json").read_text()) == {"cam.mat": [], "second.mat": list(range(9, 50))}
    assert json.loads((root / "test.json").read_text()) == {"cam.mat": list(range(9, 50)), "second.mat": []}
    assert sorted(p.name for p in (root / "videos").iterdir()) == ["cam.mat", "second.mat"]
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


def test_ingested_root_reads_with_fmf_dataset(video, tmp_path):
    data = pytest.importorskip("fmfast.data", reason="FMFDataset not available yet")
    if not hasattr(data, "FMFDataset"):
        pytest.skip("FMFDataset not available yet")
    cur, v = v2_current(tmp_path / "cur.csv", first=-5, seconds=10)
    ingest(video, cur, "--out", tmp_path / "root", "--start", start(), "--size", "32")
    ds = data.FMFDataset(tmp_path / "root", "test", num_frames=10, stride=1, current_seconds=4)
    assert len(ds) == 41
    clip, current, label = ds[len(ds) - 1]  # frame 49, second 1: current rows of seconds -2..1
    assert tuple(clip.shape) == (3, 10, 32, 32) and int(label) == 0
    np.testing.assert_allclose(np.asarray(current), v[6:14], rtol=1e-6)


@pytest.mark.parametrize("decoder", DECODERS)
def test_allow_truncated_keeps_decodable_frames(video, tmp_path, decoder):
    bad = corrupt_tail(write_video(tmp_path / "x.mp4", frames(50)), tmp_path / "bad.mp4")
    cur, _ = v2_current(tmp_path / "cur.csv", first=-5, seconds=10)
    root = tmp_path / "root"
    ingest(bad, cur, "--out", root, "--start", start(), "--size", "16", "--allow-truncated", "--decoder", decoder)
    data, _, ts, _ = read_root(root, "bad")
    assert 0 < len(data) < 50 and len(ts) == 1 + len(data)
    np.testing.assert_array_equal(frame_index(data), np.arange(len(data)))


def _bad_inputs(tmp_path, video):
    cur, _ = v2_current(tmp_path / "cur.csv", first=-5, seconds=10)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(video.read_bytes()[: video.stat().st_size // 2])
    (tmp_path / "garbage.mp4").write_bytes(b"not a video" * 50)
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "cols.csv").write_text("time,A,B\n" + "".join(f"{stamp(s)},1,2\n" for s in range(5)))
    (tmp_path / "stamp.csv").write_text(f"time,A,B,C\n{stamp(0)},1,2,3\n2024-13-45 99:00:00,1,2,3\n")
    late, _ = v2_current(tmp_path / "late.csv", first=3600, seconds=10)
    (tmp_path / "ts.csv").write_text("time\n" + "".join(f"{stamp(0)}\n" for _ in range(7)))
    np.save(tmp_path / "m.npy", np.zeros((10, 48, 80), np.uint8))
    s = ["--start", start()]
    return {
        "garbage": ([tmp_path / "garbage.mp4", cur, *s], "garbage.mp4", "cannot open"),
        "empty file": ([tmp_path / "empty.mp4", cur, *s], "empty.mp4", "zero frames"),
        "zero frames": ([audio_only(tmp_path / "audio.mp4"), cur, *s], "audio.mp4", "no video stream"),
        "truncated": ([cut, cur, *s], "cut.mp4", "cut off"),
        "lists more frames": ([corrupt_tail(video, tmp_path / "lying.mp4"), cur, *s], "lying.mp4",
                              "truncated or corrupt video: the container lists 50 frames"),
        "missing columns": ([video, tmp_path / "cols.csv", *s], "cols.csv", "missing columns"),
        "bad timestamp": ([video, tmp_path / "stamp.csv", *s], "stamp.csv", "line 3: unparseable timestamp"),
        "no overlap": ([video, late, *s], "late.csv", "does not overlap"),
        "no start": ([video, cur], "--start", "frame times unknown"),
        "timestamps count": ([video, cur, "--timestamps", tmp_path / "ts.csv"], "ts.csv", "7 frame timestamps"),
        "bad start": ([video, cur, "--start", "yesterday"], "--start", "unparseable timestamp"),
        "bad size": ([video, cur, *s, "--size", "0x5"], "--size", "expected N or WIDTHxHEIGHT"),
        "labels count": ([video, cur, *s, "--labels", tmp_path / "m.npy"], "m.npy", "expected masks [N=50"),
    }


CASES = ["garbage", "empty file", "zero frames", "truncated", "lists more frames", "missing columns",
         "bad timestamp", "no overlap", "no start", "timestamps count", "bad start", "bad size", "labels count"]


VIDEO_CASES = ["garbage", "empty file", "zero frames", "truncated", "lists more frames"]


@pytest.mark.parametrize("case, decoder", [(c, "auto") for c in CASES] +
                         [(c, "pyav") for c in VIDEO_CASES if "pyav" in DECODERS and "decord" in DECODERS])
def test_bad_input_one_line_exit_2_no_output(case, video, tmp_path, capfd, decoder):
    argv, names, says = _bad_inputs(tmp_path, video)[case]
    root = tmp_path / "root"
    capfd.readouterr()
    with pytest.raises(SystemExit) as e:
        ingest(*argv, "--out", root, "--decoder", decoder)
    assert e.value.code == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # nothing from FFmpeg or decord leaks out
    assert err[0].startswith("error: ") and names in err[0] and says in err[0], err[0]
    assert not root.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_failure_leaves_existing_root_untouched(video, tmp_path, capfd):
    cur, _ = v2_current(tmp_path / "cur.csv", first=-5, seconds=10)
    root = tmp_path / "root"
    ingest(video, cur, "--out", root, "--start", start())
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    bad = corrupt_tail(video, tmp_path / "lying.mp4")
    for argv in ([bad, cur, "--start", start()], [video, cur, "--start", start()]):  # 2nd: name taken
        with pytest.raises(SystemExit):
            ingest(*argv, "--out", root)
    assert "already exists" in capfd.readouterr().err
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


def test_stalled_decoder_is_bounded():
    from fmfast.data.video import _run_bounded

    t = time.perf_counter()
    with pytest.raises(FmfastError, match="stalled"):
        _run_bounded(lambda: time.sleep(5), 0.2, "cam.mp4")
    assert time.perf_counter() - t < 2


def test_cli_subprocess(video, tmp_path):
    cur, _ = v2_current(tmp_path / "cur.csv", first=-5, seconds=10)
    bad = corrupt_tail(video, tmp_path / "lying.mp4")
    r = subprocess.run([sys.executable, "-m", "fmfast.ingest", str(bad), str(cur), "--out", str(tmp_path / "r"),
                        "--start", start()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "lying.mp4" in r.stderr, r.stderr
    assert not (tmp_path / "r").exists()

"""detect whatever its inputs and outputs do: --out that is not a folder is refused untouched,
a run that fails on its inputs leaves earlier results alone, and --follow survives a current log
that is rotated, truncated or replaced, a video that is replaced, and says so (exit 2) when it
cannot go on."""
from __future__ import annotations

import csv
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fmfast.cli.common import run_main
from fmfast.cli.detect import main
from fmfast.engine import checkpoints as checkpoint
from fmfast.models import build_model
from fmfast.models.config import ModelConfig
from helpers.outputs import KEPT, KINDS, make_not_a_folder
from helpers.recordings import frames, stamp, write_video

T, S, HOP = 4, 4, 2


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(task="classification", image_size=32, num_frames=T, dim=16, depth=1, heads=2, dim_head=8,
                      mlp_dim=32, current_len=2 * S)
    path = tmp_path_factory.mktemp("m") / "cls.pt"
    checkpoint.save(path, checkpoint.model_payload("fmformer", build_model("fmformer", cfg),
                                                   {"num_frames": T, "stride": 2, "current_seconds": S, "frame_size": 32}))
    return path


def rows(first, last):
    return "".join(f"{stamp(s)},{1000 + s},{2000 + s},{3000 + s}\n" for s in range(first, last + 1) for _ in "ab")


def detect(*argv):
    argv = [str(a) for a in argv]
    for flag, value in (("--precision", "fp32"), ("--compile", "off")):  # exact and quick: see test_detect.py
        if flag not in argv:
            argv += [flag, value]
    try:
        return run_main(main, argv)
    except SystemExit as e:
        return e.code


def probs(path):
    with open(path) as f:
        return [(int(r["frame"]), float(r["probability"])) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def offline(model, tmp_path_factory):
    """The reference: the finished recording scored offline."""
    d = tmp_path_factory.mktemp("off")
    video = write_video(d / "full.mkv", frames(30), fps=10)
    (d / "cur.csv").write_text("time,A,B,C\n" + rows(-5, 4))
    assert detect("--checkpoint", model, video, d / "cur.csv", "--start", stamp(0), "--out", d / "out", "--hop", HOP) == 0
    return video, probs(d / "out" / "windows.csv")


@pytest.mark.parametrize("kind", KINDS)
def test_out_that_is_not_a_folder_is_refused_untouched(model, offline, tmp_path, capsys, kind):
    video = offline[0]
    cur = tmp_path / "cur.csv"
    cur.write_text("time,A,B,C\n" + rows(-5, 4))
    out = tmp_path / "out"
    target = make_not_a_folder(out, kind)
    assert detect("--checkpoint", model, video, cur, "--start", stamp(0), "--out", out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0], err
    if kind == "file":
        assert out.read_text() == KEPT
    if kind == "symlink":
        assert not list(target.iterdir())


def test_follow_that_fails_on_its_inputs_keeps_earlier_results(model, offline, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "windows.csv").write_text("earlier windows\n")
    (out / "alarms.csv").write_text("earlier alarms\n")
    bad = tmp_path / "cur.csv"
    bad.write_text("time,A,B,C\n" + rows(-5, 0).replace(",1000,", ",10142,81,", 1))
    code = detect("--checkpoint", model, offline[0], bad, "--start", stamp(0), "--out", out, "--follow",
                  "--poll", 0.05, "--follow-timeout", 0.5)
    assert code == 2 and "decimal comma" in capsys.readouterr().err
    assert (out / "windows.csv").read_text() == "earlier windows\n"
    assert (out / "alarms.csv").read_text() == "earlier alarms\n"


def _follow_while(model, video, cur, out, writer, *extra):
    th = threading.Thread(target=writer)
    th.start()
    try:
        code = detect("--checkpoint", model, video, cur, "--start", stamp(0), "--out", out, "--hop", HOP, "--follow",
                      "--poll", 0.05, "--settle", 0.3, "--follow-timeout", 1.5, *extra)
    finally:
        th.join()
    return code


def _rotate_rename(cur):  # logrotate's default: rename away, start a new file
    cur.rename(cur.with_suffix(".csv.1"))
    cur.write_text("time,A,B,C\n")


def _truncate_in_place(cur):  # logrotate copytruncate
    with open(cur, "r+") as f:
        f.truncate(0)
    with open(cur, "w") as f:
        f.write("time,A,B,C\n")


def _replace_with_copy(cur):  # a new file with everything so far, moved over the old one
    tmp = cur.with_suffix(".new")
    shutil.copy(cur, tmp)
    os.replace(tmp, cur)


@pytest.mark.parametrize("rotate", [_rotate_rename, _truncate_in_place, _replace_with_copy])
def test_follow_survives_current_log_rotation(model, offline, tmp_path, capsys, rotate, monkeypatch):
    from fmfast.detect.follow import FollowFeed

    video, ref = offline
    cur = tmp_path / "cur.csv"
    cur.write_text("time,A,B,C\n" + rows(-5, 1))
    # rotate only once the follower has read the first rows: a fixed delay lost them whenever
    # detect's start-up took longer (a loaded machine), and the rows were then really gone
    seen, poll = threading.Event(), FollowFeed.poll_current

    def first_poll(self, engine, final):
        got = poll(self, engine, final)
        seen.set()
        return got
    monkeypatch.setattr(FollowFeed, "poll_current", first_poll)

    def writer():
        assert seen.wait(60)
        time.sleep(0.1)
        rotate(cur)
        time.sleep(0.3)
        with open(cur, "a") as f:
            f.write(rows(2, 4))

    assert _follow_while(model, video, cur, tmp_path / "out", writer) == 0
    got = probs(tmp_path / "out" / "windows.csv")
    assert [f for f, _ in got] == [f for f, _ in ref], "windows were lost"
    np.testing.assert_allclose([p for _, p in got], [p for _, p in ref], atol=1e-6)
    err = capsys.readouterr().err
    if rotate is not _replace_with_copy or "warning" in err:
        assert "truncated or replaced while followed" in err


def test_follow_survives_the_video_being_replaced(model, offline, tmp_path, capsys, monkeypatch):
    from fmfast.detect.follow import FollowFeed

    video, ref = offline
    live, cur = tmp_path / "live.mkv", tmp_path / "cur.csv"
    full = video.read_bytes()
    live.write_bytes(full[: len(full) // 2])
    cur.write_text("time,A,B,C\n" + rows(-5, 4))
    # replace the file only once the follower has read the half of it (on a loaded machine,
    # detect's start-up can take longer than any fixed delay), and fresh, so it is not yet settled
    seen, poll = threading.Event(), FollowFeed.poll_frames

    def first_poll(self, final):
        if not seen.is_set():
            os.utime(live)
        got = poll(self, final)
        seen.set()
        return got
    monkeypatch.setattr(FollowFeed, "poll_frames", first_poll)

    def writer():
        assert seen.wait(60)
        time.sleep(0.3)
        tmp = tmp_path / ".live.tmp"
        tmp.write_bytes(full)  # rewritten complete (a remux), moved over the growing file
        os.replace(tmp, live)

    # --settle 1: the half file is not taken as complete before it is replaced
    assert _follow_while(model, live, cur, tmp_path / "out", writer, "--settle", 1.0) == 0
    got = probs(tmp_path / "out" / "windows.csv")
    assert [f for f, _ in got] == [f for f, _ in ref]
    np.testing.assert_allclose([p for _, p in got], [p for _, p in ref], atol=1e-6)
    assert "replaced while followed" in capsys.readouterr().err


def test_follow_stops_with_a_reason_when_frame_times_are_truncated(model, tmp_path, capsys):
    segs, cur, ts = tmp_path / "segs", tmp_path / "cur.csv", tmp_path / "ts.csv"
    segs.mkdir()
    fr = frames(30)
    write_video(segs / "seg_000.mp4", fr[:10], fps=10)
    cur.write_text("time,A,B,C\n" + rows(-5, 4))
    ts.write_text("time\n" + "".join(f"{stamp(i / 10, frac=True)}\n" for i in range(10)))

    def writer():
        deadline = time.time() + 60
        while not (tmp_path / "out" / "windows.csv").exists() and time.time() < deadline:
            time.sleep(0.05)  # the first segment's frames were placed by the first 10 times
        ts.write_text("time\n" + "".join(f"{stamp(i / 10, frac=True)}\n" for i in range(10, 20)))  # rotated
        write_video(segs / ".t.mp4", fr[10:20], fps=10)
        (segs / ".t.mp4").rename(segs / "seg_001.mp4")

    th = threading.Thread(target=writer)
    th.start()
    try:
        code = detect("--checkpoint", model, segs, cur, "--timestamps", ts, "--out", tmp_path / "out", "--hop", HOP,
                      "--follow", "--poll", 0.05, "--settle", 0.3, "--follow-timeout", 3)
    finally:
        th.join()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err and err[-1].startswith("error: ") and "ts.csv" in err[-1], err
    assert "truncated or rotated" in err[-1], err

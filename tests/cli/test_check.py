"""fmfast check: every problem of a dataset or a recording, one line each, exit 2; a clean one
exits 0. Also the YAML settings files' bad inputs (the last reader of the corpus)."""
from __future__ import annotations

import re

import numpy as np
import pytest

from fmfast.cli.check import main
from fmfast.cli.common import run_main
from helpers.corrupt import float_video, set_cell, set_split_text
from helpers.recordings import cut_file, frames, lying_avi, write_video


def check(*argv):
    try:
        return run_main(main, [str(a) for a in argv])
    except SystemExit as e:
        return e.code


def test_clean_dataset_passes(tiny_v2, capsys):
    assert check(tiny_v2) == 0
    out = capsys.readouterr().out
    assert "ok: a: 30 frames" in out and "ok: b: 20 frames" in out and "no problems" in out


def test_every_problem_is_reported_not_just_the_first(tiny_copy, capsys):
    set_cell(tiny_copy / "currents/a.csv", 3, 1, "10142,81")  # decimal comma
    float_video(tiny_copy / "videos/b.mat", np.nan)  # NaN pixel
    set_split_text(tiny_copy, "train", '{"a.mat": [0], "a.mat": [1]}')  # duplicate key
    (tiny_copy / "timestamps/b.csv").write_bytes(b"t\n\xff\n")  # not UTF-8
    assert check(tiny_copy) == 2
    cap = capsys.readouterr()
    problems = [ln for ln in cap.out.splitlines() if ln.startswith("problem: ")]
    assert len(problems) == 4, cap.out
    for says in ("currents/a.csv: line 4: 5 fields", "b.mat: 'data' frame 3: value nan",
                 "train.json: recording 'a.mat' is listed twice", "timestamps/b.csv: line 2"):
        assert any(says in p for p in problems), (says, problems)
    err = [ln for ln in cap.err.splitlines() if ln.strip()]
    assert err == [f"error: 4 problems found in {tiny_copy}"]


def test_recording_files(tmp_path, capsys):
    good = write_video(tmp_path / "good.mp4", frames(20), fps=10)
    cur = tmp_path / "cur.csv"
    cur.write_text("time,A,B,C\n2024-01-01 10:00:00,1,2,3\n2024-01-01 10:00:00.5,1e300,2,3\n")
    ts = tmp_path / "ts.csv"
    ts.write_text("t\n2024-01-01 10:00:00.2\n2024-01-01 10:00:00.1\n")
    full = write_video(tmp_path / "full.mkv", frames(100), fps=25)
    assert check(good, cur, ts, lying_avi(tmp_path / "lie.avi"), cut_file(full, tmp_path / "cut.mkv")) == 2
    out = capsys.readouterr().out
    assert "ok: good.mp4: 20 frames decoded" in out
    assert "cur.csv: line 3: current out of range" in out
    assert "ts.csv: line 3: frame timestamps go backwards" in out
    # (decord, or PyAV where decord is not installed)
    assert re.search(r"lie\.avi: (decord|PyAV) cannot open this video \(the container header declares 2000000000 frames", out)
    assert "cut.mkv: truncated video" in out


def test_unknown_things(tmp_path, capsys):
    (tmp_path / "x.bin").write_bytes(b"")
    assert check(tmp_path / "x.bin", tmp_path / "missing") == 2
    out = capsys.readouterr().out
    assert "not a dataset folder" in out and "no such file or folder" in out


YAML_BAD = {
    "not UTF-8": (b"model:\n  name: fmf\xe4rmer\n", "not UTF-8 text"),
    "not YAML": (b"model: [unclosed\n", "not valid YAML"),
    "a list": (b"- 1\n- 2\n", "expected a mapping"),
    "tabs": (b"model:\n\tname: x\n", "not valid YAML"),
}


@pytest.mark.parametrize("case", list(YAML_BAD))
def test_yaml_settings_bad_input(tmp_path, case, capsys):
    from fmfast.cli.train import main as train

    text, says = YAML_BAD[case]
    cfg = tmp_path / "cfg.yaml"
    cfg.write_bytes(text)
    try:
        code = run_main(train, ["--config", str(cfg), "--out", str(tmp_path / "run")])
    except SystemExit as e:
        code = e.code
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1 and "cfg.yaml" in err[0] and says in err[0], err
    assert not (tmp_path / "run").exists()


def test_yaml_with_bom_reads(tmp_path):
    from fmfast.engine.settings import load_yaml

    cfg = tmp_path / "cfg.yaml"
    cfg.write_bytes(b"\xef\xbb\xbftrain:\r\n  epochs: 3\r\n")
    assert load_yaml(cfg) == {"train": {"epochs": 3}}

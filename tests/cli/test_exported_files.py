"""``fmfast evaluate`` and ``fmfast detect`` take fmfast's exports as --checkpoint: an ONNX file,
an OpenVINO IR and an official state_dict with its sidecar give the checkpoint's metrics and
windows (a model at the default CPU profile: 32 px frames, 4-frame clips, 8 s of current, whose
official file alone does not say its geometry); bad exported files are one error line, exit 2."""
from __future__ import annotations

import csv
import json
import math
import shutil

import pytest

from helpers.models import tiny_checkpoint
from helpers.train_runs import cli_error
from fmfast.cli.common import run_main
from fmfast.engine.export import export

EXPORTS = {"onnx": "m.onnx", "openvino": "m.xml", "official": "m.pth"}
FAST = ["--precision", "fp32", "--compile", "off"]


@pytest.fixture(scope="module")
def exported(tiny_root, tmp_path_factory):
    d = tmp_path_factory.mktemp("exported")
    ckpt, _ = tiny_checkpoint(d, "fmformer", "classification", image_size=32, current_len=16, threshold=0.4,
                              data={"num_frames": 4, "stride": 1, "current_seconds": 8, "root": str(tiny_root)})
    for fmt, name in EXPORTS.items():
        export(ckpt, fmt, d / name)
    return d, ckpt


def evaluate(checkpoint, out, *extra):
    from fmfast.cli.evaluate import main

    assert run_main(main, ["--checkpoint", str(checkpoint), "--out", str(out), "--max-samples", "24",
                           "--batch-size", "8", *FAST, *extra]) == 0
    return json.loads(out.read_text())


def assert_same(got, want, where=""):
    """Equal metrics: numbers within 1e-5, everything else exactly, what says where and how fast it ran aside."""
    if isinstance(want, dict):
        assert set(got) == set(want), where
        for k in want:
            if k not in ("checkpoint", "path", "samples_per_s"):
                assert_same(got[k], want[k], f"{where}/{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(got, str):
        assert math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-5) or (math.isnan(got) and math.isnan(want)), where
    else:
        assert got == want, where


@pytest.mark.parametrize("fmt", list(EXPORTS))
def test_evaluate_an_export_like_the_checkpoint(exported, tmp_path, fmt, capsys):
    d, ckpt = exported
    want = evaluate(ckpt, tmp_path / "want.json")
    got = evaluate(d / EXPORTS[fmt], tmp_path / "got.json")  # no --data: the export knows its data root
    assert got["at_threshold"]["threshold"] == 0.4 and got["at_threshold"]["source"] == "calibrated on validation"
    assert_same(got, want)
    if fmt != "official":
        assert {"onnx": "onnxruntime", "openvino": "openvino"}[fmt] in got["path"]


def windows(out):
    with open(out / "windows.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("fmt", list(EXPORTS))
def test_detect_with_an_export_like_the_checkpoint(exported, tiny_root, tmp_path, fmt):
    from fmfast.cli.detect import main

    d, ckpt = exported
    for checkpoint, out in ((ckpt, tmp_path / "want"), (d / EXPORTS[fmt], tmp_path / "got")):
        assert run_main(main, ["--checkpoint", str(checkpoint), "--recording", str(tiny_root), "furnace_000",
                               "--out", str(out), "--hop", "25", *FAST]) == 0
    want, got = windows(tmp_path / "want"), windows(tmp_path / "got")
    assert len(got) == len(want) > 5 and [r["frame"] for r in got] == [r["frame"] for r in want]
    for g, w in zip(got, want):
        assert math.isclose(float(g["probability"]), float(w["probability"]), abs_tol=1e-5)
    assert (tmp_path / "got" / "alarms.csv").read_text() == (tmp_path / "want" / "alarms.csv").read_text()


def test_bad_exported_files_are_one_line_exit_2(exported, tmp_path, capsys):
    from fmfast.cli.detect import main as detect
    from fmfast.cli.evaluate import main as evaluate_main

    d, _ = exported
    (tmp_path / "cut.onnx").write_bytes((d / "m.onnx").read_bytes()[:3000])
    shutil.copy(d / "m.onnx", tmp_path / "renamed.pt")  # the wrong extension: read as a PyTorch file
    shutil.copy(d / "m.xml", tmp_path / "half.xml")  # its .bin left behind
    shutil.copy(d / "m.pth", tmp_path / "alone.pth")  # its sidecar left behind
    for name, says in (("cut.onnx", "not a readable ONNX"), ("renamed.pt", "not a readable PyTorch"),
                       ("half.xml", "half.bin"), ("alone.pth", "alone.pth.json")):
        path = str(tmp_path / name)
        cli_error(evaluate_main, ["--checkpoint", path, *FAST], capsys, name, says)
        cli_error(detect, ["--checkpoint", path, "--recording", str(tmp_path), "x", "--out", str(tmp_path / "o")],
                  capsys, name, says)

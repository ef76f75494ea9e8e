"""The evaluation protocol end to end: selection on validation with test untouched until the
end, early stopping, checked settings with nothing written, TensorBoard files, fmfast.fit,
evaluate's calibrated threshold and saved predictions."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from helpers.train_runs import TINY_DATA, TINY_MODEL, cli_error, in_process, train_args


def test_selection_on_validation_test_once_at_the_end_and_early_stopping(tiny_root, tmp_path, monkeypatch):
    from fmfast.engine import trainer as trainer_mod

    real, seen = trainer_mod.evaluate, []
    scripted = iter([0.5, 0.7, 0.6, 0.4, 0.9, 0.9])  # val F1 per epoch: best at 2, patience 2 stops after 4

    def spy(model, name, ds, *a, **kw):
        metrics, ex = real(model, name, ds, *a, **kw)
        seen.append((ds.split, ds.train, len(ds), kw.get("threshold")))
        if ds.split == "train":  # the validation view of the train split
            metrics["f1"] = next(scripted)
        return metrics, ex

    monkeypatch.setattr(trainer_mod, "evaluate", spy)
    out = tmp_path / "run"
    in_process(tiny_root, out, "--epochs", "6", "--patience", "2", "--model", "current")
    assert [s[0] for s in seen] == ["train"] * 4 + ["test"]  # validation each epoch, test once, last
    assert not any(s[1] for s in seen)  # nothing evaluated flips
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("epoch") for r in rows[:-1]] == [1, 2, 3, 4] and "test" not in json.dumps(rows[:-1])
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["selected_by"] == {"metric": "val/f1", "value": 0.7, "epoch": 2}
    assert best["epoch"] == 2 and torch.load(out / "last.pt", weights_only=True)["epoch"] == 4
    assert rows[-1]["selected_by"]["epoch"] == 2 and seen[-1][3] == best["threshold"]
    assert best["threshold"] == rows[1]["val"]["calibration"]["threshold"]


def test_without_validation_best_is_the_last_epoch(tiny_root, tmp_path):
    out = tmp_path / "run"
    in_process(tiny_root, out, "--epochs", "2", "--model", "current", "--val-fraction", "0")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["val"] == {} and rows[-1]["final"]
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["selected_by"]["epoch"] == 2 and best["threshold"] is None


@pytest.mark.parametrize("bad, says", [
    (["model.dim=abc"], "model.dim"), (["model.heads=0"], "model.heads"), (["train.seed=nan"], "train.seed"),
    (["--lr", "inf"], "optim.lr"), (["--lr", "1e300"], "float32"), (["model.depth=-1"], "model.depth"), (["train.eval_batch_size=0"], "train.eval_batch_size"),
    (["--val-fraction", "1.5"], "data.val_fraction"), (["--monitor", "val/miou"], "train.monitor"),
    (["--val-split", "/nonexistent/val.json"], "val.json"),
    (["--val-fraction", "0.9"], "validation split leaves"),  # the guard gap leaves no training sample
    (["model.patch_size=5"], "model settings"),  # checked against the data's frame size
])
def test_bad_setting_is_one_line_and_writes_nothing(tiny_root, tmp_path, capsys, bad, says):
    from fmfast.cli.train import main

    out = tmp_path / "run"
    cli_error(main, train_args(tiny_root, out, *bad), capsys, says)
    assert not out.exists()


def test_a_failed_start_does_not_block_the_corrected_retry(tiny_root, tmp_path, capsys):
    from fmfast.cli.train import main

    out = tmp_path / "run"
    cli_error(main, train_args(tiny_root, out, "--epochs", "1", "--resume", str(tmp_path / "missing.pt")), capsys, "missing.pt")
    assert not out.exists()
    in_process(tiny_root, out, "--epochs", "1", "--model", "current")
    assert (out / "best.pt").is_file()


def test_print_config_prints_the_resolved_settings_and_exits(tiny_root, tmp_path, capsys):
    import yaml

    from fmfast.cli.train import main

    out = tmp_path / "run"
    assert main(train_args(tiny_root, out, "--print-config", "--patience", "3")) == 0
    s = yaml.safe_load(capsys.readouterr().out)
    assert s["train"]["patience"] == 3 and s["model"]["depth"] == 1 and s["data"]["val_fraction"] == 0.1
    assert not out.exists()


def test_tensorboard_files_when_installed_and_none_without(tiny_root, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    with_tb, without = tmp_path / "tb", tmp_path / "no-tb"
    in_process(tiny_root, with_tb, "--epochs", "1", "--model", "current")
    events = list((with_tb / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(with_tb / "tensorboard"))
    acc.Reload()
    assert {"val/f1", "test/f1", "train_loss"} <= set(acc.Tags()["scalars"]) and "curves" in acc.Tags()["images"]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    in_process(tiny_root, without, "--epochs", "1", "--model", "current")
    assert not (without / "tensorboard").exists() and (without / "metrics.csv").is_file()


def test_fit_end_to_end(tiny_root, tmp_path):
    import fmfast

    torch.set_num_threads(1)
    r = fmfast.fit(data=str(tiny_root), out=str(tmp_path / "api"), epochs=1, model="current", batch_size=8,
                   max_train_samples=32, max_eval_samples=24, num_frames=4, current_seconds=8,
                   overrides=TINY_MODEL, quiet=True)
    assert 0 <= r["test"]["f1"] <= 1 and "f1" in r["val"] and r["selected_by"]["epoch"] == 1
    assert r["best"].is_file() and r["metrics"].is_file() and r["run"] == tmp_path / "api"
    assert TINY_DATA == ["--num-frames", "4", "--current-seconds", "8"]  # the flags the keywords mirror
    from fmfast.errors import SettingsError

    with pytest.raises(SettingsError, match="model.heads"):
        fmfast.fit(data=str(tiny_root), out=str(tmp_path / "bad"), overrides=["model.heads=0"], quiet=True)
    with pytest.raises(SettingsError, match="bogus"):
        fmfast.fit(bogus=1)
    assert not (tmp_path / "bad").exists()


def test_evaluate_uses_the_calibrated_threshold_and_saves_predictions(tiny_root, tmp_path):
    from fmfast.cli.evaluate import main
    from fmfast.data import FMFDataset

    run = tmp_path / "run"
    in_process(tiny_root, run, "--epochs", "1", "--model", "current")
    best = torch.load(run / "best.pt", weights_only=True)
    pred, out = tmp_path / "pred.npz", tmp_path / "m.json"
    assert main(["--checkpoint", str(run / "best.pt"), "--save-predictions", str(pred), "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["at_threshold"]["threshold"] == best["threshold"] and m["at_threshold"]["source"] == "calibrated on validation"
    d = np.load(pred)
    ds = FMFDataset(tiny_root, split="test", num_frames=4, current_seconds=8)
    assert len(d["score"]) == len(ds) == m["samples"]
    assert (d["label"] == ds.labels.numpy()).all() and (d["recording"][0], d["frame"][0]) == ds.sample_key(0)
    f1 = 2 * ((d["score"] >= d["threshold"]) & (d["label"] == 1)).sum() / ((d["score"] >= d["threshold"]).sum() + d["label"].sum())
    assert f1 == pytest.approx(m["at_threshold"]["f1"])

"""``python -m fmfast.train`` / ``fmfast.evaluate`` end to end on a tiny generated dataset."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from helpers.train_runs import TINY_MODEL, assert_one_line_error, cli_error, in_process, run_cli, train_args, weights

def test_cli_trains_then_evaluates(tiny_root, tmp_path):
    out = tmp_path / "run"
    run_cli("fmfast.train", *train_args(tiny_root, out, "--epochs", "2"))
    for f in ("config.yaml", "last.pt", "best.pt", "metrics.jsonl", "curves.png", "confusion.png"):
        assert (out / f).is_file(), f
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows[:-1]] == [1, 2] and all("test" not in r for r in rows[:-1])
    assert {"accuracy", "f1", "fdr", "mdr", "auroc", "ap", "calibration"} <= set(rows[0]["val"])
    assert rows[-1]["final"] and {"accuracy", "f1", "fdr", "mdr", "auroc", "ap", "at_threshold"} <= set(rows[-1]["test"])
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["selected_by"]["metric"] == "val/f1" and best["selected_by"]["epoch"] in (1, 2)
    assert rows[-1]["test"]["at_threshold"]["threshold"] == best["threshold"]
    assert (out / "metrics.csv").read_text().splitlines()[0].startswith("epoch,")
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["model"]["depth"] == 1 and cfg["data"]["num_frames"] == 4
    p = run_cli("fmfast.evaluate", "--checkpoint", str(out / "best.pt"), "--data", str(tiny_root), "--out", str(tmp_path / "m.json"),
                "--compile", "off")
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["model"] == "fmformer" and m["samples"] > 0 and 0 <= m["f1"] <= 1 and m["samples_per_s"] > 0
    assert "accuracy" in p.stdout


def test_segmentation_video_model_writes_mask_overlays(tiny_root, tmp_path):
    out = tmp_path / "seg"
    in_process(tiny_root, out, "--task", "segmentation", "--model", "video", "--epochs", "1")
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"pixel_accuracy", "miou", "frame_accuracy", "class_pixel_accuracy", "pixel_auroc", "aupro", "image_auroc",
            "pixel_f1", "at_threshold"} <= set(row["test"])
    assert (out / "masks.png").stat().st_size > 1000


def test_same_seed_same_weights_and_metrics(tiny_root, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    in_process(tiny_root, a, "--epochs", "2", "--model", "current")
    in_process(tiny_root, b, "--epochs", "2", "--model", "current")
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    strip = lambda r: {k: v for k, v in r.get("val", r.get("test")).items() if k != "samples_per_s"}  # noqa: E731
    ra = [strip(json.loads(x)) for x in (a / "metrics.jsonl").read_text().splitlines()]
    rb = [strip(json.loads(x)) for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert ra == rb


def test_killed_run_resumes_to_the_same_weights(tiny_root, tmp_path):
    """kill -9 while training, then --resume auto: the final weights equal an uninterrupted run's."""
    args = ["--epochs", "3", "--checkpoint-every", "1", "--model", "current"]
    ref = tmp_path / "ref"
    in_process(tiny_root, ref, *args)

    run = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fmfast.train", *train_args(tiny_root, run, *args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while not (run / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    killed_mid_run = proc.poll() is None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert killed_mid_run, "the run finished before it could be killed; make it longer"
    state = torch.load(run / "last.pt", weights_only=True)
    assert (state["epoch"], state["step"]) < (3, 0)  # it really was interrupted

    in_process(tiny_root, run, *args, "--resume")
    w_ref, w_run = weights(ref), weights(run)
    assert all(torch.equal(w_ref[k], w_run[k]) for k in w_ref)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3 + 1  # the epochs, then the test row


def test_losses_read_in_groups_are_complete_at_every_checkpoint(tiny_root, tmp_path, monkeypatch):
    """On a GPU the loop reads losses every 25 steps (reading one syncs the host with the GPU);
    grouped reads must log the same losses, and every checkpoint must hold all of them so far."""
    from fmfast.engine.trainer import Trainer

    saves, lag = {}, {}
    init, save, step = Trainer.__init__, Trainer._save, Trainer._train_step

    def stepped(self, idx):
        lag.setdefault(self.loss_read_every, set()).add(self.global_step - len(self.losses))  # steps not yet read
        loss = step(self, idx)
        assert isinstance(loss, torch.Tensor) and loss.dim() == 0
        return loss

    def record(self, name):
        saves.setdefault(self.loss_read_every, []).append((self.global_step, list(self.losses)))
        save(self, name)

    def grouped(self, *a, **kw):
        init(self, *a, **kw)
        self.loss_read_every = 3 if "grouped" in str(self.out) else 1

    monkeypatch.setattr(Trainer, "__init__", grouped)
    monkeypatch.setattr(Trainer, "_save", record)
    monkeypatch.setattr(Trainer, "_train_step", stepped)
    args = ["--epochs", "2", "--checkpoint-every", "4", "--model", "current", "--max-train-samples", "56"]
    in_process(tiny_root, tmp_path / "each", *args)
    in_process(tiny_root, tmp_path / "grouped", *args)
    assert lag == {1: {0}, 3: {0, 1, 2}}
    each, grouped_ = saves[1], saves[3]
    assert len(each) >= 4 and [s for s, _ in each] == [s for s, _ in grouped_]
    for (step, a), (_, b) in zip(each, grouped_):
        assert len(a) == step and a == b


def test_config_file_and_dotted_overrides(tiny_root, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"train": {"epochs": 1, "batch_size": 4}, "optim": {"name": "sgd", "lr": 0.01}}))
    out = tmp_path / "run"
    in_process(tiny_root, out, "--config", str(cfg), "optim.momentum=0.5", "schedule.name=step")
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["optim"] == {"name": "sgd", "lr": 0.01, "weight_decay": 0.0, "momentum": 0.5, "nesterov": True}
    assert resolved["schedule"]["name"] == "step"
    assert resolved["train"]["batch_size"] == 8  # the flag beats the file


def test_reference_yaml_config(tiny_root, tmp_path):
    ref = tmp_path / "CfgForCurrent.yaml"
    ref.write_text(f"""TRAIN:\n  BATCH_SIZE: 64\nDATA:\n  PATH_TO_DATA_DIR: '{tiny_root}'\n  NUM_FRAMES: 4\n  CURRENT_SECONDS: 8
SOLVER:\n  BASE_LR: 0.001\n  LR_POLICY: cosine\n  MAX_EPOCH: 1\nMODEL:\n  MODEL_NAME: vit_for_current\n  NUM_CLASSES: 2\nTASK: classification\n""")
    out = tmp_path / "run"
    from fmfast.cli.train import main

    assert main(["--config", str(ref), "--out", str(out), "--max-train-samples", "16", "--max-eval-samples", "8", *TINY_MODEL]) == 0
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["model"]["name"] == "current" and resolved["optim"]["lr"] == pytest.approx(1e-3)
    assert resolved["train"]["batch_size"] == 64 and resolved["data"]["root"] == str(tiny_root.resolve())


@pytest.mark.slow
def test_torchrun_ddp_two_gloo_processes(tiny_root, tmp_path, free_port):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port),
                        "-m", "fmfast.train", *train_args(tiny_root, out, "--epochs", "1", "--model", "current")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    state = torch.load(out / "last.pt", weights_only=True)
    # 32 samples over 2 ranks at batch 8: 2 steps per rank
    assert state["global_step"] == 2 and state["epoch"] == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1 + 1  # the epoch, then the test row


# ---------------------------------------------------------------- bad input: one line, exit 2

@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    # a bad-input test must never generate the real default dataset into the user's cache
    monkeypatch.setenv("FMFAST_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("args, needle", [
    (["--bogus"], "--bogus"),
    (["--task", "detection"], "--task"),
    (["--epochs", "zero"], "--epochs"),
    (["train.epochs=0"], "train.epochs"),
    (["model.nope=1"], "model.nope"),
    (["--data", "/nonexistent/fmf"], "/nonexistent/fmf"),
    (["--amp", "fp16", "--device", "cpu"], "fp16"),
])
def test_train_bad_input(args, needle, capsys):
    from fmfast.cli.train import main

    cli_error(main, args, capsys, needle)


def test_model_that_cannot_fit_fails_before_generating_data(tmp_path, monkeypatch, capsys):
    from fmfast.cli.train import main

    monkeypatch.setenv("FMFAST_CACHE", str(tmp_path / "cache"))
    cli_error(main, ["--num-frames", "3"], capsys, "frame_patch_size")
    assert not (tmp_path / "cache").exists()


def test_bad_input_exit_code_from_the_shell():
    assert_one_line_error(run_cli("fmfast.train", "--bogus", check=False), "--bogus")


@pytest.fixture(scope="module")
def trained(tiny_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    in_process(tiny_root, out, "--epochs", "1")
    return out


def test_run_folder_with_a_different_run_is_refused_untouched(tiny_root, trained, capsys):
    from fmfast.cli.train import main

    files = lambda: {str(p.relative_to(trained)): p.read_bytes() for p in trained.rglob("*") if p.is_file()}  # noqa: E731
    before = files()
    cli_error(main, train_args(tiny_root, trained, "--epochs", "1", "--lr", "0.1"), capsys, str(trained), "optim.lr")
    cli_error(main, train_args(tiny_root, trained, "--epochs", "1"), capsys, "--resume")
    assert files() == before


def test_evaluate_bad_input(tiny_root, trained, tmp_path, capsys):
    from fmfast.cli.evaluate import main

    best = str(trained / "best.pt")
    cli_error(main, ["--checkpoint", best, "--data", str(tiny_root), "--task", "segmentation"], capsys, "best.pt", "classification")
    cli_error(main, ["--checkpoint", best, "--data", str(tiny_root), "--model", "video"], capsys, "fmformer")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes((trained / "best.pt").read_bytes()[:5000])
    cli_error(main, ["--checkpoint", str(corrupt), "--data", str(tiny_root)], capsys, "corrupt.pt")
    cli_error(main, ["--checkpoint", str(tmp_path / "missing.pt")], capsys, "missing.pt")
    cli_error(main, ["--checkpoint", best, "--data", str(tmp_path / "nodata")], capsys, "nodata")


def test_resume_from_a_corrupt_checkpoint(tiny_root, tmp_path, capsys):
    from fmfast.cli.train import main

    corrupt = tmp_path / "last.pt"
    corrupt.write_bytes(b"\x00not a checkpoint")
    cli_error(main, train_args(tiny_root, tmp_path / "new", "--resume", str(corrupt)), capsys, "last.pt")

"""Training runs whatever the numbers or the disk do: a non-finite loss or weight stops the run
with the step and keeps the last good checkpoint; full and read-only run folders, a second run
into a locked folder and temporaries a kill left behind are handled before any training; a
resumed epoch's loss covers the whole epoch."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fmfast.data.synthetic import generate
from helpers.outputs import KEPT, KINDS, make_not_a_folder

MODEL = ["--model", "current", "model.depth=1", "model.dim=32", "model.heads=2", "model.dim_head=16", "model.mlp_dim=32"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("syn") / "data", recordings=2, frames=240, seed=3, size=32)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FMFAST_CACHE", str(tmp_path / "cache"))


def args(root, out, *extra):
    # data.val_fraction=0: these recordings are too short for a guarded validation block
    return ["--data", str(root), "--out", str(out), "--batch-size", "8", "--max-train-samples", "32",
            "--max-eval-samples", "16", "--num-frames", "4", "--current-seconds", "8", "data.val_fraction=0",
            *MODEL, *extra]


def run(argv, capsys):
    """fmfast train in-process as the command runs it -> (exit code, stderr lines)."""
    from fmfast.cli.common import run_main
    from fmfast.cli.train import main

    torch.set_num_threads(1)
    try:
        code = run_main(main, argv)
    except SystemExit as e:
        code = e.code
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error")]
    return code, err


@pytest.mark.parametrize("lr", ["inf", "nan", "1e30", "1e10"])
def test_non_finite_training_stops_naming_the_step_and_keeps_good_checkpoints(data, tmp_path, capsys, lr):
    out = tmp_path / "run"
    code, err = run(args(data, out, "--epochs", "2", "--checkpoint-every", "1", "--lr", lr), capsys)
    assert code == 2 and len(err) == 1, err
    if "optim.lr" in err[0]:  # refused as a setting before training (inf, nan): fine too
        assert not (out / "best.pt").exists()
        return
    assert "training diverged" in err[0] and ("at step" in err[0] or "after step" in err[0]), err
    for name in ("last.pt", "best.pt"):
        if (out / name).exists():  # whatever was written holds finite weights only
            w = torch.load(out / name, weights_only=True)["model"]
            assert all(torch.isfinite(v).all() for v in w.values() if v.is_floating_point()), name
    assert not list(out.glob(".*.tmp"))


def test_a_nan_loss_mid_run_names_its_step(data, tmp_path, capsys, monkeypatch):
    from fmfast.engine import trainer as tr

    real = tr.Trainer._train_step
    calls = {"n": 0}

    def poisoned(self, idx):
        calls["n"] += 1
        loss = real(self, idx)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(tr.Trainer, "_train_step", poisoned)
    out = tmp_path / "run"
    code, err = run(args(data, out, "--epochs", "1", "--checkpoint-every", "1"), capsys)
    assert code == 2 and "the loss is nan at step 3" in err[0] and "last.pt keeps the last good state (step 2)" in err[0], err
    assert torch.load(out / "last.pt", weights_only=True)["global_step"] == 2 and not (out / "best.pt").exists()


def test_a_second_run_into_a_locked_folder_is_refused(data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(f"{holder.pid}\n")
        code, err = run(args(data, out, "--epochs", "1"), capsys)
        assert code == 2 and f"process {holder.pid}" in err[0] and "another training run" in err[0], err
        assert not (out / "config.yaml").exists()  # refused before writing anything
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale and taken over; the run releases it at the end
    code, err = run(args(data, out, "--epochs", "1"), capsys)
    assert code == 0 and (out / "last.pt").is_file() and not (out / ".lock").exists()


def test_concurrent_runs_into_one_folder_one_is_refused(data, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FMFAST_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "fmfast.train", *args(data, out, "--epochs", "500")]
    a = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.time() + 120
        while not (out / "config.yaml").exists() and a.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert a.poll() is None, "the first run ended before the second started"
        b = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert a.poll() is None, "the first run ended while the second ran; the test proves nothing"
    finally:
        a.kill()
        a.wait()
    assert b.returncode == 2 and "another training run" in b.stderr and f"process {a.pid}" in b.stderr, b.stderr[-800:]
    assert "Traceback" not in b.stderr


def test_stale_temporaries_of_killed_runs_are_swept(data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = out / f".last.pt.{dead.pid}.abcd.tmp"
    stale.write_bytes(b"half a checkpoint")
    mine = out / f".other.{os.getpid()}.abcd.tmp"  # a live process's temporary is left alone
    mine.write_bytes(b"x")
    code, _ = run(args(data, out, "--epochs", "1"), capsys)
    assert code == 0 and not stale.exists() and mine.exists()


def test_resumed_epoch_loss_covers_the_whole_epoch(data, tmp_path, capsys, monkeypatch):
    from fmfast.engine import trainer as tr

    ref = tmp_path / "ref"
    assert run(args(data, ref, "--epochs", "1", "--checkpoint-every", "1"), capsys)[0] == 0
    ref_loss = json.loads((ref / "metrics.jsonl").read_text().splitlines()[0])["train_loss"]  # the epoch row

    out = tmp_path / "cut"
    real = tr.Trainer._train_step
    calls = {"n": 0}

    def stop_after_two(self, idx):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as a kill after step 2's checkpoint
        return real(self, idx)

    monkeypatch.setattr(tr.Trainer, "_train_step", stop_after_two)
    assert run(args(data, out, "--epochs", "1", "--checkpoint-every", "1"), capsys)[0] == 130
    monkeypatch.setattr(tr.Trainer, "_train_step", real)
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 2
    assert run(args(data, out, "--epochs", "1", "--checkpoint-every", "1", "--resume"), capsys)[0] == 0
    loss = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["train_loss"]
    assert math.isclose(loss, ref_loss, rel_tol=1e-6), (loss, ref_loss)


def _mount_tmpfs(path: Path, size: str, ro: bool = False) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if ro else "")
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (we may run as root), else skipped with the reason."""
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, "256k"):
        pytest.skip("cannot mount a tmpfs here (not root?); the simulated ENOSPC test covers the message")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def ro_disk(tmp_path):
    mnt = tmp_path / "ro"
    if not _mount_tmpfs(mnt, "1m", ro=True):
        pytest.skip("cannot mount a read-only tmpfs here (not root?)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_checkpoint_is_one_line_naming_the_file(data, small_disk, capsys):
    out = small_disk / "run"
    code, err = run(args(data, out, "--epochs", "1"), capsys)
    assert code == 2 and len(err) == 1 and str(out) in err[0] and "no space left" in err[0], err
    assert not list(out.glob(".*.tmp")), list(out.iterdir())  # no half-written temporary left


def test_read_only_run_folder_is_refused_before_training(data, ro_disk, capsys):
    t0 = time.perf_counter()
    code, err = run(args(data, ro_disk / "run", "--epochs", "1"), capsys)
    assert code == 2 and "read-only file system" in err[0] and str(ro_disk) in err[0], err
    assert time.perf_counter() - t0 < 30


def test_simulated_enospc_in_torch_save(tmp_path, monkeypatch):
    """Where no tmpfs can be mounted: torch.save's zip-writer error on a (nearly) full disk."""
    from fmfast.engine import checkpoints
    from fmfast.errors import OutputError

    def full(obj, f):
        Path(f).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0: file write failed")

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(checkpoints, "_nearly_full", lambda p: True)
    with pytest.raises(OutputError, match=r"last\.pt: cannot write \(no space left on the device\)"):
        checkpoints.save(tmp_path / "last.pt", {})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", KINDS)
def test_out_that_is_not_a_folder_is_refused_untouched(data, tmp_path, capsys, kind):
    out = tmp_path / "out"
    target = make_not_a_folder(out, kind)
    code, err = run(args(data, out, "--epochs", "1"), capsys)
    assert code == 2 and str(out) in err[0], err
    if kind == "file":
        assert out.read_text() == KEPT
    if kind == "symlink":
        assert list(target.iterdir()) == []

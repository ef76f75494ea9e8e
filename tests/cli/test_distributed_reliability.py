"""Two gloo ranks, one killed mid-run: the survivor ends within a bounded time with one error
line, instead of waiting in a collective forever (the process group's timeout is settable)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from fmfast.data.synthetic import generate


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("syn") / "data", recordings=2, frames=240, seed=3, size=32)


def test_a_killed_rank_ends_the_run_within_the_timeout(data, tmp_path, free_port):
    out = tmp_path / "ddp"
    port = free_port
    argv = [sys.executable, "-m", "fmfast.train", "--data", str(data), "--out", str(out), "--batch-size", "4",
            "--max-eval-samples", "8", "--num-frames", "4", "--current-seconds", "8", "--epochs", "1000",
            "--model", "current", "model.depth=1", "model.dim=32", "model.heads=2", "model.dim_head=16",
            "model.mlp_dim=32", "data.val_fraction=0"]  # (too short a recording for a guarded validation block)
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "FMFAST_DIST_TIMEOUT": "15",
               "FMFAST_CACHE": str(tmp_path / "cache")}
        procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env))
    try:
        deadline = time.time() + 180
        while not (out / "last.pt").exists() and time.time() < deadline and all(p.poll() is None for p in procs):
            time.sleep(0.1)  # both ranks are past set-up and have run an epoch together
        assert all(p.poll() is None for p in procs), [p.stderr.read()[-800:] for p in procs if p.poll() is not None]
        procs[1].send_signal(signal.SIGKILL)
        t0 = time.time()
        try:
            err = procs[0].communicate(timeout=90)[1]
        except subprocess.TimeoutExpired:
            pytest.fail("the surviving rank still runs 90 s after its peer was killed")
        took = time.time() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert procs[0].returncode == 2, err[-1500:]
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "lost a peer process" in lines[0] and "Traceback" not in err, err[-1500:]
    assert took < 60, took


def test_the_timeout_setting_is_checked(monkeypatch):
    from fmfast.engine.distributed import timeout_seconds
    from fmfast.errors import SettingsError

    monkeypatch.setenv("FMFAST_DIST_TIMEOUT", "soon")
    with pytest.raises(SettingsError, match="FMFAST_DIST_TIMEOUT"):
        timeout_seconds()
    monkeypatch.setenv("FMFAST_DIST_TIMEOUT", "7.5")
    assert timeout_seconds() == 7.5

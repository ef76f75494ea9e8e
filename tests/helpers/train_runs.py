"""Training runs for the CLI tests: the tiny model and data flags, the ``fmfast train`` argument
list, running a command as a subprocess or in-process, and reading a run's weights, and the check of a command's one-line exit-2 error."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TINY_MODEL = ["model.depth=1", "model.dim=32", "model.heads=2", "model.dim_head=16", "model.mlp_dim=64",
              "model.seg_hidden_dims=[16,8,8]"]
TINY_DATA = ["--num-frames", "4", "--current-seconds", "8"]


def train_args(root, out, *extra) -> list[str]:
    return ["--data", str(root), "--out", str(out), "--batch-size", "8", "--max-train-samples", "32",
            "--max-eval-samples", "24", *TINY_DATA, *TINY_MODEL, *extra]


def run_cli(module: str, *args, check: bool = True, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    p = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, timeout=600, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{module} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def in_process(root, out, *extra):
    from fmfast.cli.train import main

    torch.set_num_threads(1)
    assert main(train_args(root, out, *extra)) == 0


def weights(run: Path, name="last.pt") -> dict:
    return torch.load(run / name, weights_only=True)["model"]


def cli_error(main, args, capsys, *needles):
    """Run a CLI main in-process (as ``python -m`` would) and check its one-line exit-2 error."""
    from fmfast.cli.common import run_main

    with pytest.raises(SystemExit) as e:
        run_main(main, args)
    err = capsys.readouterr().err
    assert_one_line_error(subprocess.CompletedProcess(args, e.value.code, "", err), *needles)


def assert_one_line_error(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    lines = [line for line in p.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])

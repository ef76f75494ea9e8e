"""The README's main command, exactly as a user runs it: ``python -m fmfast.train`` with no
arguments on a fresh cache -- synthetic data generated, FmFormer trained and evaluated.

It takes about 1.5 minutes on two quiet cores with native bf16 (about 5 in fp32 on an AVX2-only
Zen 3); it guards the README's headline (test F1 0.968 at seed 0 on the
built-in benchmark, bf16 on a CPU with native bf16; the bar is 0.93) against changes to the data, the model or the training defaults. Its time
is not asserted (performance lives in bench/)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest


@pytest.mark.slow
def test_default_command_trains_fmformer_to_f1_0_93(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "TRITON_INTERPRET")}
    env.update(FMFAST_CACHE=str(tmp_path / "cache"), COLUMNS="120")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "fmfast.train", "--out", str(tmp_path / "run")], env=env,
                       capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t0
    assert p.returncode == 0, p.stdout + p.stderr
    assert "generating the synthetic furnace benchmark" in p.stderr + p.stdout
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    final = rows[-1]["test"]
    # timed, not asserted (a shared machine's load decides it): printed for the README's figure
    print(f"\nmain job: {wall:.0f} s wall from an empty cache, test F1 {final['f1']:.4f}, AUROC {final['auroc']:.4f}")
    # 0.968 at seed 0 on the 2-core Zen 5 (bf16; 0.959 on the Xeon); the bar leaves room for another CPU's rounding
    assert final["f1"] >= 0.93 and final["auroc"] >= 0.98, final
    for name in ("config.yaml", "last.pt", "best.pt", "curves.png", "confusion.png"):
        assert (tmp_path / "run" / name).is_file(), name

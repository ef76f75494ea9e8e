"""Training samples/s of one whole epoch through ``fmfast.engine.trainer.Trainer`` (data gather,
forward, backward, Adam, checkpoint, evaluation excluded) — the end-to-end case the GPU
benchmarks (bench/test_bench_train.py) later beat. On the CPU the shapes are small so the suite
stays quick; the printed line says which."""
from __future__ import annotations

import copy

import torch

from fmfast.data.synthetic import generate
from fmfast.engine.settings import DEFAULTS, merge, validate


def test_bench_cpu_training_epoch(benchmark, tmp_path):
    root = generate(tmp_path / "data", recordings=2, frames=160, seed=0, size=32)
    s = copy.deepcopy(DEFAULTS)
    # recordings this short have no room for a validation block behind its guard gap
    s = merge(s, {"data": {"root": str(root), "num_frames": 10, "current_seconds": 30, "val_fraction": 0.0},
                  "model": {"depth": 2},
                  "train": {"epochs": 1, "batch_size": 16, "max_train_samples": 64, "max_eval_samples": 16,
                            "device": "cpu", "out": str(tmp_path / "run")}})
    from fmfast.engine.trainer import Trainer

    trainer = Trainer(validate(s))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: intra-op threads measure the neighbours
    try:
        benchmark.pedantic(trainer.fit, rounds=1, iterations=1)
    finally:
        torch.set_num_threads(threads)
    row = trainer.history[-1]
    cfg = trainer.cfg
    rate = row["train_samples_per_s"]
    print(f"\nCPU training epoch: FmFormer dim {cfg.dim} depth {cfg.depth} heads {cfg.heads}, batch 16, "
          f"clip 3x{cfg.num_frames}x{cfg.frame_hw[0]}x{cfg.frame_hw[1]} uint8, current {cfg.current_len}x3, fp32, "
          f"1 thread: {rate:.1f} samples/s over 64 samples")
    assert rate > 0 and row["epoch"] == 1
    assert torch.isfinite(torch.tensor(row["train_loss"]))

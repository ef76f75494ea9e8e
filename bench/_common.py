"""Timing, GPU marks and reporting shared by the benchmarks.

GPU: CUDA events around repeated calls, median of repetitions (pytest-benchmark times the host,
which for asynchronous GPU work measures launches, not work). CPU: wall clock, single thread
(a shared 2-core machine: intra-op threads measure the neighbours), median. ``best_of``: wall
clock, the best of a few rounds that interleave the peers, so all see the same machine load.
"""
from __future__ import annotations

import os
import time

import pytest
import torch

GPU = torch.cuda.is_available()
GPU_REASON = "needs CUDA: compiled Triton kernels, CUDA graphs and GPU timing"
# the fast path on CPU tensors runs in the Triton interpreter; tools/gpu_check.sh turns it off
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(
    not INTERPRET, reason="the fast path on CPU tensors needs TRITON_INTERPRET=1 (off here: kernels compiled for the GPU)")


def needs_gpu(test=None, *, reason: str = GPU_REASON):
    """Mark a GPU case: the ``gpu`` marker (the root conftest.py skips such cases under the Triton
    interpreter) and a skip without CUDA saying what the case needs. ``@needs_gpu`` gives the
    general reason, ``@needs_gpu(reason="needs CUDA: ...")`` a more specific one."""
    def mark(t):
        return pytest.mark.gpu(pytest.mark.skipif(not GPU, reason=reason)(t))
    return mark if test is None else mark(test)


def time_ms(step, reps: int = 5, inner: int = 10, warmup: int = 3, cpu_reps: int = 3) -> float:
    """Median milliseconds per call of ``step``. GPU: ``warmup`` calls, then ``reps`` repetitions
    of ``inner`` calls between two CUDA events. CPU, one thread: one warm-up call, then ``cpu_reps``
    timed calls (an even count takes the upper median; ``cpu_reps=1``: one call, no warm-up, for
    steps already run once by a parity check)."""
    if GPU:
        for _ in range(warmup):
            step()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / inner)
        return sorted(times)[reps // 2]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if cpu_reps > 1:
            step()
        times = []
        for _ in range(cpu_reps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return sorted(times)[len(times) // 2] * 1e3


def best_of(*fns, rounds: int = 3, reps: tuple[int, ...] | None = None, warmup: int = 0, sync=None) -> list[float]:
    """Best (minimum) wall-clock seconds of one call of each of ``fns`` (threads as the caller set
    them). ``warmup`` untimed calls of each first; then ``rounds`` rounds, each calling every
    function in turn (``reps[i]`` timed calls of the i-th, default 1), so that all see the same
    machine load. ``sync`` (e.g. ``torch.cuda.synchronize``) runs after each call, inside its time."""
    sync = sync or (lambda: None)
    reps = reps or (1,) * len(fns)
    for fn in fns:
        for _ in range(warmup):
            fn()
    sync()
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for k, (fn, n) in enumerate(zip(fns, reps)):
            for _ in range(n):
                t = time.perf_counter()
                fn()
                sync()
                best[k] = min(best[k], time.perf_counter() - t)
    return best


def peak_mb(step):
    """(peak GPU memory in MB allocated while ``step`` runs once, above what was held before,
    ``step``'s result)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20, out


def check(target: str, value: float, goal: float, higher_is_better: bool = True) -> dict:
    """One performance target, evaluated (stored for tools/gpu_results.py)."""
    met = value >= goal if higher_is_better else value <= goal
    return {"target": target, "value": round(float(value), 4), "goal": ("<= " if not higher_is_better else ">= ") + str(goal),
            "met": bool(met)}


def report(benchmark, title: str, rows: list[tuple[str, float]], unit_batch: int | None = None,
           targets: dict | None = None, extra: dict | None = None, checks: list[dict] | None = None) -> dict:
    """Print ``rows`` (name, ms; the first is ours) with ratios peer/ours and store them in the
    benchmark's ``extra_info`` for ``tools/gpu_results.py``. Returns {name: ratio}."""
    ours = rows[0][1]
    print(f"\n{title}")
    ratios = {}
    for name, ms in rows:
        ratios[name] = ms / ours
        rate = f"  {unit_batch / ms * 1e3:12.0f} samples/s" if unit_batch else ""
        print(f"  {name:52s} {ms:10.3f} ms  x{ms / ours:6.2f}{rate}")
    for k, v in (extra or {}).items():
        print(f"  {k}: {v}")
    for k, v in (targets or {}).items():
        print(f"  target {k}: {v}")
    for c in checks or []:
        print(f"  check {c['target']}: {c['value']} (goal {c['goal']}) -> {'met' if c['met'] else 'NOT met'}")
    benchmark.extra_info.update(title=title, ms=dict(rows), ratios=ratios, targets=targets or {},
                                checks=checks or [], device=torch.cuda.get_device_name() if GPU else "cpu",
                                **(extra or {}))
    if unit_batch:
        benchmark.extra_info["samples_per_s"] = {n: unit_batch / ms * 1e3 for n, ms in rows}
    return ratios


def run_benchmark(benchmark, step, rounds: int | None = None) -> None:
    """Let pytest-benchmark time ``step`` too (synchronised on a GPU)."""
    def synced():
        step()
        if GPU:
            torch.cuda.synchronize()
    benchmark.pedantic(synced, rounds=rounds or (10 if GPU else 2), warmup_rounds=1)


def max_err(a, b) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))


def flash_tol(low_err: float, ref, floor: float = 1e-3) -> float:
    """Flash-attention-style tolerance: 2x the error of plain PyTorch at the same low precision,
    plus a floor relative to the reference's magnitude."""
    scale = max(1.0, max(t.abs().max().item() for t in ref))
    return 2 * low_err + floor * scale

"""Training step and device data gather: the fast path end to end vs the reference.

Training step, paper shape (FmFormer, clip 3x10x64x64, current 240x3), batch 256, same initial
weights and batches, Adam; every peer gathers its batch from the GPU-resident dataset, so the
ratios compare model + optimiser (the data path has its own cases below and in test_bench_data):
  ours  fast backend, bf16 autocast, the whole step -- gather by frame index, forward, backward,
        fused capturable Adam -- replayed as one CUDA graph (``fmfast.engine.step.TrainRunner``);
  (c)   ours without the graph (same kernels, eager launches);
  (a)   reference backend, eager fp32, ``ds.batch`` clips, Adam (the published model's math);
  (b)   reference backend under ``torch.compile``, bf16 autocast, fused Adam.
Parity first: a step's loss and every parameter gradient of the fast path vs (a), within 2x of
the reference's own bf16 error plus a floor; the captured step's loss equals the eager fast one.
Reported: samples/s and ratios (targets >= 4x (a), >= 2x (b)), peak GPU memory of a step from a
fresh model (target: ours <= (a)), and one epoch over 2.2 M samples extrapolated from the
steady-state step time plus the per-epoch host work (order, flips, upload); target < 60 s.

CPU: tiny shapes, reference backend (the Triton interpreter is no speed); the static-buffer twin
of the captured step against a plain eager loop, and the device-style gather against ``ds.batch``.
Run: ``python -m pytest -q bench/test_bench_train.py -s --benchmark-only``.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _common import (
    GPU,
    GPU_REASON,
    check,
    flash_tol,
    max_err,
    needs_gpu,
    peak_mb,
    report,
    run_benchmark,
    time_ms,
)

from fmfast import FmFormer, ModelConfig
from fmfast.data import FMFDataset
from fmfast.data.gather import StableFlips, gather_clip
from fmfast.data.synthetic import generate
from fmfast.engine.graphs import make_capturable
from fmfast.engine.step import TrainRunner
from fmfast.engine.trainer import epoch_order

EPOCH_SAMPLES = 2_200_000
B = 256


def model(cfg, backend, device, seed=0):
    torch.manual_seed(seed)
    m = FmFormer(cfg, backend=backend)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return m.to(device).train()


def eager_step(m, opt, ds, idx, amp_dtype):
    clips, currents, labels = ds.batch(idx)
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits = m(clips, currents)
    loss = F.cross_entropy(logits.float(), labels)
    loss.backward()
    opt.step()
    return loss.detach()


# ---- CPU ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = generate(tmp_path_factory.mktemp("bench_train"), recordings=2, frames=120, seed=0, size=16)
    return FMFDataset(root, "train", num_frames=4, current_seconds=8, seed=0)


SMALL = ModelConfig(image_size=16, num_frames=4, dim=32, depth=2, heads=2, dim_head=16, mlp_dim=64, current_len=16)


def test_bench_cpu_train_step(benchmark, small):
    """Static-buffer twin of the captured step (padding and mask included) vs a plain eager loop."""
    batch = 8
    batches = torch.randperm(len(small), generator=torch.Generator().manual_seed(0))[:3 * batch - 3].split(batch)
    ref, ours = model(SMALL, "reference", "cpu"), model(SMALL, "reference", "cpu")
    opt_ref, opt = torch.optim.Adam(ref.parameters(), lr=1e-3), torch.optim.Adam(ours.parameters(), lr=1e-3)
    run = TrainRunner(ours, "fmformer", small, opt, batch, torch.device("cpu"), graph=False, static=True)
    want = [eager_step(ref, opt_ref, small, i, None).item() for i in batches]
    got = [run(i).item() for i in batches]  # the last batch is short: padded, 0-weight rows
    assert got == pytest.approx(want, rel=1e-5)
    idx = batches[0]
    rows = [("ours: static buffers + mask, eager twin of the graph", time_ms(lambda: run(idx))),
            ("(a) plain eager step", time_ms(lambda: eager_step(ref, opt_ref, small, idx, None)))]
    report(benchmark, f"CPU training step: FmFormer dim {SMALL.dim} depth {SMALL.depth}, B={batch}, clip 3x4x16x16, "
                      f"fp32, reference backend (the Triton path needs a GPU)", rows, unit_batch=batch)
    run_benchmark(benchmark, lambda: run(idx))


def test_bench_cpu_gather(benchmark, small):
    idx = torch.randperm(len(small), generator=torch.Generator().manual_seed(1))[:64]
    clips, currents, labels = small.batch(idx)
    fi, cur, lab = small.inputs(idx)
    assert torch.equal(gather_clip(small.frames, fi), clips)
    assert torch.equal(cur, currents) and torch.equal(lab, labels)
    rows = [("ours: ds.inputs (frame table, no clip)", time_ms(lambda: small.inputs(idx))),
            ("ds.batch (clips materialised)", time_ms(lambda: small.batch(idx)))]
    report(benchmark, "CPU data gather: B=64, clip 3x4x16x16 uint8, current 16x3", rows, unit_batch=64)
    run_benchmark(benchmark, lambda: small.inputs(idx))


# ---- GPU ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def paper_data(tmp_path_factory):
    if not GPU:
        pytest.skip(GPU_REASON)
    root = generate(tmp_path_factory.mktemp("bench_train_gpu"), recordings=1, frames=900, seed=0)
    host = FMFDataset(root, "train", seed=0)
    dev = FMFDataset(root, "train", seed=0).to("cuda")
    StableFlips(dev)
    assert len(dev) >= 2 * B, f"synthetic train split too small: {len(dev)}"
    return host, dev


def _batches(ds, n, device):
    order = epoch_order(len(ds), 0, 0)[: n * B]
    return [b.to(device) for b in order.split(B)]


@needs_gpu
def test_bench_gpu_train_step(benchmark, paper_data):
    _, ds = paper_data
    cfg, dev = ModelConfig(), torch.device("cuda")
    batches = _batches(ds, 2, dev)
    idx = batches[0]

    # -- parity: one step's loss and gradients from the same weights on the same batch
    def grads(m, amp_dtype):
        m.zero_grad(set_to_none=True)
        clips, currents, labels = ds.batch(idx)
        with torch.autocast("cuda", dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = F.cross_entropy(m(clips, currents).float(), labels)
        loss.backward()
        return [loss.detach()] + [p.grad.detach().clone() for p in m.parameters()]

    want = grads(model(cfg, "reference", dev), None)
    low = grads(model(cfg, "reference", dev), torch.bfloat16)
    got = grads(model(cfg, "fast", dev), torch.bfloat16)
    for k, (g, w, lo) in enumerate(zip(got, want, low)):
        tol = flash_tol(max_err([lo], [w]), [w])
        assert max_err([g], [w]) <= tol, f"train-step parity: tensor {k} err {max_err([g], [w]):.2e} > tol {tol:.2e}"
    del want, low, got

    # -- the peers, each from a fresh model (same weights); peak memory of its first step
    torch.cuda.empty_cache()
    eager_m = model(cfg, "fast", dev)
    eager = TrainRunner(eager_m, "fmformer", ds, torch.optim.Adam(eager_m.parameters(), lr=1e-4, fused=True), B, dev,
                        torch.bfloat16, graph=False)
    first = eager(idx).item()
    ours_m = model(cfg, "fast", dev)
    opt = make_capturable(torch.optim.Adam(ours_m.parameters(), lr=1e-4, fused=True), dev)
    ours = TrainRunner(ours_m, "fmformer", ds, opt, B, dev, torch.bfloat16, graph=True, strict=True)
    mem_ours, loss = peak_mb(lambda: ours(idx))  # includes the capture: warm-up steps and the graph's pool
    assert abs(loss.item() - first) <= 1e-3 * abs(first) + 1e-4, f"captured step loss {loss.item()} != eager {first}"
    ref_m = model(cfg, "reference", dev)
    ref_opt = torch.optim.Adam(ref_m.parameters(), lr=1e-4)
    mem_ref, _ = peak_mb(lambda: eager_step(ref_m, ref_opt, ds, idx, None))
    comp_m = model(cfg, "reference", dev)
    comp = torch.compile(comp_m)
    comp_opt = torch.optim.Adam(comp_m.parameters(), lr=1e-4, fused=True)
    mem_comp, _ = peak_mb(lambda: eager_step(comp, comp_opt, ds, idx, torch.bfloat16))

    cycle = {"i": 0}

    def loop(fn):
        def step():
            cycle["i"] += 1
            fn(batches[cycle["i"] % len(batches)])
        return step

    rows = [("ours: fast, bf16, captured step incl. device gather", time_ms(loop(ours), reps=5, inner=10)),
            ("(c) ours without the graph (eager launches)", time_ms(loop(eager), reps=3, inner=5)),
            ("(a) reference, eager fp32, Adam", time_ms(loop(lambda i: eager_step(ref_m, ref_opt, ds, i, None)),
                                                      reps=3, inner=3)),
            ("(b) reference, torch.compile bf16, fused Adam",
             time_ms(loop(lambda i: eager_step(comp, comp_opt, ds, i, torch.bfloat16)), reps=3, inner=5))]
    # per-epoch host work at 2.2 M samples: order, flips, upload
    t0 = time.perf_counter()
    order = epoch_order(EPOCH_SAMPLES, 0, 1).to(dev)
    flips = torch.from_numpy(np.random.default_rng([0, 1]).random(EPOCH_SAMPLES) < 0.5).to(dev)
    torch.cuda.synchronize()
    per_epoch_s = time.perf_counter() - t0
    del order, flips
    epoch_s = EPOCH_SAMPLES / B * rows[0][1] / 1e3 + per_epoch_s
    ratios = report(benchmark, f"training step: FmFormer paper config, B={B}, clip 3x10x64x64 uint8 + current 240x3, "
                               f"Adam, on {torch.cuda.get_device_name()}", rows, unit_batch=B,
                    targets={"vs (a) reference eager fp32": ">= 4x", "vs (b) torch.compile": ">= 2x",
                             "epoch over 2.2M samples": "< 60 s", "peak memory": "ours <= (a)"},
                    extra={"peak_mem_mb": {"ours (captured, incl. capture)": round(mem_ours, 1),
                                           "(a) reference eager fp32": round(mem_ref, 1),
                                           "(b) torch.compile bf16": round(mem_comp, 1)},
                           "epoch_2.2M_s": round(epoch_s, 2), "epoch_host_work_s": round(per_epoch_s, 3),
                           "first_loss_eager_fast": first},
                    checks=[check("training throughput vs (a) reference eager fp32 (x)",
                                  rows[2][1] / rows[0][1], 4),
                            check("training throughput vs (b) reference torch.compile bf16 (x)",
                                  rows[3][1] / rows[0][1], 2),
                            check("epoch over 2.2M samples incl. gather (s)", epoch_s, 60, higher_is_better=False),
                            check("peak memory of a step, ours / (a)", mem_ours / mem_ref, 1.0,
                                  higher_is_better=False)])
    print(f"  -> {ratios['(a) reference, eager fp32, Adam']:.2f}x (a), "
          f"{ratios['(b) reference, torch.compile bf16, fused Adam']:.2f}x (b); "
          f"epoch over 2.2M samples {epoch_s:.1f} s; peak MB ours {mem_ours:.0f} vs (a) {mem_ref:.0f}")
    run_benchmark(benchmark, loop(ours))


@needs_gpu
def test_bench_gpu_gather(benchmark, paper_data):
    host, ds = paper_data
    idx_host = epoch_order(len(ds), 0, 0)[:B]
    idx = idx_host.cuda()
    clips, currents, labels = ds.batch(idx)
    fi, cur, lab = ds.inputs(idx)
    assert torch.equal(gather_clip(ds.frames, fi), clips)
    assert torch.equal(cur, currents) and torch.equal(lab, labels)
    h = host.batch(idx_host)
    assert all(torch.equal(a.cpu(), b) for a, b in zip((clips, currents, labels), h))

    def to_gpu():
        for t in host.batch(idx_host):
            t.to("cuda", non_blocking=True)

    rows = [("ours: ds.inputs on the GPU (frame table, no clip)", time_ms(lambda: ds.inputs(idx))),
            ("ds.batch on the GPU (clips materialised)", time_ms(lambda: ds.batch(idx))),
            ("ds.batch on the host + copy to the GPU", time_ms(to_gpu, reps=3, inner=3))]
    report(benchmark, f"data gather: B={B}, clip 3x10x64x64 uint8, current 240x3, train split with flips", rows,
           unit_batch=B)
    run_benchmark(benchmark, lambda: ds.inputs(idx))

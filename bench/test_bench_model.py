"""FmFormer end to end: one encoder layer, the full forward, captured inference -- fast vs reference.

Peers, same weights and inputs, paper shape (clip 3x10x64x64 uint8, current 240x3, D=96, 6 layers,
3 heads x 32, 401 + 241 tokens):
  ours  ``backend="fast"`` (fused tokenizer, packed block-sparse attention), bf16 autocast;
        inference replayed from a CUDA graph (``fmfast.engine.graphs.GraphedForward``);
  (a)   ``backend="reference"``, eager fp32: the published model's math and precision;
  (a')  the same at bf16 autocast (for the parity tolerance, and as a fair eager peer);
  (b)   (a') under ``torch.compile``.
Parity first: ours vs (a) within 2x the error of (a') vs (a) plus a small floor (flash-attention
style); (b) likewise. Ratios are peer time / ours. Targets (H200): inference latency at batch 1
under 0.3 ms with the graph; throughput at batch 1024 reported.

CPU: tiny shapes only; the fast path runs in the Triton interpreter, so its parity is checked
but its times are no speed measurement (said in the output).
Run: ``python -m pytest -q bench/test_bench_model.py -s --benchmark-only``.
"""
from __future__ import annotations

import pytest
import torch
from _common import (
    GPU,
    GPU_REASON,
    check,
    flash_tol,
    max_err,
    needs_gpu,
    needs_interpreter,
    report,
    run_benchmark,
    time_ms,
)

from fmfast import FmFormer, ModelConfig
from fmfast.engine.graphs import GraphedForward, StaticForward
from fmfast.nn import MultiStreamAttention, MultiStreamFeedForward

PAPER = ModelConfig()
TINY = ModelConfig(image_size=32, num_frames=4, dim=32, depth=1, heads=2, dim_head=16, mlp_dim=48, current_len=12)


def models(cfg, device, seed=0):
    """(fast, reference) FmFormers with the same non-trivial weights."""
    torch.manual_seed(seed)
    ref = FmFormer(cfg, backend="reference")
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    fast = FmFormer(cfg, backend="fast")
    fast.load_state_dict(ref.state_dict())
    return fast.to(device).eval(), ref.to(device).eval()


def inputs(cfg, batch, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = cfg.frame_hw
    video = torch.randint(0, 256, (batch, 3, cfg.num_frames, h, w), generator=g, dtype=torch.uint8)
    current = 3000 + 800 * torch.randn(batch, cfg.current_len, 3, generator=g)
    return video.to(device), current.to(device)


def amp(enabled: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=enabled)


def describe(cfg, batch, device, what):
    h, w = cfg.frame_hw
    return (f"{what}: B={batch}, clip 3x{cfg.num_frames}x{h}x{w} uint8 + current {cfg.current_len}x3 fp32 -> "
            f"{cfg.num_video_tokens}+{cfg.current_len + 1} tokens, D={cfg.dim}, depth {cfg.depth}, "
            f"{cfg.heads}x{cfg.dim_head} heads, on {device}")


# ---- one encoder layer (attention stage + feed-forward), forward + backward ----------------------
class Layer(torch.nn.Module):
    def __init__(self, cfg, backend):
        super().__init__()
        self.attn = MultiStreamAttention(cfg.dim, cfg.heads, cfg.dim_head, backend=backend)
        self.ff = MultiStreamFeedForward(cfg.dim, cfg.mlp_dim)

    def forward(self, x1, x2):
        return self.ff(*self.attn(x1, x2))


def layers(cfg, device):
    torch.manual_seed(0)
    ref = Layer(cfg, "reference")
    fast = Layer(cfg, "fast")
    fast.load_state_dict(ref.state_dict())
    return fast.to(device), ref.to(device)


def layer_step(layer, x1, x2, g1, g2, low):
    def step():
        layer.zero_grad(set_to_none=True)
        with amp(low):
            y1, y2 = layer(x1, x2)
        torch.autograd.backward((y1, y2), (g1, g2))
    return step


def layer_result(layer, x1, x2, g1, g2, low):
    layer_step(layer, x1, x2, g1, g2, low)()
    with torch.no_grad(), amp(low):
        y1, y2 = layer(x1, x2)
    return [y1, y2] + [p.grad for p in layer.parameters()]


def _layer_case(benchmark, cfg, batch, device, compiled: bool):
    fast, ref = layers(cfg, device)
    g = torch.Generator().manual_seed(1)
    n1, n2 = cfg.num_video_tokens, cfg.current_len + 1
    x1, x2, g1, g2 = (torch.randn(batch, n, cfg.dim, generator=g).to(device) for n in (n1, n2, n1, n2))
    low = device == "cuda"
    want = layer_result(ref, x1, x2, g1, g2, False)
    tol = flash_tol(max_err(layer_result(ref, x1, x2, g1, g2, low), want), want) if low else 1e-4
    err = max_err(layer_result(fast, x1, x2, g1, g2, low), want)
    assert err <= tol, f"encoder layer parity: ours {err:.2e} > tol {tol:.2e}"
    rows = [("ours: fast layer" + (", bf16" if low else ", fp32 (interpreter: not a speed)"),
             time_ms(layer_step(fast, x1, x2, g1, g2, low), cpu_reps=1)),
            ("(a) reference layer, eager fp32", time_ms(layer_step(ref, x1, x2, g1, g2, False)))]
    if low:
        rows.append(("(a') reference layer, eager bf16", time_ms(layer_step(ref, x1, x2, g1, g2, True))))
    if compiled:
        comp = torch.compile(ref)
        assert max_err(layer_result(comp, x1, x2, g1, g2, low), want) <= tol
        rows.append(("(b) reference layer, torch.compile bf16", time_ms(layer_step(comp, x1, x2, g1, g2, True))))
    report(benchmark, describe(cfg, batch, device, "encoder layer fwd+bwd") + (", bf16 autocast" if low else ", fp32"),
           rows, unit_batch=batch)
    # on a CPU the fast step is the interpreter: time the reference step for pytest-benchmark
    run_benchmark(benchmark, layer_step(fast, x1, x2, g1, g2, low) if low else layer_step(ref, x1, x2, g1, g2, False))


@needs_interpreter
def test_bench_cpu_encoder_layer(benchmark):
    _layer_case(benchmark, TINY, 1, "cpu", compiled=False)


@needs_gpu
def test_bench_gpu_encoder_layer(benchmark):
    _layer_case(benchmark, PAPER, 256, "cuda", compiled=True)


# ---- the full forward (inference) --------------------------------------------------------------
def _forward_parity(fast, ref, video, current, low):
    with torch.no_grad():
        want = [ref(video, current)]
        with amp(low):
            got = [fast(video, current)]
            base = [ref(video, current)]
    tol = flash_tol(max_err(base, want), want) if low else 1e-4
    err = max_err(got, want)
    assert err <= tol, f"forward parity: ours {err:.2e} > tol {tol:.2e}"
    return want, tol


@needs_interpreter
def test_bench_cpu_forward(benchmark):
    """CPU: tiny FmFormer, the fast path (interpreted) on the static buffers the captured graph
    uses on a GPU, vs the reference forward."""
    fast, ref = models(TINY, "cpu")
    video, current = inputs(TINY, 2, "cpu")
    with torch.no_grad():
        static = StaticForward(fast, (video[:1], current[:1]), graph=False)  # 2 rows: two chunks of 1
        assert max_err([static(video, current)], [ref(video, current)]) < 1e-4

    def run(m):
        def step():
            with torch.no_grad():
                m(video, current)
        return step

    rows = [("ours: fast backend, static buffers (interpreter: not a speed)", time_ms(run(static), cpu_reps=1)),
            ("(a) reference backend, eager fp32", time_ms(run(ref)))]
    report(benchmark, describe(TINY, 2, "cpu", "forward, fp32"), rows, unit_batch=2)
    run_benchmark(benchmark, run(ref))


@pytest.fixture(scope="module")
def paper_models():
    if not GPU:
        pytest.skip(GPU_REASON)
    return models(PAPER, "cuda")


@needs_gpu
def test_bench_gpu_forward_b256(benchmark, paper_models):
    fast, ref = paper_models
    batch = 256
    video, current = inputs(PAPER, batch, "cuda")
    want, tol = _forward_parity(fast, ref, video, current, True)
    with torch.no_grad():
        graphed = GraphedForward(fast, (video, current), amp_dtype=torch.bfloat16)
        assert max_err([graphed(video, current)], want) <= tol
        comp = torch.compile(ref)
        with amp(True):
            assert max_err([comp(video, current)], want) <= tol

    def run(fn, low):
        def step():
            with torch.no_grad(), amp(low):
                fn(video, current)
        return step

    rows = [("ours: fast, bf16, CUDA graph", time_ms(run(graphed, False))),
            ("ours: fast, bf16, eager launches", time_ms(run(fast, True))),
            ("(a) reference, eager fp32", time_ms(run(ref, False))),
            ("(a') reference, eager bf16", time_ms(run(ref, True))),
            ("(b) reference, torch.compile bf16", time_ms(run(comp, True)))]
    report(benchmark, describe(PAPER, batch, "cuda", "inference forward"), rows, unit_batch=batch)
    run_benchmark(benchmark, run(graphed, False))


@needs_gpu
@pytest.mark.parametrize("batch", [1, 1024])
def test_bench_gpu_inference_graph(benchmark, paper_models, batch):
    """Latency at batch 1 (target < 0.3 ms) and throughput at batch 1024, captured graph."""
    fast, ref = paper_models
    video, current = inputs(PAPER, batch, "cuda", seed=2)
    want, tol = _forward_parity(fast, ref, video, current, True)
    with torch.no_grad():
        graphed = GraphedForward(fast, (video, current), amp_dtype=torch.bfloat16)
        graphed32 = GraphedForward(fast, (video, current))
        assert max_err([graphed(video, current)], want) <= tol
        assert max_err([graphed32(video, current)], want) <= 1e-2 * max(1.0, want[0].abs().max().item())

    def run(fn, low=False):
        def step():
            with torch.no_grad(), amp(low):
                fn(video, current)
        return step

    rows = [("ours: fast, bf16, CUDA graph (incl. input copy)", time_ms(run(graphed), inner=50 if batch == 1 else 5)),
            ("ours: fast, fp32, CUDA graph", time_ms(run(graphed32), inner=50 if batch == 1 else 5)),
            ("(a) reference, eager fp32", time_ms(run(ref), inner=20 if batch == 1 else 3))]
    targets = {"latency at batch 1": "< 0.3 ms"} if batch == 1 else {"throughput at batch 1024": "reported"}
    checks = [check("inference latency at batch 1 (ms, CUDA graph, bf16)", rows[0][1], 0.3, higher_is_better=False)] \
        if batch == 1 else []
    report(benchmark, describe(PAPER, batch, "cuda", "inference"), rows, unit_batch=batch, targets=targets,
           checks=checks)
    run_benchmark(benchmark, run(graphed))

"""The CPU attention kernels (forward and backward), each build this CPU runs (AMX tiles,
AVX512-BF16 registers), against float64 and PyTorch's own bf16
SDPA on the same inputs, and the fp32 forward kernel (AVX2) against float64 and fp32 SDPA:
ragged shapes (queries and keys not multiples of the 16-row tiles or 32-key steps, a single key,
a single query), both head dims, the model's strided q/k/v views, large logits; its layout, the
custom op's registration, torch.compile, and the dispatch and fallback decisions."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fmfast.kernels import cpu_attention as ca

OK, WHY = ca.available()
ENV = {v: k for k, v in ca._CHOICE.items()}  # variant -> its FMFAST_CPU_ATTENTION value


@pytest.fixture(params=ca.supported_variants() or [None])
def variant(request, monkeypatch):
    """Runs a test once per build this CPU supports (an AMX CPU runs both)."""
    if request.param:
        monkeypatch.setenv("FMFAST_CPU_ATTENTION", ENV[request.param])
    clear_caches()
    assert ca.variant() == request.param or not OK
    yield request.param
    clear_caches()


def clear_caches():
    """Forget the loaded kernels (and so the C++ operators' entries into them): the next call
    loads what the environment now asks for."""
    for f in (ca._library, ca._library_f32, ca._library_op):
        f.cache_clear()


def needs_kernel(test):
    test = pytest.mark.usefixtures("variant")(test)
    return pytest.mark.skipif(not OK, reason=f"CPU attention unavailable here: {WHY}")(test)


def qkv(b, h, n, m, d, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, x, d, generator=g) for x in (n, m, m))
    return (q * scale).bfloat16(), k.bfloat16(), v.bfloat16()


def errors(q, k, v):
    """(ours, SDPA) max abs error against float64 on the same inputs (bf16 or fp32), SDPA in
    their dtype."""
    sc = q.shape[-1] ** -0.5
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=sc)
    ours = ca.cpu_attention(q, k, v, sc)
    plain = F.scaled_dot_product_attention(q, k, v, scale=sc)
    assert ours.dtype == q.dtype and ours.shape == q.shape
    return (ours.double() - exact).abs().max().item(), (plain.double() - exact).abs().max().item()


@needs_kernel
@pytest.mark.parametrize("b, h, n, m, d", [
    (2, 3, 401, 401, 32), (2, 3, 241, 401, 32), (2, 3, 401, 241, 32),  # FmFormer's four shapes
    (1, 1, 1, 1, 32), (1, 2, 17, 5, 32), (3, 1, 33, 50, 64), (2, 2, 100, 300, 64), (1, 1, 3, 31, 64),
    (1, 1, 16, 32, 32), (1, 1, 15, 33, 32), (4, 1, 64, 48, 32)])
def test_matches_float64_as_well_as_sdpa(b, h, n, m, d):
    ours, plain = errors(*qkv(b, h, n, m, d))
    assert ours <= 2 * plain + 1e-3, (ours, plain)


@needs_kernel
@pytest.mark.parametrize("scale", [8.0, 30.0])
def test_large_logits_stay_finite_and_exact(scale):
    """Logits in the hundreds: the row max is subtracted before the exponential (no overflow),
    and keys far below it get exactly 0 (no clamp is needed)."""
    q, k, v = qkv(2, 2, 70, 90, 32, scale=scale)
    ours, plain = errors(q, k, v)
    assert ours <= 2 * plain + 1e-3, (ours, plain)
    assert torch.isfinite(ca.cpu_attention(q, k, v, 32 ** -0.5)).all()


@needs_kernel
def test_the_models_strided_views_and_the_output_layout():
    """q, k, v as FmFormer makes them (views of one [B, N, 3*H*D] projection) give what their
    contiguous copies give, bit for bit; the output is [B, N, H, D] underneath."""
    b, n, h, d = 3, 37, 3, 32
    proj = torch.randn(b, n, 3 * h * d).bfloat16()
    q, k, v = proj.view(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    o = ca.cpu_attention(q, k, v, 0.2)
    assert torch.equal(o, ca.cpu_attention(q.contiguous(), k.contiguous(), v.contiguous(), 0.2))
    assert o.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(o.float(), ca.cpu_attention_ref(q, k, v, 0.2).float(), atol=2e-2, rtol=2e-2)


@needs_kernel
def test_thread_counts_agree():
    q, k, v = qkv(1, 3, 90, 70, 32)  # B*H = 3: the kernel splits queries to feed the threads
    before = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append(ca.cpu_attention(q, k, v, 0.2))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(*outs)


@needs_kernel
def test_bad_inputs_raise_in_words():
    q, k, v = qkv(1, 1, 8, 8, 32)
    with pytest.raises(ValueError, match="head dim"):
        ca.cpu_attention(*qkv(1, 1, 8, 8, 48), 0.1)
    with pytest.raises(ValueError, match="head dim"):
        ca.cpu_attention(q, k[:, :, :0], v[:, :, :0], 0.1)
    with pytest.raises(ValueError, match="k, v"):
        ca.cpu_attention(q, k, v[:, :, :4], 0.1)


@needs_kernel
def test_custom_op_registration_and_compile():
    q, k, v = qkv(2, 3, 20, 40, 32)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    torch.library.opcheck(torch.ops.fmfast.cpu_attention_fwd.default, (q, k, v, 0.2),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    do = torch.randn(2, 3, 20, 32).bfloat16()
    o, lse = torch.ops.fmfast.cpu_attention_fwd(q.detach(), k.detach(), v.detach(), 0.2)
    torch.library.opcheck(torch.ops.fmfast.cpu_attention_bwd.default, (do, q.detach(), k.detach(), v.detach(), o, lse, 0.2),
                          test_utils=("test_schema", "test_faketensor"))
    fn = torch.compile(lambda q, k, v: ca.cpu_attention(q, k, v, 0.2) * 2, fullgraph=True, dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(fn(q, k, v), ca.cpu_attention(q, k, v, 0.2) * 2)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("first, second", [
    ((2, 3, 401, 401, 32), (2, 3, 241, 241, 32)),  # FmFormer's two self-attentions
    ((1, 3, 401, 241, 32), (1, 3, 241, 401, 32)),  # and its two cross-attentions, at B=1
    ((1, 2, 17, 5, 64), (3, 1, 1, 33, 32)),        # ragged, different batches, heads and head dims
    ((1, 1, 0, 8, 32), (2, 2, 40, 20, 32))])       # an empty member
def test_pair_is_two_calls_bit_for_bit(first, second, threads):
    """One kernel call for two attentions gives exactly the two calls' outputs, lse and gradients,
    whatever the thread count (its work items share one queue)."""
    a, b = qkv(*first, seed=1), qkv(*second, seed=2)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        o1, lse1, o2, lse2 = torch.ops.fmfast.cpu_attention_pair_fwd(*a, *b, 0.19, 0.23)
        w1, wl1 = torch.ops.fmfast.cpu_attention_fwd(*a, 0.19)
        w2, wl2 = torch.ops.fmfast.cpu_attention_fwd(*b, 0.23)
        for got, want in ((o1, w1), (lse1, wl1), (o2, w2), (lse2, wl2)):
            assert got.shape == want.shape and got.stride() == want.stride() and torch.equal(got, want)
        xs = [x.clone().requires_grad_() for x in (*a, *b)]
        ys = [x.clone().requires_grad_() for x in (*a, *b)]
        p1, p2 = ca.cpu_attention_pair(*xs, 0.19, 0.23)
        (p1.float().square().sum() + p2.float().sum()).backward()
        (ca.cpu_attention(*ys[:3], 0.19).float().square().sum() + ca.cpu_attention(*ys[3:], 0.23).float().sum()).backward()
        for x, y in zip(xs, ys):
            assert torch.equal(x.grad, y.grad)
    finally:
        torch.set_num_threads(before)


@needs_kernel
def test_pair_op_registration_compile_and_bad_inputs():
    a, b = qkv(2, 3, 20, 40, 32, seed=3), qkv(1, 3, 7, 9, 32, seed=4)
    args = (*(x.requires_grad_() for x in (*a, *b)), 0.2, 0.3)
    torch.library.opcheck(torch.ops.fmfast.cpu_attention_pair_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    fn = torch.compile(lambda *xs: [o * 2 for o in ca.cpu_attention_pair(*xs, 0.2, 0.3)], fullgraph=True, dynamic=False)
    with torch.no_grad():
        for got, want in zip(fn(*args[:6]), ca.cpu_attention_pair(*args[:6], 0.2, 0.3)):
            torch.testing.assert_close(got, want * 2)
    with pytest.raises(ValueError, match="head dim"):
        ca.cpu_attention_pair(*a, *qkv(1, 1, 8, 8, 48), 0.1, 0.1)
    with pytest.raises(ValueError, match="k, v"):
        ca.cpu_attention_pair(*a, b[0], b[1], b[2][:, :, :4], 0.1, 0.1)


def grad_errors(b, h, n, m, d, seed=0, scale=1.0, strided=False, dtype=torch.bfloat16):
    """Per input, (ours, SDPA in ``dtype``) relative L2 error of the gradient against float64,
    on the same ``dtype`` inputs."""
    q, k, v = (qkv if dtype == torch.bfloat16 else qkv32)(b, h, n, m, d, seed, scale)
    if strided:  # views of one projection, as in the model (n == m)
        proj = torch.cat([q, k, v], -1).transpose(1, 2).contiguous()  # [B, N, H, 3D]
        q, k, v = proj.transpose(1, 2).split(d, -1)
    do = torch.randn(b, h, n, d, generator=torch.Generator().manual_seed(seed + 7)).to(dtype)
    sc = d ** -0.5

    def grads(fn, dt):
        xs = [x.detach().to(dt).requires_grad_() for x in (q, k, v)]
        fn(*xs).backward(do.to(dt))
        return [x.grad.double() for x in xs]
    exact = grads(lambda *x: F.scaled_dot_product_attention(*x, scale=sc), torch.float64)
    ours = grads(lambda *x: ca.cpu_attention(*x, sc), dtype)
    plain = grads(lambda *x: F.scaled_dot_product_attention(*x, scale=sc), dtype)
    assert all(g.dtype == torch.float64 for g in ours)
    rel = lambda a, e: ((a - e).norm() / e.norm().clamp_min(1e-30)).item()  # noqa: E731
    return [(rel(a, e), rel(p, e), e.norm().item()) for a, p, e in zip(ours, plain, exact)]


@needs_kernel
@pytest.mark.parametrize("b, h, n, m, d", [
    (2, 3, 401, 401, 32), (2, 3, 241, 401, 32), (2, 3, 401, 241, 32), (1, 2, 17, 5, 32), (3, 1, 33, 50, 64),
    (2, 2, 100, 300, 64), (1, 1, 16, 32, 32), (1, 1, 15, 33, 32), (4, 1, 64, 48, 32), (1, 1, 2, 1, 32)])
def test_gradients_match_float64_as_well_as_sdpa(b, h, n, m, d):
    """Ragged queries and keys (the backward pads queries to 32 and keys to 32-key chunks)."""
    for ours, plain, norm in grad_errors(b, h, n, m, d):
        if norm < 1e-6:  # a single key: q and k get no gradient; ours must be ~0 too
            continue
        assert ours <= 2 * plain + 1e-3, (ours, plain)


@needs_kernel
def test_gradients_with_large_logits_and_strided_views():
    for ours, plain, _ in grad_errors(2, 3, 57, 57, 32, scale=8.0) + grad_errors(2, 3, 57, 57, 32, strided=True):
        assert ours <= 2 * plain + 1e-3, (ours, plain)


@needs_kernel
def test_a_single_key_gives_zero_query_and_key_gradients():
    q, k, v = (x.requires_grad_() for x in qkv(1, 2, 5, 1, 32))
    ca.cpu_attention(q, k, v, 0.3).float().sum().backward()
    # (exactly 0 in exact arithmetic: P = 1; here P's polynomial and o's bf16 rounding leave ~1e-7)
    assert q.grad.abs().max() < 1e-4 and k.grad.abs().max() < 1e-4
    assert torch.allclose(v.grad.float(), torch.full_like(v.grad.float(), 5.0), rtol=1e-3)  # all queries take v


def test_switched_off_or_unavailable_says_why_and_the_model_falls_back(tmp_path):
    """FMFAST_CPU_ATTENTION=0 (as on a CPU without AMX or a machine without a C compiler): the
    reason is given and a bf16 inference forward runs PyTorch's SDPA instead."""
    script = (
        "import torch\nfrom fmfast.kernels import cpu_attention as ca\nfrom fmfast.nn.attention import attend\n"
        "ok, why = ca.available(); print(ok, why)\n"
        "q = torch.randn(1, 2, 9, 32).bfloat16()\n"
        "with torch.no_grad(): o = attend(q, q, q, 0.2, fused=True)\n"
        "print(torch.allclose(o.float(), torch.nn.functional.scaled_dot_product_attention(q, q, q, scale=0.2).float()))\n")
    env = dict(os.environ, FMFAST_CPU_ATTENTION="0", FMFAST_KERNEL_CACHE=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    first, second = out.stdout.splitlines()[-2:]
    assert first.startswith("False") and "FMFAST_CPU_ATTENTION=0" in first
    assert second == "True"


@pytest.mark.parametrize("ask", ["amx", "avx512", "fast", "auto"])
def test_the_environment_picks_a_build_or_says_why_not(ask, monkeypatch):
    monkeypatch.setenv("FMFAST_CPU_ATTENTION", ask)
    clear_caches()
    try:
        ok, why = ca.available()
        have = ca.supported_variants()
        if ask == "fast":
            assert not ok and "not one of auto, amx, avx512, 0" in why
        elif ask == "auto":
            assert ca.variant() == have[0] if ok else (have or "neither" in why)
        elif ca._CHOICE[ask] in have:
            assert ok and ca.variant() == ca._CHOICE[ask], why
        else:
            assert not ok and f"no {ca._CHOICE[ask]}" in why
    finally:
        clear_caches()


@needs_kernel
def test_build_is_cached_by_source_and_written_whole(tmp_path, monkeypatch, variant):
    import shutil

    monkeypatch.setenv("FMFAST_KERNEL_CACHE", str(tmp_path))
    cc = shutil.which("cc") or shutil.which("gcc")
    lib = ca._build(cc, ca.SOURCE, ca.FLAGS + ca.VARIANTS[variant])
    assert lib.parent == tmp_path and lib.stat().st_size > 0
    stamp = lib.stat().st_mtime_ns
    assert ca._build(cc, ca.SOURCE, ca.FLAGS + ca.VARIANTS[variant]) == lib and lib.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [lib.name]  # no temp file left behind


def test_a_failed_build_is_a_reason_not_a_crash(tmp_path, monkeypatch):
    monkeypatch.setenv("FMFAST_KERNEL_CACHE", str(tmp_path))
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'cc: error: no such flag' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(RuntimeError, match="no such flag"):
        ca._build(str(fake), ca.SOURCE, ca.FLAGS)
    assert [p.name for p in tmp_path.iterdir()] == ["cc"]  # nothing half-written


PIN_PROBE = """
import json, os, torch
from fmfast.kernels import cpu_attention as ca
torch.set_num_threads({threads})
def placements():
    out = {{}}
    for t in os.listdir("/proc/self/task"):
        for line in open(f"/proc/self/task/{{t}}/status"):
            if line.startswith("Cpus_allowed_list"):
                out[int(t)] = line.split()[1]
    return out
x = torch.randn(1, 2, 40, 32).to(torch.bfloat16 if ca.available()[0] else torch.float32)
ca.cpu_attention(x, x, x, 0.2)  # the pool exists
before = placements()
ok, words = ca.pin_threads()
ca.cpu_attention(x, x, x, 0.2)  # and still computes
print(json.dumps({{"ok": ok, "words": words, "before": before, "after": placements(), "main": os.getpid(),
                  "again": list(ca.pin_threads())}}))
"""


def pin_probe(threads, env):
    r = subprocess.run([sys.executable, "-c", PIN_PROBE.format(threads=threads)], capture_output=True, text=True,
                       timeout=120, env={**os.environ, **env})
    assert r.returncode == 0, r.stderr[-2000:]
    import json
    return json.loads(r.stdout.strip().splitlines()[-1])


CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
ANY_OK = OK or ca.available_f32()[0]  # either library pins (both hold fmf_pin_threads)


@pytest.mark.skipif(not ANY_OK or len(CPUS) < 2, reason=f"needs a CPU kernel and 2 CPUs ({len(CPUS)} CPUs)")
def test_pin_threads_pins_the_workers_and_leaves_the_caller():
    """Each OpenMP worker gets one CPU of the process's set, in order, and the calling thread
    (whose affinity later threads and child processes inherit) keeps the whole set."""
    n = len(CPUS)
    got = pin_probe(n, {"FMFAST_PIN_THREADS": "auto"})
    assert got["ok"] and f"{n - 1} worker thread(s) pinned" in got["words"], got["words"]
    assert got["again"] == [got["ok"], got["words"]]
    main, after = str(got["main"]), got["after"]
    assert after[main] == got["before"][main] and not after[main].isdigit()
    singles = sorted(int(p) for t, p in after.items() if t != main and p.isdigit())
    assert singles == CPUS[1:n], after


@pytest.mark.skipif(not ANY_OK or len(CPUS) < 2, reason=f"needs a CPU kernel and 2 CPUs ({len(CPUS)} CPUs)")
@pytest.mark.parametrize("env, threads, why", [
    ({"FMFAST_PIN_THREADS": "0"}, len(CPUS), "FMFAST_PIN_THREADS=0"),
    ({"FMFAST_PIN_THREADS": "yes"}, len(CPUS), "is not one of auto, 0, 1"),
    ({}, 1, "one thread"),
    ({}, len(CPUS) + 1, f"{len(CPUS) + 1} threads on {len(CPUS)} CPUs")])
def test_pin_threads_says_why_not_and_changes_nothing(env, threads, why):
    got = pin_probe(threads, {"FMFAST_PIN_THREADS": "auto", **env})
    assert not got["ok"] and why in got["words"], got["words"]
    assert all(got["after"][t] == p for t, p in got["before"].items() if t in got["after"])


# ---- the fp32 forward kernel (AVX2) ------------------------------------------------------------
OK32, WHY32 = ca.available_f32()
needs_f32 = pytest.mark.skipif(not OK32, reason=f"fp32 CPU attention unavailable here: {WHY32}")


def qkv32(b, h, n, m, d, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, x, d, generator=g) for x in (n, m, m))
    return q * scale, k, v


@needs_f32
@pytest.mark.parametrize("b, h, n, m, d", [
    (2, 3, 401, 401, 32), (2, 3, 241, 401, 32), (2, 3, 401, 241, 32),  # FmFormer's four shapes
    (1, 1, 1, 1, 32), (1, 2, 17, 5, 32), (3, 1, 33, 50, 64), (2, 2, 100, 300, 64), (1, 1, 3, 31, 64),
    (1, 1, 24, 16, 32), (1, 1, 25, 17, 32), (1, 1, 23, 15, 32), (4, 1, 6, 8, 32), (2, 3, 41, 17, 32)])
def test_f32_matches_float64_as_well_as_sdpa(b, h, n, m, d):
    """Ragged queries and keys around the kernel's blocks (24 queries, 6-row groups, 16-key
    slices, 8-key vectors, 64-key chunks)."""
    ours, plain = errors(*qkv32(b, h, n, m, d))
    assert ours <= 2 * plain + 2e-6, (ours, plain)


@needs_f32
@pytest.mark.parametrize("scale", [8.0, 30.0])
def test_f32_large_logits_stay_finite_and_exact(scale):
    """Logits in the hundreds: no overflow, and keys far below the row max (clamped at 2^-126)
    add nothing visible; a row of all-negative logits is not lifted by the zero padding."""
    q, k, v = qkv32(2, 2, 70, 90, 32, scale=scale)
    ours, plain = errors(q, k, v)
    assert ours <= 2 * plain + 2e-6, (ours, plain)
    v = qkv32(1, 1, 5, 3, 32)[2]  # 3 keys in a 16-key slice: 13 zero logits of padding
    qq, kk = torch.zeros(1, 1, 5, 32), torch.zeros(1, 1, 3, 32)
    qq[..., 0] = 1.0
    kk[..., 0] = torch.tensor([-50.0, -51.0, -52.0]) / 32 ** -0.5  # logits -50..-52: padding's 0 would win a max
    ours, plain = errors(qq, kk, v)
    assert ours <= 2 * plain + 2e-6, (ours, plain)


@needs_f32
def test_f32_strided_views_threads_and_layout():
    """q, k, v as the model makes them (views of one projection) give their contiguous copies'
    output bit for bit, at 1, 2 and 3 threads (the query splits change); the output is
    [B, N, H, D] underneath."""
    b, n, h, d = 1, 37, 3, 32
    proj = torch.randn(b, n, 3 * h * d)
    q, k, v = proj.view(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    before, outs = torch.get_num_threads(), []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(ca.cpu_attention(q, k, v, 0.2))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(outs[0], o) for o in outs)
    assert torch.equal(outs[0], ca.cpu_attention(q.contiguous(), k.contiguous(), v.contiguous(), 0.2))
    assert outs[0].transpose(1, 2).is_contiguous()
    torch.testing.assert_close(outs[0], ca.cpu_attention_ref(q, k, v, 0.2), atol=2e-6, rtol=1e-5)


@needs_f32
def test_f32_bad_inputs_raise_in_words():
    q, k, v = qkv32(1, 1, 8, 8, 32)
    with pytest.raises(ValueError, match="head dim"):
        ca.cpu_attention(*qkv32(1, 1, 8, 8, 48), 0.1)
    with pytest.raises(ValueError, match="head dim"):
        ca.cpu_attention(q, k[:, :, :0], v[:, :, :0], 0.1)
    with pytest.raises(ValueError, match="k, v"):
        ca.cpu_attention(q, k, v[:, :, :4], 0.1)
    with pytest.raises(ValueError, match="one dtype"):
        ca.cpu_attention_pair(q, k, v, q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.1, 0.1)
    with pytest.raises(ValueError, match="all torch.float32"):  # the op itself: bytes the C side would misread
        torch.ops.fmfast.cpu_attention_f32_fwd(q, k.bfloat16(), v, 0.1)
    x = q.clone().requires_grad_()
    with pytest.raises(ValueError, match="k, v"):  # the backward's inputs are checked too
        torch.ops.fmfast.cpu_attention_f32_bwd(q, x, k, v[:, :, :4], q, q[..., 0], 0.1)


@needs_f32
def test_f32_custom_ops_registration_and_compile():
    """Schema, fake tensors and the autograd registration check out; torch.compile sees one node."""
    q, k, v = qkv32(2, 3, 20, 40, 32)
    a, b = (q, k, v), qkv32(1, 3, 7, 9, 64, seed=4)
    grad = [x.clone().requires_grad_() for x in (*a, *b)]
    torch.library.opcheck(torch.ops.fmfast.cpu_attention_f32_fwd.default, (*grad[:3], 0.2),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    torch.library.opcheck(torch.ops.fmfast.cpu_attention_f32_pair_fwd.default, (*grad, 0.2, 0.3),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    o, lse = torch.ops.fmfast.cpu_attention_f32_fwd(q, k, v, 0.2)
    torch.library.opcheck(torch.ops.fmfast.cpu_attention_f32_bwd.default, (torch.randn_like(q), q, k, v, o, lse, 0.2),
                          test_utils=("test_schema", "test_faketensor"))
    fn = torch.compile(lambda *xs: [o * 2 for o in ca.cpu_attention_pair(*xs, 0.2, 0.3)], fullgraph=True, dynamic=False)
    for got, want in zip(fn(*a, *b), ca.cpu_attention_pair(*a, *b, 0.2, 0.3)):
        torch.testing.assert_close(got, want * 2)


@needs_f32
@pytest.mark.parametrize("b, h, n, m, d", [
    (2, 3, 401, 401, 32), (2, 3, 241, 401, 32), (2, 3, 401, 241, 32), (1, 2, 17, 5, 32), (3, 1, 33, 50, 64),
    (2, 2, 100, 300, 64), (1, 1, 24, 16, 32), (1, 1, 25, 18, 32), (4, 1, 7, 3, 32), (1, 1, 2, 1, 32),
    (2, 3, 41, 17, 32), (1, 1, 48, 32, 64)])
def test_f32_gradients_match_float64_as_well_as_sdpa(b, h, n, m, d):
    """Ragged queries (24-row blocks) and keys (16-key slices, 3-key accumulator rows past M)."""
    for ours, plain, norm in grad_errors(b, h, n, m, d, dtype=torch.float32):
        if norm < 1e-6:  # a single key: q and k get no gradient; ours must be ~0 too
            assert ours * norm <= 1e-5  # (relative error of ~0 is meaningless: the absolute one)
            continue
        assert ours <= 2 * plain + 1e-6, (ours, plain)


@needs_f32
def test_f32_gradients_with_large_logits_and_strided_views():
    for ours, plain, _ in grad_errors(2, 3, 57, 57, 32, scale=8.0, dtype=torch.float32) + grad_errors(
            2, 3, 57, 57, 32, strided=True, dtype=torch.float32):
        assert ours <= 2 * plain + 1e-6, (ours, plain)


@needs_f32
def test_f32_a_single_key_gives_zero_query_and_key_gradients():
    q, k, v = (x.requires_grad_() for x in qkv32(1, 2, 5, 1, 32))
    ca.cpu_attention(q, k, v, 0.3).sum().backward()
    # (exactly 0 in exact arithmetic: dP - delta cancels; fp32 leaves ~1e-6 at |do . v| ~ 5)
    assert q.grad.abs().max() < 1e-5 and k.grad.abs().max() < 1e-5
    torch.testing.assert_close(v.grad, torch.full_like(v.grad, 5.0))  # all queries take v


@needs_f32
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("first, second", [
    ((2, 3, 401, 401, 32), (2, 3, 241, 241, 32)),
    ((1, 3, 401, 241, 32), (1, 3, 241, 401, 32)),
    ((1, 2, 17, 5, 64), (3, 1, 1, 33, 32)),
    ((1, 1, 0, 8, 32), (2, 2, 40, 20, 32))])
def test_f32_pair_is_two_calls_bit_for_bit(first, second, threads):
    a, b = qkv32(*first, seed=1), qkv32(*second, seed=2)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        o1, o2 = ca.cpu_attention_pair(*a, *b, 0.19, 0.23)
        for got, want in ((o1, ca.cpu_attention(*a, 0.19)), (o2, ca.cpu_attention(*b, 0.23))):
            assert got.shape == want.shape and got.stride() == want.stride() and torch.equal(got, want)
        xs = [x.clone().requires_grad_() for x in (*a, *b)]
        ys = [x.clone().requires_grad_() for x in (*a, *b)]
        p1, p2 = ca.cpu_attention_pair(*xs, 0.19, 0.23)
        (p1.square().sum() + p2.sum()).backward()
        (ca.cpu_attention(*ys[:3], 0.19).square().sum() + ca.cpu_attention(*ys[3:], 0.23).sum()).backward()
        for x, y in zip(xs, ys):
            assert torch.equal(x.grad, y.grad)
    finally:
        torch.set_num_threads(before)


def test_f32_takes_only_what_it_can_run(monkeypatch):
    """fp32 that is not being exported, differentiated or not; never another head dim, mixed
    dtypes or a non-CPU tensor."""
    monkeypatch.setenv("FMFAST_CPU_ATTENTION_F32", "1")
    q, k, v = qkv32(1, 2, 9, 9, 32)
    assert ca.takes(q, k, v) == OK32
    assert not ca.takes(*qkv32(1, 2, 9, 9, 48))
    assert not ca.takes(q, k.bfloat16(), v)
    assert not ca.takes(q.double(), k.double(), v.double())
    assert not ca.takes(q.to("meta"), k.to("meta"), v.to("meta"))
    assert ca.takes(q.clone().requires_grad_(), k, v) == OK32


def test_f32_switched_off_says_why(monkeypatch):
    monkeypatch.setenv("FMFAST_CPU_ATTENTION", "0")
    clear_caches()
    try:
        ok, why = ca.available_f32()
        assert not ok and "FMFAST_CPU_ATTENTION=0" in why
        assert not ca.takes(*qkv32(1, 2, 9, 9, 32))
    finally:
        clear_caches()


@pytest.mark.parametrize("ask", ["auto", "1", "0", "yes"])
def test_f32_preference_by_cpu_and_environment(ask, monkeypatch):
    """By default the AVX2 kernels take fp32 only on CPUs without AVX-512 (where they were
    measured faster than SDPA); the environment can force either way; a bad value says so."""
    monkeypatch.setenv("FMFAST_CPU_ATTENTION_F32", ask)
    ok, why = ca.prefers_f32()
    q = qkv32(1, 2, 9, 9, 32)
    assert ca.takes(*q) == ok
    if not OK32:
        assert not ok and why == WHY32
    elif ask == "1":
        assert ok, why
    elif ask == "0":
        assert not ok and "FMFAST_CPU_ATTENTION_F32=0" in why
    elif ask == "yes":
        assert not ok and "not one of auto, 0, 1" in why
    else:
        assert ok == ("avx512f" not in ca._cpu_flags()), why


# ---- the C++ inference operators (csrc/cpu_attention_op.cpp) -------------------------------------
OK_OP, WHY_OP = ca._library_op()
needs_op = pytest.mark.skipif(not OK_OP, reason=f"the C++ inference operators are unavailable here: {WHY_OP}")
OP_DTYPES = [pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not OK, reason=f"no bf16 kernel: {WHY}")),
             pytest.param(torch.float32, marks=pytest.mark.skipif(not OK32, reason=f"no fp32 kernel: {WHY32}"))]


def model_views(b, h, n, d, dtype, seed=0):
    """q, k, v as the model makes them: strided views of one [B, N, 3, H, D] projection."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, 3, h, d, generator=g).to(dtype).permute(2, 0, 3, 1, 4).unbind(0)


def fmfast_ops(fn) -> list[str]:
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return sorted({e.name for e in prof.events() if e.name.startswith("fmfast::")})


@needs_op
@pytest.mark.parametrize("dtype", OP_DTYPES)
@pytest.mark.parametrize("b, h, n, m, d", [(2, 3, 401, 241, 32), (1, 2, 17, 5, 32), (3, 1, 33, 50, 64),
                                           (1, 1, 1, 1, 32), (2, 1, 100, 300, 64)])
def test_inference_operators_are_the_python_ops_bit_for_bit(dtype, b, h, n, m, d):
    """Without autograd, cpu_attention and cpu_attention_pair call the C++ operators: the same
    kernel entry, so the same bits and the same output layout as the Python ops, on the model's
    strided views and on contiguous ragged inputs alike."""
    q, _, _ = model_views(b, h, n, d, dtype)
    _, k, v = model_views(b, h, m, d, dtype, seed=1)
    q2 = torch.randn(b, h, m, d).to(dtype)
    sc, sc2 = d ** -0.5, 0.3
    forward = ca._attention_f32_fwd if dtype == torch.float32 else ca._attention_fwd
    pair = ca._attention_f32_pair_fwd if dtype == torch.float32 else ca._attention_pair_fwd
    want = forward(q, k, v, sc)[0]
    want1, _, want2, _ = pair(q, k, v, q2, q, q, sc, sc2)
    with torch.no_grad():
        got = ca.cpu_attention(q, k, v, sc)
        got1, got2 = ca.cpu_attention_pair(q, k, v, q2, q, q, sc, sc2)
    for g, w in ((got, want), (got1, want1), (got2, want2)):
        assert torch.equal(g, w) and g.stride() == w.stride() and g.dtype == dtype


@needs_op
@pytest.mark.parametrize("dtype", OP_DTYPES)
def test_only_calls_without_autograd_take_the_inference_operators(dtype):
    q, k, v = model_views(1, 2, 20, 32, dtype)
    with torch.no_grad():
        assert fmfast_ops(lambda: ca.cpu_attention(q, k, v, 0.2)) == ["fmfast::cpu_attention_infer"]
        assert fmfast_ops(lambda: ca.cpu_attention_pair(q, k, v, k, q, q, 0.2, 0.3)) == [
            "fmfast::cpu_attention_infer_pair"]
    with torch.inference_mode():
        assert fmfast_ops(lambda: ca.cpu_attention(q, k, v, 0.2)) == ["fmfast::cpu_attention_infer"]
    trained = fmfast_ops(lambda: ca.cpu_attention(q.clone().requires_grad_(), k, v, 0.2))
    assert "fmfast::cpu_attention_infer" not in trained and trained, trained


@needs_op
@pytest.mark.parametrize("dtype", OP_DTYPES)
def test_inference_operators_registration_compile_and_bad_inputs(dtype):
    q, k, v = (x.contiguous() for x in model_views(2, 3, 24, 32, dtype))
    torch.library.opcheck(torch.ops.fmfast.cpu_attention_infer.default, (q, k, v, 0.2))
    torch.library.opcheck(torch.ops.fmfast.cpu_attention_infer_pair.default, (q, k, v, k, q, q, 0.2, 0.3))
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b, c: ca.cpu_attention_pair(a, b, c, b, a, a, 0.2, 0.3), fullgraph=True)
    with torch.no_grad():
        want = ca.cpu_attention_pair(q, k, v, k, q, q, 0.2, 0.3)
        got = compiled(q, k, v)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="head dim 32 or 64"):
            ca.cpu_attention(q[..., :16], k[..., :16], v[..., :16], 0.2)
        with pytest.raises(RuntimeError, match="all bf16 or all fp32"):
            torch.ops.fmfast.cpu_attention_infer(q, k.double(), v, 0.2)
        with pytest.raises(RuntimeError, match="q \\[B, H, N, D\\] and k, v \\[B, H, M, D\\]"):
            ca.cpu_attention(q, k[:1], v[:1], 0.2)


def test_inference_operators_switched_off_or_unbuildable_say_why(monkeypatch):
    """FMFAST_CPU_ATTENTION_OP=0, or a failed C++ build: the reason, and calls without autograd
    keep the Python ops."""
    monkeypatch.setenv("FMFAST_CPU_ATTENTION_OP", "0")
    ca._library_op.cache_clear()
    try:
        ok, why = ca._library_op()
        assert not ok and "FMFAST_CPU_ATTENTION_OP=0" in why
        if OK:
            q, k, v = model_views(1, 2, 20, 32, torch.bfloat16)
            with torch.no_grad():
                assert fmfast_ops(lambda: ca.cpu_attention(q, k, v, 0.2)) == ["fmfast::cpu_attention_fwd"]
        monkeypatch.delenv("FMFAST_CPU_ATTENTION_OP")
        ca._library_op.cache_clear()
        ca._op_shim.cache_clear()

        def broken(*a, **k):
            raise RuntimeError("c++: fatal error: torch/library.h: No such file")
        monkeypatch.setattr(ca, "_build", broken)
        ok, why = ca._library_op()
        if OK or OK32:
            assert not ok and "its build failed" in why and "No such file" in why
    finally:
        monkeypatch.undo()
        ca._library_op.cache_clear()
        ca._op_shim.cache_clear()
        assert ca._library_op()[0] == OK_OP

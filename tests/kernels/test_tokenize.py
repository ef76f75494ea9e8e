"""Fused multiscale tokenizer (TRITON_INTERPRET=1 on CPU) against its plain-PyTorch twin, and the
twin against a literal reading of the reference model (einops rearrange + nearest interpolation).

Shapes stay tiny: the interpreter costs milliseconds per Triton op per program instance."""
import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from hypothesis import given, settings, strategies as st

import fmfast.kernels.tokenize as tk
from fmfast.kernels.tokenize import multiscale_tokenize, multiscale_tokenize_ref

_no_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton compiled path)")


def cuda(test):
    return pytest.mark.gpu(_no_cuda(test))

NAMES = ("cls", "norm_in.weight", "norm_in.bias", "proj.weight", "proj.bias", "norm_out.weight",
         "norm_out.bias", "pos")


def n_tokens(T, H, W, p, pf, dilations):
    return [(T // pf) * (H // d // p) * (W // d // p) for d in dilations]


def make_params(C, p, pf, D, n, seed=0, device="cpu"):
    """cls [1,1,D] and per-scale 7-tuples with non-trivial LayerNorm affine parameters."""
    g = torch.Generator().manual_seed(seed)
    K = C * p * p * pf

    def r(*s, scale=1.0, shift=0.0):
        return (shift + scale * torch.randn(*s, generator=g)).to(device)

    scales = [(r(K, scale=0.2, shift=1.0), r(K, scale=0.1), r(D, K, scale=K ** -0.5), r(D, scale=0.1),
               r(D, scale=0.2, shift=1.0), r(D, scale=0.1), r(1, m + (1 if i == 0 else 0), D))
              for i, m in enumerate(n)]
    return r(1, 1, D), scales


def make_video(shape, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).to(device)
    return (torch.rand(shape, generator=g) * 255).to(dtype).to(device)


def run(fn, video, cls, scales, grad_out=None, **kw):
    """Forward (and backward with ``grad_out``) on fresh copies of the parameters."""
    leaves = [cls.detach().clone().requires_grad_()]
    sc = []
    for sp in scales:
        sp = [t.detach().clone().requires_grad_() for t in sp]
        leaves += sp
        sc.append(sp)
    out = fn(video, leaves[0], sc, **kw)
    if grad_out is None:
        return out.detach(), None
    out.backward(grad_out)
    return out.detach(), [t.grad for t in leaves]


def _err(a, e):
    return (a.double() - e.double()).abs().max().item()


def grad_names(S):
    return ["cls"] + [f"scales.{s}.{n}" for s in range(S) for n in NAMES[1:]]


def assert_matches_ref(video, C, T, H, W, p, pf, D, dilations, frame_index=None, B=None, backward=True,
                       tol=2e-5, seed=0):
    n = n_tokens(T, H, W, p, pf, dilations)
    cls, scales = make_params(C, p, pf, D, n, seed=seed, device=video.device)
    B = B or video.shape[0]
    go = torch.randn(B, 1 + sum(n), D, generator=torch.Generator().manual_seed(seed + 1)).to(video.device)
    kw = dict(patch_size=p, frame_patch_size=pf, dilations=dilations, frame_index=frame_index)
    got, g_got = run(multiscale_tokenize, video, cls, scales, go if backward else None, **kw)
    want, g_want = run(multiscale_tokenize_ref, video, cls, scales, go if backward else None, **kw)
    assert got.shape == (B, 1 + sum(n), D) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    if backward:
        for name, a, e in zip(grad_names(len(dilations)), g_got, g_want):
            assert a is not None and a.shape == e.shape, name
            scale = max(1.0, e.abs().max().item())  # sums over many tokens: relative to their size
            torch.testing.assert_close(a, e, atol=tol * scale, rtol=tol, msg=lambda m: f"{name}: {m}")
    return got, g_got


# ---- the twin is the reference model's tokenizer ------------------------------------------------
def literal_reference(video, cls, scales, p, pf, dilations):
    """The reference code's steps: nearest interpolation to H/d x W/d, einops rearrange,
    LayerNorm -> Linear -> LayerNorm, cls concat, position add."""
    B, C, T, H, W = video.shape
    x = video.float()
    outs = []
    for i, (d, (wi, bi, w, b, wo, bo, pos)) in enumerate(zip(dilations, scales)):
        xs = F.interpolate(x, (T, H // d, W // d), mode="nearest") if d > 1 else x
        t = rearrange(xs, "b c (f pf) (h p1) (w p2) -> b (f h w) (p1 p2 pf c)", p1=p, p2=p, pf=pf)
        t = F.layer_norm(t, t.shape[-1:], wi, bi)
        t = F.layer_norm(F.linear(t, w, b), (w.shape[0],), wo, bo)
        if i == 0:
            t = torch.cat([cls.expand(B, -1, -1), t], 1)
        outs.append(t + pos)
    return torch.cat(outs, 1)


def test_ref_is_the_literal_reference():
    C, T, H, W, p, pf, D, dil = 3, 4, 16, 24, 4, 2, 24, (1, 2)
    video = make_video((2, C, T, H, W), torch.uint8)
    cls, scales = make_params(C, p, pf, D, n_tokens(T, H, W, p, pf, dil))
    want = literal_reference(video, cls, scales, p, pf, dil)
    got = multiscale_tokenize_ref(video, cls, scales, patch_size=p, frame_patch_size=pf, dilations=dil)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ---- kernel vs twin: forward and every parameter gradient, fp32 --------------------------------
CASES = {
    # name: (B, C, T, H, W, p, pf, D, dilations, dtype)
    "two_scales_uint8": (2, 3, 4, 16, 16, 4, 2, 24, (1, 2), torch.uint8),
    "batch1_float_nonsquare_odd_D": (1, 3, 6, 8, 24, 4, 3, 40, (1, 2), torch.float32),
    "three_scales_tiny_patch_dim": (2, 3, 2, 16, 16, 2, 1, 16, (1, 2, 4), torch.uint8),  # K = 12 < 16
    "patch_dim_two_chunks": (1, 3, 3, 8, 8, 4, 3, 20, (1, 2), torch.uint8),  # K = 144: chunks 128 + 16
    "dilation_3_only": (3, 3, 2, 12, 6, 2, 2, 17, (3,), torch.float64),
    "grey_channel": (2, 1, 4, 8, 16, 4, 2, 32, (1, 2), torch.uint8),
}


@pytest.mark.parametrize("name", list(CASES))
def test_forward_backward_fp32(name):
    B, C, T, H, W, p, pf, D, dil, dtype = CASES[name]
    video = make_video((B, C, T, H, W), dtype)
    assert_matches_ref(video, C, T, H, W, p, pf, D, dil)


@pytest.mark.parametrize("kind", ["uint8_saturated", "float_tiny_variance"])
def test_flat_and_saturated_patches(kind):
    """Black, white and nearly flat tubelets (a saturated furnace frame) and a patch whose variance
    is below eps: where fp32 itself is ill-conditioned, judged against float64 (error at most twice
    the fp32 twin's, plus a floor). The tiny-variance patch makes eps matter."""
    B, C, T, H, W, p, pf, D, dil = 1, 3, 2, 8, 16, 4, 2, 16, (1, 2)
    g = torch.Generator().manual_seed(0)
    if kind == "uint8_saturated":
        video = torch.full((B, C, T, H, W), 255, dtype=torch.uint8)
        video[..., :, :4] = 0
        video[..., :4, 8:12] = 200
        video[0, 0, 0, 0, 8] = 201  # one pixel off: variance ~ 1e-2 on a mean of 200
        video[..., 4:, 12:] = 254 + torch.randint(0, 2, (B, C, T, 4, 4), generator=g, dtype=torch.uint8)
    else:
        video = torch.rand(B, C, T, H, W, generator=g) * 255
        video[..., :4, :4] = 1e-3 * torch.randn(B, C, T, 4, 4, generator=g)  # variance 1e-6 < eps
        video[..., 4:, 4:8] = 17.0
    n = n_tokens(T, H, W, p, pf, dil)
    cls, scales = make_params(C, p, pf, D, n)
    go = torch.randn(B, 1 + sum(n), D, generator=g)
    kw = dict(patch_size=p, frame_patch_size=pf, dilations=dil)
    got, g_got = run(multiscale_tokenize, video, cls, scales, go, **kw)
    r32, g32 = run(multiscale_tokenize_ref, video, cls, scales, go, **kw)
    s64 = [[t.double() for t in sp] for sp in scales]
    r64, g64 = run(multiscale_tokenize_ref, video.double(), cls.double(), s64, go.double(), **kw)
    for name, a, lo, e in zip(["out"] + grad_names(len(dil)), [got] + g_got, [r32] + g32, [r64] + g64):
        floor = 2e-5 * max(1.0, e.abs().max().item())
        assert _err(a, e) <= 2 * _err(lo, e) + floor, name


def _single_pass_16bit(x, g, b, w, bp, lo, split):
    """The forward kernel's arithmetic in torch, rounding where it rounds: pixels shifted by each
    row's first one, LN sums of the shifted values, (x - xr) @ (gamma * W)^T with 16-bit operands
    and fp32 accumulation (``split``: float pixels as a hi + lo pair), then rstd * (acc - mean *
    c1) + c2 + bias. (The interpreter computes bf16 wrongly, so the 16-bit path is checked here.)"""
    xs = x.float() - x.float()[:, :1]
    mean = xs.mean(1, keepdim=True)
    rstd = 1 / torch.sqrt((xs * xs).mean(1, keepdim=True) - mean * mean + 1e-5)
    wg = (g.float() * w.float()).to(lo)
    hi = xs.to(lo)
    acc = hi.float() @ wg.float().T
    if split:
        acc += (xs - hi.float()).to(lo).float() @ wg.float().T
    return rstd * (acc - mean * wg.float().sum(1)) + (w.float() @ b.float() + bp.float())


@pytest.mark.parametrize("lo", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["uint8", "saturated", "channels_apart", "float_narrow"])
def test_single_pass_algebra_in_16_bit_is_as_accurate_as_autocast(kind, lo):
    """|single pass - float64| <= 2 |reference under autocast (LN fp32, Linear in 16 bits) - float64|
    at the patch width of the paper (K = 384), on pixels that stress the algebra: saturated and
    nearly flat patches (the shift must cancel exactly), channels far apart (large shifts), and
    float pixels of small spread (inexact in 16 bits: the hi + lo pair)."""
    gen = torch.Generator().manual_seed(0)
    M, K, D = 2048, 384, 96
    if kind == "uint8":
        x = torch.randint(0, 256, (M, K), generator=gen).double()
    elif kind == "saturated":
        x = torch.full((M, K), 255.0, dtype=torch.float64)
        x[: M // 2, ::7] = 254
        x[M // 4:, 5] = 0  # one dark pixel
    elif kind == "channels_apart":
        x = torch.cat([torch.full((M, K // 3), v) for v in (250.0, 120.0, 30.0)], 1).double()
        x += torch.randint(0, 5, (M, K), generator=gen).double()
    else:
        x = 0.5 + 0.01 * torch.randn(M, K, generator=gen, dtype=torch.float64)
    g = 1 + 0.1 * torch.randn(K, generator=gen, dtype=torch.float64)
    b = 0.1 * torch.randn(K, generator=gen, dtype=torch.float64)
    w = torch.randn(D, K, generator=gen, dtype=torch.float64) / K ** 0.5
    bp = 0.02 * torch.randn(D, generator=gen, dtype=torch.float64)
    truth = F.linear(F.layer_norm(x, (K,), g, b, 1e-5), w, bp)
    xn = F.layer_norm(x.float(), (K,), g.float(), b.float(), 1e-5)
    autocast = xn.to(lo).float() @ w.to(lo).float().T + bp.float()
    got = _single_pass_16bit(x, g, b, w, bp, lo, split=kind == "float_narrow")
    assert _err(got, truth) <= 2 * _err(autocast, truth) + 1e-4


def test_non_contiguous_permuted_video():
    B, C, T, H, W, p, pf, D, dil = 2, 3, 4, 16, 8, 4, 2, 24, (1, 2)
    base = make_video((B, T, H, W, C), torch.uint8)  # channels-last storage
    video = base.permute(0, 4, 1, 2, 3)
    assert not video.is_contiguous()
    got, _ = assert_matches_ref(video, C, T, H, W, p, pf, D, dil)
    want, _ = run(multiscale_tokenize, video.contiguous(), *make_params(C, p, pf, D, n_tokens(T, H, W, p, pf, dil)),
                  patch_size=p, frame_patch_size=pf, dilations=dil)
    torch.testing.assert_close(got, want, atol=0, rtol=0)  # strides change addresses, not values


def test_non_contiguous_sliced_video():
    B, C, T, H, W, p, pf, D, dil = 2, 3, 4, 8, 16, 4, 2, 16, (1, 2)
    big = make_video((B + 1, C + 1, T + 3, H + 2, 2 * W + 1), torch.float32)
    video = big[1:, 1:, 2:2 + T, 1:1 + H, 1::2]  # offsets and a stride-2 last axis
    assert video.shape == (B, C, T, H, W) and not video.is_contiguous()
    assert_matches_ref(video, C, T, H, W, p, pf, D, dil)


def clips_by_hand(store, index):
    """The frame-table convention spelled out: entry i is frame i, ~i is frame i mirrored along
    W, frames clamped into [0, N-1]."""
    N = store.shape[0]
    rows = [torch.stack([store[min(e if e >= 0 else ~e, N - 1)].flip(-1) if e < 0 else store[min(e, N - 1)]
                         for e in row.tolist()]) for row in index]
    return torch.stack(rows).permute(0, 2, 1, 3, 4)  # [B, C, T, H, W]


def test_frame_store_repeated_clamped_and_mirrored_indices():
    N, C, H, W, p, pf, D, dil = 5, 3, 8, 16, 4, 2, 24, (1, 2)  # H != W: the mirror is along W
    store = make_video((N, C, H, W), torch.uint8, seed=3)
    index = torch.tensor([[~0, ~2, 0, 0], [2, 2, 2, 4], [4, 7, ~9, 3]])  # repeats, past N, mirrored
    T, B = index.shape[1], index.shape[0]
    got, g_got = assert_matches_ref(store, C, T, H, W, p, pf, D, dil, frame_index=index, B=B)
    # same as materialising the clips by hand
    want, g_want = assert_matches_ref(clips_by_hand(store, index), C, T, H, W, p, pf, D, dil)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    for a, e in zip(g_got, g_want):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


def test_ops_gather_clip_reads_like_the_kernel():
    # fmfast.data.gather's clip gather (what the CPU data path runs) must read the same frames as the kernel
    from fmfast.data.gather import gather_clip

    store = make_video((5, 3, 4, 6), torch.uint8, seed=1)
    index = torch.tensor([[~3, ~0, 0, 4], [2, 5, 7, ~8]])
    torch.testing.assert_close(gather_clip(store, index), clips_by_hand(store, index), atol=0, rtol=0)


def test_frame_store_int32_transposed_table_and_strided_store():
    N, C, H, W, p, pf, D, dil = 6, 3, 8, 8, 4, 1, 16, (1, 2)
    store = make_video((N, H, W, C), torch.uint8, seed=5).permute(0, 3, 1, 2)  # channels-last store
    index = torch.tensor([[5, 0, 3], [1, 1, 2]], dtype=torch.int32).t()  # [B=3, T=2], non-contiguous
    assert not index.is_contiguous() and not store.is_contiguous()
    assert_matches_ref(store, C, 2, H, W, p, pf, D, dil, frame_index=index, B=3)


@settings(max_examples=6, deadline=None)
@given(B=st.integers(1, 3), C=st.sampled_from([1, 3]), p=st.sampled_from([2, 4]), pf=st.sampled_from([1, 2]),
       tg=st.integers(1, 2), dil=st.sampled_from([(1,), (1, 2), (2,), (1, 3)]), gh=st.integers(1, 2),
       gw=st.integers(1, 3), D=st.sampled_from([16, 24, 33]), u8=st.booleans(), store=st.booleans(),
       seed=st.integers(0, 99))
def test_hypothesis_shapes(B, C, p, pf, tg, dil, gh, gw, D, u8, store, seed):
    m = math.lcm(*dil)
    T, H, W = tg * pf, gh * m * p, gw * m * p
    dtype = torch.uint8 if u8 else torch.float32
    if store:  # a frame store and a table with repeated, clamped and mirrored (~i) entries
        index = torch.randint(-6, 6, (B, T), generator=torch.Generator().manual_seed(seed))
        assert_matches_ref(make_video((4, C, H, W), dtype, seed=seed), C, T, H, W, p, pf, D, dil,
                           frame_index=index, B=B, seed=seed)
    else:
        assert_matches_ref(make_video((B, C, T, H, W), dtype, seed=seed), C, T, H, W, p, pf, D, dil, seed=seed)


def test_paper_shape_forward_backward():
    """B=1, 10 frames of 64x64, 8x8x2 tubelets, D=96, dilations (1, 2) -> 1 + 320 + 80 tokens."""
    video = make_video((1, 3, 10, 64, 64), torch.uint8)
    got, _ = assert_matches_ref(video, 3, 10, 64, 64, 8, 2, 96, (1, 2), tol=3e-5)
    assert got.shape == (1, 401, 96)


@pytest.mark.parametrize("source", ["clip", "store"])
def test_gpu_block_sizes_under_the_interpreter(monkeypatch, source):
    """The GPU's tiles (forward 64 tokens x 16 columns, backward 16 x 32: ragged token blocks,
    several patch chunks) in the interpreter, since the CPU path picks larger ones. From a frame
    store the forward's 16-column chunks lie within one (channel, frame) of the 4 x 4 x 2
    tubelet, so it decodes each row's frame index once (ROW_FRAME); bwd_w's 32-column chunks
    straddle two frames and decode per pixel: both paths, with repeated, clamped and mirrored
    entries."""
    gpu_blocks = tk._blocks
    cuda_dev = torch.device("cuda")
    monkeypatch.setattr(tk, "_blocks", lambda D, K, device, backward=False: gpu_blocks(D, K, cuda_dev, backward))
    assert gpu_blocks(40, 96, cuda_dev)[1] == 16 and gpu_blocks(40, 96, cuda_dev, True)[1] == 32
    if source == "clip":
        video = make_video((2, 3, 4, 16, 24), torch.uint8)
        assert_matches_ref(video, 3, 4, 16, 24, 4, 2, 40, (1, 2))  # K = 96, 48 + 12 tokens
    else:
        store = make_video((6, 3, 16, 24), torch.uint8, seed=4)
        index = torch.tensor([[~0, ~0, 5, 9], [3, ~4, ~4, 1]])  # mirrored pairs, repeats, past N
        got, _ = assert_matches_ref(store, 3, 4, 16, 24, 4, 2, 40, (1, 2), frame_index=index, B=2)
        want, _ = assert_matches_ref(clips_by_hand(store, index), 3, 4, 16, 24, 4, 2, 40, (1, 2))
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_half_output_dtype():
    C, T, H, W, p, pf, D, dil = 3, 2, 8, 8, 4, 2, 16, (1, 2)
    video = make_video((2, C, T, H, W), torch.uint8)
    cls, scales = make_params(C, p, pf, D, n_tokens(T, H, W, p, pf, dil))
    kw = dict(patch_size=p, frame_patch_size=pf, dilations=dil, out_dtype=torch.float16)
    got = multiscale_tokenize(video, cls, scales, **kw)
    want = multiscale_tokenize_ref(video, cls, scales, **kw)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), want.float(), atol=4e-3, rtol=1e-3)


def test_backward_is_deterministic():
    C, T, H, W, p, pf, D, dil = 3, 2, 8, 8, 4, 2, 16, (1, 2)
    video = make_video((3, C, T, H, W), torch.uint8)
    cls, scales = make_params(C, p, pf, D, n_tokens(T, H, W, p, pf, dil))
    go = torch.randn(3, 1 + 4 + 1, D)
    kw = dict(patch_size=p, frame_patch_size=pf, dilations=dil)
    _, g1 = run(multiscale_tokenize, video, cls, scales, go, **kw)
    _, g2 = run(multiscale_tokenize, video, cls, scales, go, **kw)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


# ---- registration: one custom-op node for torch.compile / CUDA graphs ---------------------------
def _tiny_op_args():
    C, T, H, W, p, pf, D, dil = 1, 2, 8, 8, 4, 2, 16, [1, 2]
    n = n_tokens(T, H, W, p, pf, dil)
    cls, scales = make_params(C, p, pf, D, n)
    w_in, b_in, w, bp, w_out, b_out, pos = zip(*scales)
    params = [cls.reshape(D), torch.cat([x.reshape(-1, D) for x in pos])] + [
        torch.stack(x) for x in (w_in, b_in, w, bp, w_out, b_out)]
    params = [t.requires_grad_() for t in params]
    # save=True: the forward also returns z and the patch LN stats for the backward
    return (make_video((2, C, T, H, W), torch.uint8), None, *params, p, pf, dil, 1e-5, "float32", "float32", True)


def test_opcheck_custom_op():
    torch.library.opcheck(torch.ops.fmfast.multiscale_tokenize.default, _tiny_op_args(),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_compile_sees_one_node_forward_and_backward():
    """AOTAutograd traces the op through its fake impls: one node forward, one backward."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    C, T, H, W, p, pf, D, dil = 1, 2, 8, 8, 4, 2, 16, (1, 2)
    video = make_video((2, C, T, H, W), torch.uint8)
    cls, scales = make_params(C, p, pf, D, n_tokens(T, H, W, p, pf, dil))
    go = torch.randn(2, 6, D)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    def f(v, c, s):
        return multiscale_tokenize(v, c, s, patch_size=p, frame_patch_size=pf, dilations=dil)

    torch._dynamo.reset()
    compiled = torch.compile(f, backend=aot_autograd(fw_compiler=record, bw_compiler=record), fullgraph=True)
    got, g_got = run(compiled, video, cls, scales, go)
    want, g_want = run(f, video, cls, scales, go)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    for a, e in zip(g_got, g_want):
        torch.testing.assert_close(a, e, atol=0, rtol=0)
    targets = [str(nd.target) for g in graphs for nd in g.graph.nodes if nd.op == "call_function"]
    assert sum(t.startswith("fmfast.multiscale_tokenize.") for t in targets) == 1, targets
    assert sum(t.startswith("fmfast.multiscale_tokenize_backward.") for t in targets) == 1, targets


# ---- the compiler's form of the twin: the patch LayerNorm written out by dims ------------------
@pytest.mark.parametrize("shape, p, pf, dil", [((2, 3, 4, 16, 8), 4, 2, (1, 2)), ((1, 1, 3, 12, 12), 3, 3, (1,)),
                                               ((3, 2, 2, 8, 16), 2, 1, (1, 2, 4))])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_ref_for_compiler_matches_ref(shape, p, pf, dil, dtype):
    # forward and every parameter gradient within twice the flat F.layer_norm's fp32 error
    # against float64, including near-constant patches (variance under eps)
    B, C, T, H, W = shape
    video = make_video(shape, dtype)
    if dtype == torch.float32:
        video[..., :p, :p] = 17.0 + 1e-3 * torch.randn(B, C, T, p, p, generator=torch.Generator().manual_seed(5))
    n = n_tokens(T, H, W, p, pf, dil)
    cls, scales = make_params(C, p, pf, 8, n)
    go = torch.randn(B, 1 + sum(n), 8, generator=torch.Generator().manual_seed(2))
    kw = dict(patch_size=p, frame_patch_size=pf, dilations=dil)
    got, g_got = run(lambda *a, **k: multiscale_tokenize_ref(*a, for_compiler=True, **k), video, cls, scales, go, **kw)
    r32, g32 = run(multiscale_tokenize_ref, video, cls, scales, go, **kw)
    s64 = [[t.double() for t in sp] for sp in scales]
    r64, g64 = run(multiscale_tokenize_ref, video.double(), cls.double(), s64, go.double(), **kw)
    for name, a, lo, e in zip(["out"] + grad_names(len(dil)), [got] + g_got, [r32] + g32, [r64] + g64):
        assert _err(a, e) <= 2 * _err(lo, e) + 1e-5 * max(1.0, e.abs().max().item()), name


def test_compiled_fused_tokenizer_writes_the_norm_by_dims(monkeypatch):
    # the fused (CPU) path passes for_compiler only while torch.compile traces it; eagerly and on
    # the reference backend it is F.layer_norm, the published operation order
    from fmfast.nn.embed import ScaleParams, multiscale_tokens

    seen = []
    real = tk.multiscale_tokenize_ref
    monkeypatch.setattr(tk, "multiscale_tokenize_ref", lambda *a, for_compiler, **k: seen.append(for_compiler)
                        or real(*a, for_compiler=for_compiler, **k))
    C, T, H, W, p, pf, D, dil = 3, 2, 8, 8, 4, 2, 16, (1, 2)
    cls, scales = make_params(C, p, pf, D, n_tokens(T, H, W, p, pf, dil))
    scales = [ScaleParams(*sp) for sp in scales]
    kw = dict(patch_size=p, frame_patch_size=pf, dilations=dil)
    video = make_video((2, C, T, H, W), torch.uint8)
    eager = multiscale_tokens(video, cls, scales, backend="auto", **kw)
    ref = multiscale_tokens(video, cls, scales, backend="reference", **kw)
    torch._dynamo.reset()
    compiled = torch.compile(lambda v: multiscale_tokens(v, cls, scales, backend="auto", **kw), backend="eager")(video)
    assert seen == [False, False, True]
    torch.testing.assert_close(compiled, eager, atol=2e-5, rtol=2e-5)
    assert torch.equal(eager, ref)


# ---- dispatch: fmfast.nn.multiscale_tokens and the drop-in module --------------------------------
def _module_pair(**kw):
    from fmfast.nn import MultiscaleTubeletEmbed

    torch.manual_seed(0)
    a = MultiscaleTubeletEmbed(**kw, backend="fast")
    with torch.no_grad():
        for t in a.parameters():
            t.add_(0.1 * torch.randn_like(t))
    b = MultiscaleTubeletEmbed(**kw, backend="reference")
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("frame_store", [False, True])
def test_module_fast_backend_is_the_reference_backend(frame_store):
    fast, ref = _module_pair(frame_hw=(16, 8), num_frames=4, patch_size=4, frame_patch_size=2, dim=24)
    if frame_store:
        args = (make_video((6, 3, 16, 8), torch.uint8), torch.tensor([[0, 0, 1, 2], [5, 4, 4, 3]]))
    else:
        args = (make_video((2, 3, 4, 16, 8), torch.uint8),)
    got, want = fast(*args), ref(*args)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    go = torch.randn_like(want)
    got.backward(go)
    want.backward(go)
    for (name, a), b in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_dispatch_backends_and_video_gradient():
    from fmfast.nn.embed import ScaleParams, multiscale_tokens

    C, T, H, W, p, pf, D, dil = 3, 2, 8, 8, 4, 2, 16, (1, 2)
    cls, scales = make_params(C, p, pf, D, n_tokens(T, H, W, p, pf, dil))
    scales = [ScaleParams(*sp) for sp in scales]
    kw = dict(patch_size=p, frame_patch_size=pf, dilations=dil)
    video = make_video((1, C, T, H, W), torch.float32).requires_grad_()
    with pytest.raises(ValueError, match="backend must be one of"):
        multiscale_tokens(video, cls, scales, backend="cuda", **kw)
    with pytest.raises(ValueError, match="no gradient for the video"):
        multiscale_tokens(video, cls, scales, backend="fast", **kw)
    multiscale_tokens(video, cls, scales, backend="auto", **kw).sum().backward()  # the PyTorch path
    assert video.grad is not None and video.grad.abs().sum() > 0


@cuda
def test_cuda_model_tokenizer_auto_is_triton():
    from fmfast.nn import MultiscaleTubeletEmbed

    torch.manual_seed(0)
    emb = MultiscaleTubeletEmbed(64, 10, 8, 2, 96).cuda()
    video = make_video((3, 3, 10, 64, 64), torch.uint8, device="cuda")
    got = emb(video)
    emb.backend = "reference"
    torch.testing.assert_close(got, emb(video), atol=1e-4, rtol=1e-4)
    emb.backend = "auto"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        emb(video)
        torch.cuda.synchronize()
    assert any("_tokenize_fwd" in e.name for e in prof.events())


# ---- the GPU compiler's view, without a GPU --------------------------------------------------------
_LOWER_TO_SM90 = r"""
import os, sys
import torch
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
import fmfast.kernels.tokenize as tk

geo = dict(B=256, B_CHUNK=4, NBLK=14, H=64, W=64, TG=5, D=96, N_OUT=401, d0=1, d1=2, d2=1, d3=1,
           s_h=64, s_w=1, s_it=1)
clip = dict(n_store=1, s_b=122880, s_c=40960, s_t=4096, s_ib=0)
store = dict(n_store=300000, s_b=12288, s_c=4096, s_t=0, s_ib=10)
for fn, store_mode, cdt in [(tk._tokenize_fwd, False, tl.float32), (tk._tokenize_bwd_tok, True, tl.bfloat16),
                            (tk._tokenize_bwd_w, False, tl.float32)]:
    ints = dict(geo, **(store if store_mode else clip))
    BM, BK, BD, nw = tk._blocks(96, 384, torch.device("cuda"), backward=fn is not tk._tokenize_fwd)
    meta = dict(C=3, P=8, PF=2, FRAME_STORE=store_mode, BM=BM, BK=BK, BD=BD, CDT=cdt, SAVE=True)
    sig, consts = {}, {}
    for a in fn.arg_names:
        if a in meta or ints.get(a) == 1:
            sig[a], consts[a] = "constexpr", meta.get(a, 1)
        elif a.endswith("_ptr"):
            lo = "*bf16" if cdt == tl.bfloat16 else "*fp32"
            sig[a] = {"src_ptr": "*u8", "idx_ptr": "*i64" if store_mode else "*u8", "out_ptr": lo, "dz_ptr": lo,
                      "z_ptr": lo, "w_ptr": lo, "wg_ptr": lo}.get(a, "*fp32")
        else:
            sig[a] = "fp32" if a == "eps" else "i32"
    k = compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32), options={"num_warps": nw})
    assert k.asm.get("cubin"), fn.__name__
    print(fn.__name__, "ok", k.metadata.shared, "bytes shared")
# the reduction launch: fp32 partials in, bf16 gradients out (parameters of any float dtype)
fn = tk._tokenize_bwd_sum
sig = {a: ("*i64" if a == "order_ptr" else "*bf16" if a.startswith("g_") else "*fp32") if a.endswith("_ptr")
       else ("constexpr" if a in ("BD", "BK") else "i32") for a in fn.arg_names}
k = compile(ASTSource(fn, sig, dict(BD=128, BK=128)), target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
assert k.asm.get("cubin"), fn.__name__
print(fn.__name__, "ok", k.metadata.shared, "bytes shared")
# the weight permutation: fp32 parameters in, bf16 W out
fn = tk._tokenize_prep
sig = {a: ("*i64" if a == "order_ptr" else "*bf16" if a in ("wk_ptr", "wgk_ptr") else "*fp32") if a.endswith("_ptr")
       else ("constexpr" if a == "BK" else "i32") for a in fn.arg_names}
k = compile(ASTSource(fn, sig, dict(BK=128)), target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
assert k.asm.get("cubin"), fn.__name__
print(fn.__name__, "ok", k.metadata.shared, "bytes shared")
"""


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the compiled tests run the kernels themselves")
def test_kernels_lower_to_sm90_cubin(lower_in_subprocess):
    """Compile the kernels for an H100/H200 (sm_90) down to cubin with Triton's bundled ptxas: the
    GPU compiler rejects things the interpreter accepts (tl.dot shapes and dtypes, scalar types)."""
    out = lower_in_subprocess(_LOWER_TO_SM90)
    assert out.count(" ok ") == 5, out


# ---- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,dil,p,pf,match", [
    ((1, 3, 4, 12, 12), (1, 2), 4, 2, "divisible by patch_size"),  # 12/2 = 6 not divisible by 4
    ((1, 3, 4, 9, 9), (1, 2), 3, 2, "divisible by patch_size"),  # 9 not divisible by d = 2
    ((1, 3, 5, 8, 8), (1,), 4, 2, "not divisible by frame_patch_size"),
    ((1, 3, 2, 8, 8), (1, 1, 1, 1, 1), 4, 2, "1 to 4 scales"),
    ((1, 3, 2, 8, 8), (0,), 4, 2, "positive"),
])
def test_unsupported_shapes_raise(shape, dil, p, pf, match):
    C = shape[1]
    cls, scales = make_params(C, p, pf, 16, [1] * len(dil))
    with pytest.raises(ValueError, match=match):
        multiscale_tokenize(torch.zeros(shape, dtype=torch.uint8), cls, scales, patch_size=p,
                            frame_patch_size=pf, dilations=dil)


def test_bad_arguments_raise():
    C, T, H, W, p, pf, D, dil = 3, 2, 8, 8, 4, 2, 16, (1, 2)
    n = n_tokens(T, H, W, p, pf, dil)
    cls, scales = make_params(C, p, pf, D, n)
    kw = dict(patch_size=p, frame_patch_size=pf, dilations=dil)
    video = make_video((1, C, T, H, W), torch.uint8)
    with pytest.raises(ValueError, match="proj_weight"):
        bad = [list(s) for s in scales]
        bad[1][2] = torch.zeros(D, 7)
        multiscale_tokenize(video, cls, bad, **kw)
    with pytest.raises(ValueError, match="pos_embedding"):
        bad = [list(s) for s in scales]
        bad[0][6] = torch.zeros(1, n[0], D)  # forgot the cls row
        multiscale_tokenize(video, cls, bad, **kw)
    with pytest.raises(ValueError, match="uint8 or float"):
        multiscale_tokenize(video.int(), cls, scales, **kw)
    with pytest.raises(ValueError, match=r"\[B, C, T, H, W\]"):
        multiscale_tokenize(video[0], cls, scales, **kw)
    with pytest.raises(ValueError, match="frame_index"):
        multiscale_tokenize(video[0].transpose(0, 1), cls, scales, frame_index=torch.zeros(1, T), **kw)
    with pytest.raises(ValueError, match="sets of scale weights"):
        multiscale_tokenize(video, cls, scales[:1], **kw)


# ---- GPU: compiled Triton, low precision, torch.compile, CUDA graphs ------------------------------

@cuda
@pytest.mark.parametrize("B", [1, 5])
def test_cuda_fp32_paper_shape(B):
    video = make_video((B, 3, 10, 64, 64), torch.uint8, device="cuda")
    assert_matches_ref(video, 3, 10, 64, 64, 8, 2, 96, (1, 2), tol=1e-4)


@cuda
def test_cuda_frame_store():
    store = make_video((40, 3, 64, 64), torch.uint8, device="cuda")
    index = torch.randint(-5, 45, (7, 10), device="cuda")
    assert_matches_ref(store, 3, 10, 64, 64, 8, 2, 96, (1, 2), frame_index=index, B=7, tol=1e-4)


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_autocast_matches_flash_attention_style(dtype):
    """|kernel - fp32 ref| <= 2 |torch at the same precision - fp32 ref| + floor, fwd and grads."""
    B, C, T, H, W, p, pf, D, dil = 8, 3, 10, 64, 64, 8, 2, 96, (1, 2)
    video = make_video((B, C, T, H, W), torch.uint8, device="cuda")
    n = n_tokens(T, H, W, p, pf, dil)
    cls, scales = make_params(C, p, pf, D, n, device="cuda")
    go = torch.randn(B, 1 + sum(n), D, device="cuda")
    kw = dict(patch_size=p, frame_patch_size=pf, dilations=dil)
    ref32, g32 = run(multiscale_tokenize_ref, video, cls, scales, go, **kw)
    with torch.autocast("cuda", dtype=dtype):
        ref_lo, g_lo = run(multiscale_tokenize_ref, video, cls, scales, go, **kw)
        got, g_got = run(multiscale_tokenize, video, cls, scales, go, **kw)
    assert got.dtype == ref_lo.dtype == torch.float32
    assert _err(got, ref32) <= 2 * _err(ref_lo, ref32) + 1e-3
    for name, a, lo, e in zip(grad_names(len(dil)), g_got, g_lo, g32):
        assert _err(a, e) <= 2 * _err(lo, e) + 1e-3 * max(1.0, e.abs().max().item()), name


@cuda
def test_cuda_bf16_output_and_params():
    video = make_video((4, 3, 10, 64, 64), torch.uint8, device="cuda")
    n = n_tokens(10, 64, 64, 8, 2, (1, 2))
    cls, scales = make_params(3, 8, 2, 96, n, device="cuda")
    kw = dict(patch_size=8, frame_patch_size=2, dilations=(1, 2))
    ref32 = multiscale_tokenize_ref(video, cls, scales, **kw)
    lo = [tuple(t.bfloat16() for t in s) for s in scales]
    got = multiscale_tokenize(video, cls.bfloat16(), lo, **kw)
    ref_lo = multiscale_tokenize_ref(video, cls.bfloat16(), lo, **kw)
    assert got.dtype == torch.bfloat16
    assert _err(got, ref32) <= 2 * _err(ref_lo, ref32) + 1e-2


@cuda
def test_cuda_torch_compile_and_graph_capture():
    B, p, pf, D, dil = 4, 8, 2, 96, (1, 2)
    video = make_video((B, 3, 10, 64, 64), torch.uint8, device="cuda")
    cls, scales = make_params(3, p, pf, D, n_tokens(10, 64, 64, p, pf, dil), device="cuda")
    kw = dict(patch_size=p, frame_patch_size=pf, dilations=dil)

    def f(v):
        return multiscale_tokenize(v, cls, scales, **kw)

    want = multiscale_tokenize_ref(video, cls, scales, **kw)
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(video), want, atol=1e-4, rtol=1e-4)
    static = video.clone()
    f(static)  # warm up (compiles the kernel) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = f(static)
    video2 = make_video(video.shape, torch.uint8, seed=9, device="cuda")
    static.copy_(video2)
    graph.replay()
    torch.testing.assert_close(out, multiscale_tokenize_ref(video2, cls, scales, **kw), atol=1e-4, rtol=1e-4)

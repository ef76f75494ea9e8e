"""Block-sparse attention kernel (TRITON_INTERPRET=1 on CPU) against the dense masked reference.

Shapes stay tiny: the interpreter costs about a millisecond per Triton op per program."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from fmfast.kernels.attention import block_sparse_attention, block_sparse_attention_ref, element_mask
from fmfast.kernels import layout as L

_no_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton compiled path)")


def cuda(test):
    return pytest.mark.gpu(_no_cuda(test))


def rand_qkv(b, h, n, d, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, device=device, dtype=torch.float32).to(dtype).requires_grad_()
            for _ in range(3)]


def run(fn, q, k, v, do, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kw)
    out.backward(do)
    return out.detach(), q.grad, k.grad, v.grad


def assert_matches_ref(lay, b=2, h=1, d=32, sm_scale=None, tol=2e-5, seed=0):
    q, k, v = rand_qkv(b, h, lay.seq_len, d, seed=seed)
    do = torch.randn(b, h, lay.seq_len, d, generator=torch.Generator().manual_seed(seed + 1))
    got = run(block_sparse_attention, q, k, v, do, layout=lay, sm_scale=sm_scale)
    want = run(block_sparse_attention_ref, q, k, v, do, layout=lay, sm_scale=sm_scale)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, e, atol=tol, rtol=tol, msg=lambda m, name=name: f"{name}: {m}")
    return got


# ---- layouts the kernel must honour -----------------------------------------------------------
LAYOUTS = {
    "self_ragged": lambda: L.self_attention_layout((37, 27), 16, 16, aligned=False),
    "cross_ragged": lambda: L.cross_attention_layout((37, 27), 16, 16, aligned=False),
    # blocks restart at each segment: short blocks whose padding holds the next block's tokens
    "self_aligned": lambda: L.self_attention_layout((37, 27), 16, 16, aligned=True),
    "cross_aligned": lambda: L.cross_attention_layout((37, 27), 16, 16, aligned=True),
    "mix_3seg_rect_blocks": lambda: L.segment_layout((5, 30, 29), [[1, 0, 0], [0, 1, 1], [1, 0, 1]], 16, 32),
    "mix_3seg_rect_aligned": lambda: L.segment_layout((5, 30, 29), [[1, 0, 0], [0, 1, 1], [1, 0, 1]], 16, 32,
                                                      aligned=True),
    "window_aligned": lambda: L.segment_layout((1, 60, 6), [[True] * 3] * 3, 16, 16, grid=(3, 4, 5),
                                               window=(3, 3, 3), grid_segment=1, aligned=True),
    "window": lambda: L.local_window_layout((3, 4, 5), (3, 3, 3), 1, 6, 16, 16),
    "causal_bits": lambda: L.from_mask_mod(_causal, 45, 16, 16),
    "block_mask": lambda: L.from_block_mask(torch.tensor([[1, 0, 1], [0, 0, 1], [1, 1, 0]], dtype=torch.bool),
                                            40, 16, 16),
}


def _causal(b, h, q, kv):
    return q >= kv


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_element_mask_is_the_layout_mask(name):
    """The reference's mask, rebuilt from the kernel's int32 inputs, is the layout's definition."""
    lay = LAYOUTS[name]()
    assert torch.equal(element_mask(lay), lay.dense_mask())


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_forward_backward_fp32(name):
    assert_matches_ref(LAYOUTS[name]())


def test_dkdv_overrides_reach_the_dkdv_launch_only(monkeypatch):
    """DKDV_OVERRIDES (the A/B lead's launch settings) change the dk/dv programs' launch and
    nothing else, and the gradients stay the reference's."""
    import fmfast.kernels.attention as ka

    kernel, seen = ka._bwd_kernel, []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append((kw["DKDV"], kw["num_stages"], kw["num_warps"]))
                return kernel[grid](*args, **kw)
            return launch

    monkeypatch.setattr(ka, "_bwd_kernel", Recorder())
    monkeypatch.setattr(ka, "DKDV_OVERRIDES", {"num_stages": 1, "num_warps": 8})
    assert_matches_ref(LAYOUTS["cross_ragged"]())
    assert seen == [(False, 2, 4), (True, 1, 8)]


@pytest.mark.parametrize("d", [64, 128])
def test_head_dims(d):
    assert_matches_ref(L.cross_attention_layout((21, 19), 16, 16), b=1, h=1, d=d)


def test_batch1_several_heads_and_scale():
    assert_matches_ref(L.self_attention_layout((20, 25), 16, 16), b=1, h=3, sm_scale=0.3)


def test_empty_rows_are_zero_with_zero_grads():
    # segment 0 sees nothing: its rows are empty; segment 2 sees only segment 0 (whose keys exist)
    lay = L.segment_layout((10, 23, 12), [[0, 0, 0], [1, 1, 0], [1, 0, 0]], 16, 16)
    q, k, v = rand_qkv(1, 2, lay.seq_len, 32)
    out, lse = block_sparse_attention(q, k, v, lay, return_lse=True)
    assert torch.all(out[:, :, :10] == 0)
    assert torch.all(lse[:, :, :10] == float("-inf")) and torch.isfinite(lse[:, :, 10:]).all()
    (out * torch.randn_like(out)).sum().backward()
    for g in (q.grad, k.grad, v.grad):
        assert torch.isfinite(g).all()
    assert torch.all(q.grad[:, :, :10] == 0)
    # keys of segment 2 are seen by nobody: zero dk, dv
    assert torch.all(k.grad[:, :, 33:] == 0) and torch.all(v.grad[:, :, 33:] == 0)
    assert_matches_ref(lay, b=1, h=2)


def test_lse_is_the_logsumexp():
    lay = L.self_attention_layout((18, 30), 16, 16)
    q, k, v = rand_qkv(1, 1, lay.seq_len, 32)
    _, lse = block_sparse_attention(q, k, v, lay, sm_scale=0.5, return_lse=True)
    s = (q @ k.transpose(-1, -2) * 0.5).masked_fill(~lay.dense_mask(), float("-inf"))
    torch.testing.assert_close(lse, s.logsumexp(-1).detach(), atol=1e-5, rtol=1e-5)


def test_strided_inputs_from_packed_qkv():
    """q, k, v as views of one [B, N, 3, H, D] projection (what the module passes)."""
    lay = L.cross_attention_layout((17, 30), 16, 16)
    b, h, n, d = 2, 2, lay.seq_len, 32
    qkv = torch.randn(b, n, 3, h, d)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    out = block_sparse_attention(q, k, v, lay)
    torch.testing.assert_close(out, block_sparse_attention_ref(q, k, v, lay), atol=2e-5, rtol=2e-5)
    assert out.transpose(1, 2).is_contiguous()  # [B, N, H, D] storage: merging heads is a view


def test_fp16_interpreter():
    lay = L.cross_attention_layout((21, 27), 16, 16)
    q, k, v = rand_qkv(1, 2, lay.seq_len, 32)
    q16, k16, v16 = (t.detach().half() for t in (q, k, v))
    out = block_sparse_attention(q16, k16, v16, lay)
    assert out.dtype == torch.float16
    ref = block_sparse_attention_ref(q.detach(), k.detach(), v.detach(), lay)
    torch.testing.assert_close(out.float(), ref, atol=3e-3, rtol=3e-3)


@settings(max_examples=6, deadline=None)
@given(lengths=st.lists(st.integers(1, 30), min_size=2, max_size=3), data=st.data(),
       h=st.integers(1, 2), d=st.sampled_from([32, 64]))
def test_hypothesis_segment_layouts(lengths, data, h, d):
    s = len(lengths)
    allowed = data.draw(st.lists(st.lists(st.booleans(), min_size=s, max_size=s), min_size=s, max_size=s))
    lay = L.segment_layout(lengths, allowed, 16, 16, aligned=data.draw(st.sampled_from([None, True, False])))
    assert_matches_ref(lay, b=1, h=h, d=d, seed=data.draw(st.integers(0, 100)))


@pytest.mark.parametrize("bad,match", [
    (lambda q, lay: (q, q[..., :16].contiguous(), q), "share one"),
    (lambda q, lay: (q[..., :24], q[..., :24], q[..., :24]), "head dim"),
    (lambda q, lay: (q.half(), q, q), "dtype"),
    (lambda q, lay: (q[:, :, :-1],) * 3, "seq_len"),
])
def test_bad_input_raises(bad, match):
    lay = L.self_attention_layout((20, 20), 16, 16)
    q = torch.randn(1, 1, 40, 32)
    with pytest.raises(ValueError, match=match):
        block_sparse_attention(*bad(q, lay), lay)


def test_compiles_to_one_custom_op_node():
    """torch.compile traces the kernel as one opaque node (fake impl gives shapes)."""
    lay = L.self_attention_layout((20, 20), 16, 16)
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    q, k, v = (t.detach() for t in rand_qkv(1, 1, 40, 32))
    f = torch.compile(lambda q, k, v: block_sparse_attention(q, k, v, lay) * 2, backend=backend, fullgraph=True)
    out = f(q, k, v)
    torch.testing.assert_close(out, 2 * block_sparse_attention_ref(q, k, v, lay), atol=2e-5, rtol=2e-5)
    assert sum("block_sparse_attn_fwd" in s for s in seen) == 1


def test_opcheck():
    from fmfast.kernels.attention import register_layout

    lay = L.cross_attention_layout((9, 23), 16, 16)
    q, k, v = rand_qkv(1, 1, lay.seq_len, 32)
    args = (q, k, v, register_layout(lay), 32 ** -0.5)
    torch.library.opcheck(torch.ops.fmfast.block_sparse_attn_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# ---- GPU (compiled Triton): low precision with flash-attention style tolerances ---------------
def _err(a, b):
    return (a.float() - b.float()).abs().max().item()


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["self", "cross", "window"])
@pytest.mark.parametrize("d", [32, 64, 128])
def test_gpu_low_precision(dtype, kind, d):
    if kind == "window":
        lay = L.local_window_layout((4, 14, 14), (3, 5, 5), 1, 241, 64, 64)
    else:
        make = L.self_attention_layout if kind == "self" else L.cross_attention_layout
        lay = make((401, 241), 64, 64)
    q, k, v = rand_qkv(4, 3, lay.seq_len, d, device="cuda")
    do = torch.randn_like(q)
    mask = element_mask(lay, "cuda")
    ref = run(block_sparse_attention_ref, q, k, v, do, layout=lay, mask=mask)  # fp32
    low = [t.detach().to(dtype) for t in (q, k, v, do)]
    ref_low = run(block_sparse_attention_ref, *low, layout=lay, mask=mask)
    got = run(block_sparse_attention, *low, layout=lay)
    for name, a, e, r in zip(("out", "dq", "dk", "dv"), got, ref, ref_low):
        assert a.dtype == dtype
        assert _err(a, e) <= 2 * _err(r, e) + 1e-3, name


@cuda
def test_gpu_fp32_tight_and_cuda_graph():
    lay = L.cross_attention_layout((401, 241), 64, 64)
    q, k, v = rand_qkv(2, 3, lay.seq_len, 32, device="cuda")
    do = torch.randn_like(q)
    got = run(block_sparse_attention, q, k, v, do, layout=lay)
    want = run(block_sparse_attention_ref, q, k, v, do, layout=lay)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)
    # capture: static shapes, layout tensors already on the device
    qs, ks, vs = (t.detach().clone() for t in (q, k, v))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        block_sparse_attention(qs, ks, vs, lay)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = block_sparse_attention(qs, ks, vs, lay)
    qs.copy_(q.detach() * 0.5)
    g.replay()
    torch.testing.assert_close(out, block_sparse_attention_ref(qs, ks, vs, lay), atol=1e-4, rtol=1e-4)


@cuda
def test_gpu_compiled_matches_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    lay = L.local_window_layout((4, 14, 14), (3, 5, 5), 1, 241, 64, 64)
    q, k, v = rand_qkv(2, 4, lay.seq_len, 64, dtype=torch.bfloat16, device="cuda")
    do = torch.randn_like(q)
    bm = lay.to_block_mask("cuda")
    flex = torch.compile(flex_attention)
    want = run(lambda q, k, v: flex(q, k, v, block_mask=bm), q, k, v, do)
    fast = torch.compile(lambda q, k, v: block_sparse_attention(q, k, v, lay))
    got = run(fast, q, k, v, do)
    ref = run(block_sparse_attention_ref, *(t.detach().float() for t in (q, k, v, do)), layout=lay)
    for a, f, r in zip(got, want, ref):
        assert _err(a, r) <= 2 * _err(f, r) + 1e-2


# ---- the drop-in module: packed Triton path vs the reference path -----------------------------
def _module_pair(cross=True, dim=48, heads=2, dim_head=32, seed=0):
    import copy

    from fmfast.nn import MultiStreamAttention

    torch.manual_seed(seed)
    ref = MultiStreamAttention(dim, heads, dim_head, cross_attention=cross, backend="reference")
    for p in ref.parameters():  # LayerNorm defaults are 1/0: randomise so every weight matters
        p.data.add_(0.1 * torch.randn_like(p))
    fast = copy.deepcopy(ref)
    fast.backend, fast.block_size = "fast", 16
    return ref, fast


@pytest.mark.parametrize("cross", [True, False])
def test_multistream_attention_fast_matches_reference(cross):
    ref, fast = _module_pair(cross)
    assert list(fast.state_dict()) == list(ref.state_dict())
    x1, x2 = torch.randn(1, 37, 48), torch.randn(1, 21, 48)
    outs, grads = [], []
    for m in (ref, fast):
        a, b = x1.clone().requires_grad_(), x2.clone().requires_grad_()
        y1, y2 = m(a, b)
        ((y1 * torch.linspace(-1, 1, 48)).sum() + (y2 ** 2).sum()).backward()
        outs.append((y1.detach(), y2.detach()))
        grads.append([a.grad, b.grad] + [p.grad for p in m.parameters()])
    for a, e in zip(outs[1], outs[0]):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)
    for a, e in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


def test_multistream_backend_dispatch(monkeypatch):
    import fmfast.nn.attention as nn_attention
    from fmfast.nn import set_backend
    from fmfast.nn.attention import MultiStreamAttention

    _, fast = _module_pair()
    calls = []
    real = nn_attention.packed_attention
    monkeypatch.setattr(nn_attention, "packed_attention", lambda *a: calls.append(1) or real(*a))
    x1, x2 = torch.randn(1, 20, 48), torch.randn(1, 9, 48)
    set_backend(fast, "auto")
    fast(x1, x2)
    assert calls == []  # auto on CPU: the reference path
    set_backend(fast, "fast")
    fast(x1, x2)
    assert calls == [1, 1]  # one launch per phase
    with pytest.raises(ValueError, match="backend must be one of"):
        MultiStreamAttention(48, 2, 32, backend="cuda")


def test_multistream_compiles_without_tracing_layouts():
    """fullgraph compile (AOT forward + backward): two kernel nodes, no layout construction in
    the graph, same outputs and gradients as eager."""
    ref, fast = _module_pair()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return make_boxed_func(gm.forward)

    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    compiled = torch.compile(fast, backend=aot_autograd(fw_compiler=backend, bw_compiler=backend), fullgraph=True)
    x1, x2 = torch.randn(1, 21, 48), torch.randn(1, 13, 48)
    grads = []
    for m in (ref, compiled):
        a = x1.clone().requires_grad_()
        y1, y2 = m(a, x2)
        (y1.sum() + (y2 ** 2).sum()).backward()
        grads.append((y1.detach(), y2.detach(), a.grad))
    for g, e in zip(grads[1], grads[0]):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)
    fw, bw = graphs
    assert sum("block_sparse_attn_fwd" in n for n in fw) == 2
    assert sum("block_sparse_attn_bwd" in n for n in bw) == 2
    assert not any(op in n for n in fw for op in ("sort", "unique", "repeat_interleave", "scatter"))


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_multistream_paper_shape(dtype):
    ref, fast = _module_pair(dim=96, heads=3, dim_head=32)
    ref, fast = ref.cuda(), fast.cuda()
    fast.block_size = 64
    x1, x2 = torch.randn(8, 401, 96, device="cuda"), torch.randn(8, 241, 96, device="cuda")
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        got = fast(x1, x2)
        low = ref(x1, x2)
    want = ref(x1, x2)
    for a, l, e in zip(got, low, want):
        assert _err(a, e) <= 2 * _err(l, e) + 1e-4


# ---- the GPU compiler, without a GPU ----------------------------------------------------------
_LOWER_TO_SM90 = r"""
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
import fmfast.kernels.attention as ka

FLOATS = ("qk_scale", "sm_scale")
F32_PTRS = ("LSE", "DELTA")
INT_PTRS = ("KV_NUM", "KV_FULL", "KV_IDX", "Q_NUM", "Q_FULL", "Q_IDX", "QBITS", "KSEG", "COORDS", "EBITS", "QS", "KS")
# the paper's shape: 64 x 64 blocks, head_dim 32; bf16 and fp32 (3xTF32 dots); both backward roles
for lo, prec in (("bf16", "tf32"), ("fp32", "tf32x3")):
    for fn, role in ((ka._fwd_kernel, None), (ka._bwd_kernel, True), (ka._bwd_kernel, False)):
        meta = dict(BLOCK_M=64, BLOCK_N=64, HEAD_DIM=32, HAS_WINDOW=True, HAS_EBITS=True, DOT_PREC=prec, DKDV=role)
        sig, consts = {}, {}
        for a in fn.arg_names:
            if a in meta:
                sig[a], consts[a] = "constexpr", meta[a]
            elif a in FLOATS:
                sig[a] = "fp32"
            elif a in F32_PTRS:
                sig[a] = "*fp32"
            elif a in INT_PTRS:
                sig[a] = "*i32"
            elif a in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"):
                sig[a] = "*" + lo
            else:
                sig[a] = "i32"
        k = compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                    options={"num_warps": ka._warps(32, 64, 64), "num_stages": 2})
        assert k.asm.get("cubin"), fn.__name__
        print(fn.__name__, lo, "ok", k.metadata.shared, "bytes shared")
"""


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the compiled tests run the kernels themselves")
def test_kernels_lower_to_sm90_cubin(lower_in_subprocess):
    """Compile forward and backward for an H100/H200 (sm_90) down to cubin with Triton's bundled
    ptxas, in bf16 and fp32: the GPU compiler rejects things the interpreter accepts."""
    out = lower_in_subprocess(_LOWER_TO_SM90)
    assert out.count(" ok ") == 6, out

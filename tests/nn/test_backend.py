"""Backends: the fast path (Triton kernels, TRITON_INTERPRET=1 on CPU) against the reference
model with the same weights -- logits and every parameter gradient -- and switching backends
on a loaded checkpoint. Tiny shapes: the interpreter costs ~0.5 ms per program instance."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from fmfast import CurrentViT, FmFormer, ModelConfig, VideoViT, build_model
from fmfast.engine import checkpoints as ckpt
from fmfast.nn.backend import Dispatching, set_backend
from fmfast.nn import Attention, MultiscaleTubeletEmbed
from helpers.models import model_inputs as inputs
from fmfast.models import call as call_model

# head dim 16: the packed kernel's smallest; 41 video + 13 current tokens -> one 64-token block
TINY = dict(image_size=32, num_frames=4, dim=32, depth=1, heads=2, dim_head=16, mlp_dim=48, current_len=12)
GPU = torch.cuda.is_available()


def tiny(**kw) -> ModelConfig:
    seg = {"seg_hidden_dims": (8, 8, 8)} if kw.get("task") == "segmentation" else {}
    return ModelConfig(**{**TINY, **seg, **kw})


# CPU tensors through the Triton kernels: the interpreter (tests/conftest.py sets it unless told not to)
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="runs the Triton kernels on CPU tensors: needs TRITON_INTERPRET=1")


def pair(name, cfg, seed=0):
    """(reference model, fast model) with the same, non-trivial weights."""
    torch.manual_seed(seed)
    ref = build_model(name, cfg, backend="reference")
    with torch.no_grad():  # LayerNorm affines away from 1/0 so their gradients are exercised
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fast = build_model(name, cfg, backend="fast")
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def loss_and_grads(name, model, video, current):
    model.zero_grad(set_to_none=True)
    out = call_model(model, name, video, current)
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    (out * target).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


def assert_close_all(a: dict, b: dict, rtol=2e-4, atol=2e-5):
    assert a.keys() == b.keys()
    for k in a:
        if a[k] is None or b[k] is None:  # e.g. the last layer's current stream in segmentation
            assert a[k] is None and b[k] is None, k
            continue
        scale = a[k].abs().max().item()
        err = (a[k] - b[k]).abs().max().item()
        assert err <= atol + rtol * scale, f"{k}: max err {err:.3e} vs scale {scale:.3e}"


# --------------------------------------------------------------------------- parity

@pytest.mark.parametrize("name,task", [("fmformer", "classification"), ("fmformer", "segmentation"),
                                       ("video", "classification"), ("current", "classification")])
@interpreted
def test_fast_backend_matches_reference_logits_and_every_gradient(name, task):
    cfg = tiny(task=task)
    ref, fast = pair(name, cfg)
    # batch 2 once (batch indexing in the kernels), else 1: the interpreter's cost is per program
    video, current = inputs(cfg, b=2 if (name, task) == ("fmformer", "classification") else 1)
    want, want_g = loss_and_grads(name, ref, video, current)
    got, got_g = loss_and_grads(name, fast, video, current)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert_close_all(want_g, got_g)
    # every gradient the reference has is a real one (not all zero)
    assert all(g.abs().sum() > 0 for k, g in got_g.items() if g is not None and not (name == "video" and "mlp_head2" in k))


@interpreted
def test_fast_backend_really_runs_the_kernels(monkeypatch):
    """The fast model's forward goes through both Triton entry points (not a silent fallback)."""
    import fmfast.kernels.attention as ka
    import fmfast.kernels.tokenize as kt

    calls = {"tok": 0, "attn": 0}
    tok, attn = kt.multiscale_tokenize, ka.block_sparse_attention

    def count(key, fn):
        def wrapped(*a, **k):
            calls[key] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(kt, "multiscale_tokenize", count("tok", tok))
    monkeypatch.setattr(ka, "block_sparse_attention", count("attn", attn))
    cfg = tiny()
    _, fast = pair("fmformer", cfg)
    video, current = inputs(cfg, b=1)
    with torch.no_grad():
        fast(video, current)
    assert calls == {"tok": 1, "attn": 2 * cfg.depth}  # self phase + cross phase per layer
    calls.update(tok=0, attn=0)
    _, vfast = pair("video", cfg)
    with torch.no_grad():
        vfast(video)
    assert calls == {"tok": 1, "attn": cfg.depth}


@interpreted
def test_fast_frame_store_input_equals_clip_input():
    cfg = tiny()
    ref, fast = pair("fmformer", cfg)
    g = torch.Generator().manual_seed(3)
    store = torch.randint(0, 256, (9, 3, 32, 32), generator=g, dtype=torch.uint8)
    index = torch.tensor([[0, 2, 4, 8], [8, 8, 1, 0]])
    clip = store[index].permute(0, 2, 1, 3, 4)
    current = torch.randn(2, cfg.current_len, 3, generator=g)
    with torch.no_grad():
        a = fast(store, current, frame_index=index)
        b = ref(clip, current)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- same weights everywhere

@pytest.mark.parametrize("name", ["fmformer", "video", "current"])
def test_every_backend_has_the_same_parameters_and_keys(name):
    cfg = tiny()
    models = {b: build_model(name, cfg, backend=b) for b in ("auto", "reference", "fast")}
    keys = {b: [(k, tuple(v.shape)) for k, v in m.state_dict().items()] for b, m in models.items()}
    assert keys["auto"] == keys["reference"] == keys["fast"]
    counts = {sum(p.numel() for p in m.parameters()) for m in models.values()}
    assert len(counts) == 1


def test_published_parameter_count_under_the_fast_backend():
    assert sum(p.numel() for p in FmFormer(ModelConfig(), backend="fast").parameters()) == 1_923_466


def test_set_backend_keeps_parameter_objects_and_flags_every_module():
    cfg = tiny()
    for cls in (FmFormer, VideoViT, CurrentViT):
        m = cls(cfg, backend="reference")
        params = list(m.parameters())
        m.set_backend("fast")
        assert m.backend == "fast"
        assert [id(p) for p in m.parameters()] == [id(p) for p in params]
        flagged = [mod for mod in m.modules() if isinstance(mod, Dispatching)]
        assert flagged and all(mod.backend == "fast" for mod in flagged)
        if cls is not FmFormer:  # the single-stream encoder's branches dispatch too
            assert all(isinstance(layer[0], Attention) and layer[0].backend == "fast" for layer in m.transformer.layers)
        if cls is not CurrentViT:
            assert isinstance(m.video_embed, MultiscaleTubeletEmbed) and m.video_embed.backend == "fast"
        m.set_backend("reference")
        assert all(mod.backend == "reference" for mod in m.modules() if isinstance(mod, Dispatching))


def test_bad_backend_raises():
    with pytest.raises(ValueError, match="backend must be one of"):
        FmFormer(tiny(), backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        set_backend(VideoViT(tiny()), "gpu")


@interpreted
def test_wrapped_attention_shares_the_modules_and_runs_the_kernel():
    a = Attention(32, 2, 16, backend="reference")
    s = Attention.wrap(a, "fast")
    assert s.norm is a.norm and s.to_qkv is a.to_qkv and s.to_out is a.to_out
    x = torch.randn(2, 70, 32)  # 70 tokens: two blocks, the second ragged
    with torch.no_grad():
        torch.testing.assert_close(s(x), a(x), rtol=1e-4, atol=1e-5)


@interpreted
def test_switch_backends_on_a_loaded_checkpoint(tmp_path):
    cfg = tiny()
    ref, _ = pair("fmformer", cfg, seed=4)
    path = tmp_path / "m.pt"
    ckpt.save(path, ckpt.model_payload("fmformer", ref))
    model, meta = ckpt.load_model(path)
    assert meta["model_name"] == "fmformer"
    video, current = inputs(cfg, b=1, seed=5)
    with torch.no_grad():
        want = ref(video, current)
        model.set_backend("fast")
        fast = model(video, current)
        model.set_backend("reference")
        back = model(video, current)
    torch.testing.assert_close(fast, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(back, want)
    # and a training step after the switch moves the same weights both ways
    model.set_backend("fast")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = F.cross_entropy(model(video, current), torch.tensor([1]))
    loss.backward()
    opt.step()
    assert not torch.equal(model.state_dict()["head.mlp_head1.1.weight"], ref.state_dict()["head.mlp_head1.1.weight"])


# --------------------------------------------------------------------------- GPU only

_no_gpu = pytest.mark.skipif(not GPU, reason="needs CUDA: compiled Triton kernels and bf16/fp16 autocast on the GPU "
                                             "(bf16 arithmetic is not faithful in the CPU interpreter)")


def gpu(test):
    return pytest.mark.gpu(_no_gpu(test))


@gpu
@pytest.mark.parametrize("name", ["fmformer", "video", "current"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_fast_autocast_paper_shape(name, dtype):
    """Flash-attention-style tolerance: the fast error vs the fp32 reference is at most ~2x that of
    the reference run at the same low precision (plus a small floor), for logits and gradients."""
    cfg = ModelConfig()
    ref, fast = pair(name, cfg)
    ref, fast = ref.cuda(), fast.cuda()
    video, current = inputs(cfg, b=8, device="cuda")
    want, want_g = loss_and_grads(name, ref, video, current)
    with torch.autocast("cuda", dtype=dtype):
        low, low_g = loss_and_grads(name, ref, video, current)
        got, got_g = loss_and_grads(name, fast, video, current)

    def err(a, b):
        return (a.float() - b.float()).abs().max().item()

    floor = 1e-3
    assert err(got, want) <= 2 * err(low, want) + floor * max(1.0, want.abs().max().item())
    for k in want_g:
        if want_g[k] is None:  # unused by this model (the video ViT's second head)
            assert got_g[k] is None, k
            continue
        scale = max(1e-6, want_g[k].abs().max().item())
        assert err(got_g[k], want_g[k]) <= 2 * err(low_g[k], want_g[k]) + floor * scale, k


@gpu
def test_gpu_fast_fp32_matches_reference_and_auto_is_fast():
    cfg = ModelConfig()
    ref, fast = pair("fmformer", cfg)
    ref, fast = ref.cuda(), fast.cuda()
    auto = FmFormer(cfg).cuda()
    auto.load_state_dict(ref.state_dict())
    video, current = inputs(cfg, b=4, device="cuda")
    want, want_g = loss_and_grads("fmformer", ref, video, current)
    got, got_g = loss_and_grads("fmformer", fast, video, current)
    a, _ = loss_and_grads("fmformer", auto, video, current)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    assert torch.equal(a, got)  # auto on CUDA takes exactly the fast path
    assert_close_all(want_g, got_g, rtol=2e-3, atol=1e-4)

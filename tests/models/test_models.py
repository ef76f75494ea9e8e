"""Reference models and their building blocks: sizes, shapes, input handling, tokenizer math."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fmfast import CurrentViT, FmFormer, ModelConfig, VideoViT, build_model
from fmfast.models import MODELS
from fmfast.nn import CurrentEmbed, FeedForward, MultiscaleTubeletEmbed, MultiStreamAttention, MultiStreamFeedForward
from fmfast.kernels.tokenize import multiscale_tokenize_ref
from fmfast.nn import attention_ref
from helpers.models import model_inputs as inputs
from fmfast.models import call as call_model

TINY = dict(image_size=32, num_frames=4, dim=16, depth=2, heads=2, dim_head=8, mlp_dim=24, current_len=12)


def tiny(**kw) -> ModelConfig:
    seg = {"seg_hidden_dims": (8, 6, 4)} if kw.get("task") == "segmentation" else {}
    return ModelConfig(**{**TINY, **seg, **kw})


def nparams(m) -> int:
    return sum(p.numel() for p in m.parameters())


# --------------------------------------------------------------------------- sizes

def test_parameter_counts_equal_the_published_code():
    assert nparams(FmFormer(ModelConfig())) == 1_923_466
    assert nparams(FmFormer(ModelConfig(task="segmentation"))) == 2_419_848
    # the published count is the one with the dilated tokens (reference ADDITIONAL_TOKENS: True):
    # without them the tokenizer (37,920) and position table (80 x 96) of that scale are gone
    assert nparams(FmFormer(ModelConfig(dilated_tokens=False))) == 1_923_466 - 37_920 - 80 * 96


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_paper_shapes_batch1(task):
    cfg = ModelConfig(task=task)
    video, current = inputs(cfg, b=1)
    out = (1, 2) if task == "classification" else (1, 2, 64, 64)
    with torch.no_grad():
        for name in ("fmformer", "video"):
            assert call_model(build_model(name, cfg).eval(), name, video, current).shape == out
        if task == "classification":
            assert CurrentViT(cfg).eval()(current).shape == (1, 2)
    assert FmFormer(cfg).video_embed(video).shape == (1, 401, 96)
    assert FmFormer(cfg).current_embed(current).shape == (1, 241, 96)


@pytest.mark.parametrize("name", ["fmformer", "video", "current"])
@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_tiny_shapes(name, task):
    cfg = tiny(task=task)
    if name == "current" and task == "segmentation":
        with pytest.raises(ValueError, match="classification' only"):
            CurrentViT(cfg)
        return
    video, current = inputs(cfg, b=3)
    out = call_model(build_model(name, cfg), name, video, current)
    assert out.shape == ((3, 2) if task == "classification" else (3, 2, 32, 32))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_other_sizes(task):
    # rectangular frames, another clip length, depth, current length, width, classes; 1-frame tubelets
    cfg = ModelConfig(task=task, image_size=(48, 32), num_frames=6, frame_patch_size=1, depth=3, current_len=17,
                      dim=24, heads=3, dim_head=8, mlp_dim=32, num_classes=3, seg_hidden_dims=(8, 8, 4))
    video, current = inputs(cfg)
    m = FmFormer(cfg)
    tokens = m.video_embed(video)
    assert tokens.shape == (2, cfg.num_video_tokens, 24) == (2, 1 + 6 * 6 * 4 + 6 * 3 * 2, 24)
    out = m(video, current)
    assert out.shape == ((2, 3) if task == "classification" else (2, 3, 48, 32))
    assert len(m.transformer.layers) == 3 and m.current_embed(current).shape == (2, 18, 24)
    assert VideoViT(cfg)(video).shape == out.shape
    if task == "classification":
        # smaller patches and no dilated tokens
        cfg = ModelConfig(image_size=16, num_frames=2, patch_size=4, dilated_tokens=False, dim=16, depth=1, heads=2,
                          dim_head=8, mlp_dim=16, current_len=5)
        video, current = inputs(cfg)
        assert FmFormer(cfg).video_embed(video).shape == (2, 1 + 16, 16)
        assert FmFormer(cfg)(video, current).shape == (2, 2)
        assert CurrentViT(cfg)(current).shape == (2, 2)


def test_segmentation_needs_8x8_patches():
    with pytest.raises(ValueError, match="patch_size 8"):
        FmFormer(ModelConfig(task="segmentation", patch_size=4, image_size=32))


def test_build_model():
    for name, cls in MODELS.items():
        assert type(build_model(name, tiny())) is cls
    with pytest.raises(ValueError, match="unknown model 'vit'"):
        build_model("vit", tiny())


# --------------------------------------------------------------------------- inputs

@pytest.mark.parametrize("name", ["fmformer", "video"])
def test_uint8_and_float_inputs_agree(name):
    cfg = tiny(task="segmentation")
    video, current = inputs(cfg)
    m = build_model(name, cfg).eval()
    with torch.no_grad():
        a = call_model(m, name, video, current)
        b = call_model(m, name, video.float(), current)
        c = call_model(m, name, video.double(), current)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_frame_store_input_equals_clip_input():
    cfg = tiny()
    g = torch.Generator().manual_seed(1)
    store = torch.randint(0, 256, (9, 3, 32, 32), generator=g, dtype=torch.uint8)
    index = torch.tensor([[0, 0, 0, 1], [5, 6, 7, 8], [3, 3, 8, 2]])  # clamped starts, repeats, any order
    clip = torch.stack([store[i] for i in index]).permute(0, 2, 1, 3, 4)  # [B, 3, T, H, W]
    current = torch.randn(3, cfg.current_len, 3)
    m = FmFormer(cfg).eval()
    with torch.no_grad():
        assert torch.equal(m.video_embed(store, index), m.video_embed(clip))
        assert torch.equal(m(store, current, frame_index=index), m(clip, current))
        v = VideoViT(cfg).eval()
        assert torch.equal(v(store, index), v(clip))


def test_noncontiguous_video():
    cfg = tiny()
    video, _ = inputs(cfg)
    emb = FmFormer(cfg).video_embed
    wide = torch.zeros(2, 3, 4, 32, 64, dtype=torch.uint8)
    wide[..., ::2] = video
    view = wide[..., ::2]
    assert not view.is_contiguous()
    assert torch.equal(emb(view), emb(video))


def test_bad_inputs_raise_clear_errors():
    cfg = tiny()
    m = FmFormer(cfg)
    video, current = inputs(cfg)
    with pytest.raises(ValueError, match=r"video: expected shape \[B, 3, 4, 32, 32\].*got \[2, 3, 4, 32, 16\]"):
        m(video[..., :16], current)
    with pytest.raises(ValueError, match=r"video: expected shape"):
        m(video[:, :, 0], current)
    with pytest.raises(ValueError, match=r"current: expected shape \[B, 12, 3\], got \[2, 11, 3\]"):
        m(video, current[:, :11])
    with pytest.raises(ValueError, match="video batch 2 and current batch 1 differ"):
        m(video, current[:1])
    store = torch.zeros(5, 3, 32, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"frame_index: expected shape \[B, 4\]"):
        m.video_embed(store, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="frame_index: expected an integer"):
        m.video_embed(store, torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"frame store: expected shape \[N, 3, 32, 32\]"):
        m.video_embed(video, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible by dilation\\*patch_size = 2\\*8"):
        MultiscaleTubeletEmbed(24, 4, 8, 2, 16)
    with pytest.raises(ValueError, match="num_frames 5"):
        MultiscaleTubeletEmbed(32, 5, 8, 2, 16)
    with pytest.raises(ValueError, match="dilations must start with 1"):
        MultiscaleTubeletEmbed(32, 4, 8, 2, 16, dilations=(2,))


# --------------------------------------------------------------------------- tokenizer math

def _token(video, emb, scale, f, i, j):
    """One token computed by hand: tubelet (f, i, j) of ``scale``, vector order (p1, p2, pf, c)."""
    s = emb.scales[scale]
    d, p, pf = emb.dilations[scale], emb.patch_size, emb.frame_patch_size
    v = video.float()[0, :, f * pf:(f + 1) * pf, ::d, ::d][:, :, i * p:(i + 1) * p, j * p:(j + 1) * p]  # c pf p1 p2
    vec = torch.stack([v[c, k, r, q] for r in range(p) for q in range(p) for k in range(pf) for c in range(v.shape[0])])
    x = s.norm_out(s.proj(s.norm_in(vec)))
    t, h, w = emb.grids[scale]
    n = (f * h + i) * w + j
    return x + (s.pos_embedding[0, 1 + n] if scale == 0 else s.pos_embedding[0, n])


def test_tokens_by_hand():
    torch.manual_seed(0)
    emb = MultiscaleTubeletEmbed((32, 48), num_frames=4, patch_size=4, frame_patch_size=2, dim=8, dilations=(1, 2, 4))
    with torch.no_grad():
        for p in emb.parameters():
            p.add_(0.1 * torch.randn_like(p))
    video = torch.randint(0, 256, (1, 3, 4, 32, 48), dtype=torch.uint8)
    out = emb(video)
    assert emb.grids == ((2, 8, 12), (2, 4, 6), (2, 2, 3))
    assert out.shape == (1, 1 + 192 + 48 + 12, 8)
    torch.testing.assert_close(out[0, 0], emb.cls_token[0, 0] + emb.scales[0].pos_embedding[0, 0])
    offsets = (1, 1 + 192, 1 + 192 + 48)
    for scale, (f, i, j) in [(0, (0, 0, 0)), (0, (1, 7, 11)), (0, (1, 3, 5)), (1, (1, 2, 4)), (2, (1, 1, 2))]:
        t, h, w = emb.grids[scale]
        torch.testing.assert_close(out[0, offsets[scale] + (f * h + i) * w + j], _token(video, emb, scale, f, i, j))


def test_dilation_equals_reference_nearest_interpolation():
    # the reference resizes the clip with F.interpolate(mode='nearest') to 1/d of the frame size
    torch.manual_seed(0)
    video = torch.rand(2, 3, 4, 48, 32) * 255
    for d in (2, 4):
        emb = MultiscaleTubeletEmbed((48, 32), 4, 4, 2, 8, dilations=(1, d))
        small = F.interpolate(video, size=(4, 48 // d, 32 // d), mode="nearest")
        direct = MultiscaleTubeletEmbed((48 // d, 32 // d), 4, 4, 2, 8, dilations=(1,))
        s, s1 = direct.scales[0], emb.scales[1]
        with torch.no_grad():
            for name in ("norm_in", "proj", "norm_out"):
                getattr(s, name).load_state_dict(getattr(s1, name).state_dict())
            s.pos_embedding[:, 1:] = s1.pos_embedding
        assert torch.equal(emb(video)[:, 1 + emb.num_tokens[0]:], direct(small)[:, 1:])


def test_current_embed():
    torch.manual_seed(0)
    emb = CurrentEmbed(length=5, channels=3, dim=8)
    x = torch.randn(2, 5, 3) * 1000
    out = emb(x)
    assert out.shape == (2, 6, 8)
    torch.testing.assert_close(out[:, 0], (emb.cls_token + emb.pos_embedding[:, 0]).expand(2, 1, 8)[:, 0])
    torch.testing.assert_close(out[1, 3], emb.norm_out(emb.proj(emb.norm_in(x[1, 2]))) + emb.pos_embedding[0, 3])


# --------------------------------------------------------------------------- attention blocks

def test_attention_ref_matches_sdpa():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 7, 8), torch.randn(2, 3, 11, 8), torch.randn(2, 3, 11, 8)
    torch.testing.assert_close(attention_ref(q, k, v, 8 ** -0.5), F.scaled_dot_product_attention(q, k, v),
                               rtol=1e-5, atol=1e-5)


def test_block_state_dict_names():
    a = MultiStreamAttention(16, heads=2, dim_head=8)
    keys = set(a.state_dict())
    assert {"stream1.to_qkv.weight", "stream2.to_out.0.bias", "cross_attn.to_qkv1.weight", "cross_attn.to_qkv2.weight",
            "cross_attn.norm1.weight", "cross_attn.norm2.bias", "cross_attn.to_out1.0.weight",
            "cross_attn.to_out2.0.bias"} <= keys
    assert "stream1.to_qkv.bias" not in keys
    assert set(FeedForward(16, 24).state_dict()) == {f"net.{i}.{p}" for i in (0, 1, 4) for p in ("weight", "bias")}
    assert set(MultiStreamFeedForward(16, 24).state_dict()) == {
        f"ff{s}.net.{i}.{p}" for s in (1, 2) for i in (0, 1, 4) for p in ("weight", "bias")}


def test_cross_attention_reads_the_other_stream():
    torch.manual_seed(0)
    a = MultiStreamAttention(16, heads=2, dim_head=8).eval()
    x1, x2 = torch.randn(2, 5, 16), torch.randn(2, 9, 16)
    y1, y2 = a(x1, x2)
    assert y1.shape == x1.shape and y2.shape == x2.shape
    x2b = torch.randn_like(x2)  # (not x2 + 1: LayerNorm removes a constant shift)
    y1b, _ = a(x1, x2b)  # changing stream 2 changes stream 1's output only through cross-attention
    assert not torch.allclose(y1, y1b)
    a.cross_attn = None
    z1, _ = a(x1, x2)
    z1b, _ = a(x1, x2b)
    assert torch.equal(z1, z1b)


# --------------------------------------------------------------------------- training behaviour

@pytest.mark.parametrize("name,task", [("fmformer", "classification"), ("fmformer", "segmentation"),
                                       ("video", "segmentation"), ("current", "classification")])
def test_backward_reaches_every_parameter(name, task):
    cfg = tiny(task=task)
    torch.manual_seed(0)
    m = build_model(name, cfg).train()
    video, current = inputs(cfg)
    out = call_model(m, name, video, current)
    target = torch.randint(0, 2, out.shape[:1] + out.shape[2:])
    F.cross_entropy(out, target).backward()
    # segmentation reads only the video stream: the current stream's last updates (its last
    # cross-attention output and feed-forward) are dead weights, in the reference model too
    last = f"transformer.layers.{cfg.depth - 1}."
    dead = {f"{last}0.cross_attn.to_out2.0.", f"{last}1.ff2."} if (name, task) == ("fmformer", "segmentation") else set()
    for k, p in m.named_parameters():
        if any(k.startswith(d) for d in dead):
            assert p.grad is None, k
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), k
        assert p.grad.abs().sum() > 0, k


def test_video_vit_second_head_is_unused():
    m = VideoViT(tiny())
    video, _ = inputs(tiny())
    m(video).sum().backward()
    assert all(p.grad is None for p in m.head.mlp_head2.parameters())
    assert m.head.mlp_head1[1].weight.grad is not None


def test_autocast_bf16_cpu():
    cfg = tiny()
    m = FmFormer(cfg).eval()
    video, current = inputs(cfg)
    with torch.no_grad():
        ref = m(video, current)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(video, current)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1)


def test_tokenizer_op_is_the_module_math():
    # the module only validates and dispatches: its reference path is the kernel file's *_ref twin
    cfg = tiny()
    emb = FmFormer(cfg).video_embed
    video, _ = inputs(cfg)
    direct = multiscale_tokenize_ref(video, emb.cls_token, [s.params() for s in emb.scales], patch_size=8,
                                   frame_patch_size=2, dilations=(1, 2))
    assert torch.equal(direct, emb(video))


def test_import_is_light():
    code = "import sys, fmfast; bad = [m for m in ('matplotlib', 'h5py', 'decord') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"

"""Checkpoint interop with the reference code (GaochangWu/FMF-Benchmark).

The reference model is re-stated here as a *functional* forward over a state_dict with the
reference's key names (``official_forward``), written from the reference's structure, and as a
key/shape table (``official_spec``). fmfast's models, loaded with ``from_official``, must give
the same outputs; ``to_official`` must give exactly the reference's keys and shapes.
"""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange, repeat

import fmfast
from fmfast import CurrentViT, FmFormer, ModelConfig, VideoViT
from fmfast.errors import CheckpointMismatch
from fmfast.models.official_config import infer_config
from fmfast.models.registry import guess_official
from helpers.models import model_inputs as inputs
from fmfast.models import call as call_model

MODELS = {"fmformer": FmFormer, "video": VideoViT, "current": CurrentViT}

# tiny shapes: 32x32 frames, 4 frames, 8x8x2 tubelets -> 2x4x4 = 32 standard + 2x2x2 = 8 dilated tokens
TINY = dict(image_size=32, num_frames=4, dim=16, depth=2, heads=2, dim_head=8, mlp_dim=24, current_len=12)


def tiny(**kw) -> ModelConfig:
    # small decoder for segmentation; classification keeps the default (unused) widths
    seg = {"seg_hidden_dims": (8, 6, 4)} if kw.get("task") == "segmentation" else {}
    return ModelConfig(**{**TINY, **seg, **kw})


def relevant(kind: str, cfg: ModelConfig) -> dict:
    """The config fields a model of ``kind`` uses (the rest cannot be read from its checkpoint)."""
    d = cfg.to_dict()
    unused = {"video": ("current_len", "current_channels"),
              "current": ("image_size", "num_frames", "channels", "patch_size", "frame_patch_size",
                          "dilated_tokens", "seg_hidden_dims")}.get(kind, ())
    if cfg.task == "classification":
        unused += ("seg_hidden_dims",)
    return {k: v for k, v in d.items() if k not in unused}


# what from_official cannot read from tensors: the frame size (a token count does not split into
# clip length and frame size) and the head count (only heads * dim_head is a shape)
OV = dict(image_size=32, heads=2)


# --------------------------------------------------------------------------- the reference's keys

def official_spec(kind: str, cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Keys and shapes of the reference model's state_dict, in its order."""
    D, C = cfg.dim, cfg.num_classes
    inner = cfg.heads * cfg.dim_head
    t, h, w = cfg.grid
    pdim = cfg.channels * cfg.patch_size ** 2 * cfg.frame_patch_size
    n0, n1 = t * h * w, t * (h // 2) * (w // 2)

    def ln(name, n):
        return [(f"{name}.weight", (n,)), (f"{name}.bias", (n,))]

    def lin(name, i, o, bias=True):
        return [(f"{name}.weight", (o, i))] + ([(f"{name}.bias", (o,))] if bias else [])

    def attn(pre):
        return ln(f"{pre}.norm", D) + lin(f"{pre}.to_qkv", D, 3 * inner, False) + lin(f"{pre}.to_out.0", inner, D)

    def ff(pre):
        return ln(f"{pre}.net.0", D) + lin(f"{pre}.net.1", D, cfg.mlp_dim) + lin(f"{pre}.net.4", cfg.mlp_dim, D)

    def tok(stem, first):
        return ln(f"{stem}.{first}", pdim if first == 1 else cfg.current_channels) + lin(
            f"{stem}.{first + 1}", pdim if first == 1 else cfg.current_channels, D) + ln(f"{stem}.{first + 2}", D)

    def dilated():
        if not cfg.dilated_tokens:
            return []
        return [("get_additional_tokens.pos_embedding", (1, n1, D))] + tok("get_additional_tokens.to_patch_embedding", 1)

    def conv(name, i, o, k, transposed=False):
        return [(f"{name}.weight", (i, o, k, k) if transposed else (o, i, k, k)), (f"{name}.bias", (o,))]

    def rcu(pre, n):
        return conv(f"{pre}.conv1", n, n, 3) + ln(f"{pre}.bn1", n) + [
            (f"{pre}.bn1.running_mean", (n,)), (f"{pre}.bn1.running_var", (n,)), (f"{pre}.bn1.num_batches_tracked", ())]

    def head():
        if cfg.task == "classification":
            return ln("head.mlp_head1.0", D) + lin("head.mlp_head1.1", D, C) + ln("head.mlp_head2.0", D) + lin(
                "head.mlp_head2.1", D, C)
        h0, h1, h2 = cfg.seg_hidden_dims
        out = conv("head.de_patch_embedding.1", t * D, D, 1)
        if cfg.dilated_tokens:
            out += conv("head.de_patch_embedding_dilated.1", t * D, D, 1)
            out += conv("head.decode_dilated.0", D, D, 2, True) + rcu("head.decode_dilated.1", D)
        for i, (a, b) in enumerate([(D, h0), (h0, h1), (h1, h2)], 1):
            out += conv(f"head.decode{i}.0", a, b, 2, True) + rcu(f"head.decode{i}.1", b)
        return out + conv("head.decode_out", h2, C, 1)

    L = cfg.current_len
    if kind == "fmformer":
        keys = [("pos_embedding1", (1, n0 + 1, D)), ("cls_token1", (1, 1, D)),
                ("pos_embedding2", (1, L + 1, D)), ("cls_token2", (1, 1, D))]
        keys += tok("to_patch_embedding1", 1) + dilated() + tok("to_patch_embedding2", 0)
        for i in range(cfg.depth):
            p = f"transformer.layers.{i}"
            keys += attn(f"{p}.0.stream1") + attn(f"{p}.0.stream2")
            keys += ln(f"{p}.0.cross_attn.norm1", D) + ln(f"{p}.0.cross_attn.norm2", D)
            keys += lin(f"{p}.0.cross_attn.to_qkv1", D, 3 * inner, False) + lin(f"{p}.0.cross_attn.to_qkv2", D, 3 * inner, False)
            keys += lin(f"{p}.0.cross_attn.to_out1.0", inner, D) + lin(f"{p}.0.cross_attn.to_out2.0", inner, D)
            keys += ff(f"{p}.1.ff1") + ff(f"{p}.1.ff2")
        return keys + head()
    if kind == "video":
        keys = [("cls_token", (1, 1, D))] + tok("to_patch_embedding", 1) + [("pos_embedding.pe", (1, n0 + 1, D))]
        keys += dilated()
        for i in range(cfg.depth):
            keys += attn(f"transformer.layers.{i}.0") + ff(f"transformer.layers.{i}.1")
        return keys + head()
    keys = [("pos_embedding", (1, L + 1, D)), ("cls_token", (1, 1, D))] + tok("to_patch_embedding", 0)
    keys += ln("transformer.norm", D)
    for i in range(cfg.depth):
        keys += attn(f"transformer.layers.{i}.0") + ff(f"transformer.layers.{i}.1")
    return keys + lin("mlp_head", D, C)


def random_official(kind: str, cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A reference-named state_dict with random values everywhere (LN/BN affine and BN stats too)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in official_spec(kind, cfg):
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(shape, generator=g) + 0.5
        elif ".bn1." in k or k.endswith(("0.weight", "3.weight", "norm.weight", "norm1.weight", "norm2.weight")) and len(shape) == 1:
            sd[k] = 1 + 0.2 * torch.randn(shape, generator=g)
        else:
            fan = shape[-1] if len(shape) >= 2 else 4
            sd[k] = torch.randn(shape, generator=g) * (0.3 if "pos" in k or "cls" in k else fan ** -0.5)
    return sd


# --------------------------------------------------------------------------- the reference's forward

EPS = 1e-5


def _ln(x, sd, name):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], EPS)


def _lin(x, sd, name):
    return F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))


def _embed3(x, sd, stem, first):
    return _ln(_lin(_ln(x, sd, f"{stem}.{first}"), sd, f"{stem}.{first + 1}"), sd, f"{stem}.{first + 2}")


def _sdpa(q, k, v, heads):
    q, k, v = (rearrange(a, "b n (h d) -> b h n d", h=heads) for a in (q, k, v))
    a = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
    return rearrange(a @ v, "b h n d -> b n (h d)")


def _self_attn(x, sd, pre, heads):
    q, k, v = _lin(_ln(x, sd, f"{pre}.norm"), sd, f"{pre}.to_qkv").chunk(3, -1)
    return _lin(_sdpa(q, k, v, heads), sd, f"{pre}.to_out.0")


def _ff(x, sd, pre):
    return _lin(F.gelu(_lin(_ln(x, sd, f"{pre}.net.0"), sd, f"{pre}.net.1")), sd, f"{pre}.net.4")


def _video_tokens(sd, video, cfg, stem, pos_key, cls_key):
    p, pf = cfg.patch_size, cfg.frame_patch_size
    v = video.float()
    to_tubelets = "b c (f pf) (h p1) (w p2) -> b (f h w) (p1 p2 pf c)"
    x = _embed3(rearrange(v, to_tubelets, p1=p, p2=p, pf=pf), sd, stem, 1)
    x = torch.cat([repeat(sd[cls_key], "1 1 d -> b 1 d", b=x.shape[0]), x], 1)
    x = x + sd[pos_key][:, : x.shape[1]]
    if cfg.dilated_tokens:
        t, hh, ww = v.shape[2:]
        vd = F.interpolate(v, size=(t, hh // 2, ww // 2), mode="nearest")
        y = _embed3(rearrange(vd, to_tubelets, p1=p, p2=p, pf=pf), sd, "get_additional_tokens.to_patch_embedding", 1)
        x = torch.cat([x, y + sd["get_additional_tokens.pos_embedding"][:, : y.shape[1]]], 1)
    return x


def _current_tokens(sd, current, stem, pos_key, cls_key):
    x = _embed3(current, sd, stem, 0)
    x = torch.cat([repeat(sd[cls_key], "1 1 d -> b 1 d", b=x.shape[0]), x], 1)
    return x + sd[pos_key][:, : x.shape[1]]


def _rcu(x, sd, pre):
    # As the reference's module runs: its ReLU is inplace, so ``x`` itself is rectified before the skip add.
    out = torch.relu_(x)
    out = F.batch_norm(out, sd[f"{pre}.bn1.running_mean"], sd[f"{pre}.bn1.running_var"],
                       sd[f"{pre}.bn1.weight"], sd[f"{pre}.bn1.bias"], False, 0.0, EPS)
    out = F.conv2d(out, sd[f"{pre}.conv1.weight"], sd[f"{pre}.conv1.bias"], padding=1)
    return out + x


def _up(x, sd, pre):
    x = F.conv_transpose2d(x, sd[f"{pre}.0.weight"], sd[f"{pre}.0.bias"], stride=2)
    return _rcu(x, sd, f"{pre}.1")


def _head(sd, x1, x2, cfg):
    if cfg.task == "classification":
        out = _lin(_ln(x1[:, 0], sd, "head.mlp_head1.0"), sd, "head.mlp_head1.1")
        if x2 is not None:
            out = out + _lin(_ln(x2[:, 0], sd, "head.mlp_head2.0"), sd, "head.mlp_head2.1")
        return out
    t, h, w = cfg.grid
    tok = x1[:, 1:]
    n = t * h * w
    to_map = "b (t h w) c -> b (t c) h w"
    m = F.conv2d(rearrange(tok[:, :n], to_map, t=t, h=h, w=w), sd["head.de_patch_embedding.1.weight"],
                 sd["head.de_patch_embedding.1.bias"])
    if cfg.dilated_tokens:
        md = F.conv2d(rearrange(tok[:, n:], to_map, t=t, h=h // 2, w=w // 2),
                      sd["head.de_patch_embedding_dilated.1.weight"], sd["head.de_patch_embedding_dilated.1.bias"])
        m = m + _up(md, sd, "head.decode_dilated")
    for i in (1, 2, 3):
        m = _up(m, sd, f"head.decode{i}")
    return F.conv2d(m, sd["head.decode_out.weight"], sd["head.decode_out.bias"])


def official_forward(kind, sd, cfg, video=None, current=None):
    """The reference models' eval-mode forward, from a reference-named state_dict."""
    heads = cfg.heads
    if kind == "fmformer":
        x1 = _video_tokens(sd, video, cfg, "to_patch_embedding1", "pos_embedding1", "cls_token1")
        x2 = _current_tokens(sd, current, "to_patch_embedding2", "pos_embedding2", "cls_token2")
        for i in range(cfg.depth):
            p = f"transformer.layers.{i}"
            x1 = x1 + _self_attn(x1, sd, f"{p}.0.stream1", heads)
            x2 = x2 + _self_attn(x2, sd, f"{p}.0.stream2", heads)
            c = f"{p}.0.cross_attn"
            q1, k1, v1 = _lin(_ln(x1, sd, f"{c}.norm1"), sd, f"{c}.to_qkv1").chunk(3, -1)
            q2, k2, v2 = _lin(_ln(x2, sd, f"{c}.norm2"), sd, f"{c}.to_qkv2").chunk(3, -1)
            r1 = _lin(_sdpa(q1, k2, v2, heads), sd, f"{c}.to_out1.0")
            r2 = _lin(_sdpa(q2, k1, v1, heads), sd, f"{c}.to_out2.0")
            x1, x2 = x1 + r1, x2 + r2
            x1, x2 = x1 + _ff(x1, sd, f"{p}.1.ff1"), x2 + _ff(x2, sd, f"{p}.1.ff2")
        return _head(sd, x1, x2, cfg)
    if kind == "video":
        x = _video_tokens(sd, video, cfg, "to_patch_embedding", "pos_embedding.pe", "cls_token")
        for i in range(cfg.depth):
            x = x + _self_attn(x, sd, f"transformer.layers.{i}.0", heads)
            x = x + _ff(x, sd, f"transformer.layers.{i}.1")
        return _head(sd, x, None, cfg)
    x = _current_tokens(sd, current, "to_patch_embedding", "pos_embedding", "cls_token")
    for i in range(cfg.depth):
        x = x + _self_attn(x, sd, f"transformer.layers.{i}.0", heads)
        x = x + _ff(x, sd, f"transformer.layers.{i}.1")
    x = _ln(x, sd, "transformer.norm")
    return _lin(x[:, 0], sd, "mlp_head")


CASES = [("fmformer", "classification"), ("fmformer", "segmentation"), ("video", "classification"),
         ("video", "segmentation"), ("current", "classification")]


# --------------------------------------------------------------------------- key names

# fmformer, classification, depth 1, tiny shapes: every key and shape of the reference's state_dict, in order
EXPECTED_FMFORMER_DEPTH1 = [
    ("pos_embedding1", (1, 33, 16)), ("cls_token1", (1, 1, 16)), ("pos_embedding2", (1, 13, 16)),
    ("cls_token2", (1, 1, 16)),
    ("to_patch_embedding1.1.weight", (384,)), ("to_patch_embedding1.1.bias", (384,)),
    ("to_patch_embedding1.2.weight", (16, 384)), ("to_patch_embedding1.2.bias", (16,)),
    ("to_patch_embedding1.3.weight", (16,)), ("to_patch_embedding1.3.bias", (16,)),
    ("get_additional_tokens.pos_embedding", (1, 8, 16)),
    ("get_additional_tokens.to_patch_embedding.1.weight", (384,)),
    ("get_additional_tokens.to_patch_embedding.1.bias", (384,)),
    ("get_additional_tokens.to_patch_embedding.2.weight", (16, 384)),
    ("get_additional_tokens.to_patch_embedding.2.bias", (16,)),
    ("get_additional_tokens.to_patch_embedding.3.weight", (16,)),
    ("get_additional_tokens.to_patch_embedding.3.bias", (16,)),
    ("to_patch_embedding2.0.weight", (3,)), ("to_patch_embedding2.0.bias", (3,)),
    ("to_patch_embedding2.1.weight", (16, 3)), ("to_patch_embedding2.1.bias", (16,)),
    ("to_patch_embedding2.2.weight", (16,)), ("to_patch_embedding2.2.bias", (16,)),
    ("transformer.layers.0.0.stream1.norm.weight", (16,)), ("transformer.layers.0.0.stream1.norm.bias", (16,)),
    ("transformer.layers.0.0.stream1.to_qkv.weight", (48, 16)),
    ("transformer.layers.0.0.stream1.to_out.0.weight", (16, 16)), ("transformer.layers.0.0.stream1.to_out.0.bias", (16,)),
    ("transformer.layers.0.0.stream2.norm.weight", (16,)), ("transformer.layers.0.0.stream2.norm.bias", (16,)),
    ("transformer.layers.0.0.stream2.to_qkv.weight", (48, 16)),
    ("transformer.layers.0.0.stream2.to_out.0.weight", (16, 16)), ("transformer.layers.0.0.stream2.to_out.0.bias", (16,)),
    ("transformer.layers.0.0.cross_attn.norm1.weight", (16,)), ("transformer.layers.0.0.cross_attn.norm1.bias", (16,)),
    ("transformer.layers.0.0.cross_attn.norm2.weight", (16,)), ("transformer.layers.0.0.cross_attn.norm2.bias", (16,)),
    ("transformer.layers.0.0.cross_attn.to_qkv1.weight", (48, 16)),
    ("transformer.layers.0.0.cross_attn.to_qkv2.weight", (48, 16)),
    ("transformer.layers.0.0.cross_attn.to_out1.0.weight", (16, 16)),
    ("transformer.layers.0.0.cross_attn.to_out1.0.bias", (16,)),
    ("transformer.layers.0.0.cross_attn.to_out2.0.weight", (16, 16)),
    ("transformer.layers.0.0.cross_attn.to_out2.0.bias", (16,)),
    ("transformer.layers.0.1.ff1.net.0.weight", (16,)), ("transformer.layers.0.1.ff1.net.0.bias", (16,)),
    ("transformer.layers.0.1.ff1.net.1.weight", (24, 16)), ("transformer.layers.0.1.ff1.net.1.bias", (24,)),
    ("transformer.layers.0.1.ff1.net.4.weight", (16, 24)), ("transformer.layers.0.1.ff1.net.4.bias", (16,)),
    ("transformer.layers.0.1.ff2.net.0.weight", (16,)), ("transformer.layers.0.1.ff2.net.0.bias", (16,)),
    ("transformer.layers.0.1.ff2.net.1.weight", (24, 16)), ("transformer.layers.0.1.ff2.net.1.bias", (24,)),
    ("transformer.layers.0.1.ff2.net.4.weight", (16, 24)), ("transformer.layers.0.1.ff2.net.4.bias", (16,)),
    ("head.mlp_head1.0.weight", (16,)), ("head.mlp_head1.0.bias", (16,)),
    ("head.mlp_head1.1.weight", (2, 16)), ("head.mlp_head1.1.bias", (2,)),
    ("head.mlp_head2.0.weight", (16,)), ("head.mlp_head2.0.bias", (16,)),
    ("head.mlp_head2.1.weight", (2, 16)), ("head.mlp_head2.1.bias", (2,)),
]


def test_to_official_keys_hardcoded_depth1():
    sd = FmFormer(tiny(depth=1)).to_official()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == EXPECTED_FMFORMER_DEPTH1
    assert official_spec("fmformer", tiny(depth=1)) == EXPECTED_FMFORMER_DEPTH1


@pytest.mark.parametrize("dilated", [True, False])
@pytest.mark.parametrize("kind,task", CASES)
def test_to_official_matches_reference_keys(kind, task, dilated):
    cfg = tiny(task=task, dilated_tokens=dilated)
    sd = MODELS[kind](cfg).to_official()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == official_spec(kind, cfg)


@pytest.mark.parametrize("task,count", [("classification", 1_923_466), ("segmentation", 2_419_848)])
def test_reference_spec_parameter_count(task, count):
    # the key table above, at the paper config, has the published parameter counts (BN buffers excluded)
    spec = official_spec("fmformer", ModelConfig(task=task))
    n = sum(torch.Size(s).numel() for k, s in spec if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert n == count

def assert_logits_match(ours, ref):
    """1e-4 on logits of order one; relative to the output's size where random published-style
    weights (and BatchNorm statistics) blow the segmentation logits up to ~1e10."""
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4 * max(1.0, ref.abs().max().item()))


# --------------------------------------------------------------------------- same outputs as the reference

@pytest.mark.parametrize("kind,task", CASES)
def test_from_official_matches_reference_forward(kind, task):
    cfg = tiny(task=task)
    sd = random_official(kind, cfg, seed=1)
    model = MODELS[kind].from_official(sd, task=task, **OV).eval()
    assert relevant(kind, model.config) == relevant(kind, cfg)
    video, current = inputs(cfg)
    with torch.no_grad():
        ours = call_model(model, kind, video, current)
        ref = official_forward(kind, {k: v.clone() for k, v in sd.items()}, cfg, video, current)
    assert ours.shape == ref.shape
    assert ref.abs().max() > 1e-2  # the comparison is not between two near-zero tensors
    assert_logits_match(ours, ref)


def test_from_official_matches_reference_without_dilated_tokens():
    cfg = tiny(task="segmentation", dilated_tokens=False)
    sd = random_official("fmformer", cfg, seed=2)
    model = FmFormer.from_official(sd, heads=2).eval()
    assert model.config == cfg  # task and sizes inferred from the keys and shapes alone
    video, current = inputs(cfg)
    with torch.no_grad():
        assert_logits_match(model(video, current), official_forward("fmformer", sd, cfg, video, current))


def test_reference_residual_unit_rectifies_the_skip_path():
    # The check above is sensitive to the inplace-ReLU detail: with a plain ``x + conv(bn(relu(x)))``
    # skip the segmentation logits differ.
    cfg = tiny(task="segmentation")
    sd = random_official("fmformer", cfg, seed=3)
    model = FmFormer.from_official(sd, heads=2).eval()
    video, current = inputs(cfg)
    with torch.no_grad():
        ours = model(video, current)
        rcu = model.head.decode1[1]
        x = torch.randn(2, rcu.conv1.in_channels, 5, 5)
        assert torch.allclose(rcu(x), _rcu(x.clone(), sd, "head.decode1.1"), atol=1e-5)
        plain = x + rcu.conv1(rcu.bn1(torch.relu(x)))
        assert not torch.allclose(rcu(x), plain, atol=1e-3)
    assert ours.shape == (2, 2, 32, 32)


def test_paper_config_matches_reference_forward_batch1():
    for task in ("classification", "segmentation"):
        cfg = ModelConfig(task=task)
        sd = random_official("fmformer", cfg, seed=4)
        model = FmFormer.from_official(sd).eval()
        assert model.config == cfg
        video, current = inputs(cfg, b=1)
        with torch.no_grad():
            assert_logits_match(model(video, current), official_forward("fmformer", sd, cfg, video, current))


# --------------------------------------------------------------------------- round trip

@pytest.mark.parametrize("kind,task", CASES)
def test_round_trip_is_exact(kind, task):
    cfg = tiny(task=task)
    torch.manual_seed(0)
    a = MODELS[kind](cfg).eval()
    with torch.no_grad():
        for p in a.parameters():  # LayerNorm/bias defaults are 1/0; make every value count
            p.add_(0.1 * torch.randn_like(p))
    official = a.to_official()
    b = MODELS[kind].from_official(official, **OV).eval()
    assert relevant(kind, b.config) == relevant(kind, a.config)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    back = b.to_official()
    assert list(back) == list(official) and all(torch.equal(back[k], official[k]) for k in official)
    video, current = inputs(cfg)
    with torch.no_grad():
        assert torch.equal(call_model(a, kind, video, current), call_model(b, kind, video, current))


# --------------------------------------------------------------------------- config inference

def test_infers_paper_config_and_other_sizes():
    for task in ("classification", "segmentation"):
        sd = FmFormer(ModelConfig(task=task)).to_official()
        assert FmFormer.from_official(sd).config == ModelConfig(task=task)
    # other depth / current length / classes / width / mlp, no dilated tokens: read from the tensors
    cfg = tiny(depth=3, current_len=17, num_classes=4, dim=24, mlp_dim=40, heads=3, dim_head=8, dilated_tokens=False)
    sd = FmFormer(cfg).to_official()
    got = infer_config("fmformer", sd, "classification", image_size=32, heads=3)
    assert got == cfg
    # the clip length cannot be read from a classification checkpoint: num_frames is enough when frames are square
    cfg = tiny(num_frames=6)
    assert FmFormer.from_official(FmFormer(cfg).to_official(), num_frames=6, heads=2).config == cfg
    # the reference's video config: 8 frames at 64x64, found from the 64x64 default
    cfg = ModelConfig(num_frames=8, depth=1)
    assert relevant("video", VideoViT.from_official(VideoViT(cfg).to_official()).config) == relevant("video", cfg)
    cfg = ModelConfig(current_len=100, depth=2)
    assert relevant("current", CurrentViT.from_official(CurrentViT(cfg).to_official()).config) == relevant("current", cfg)


def test_ambiguous_geometry_asks_for_sizes():
    sd = FmFormer(tiny(image_size=40, num_frames=6, dilated_tokens=False)).to_official()  # 3 x 5 x 5 tokens
    with pytest.raises(CheckpointMismatch, match="image_size"):
        FmFormer.from_official(sd, heads=2)
    assert FmFormer.from_official(sd, image_size=40, heads=2).config.num_frames == 6


# --------------------------------------------------------------------------- files

def _save(obj, path):
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("wrap", ["plain", "model_state_dict", "state_dict", "model", "module"])
def test_reads_files(tmp_path, wrap):
    cfg = tiny()
    a = FmFormer(cfg)
    sd = a.to_official()
    obj = {"plain": sd, "model_state_dict": {"model_state_dict": sd, "epoch": 3},
           "state_dict": {"state_dict": sd}, "model": {"model": sd, "optimizer": {}},
           "module": {f"module.{k}": v for k, v in sd.items()}}[wrap]
    path = _save(obj, tmp_path / "ckpt.pth")
    b = FmFormer.from_official(path, **OV)
    b2 = FmFormer.from_official(str(path), **OV)
    for m in (b, b2):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), m.state_dict().values()))


def test_unreadable_files(tmp_path):
    bad = tmp_path / "corrupt.pth"
    buf = io.BytesIO()
    torch.save(FmFormer(tiny()).to_official(), buf)
    bad.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(CheckpointMismatch, match="corrupt.pth"):
        FmFormer.from_official(bad)  # noqa
    with pytest.raises(CheckpointMismatch, match="nothere.pth"):
        FmFormer.from_official(tmp_path / "nothere.pth")
    lst = _save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(CheckpointMismatch, match="list.pth.*dict"):
        FmFormer.from_official(lst)
    other = _save({"epoch": 3, "lr": torch.tensor(0.1), "note": "x"}, tmp_path / "notes.pth")
    with pytest.raises(CheckpointMismatch, match="notes.pth"):
        FmFormer.from_official(other)


# --------------------------------------------------------------------------- mismatches

def test_wrong_task_names_keys_and_hints():
    sd = FmFormer(tiny(task="segmentation")).to_official()
    with pytest.raises(CheckpointMismatch) as e:
        FmFormer.from_official(sd, task="classification", heads=2)
    msg = str(e.value)
    assert isinstance(e.value, ValueError)
    assert "missing keys (8): head.mlp_head1.* (4 keys), head.mlp_head2.* (4 keys); " in msg and "\n" not in msg
    assert "unexpected keys (42): head.de_patch_embedding.1.bias, head.de_patch_embedding.1.weight, " in msg
    assert "head.decode1.* (9 keys)" in msg and "head.decode_out.weight" in msg
    assert "pass task='segmentation'" in msg


def test_wrong_shapes_are_listed():
    cfg = tiny()
    sd = FmFormer(cfg).to_official()
    with pytest.raises(CheckpointMismatch) as e:
        FmFormer.from_official(sd, cfg=tiny(current_len=20))
    assert "pos_embedding2: checkpoint [1, 13, 16] vs model [1, 21, 16]" in str(e.value)
    sd["transformer.layers.1.1.ff2.net.4.weight"] = torch.zeros(16, 5)
    with pytest.raises(CheckpointMismatch, match=r"ff2.net.4.weight: checkpoint \[16, 5\] vs model \[16, 24\]"):
        FmFormer.from_official(sd, **OV)


def test_missing_and_unexpected_keys_are_listed():
    sd = FmFormer(tiny()).to_official()
    del sd["cls_token2"], sd["transformer.layers.0.0.cross_attn.to_qkv1.weight"]
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatch) as e:
        FmFormer.from_official(sd, **OV)
    msg = str(e.value)
    assert "missing keys (2): cls_token2, transformer.layers.0.0.cross_attn.to_qkv1.weight" in msg
    assert "unexpected keys (1): extra.weight" in msg


def test_other_models_checkpoint_is_named():
    sd = VideoViT(tiny()).to_official()
    with pytest.raises(CheckpointMismatch, match="VideoViT.from_official"):
        FmFormer.from_official(sd, **OV)
    with pytest.raises(CheckpointMismatch, match="ViTForVideo"):
        CurrentViT.from_official(sd, heads=2)


@pytest.mark.parametrize("kind,task", CASES)
def test_guess_official(kind, task, tmp_path):
    sd = MODELS[kind](tiny(task=task)).to_official()
    name, model = guess_official(_save(sd, tmp_path / "x.pth"), **OV)
    assert name == kind and isinstance(model, MODELS[kind]) and model.config.task == task
    with pytest.raises(CheckpointMismatch, match="not a reference"):
        guess_official({"foo.weight": torch.zeros(2)})


def test_public_names():
    assert fmfast.FmFormer is FmFormer and issubclass(fmfast.models.interop.CheckpointMismatch, ValueError)

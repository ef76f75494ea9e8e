"""``fmfast.swap_modules`` on stand-ins of the published classes (``helpers/reference_standin.py``: same
class names, attributes and forward semantics) and on fmfast's own reference model: outputs
unchanged, Parameters shared, a training step still works, unknown modules left alone. The fast
path runs under TRITON_INTERPRET=1; shapes are tiny (the interpreter is slow per program)."""
from __future__ import annotations

import copy
import os

from helpers import reference_standin as ref
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fmfast import FmFormer, ModelConfig, swap_modules
from fmfast.nn import Attention, MultiStreamAttention

# 32x32 frames, 4 frames, 8x8x2 tubelets: 32 + 8 dilated video tokens; head dim 16 (a kernel size)
KW = dict(image_size=32, image_patch_size=8, frames=4, frame_patch_size=2, num_classes=2, dim=32, depth=1,
          heads=2, mlp_dim=48, dim_head=16)


# CPU tensors through the Triton kernels: the interpreter (tests/conftest.py sets it unless told not to)
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="runs the Triton kernels on CPU tensors: needs TRITON_INTERPRET=1")



def vicu(**kw):
    torch.manual_seed(0)
    return ref.ViTForViCu(**{**KW, "current_patches": 12, "current_patch_dim": 3, "additional": True, **kw})


def data(b=1, seed=0, float_video=True):
    g = torch.Generator().manual_seed(seed)
    video = torch.randint(0, 256, (b, 3, 4, 32, 32), generator=g, dtype=torch.uint8)
    current = 3000 + 800 * torch.randn(b, 12, 3, generator=g)
    return (video.float() if float_video else video), current


def grads(model, *inputs, target=1):
    model.zero_grad(set_to_none=True)
    out = model(*inputs)
    F.cross_entropy(out, torch.full((out.shape[0],), target)).backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def same_grads(a, b, rtol=2e-4, atol=2e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


@interpreted
def test_vicu_swap_keeps_outputs_gradients_and_parameters():
    model = vicu()
    before = copy.deepcopy(model)
    params = {n: p for n, p in model.named_parameters()}
    video, current = data()
    want, want_g = grads(before, video, current)

    swapped = swap_modules(model, backend="fast")
    assert swapped is model  # swapped in place and returned, as torch.compile returns its module
    report = model.fmfast_swap_report
    kinds = [what for _, what in report.replaced]
    assert sum("MultiStreamAttention ->" in w for w in kinds) == KW["depth"]
    assert any("ViTForViCu.forward" in w for w in kinds)
    assert report.skipped == []
    assert isinstance(model.transformer.layers[0][0], MultiStreamAttention)
    # the very same Parameters, under the very same keys
    assert {n: id(p) for n, p in model.named_parameters()} == {n: id(p) for n, p in params.items()}
    assert list(model.state_dict()) == list(before.state_dict())

    got, got_g = grads(model, video, current)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    same_grads(want_g, got_g)
    # uint8 clips work too (the published forward needs float)
    with torch.no_grad():
        torch.testing.assert_close(model(video.to(torch.uint8), current), want, rtol=1e-4, atol=1e-4)


@interpreted
def test_vicu_swapped_model_trains_like_the_original():
    model, before = vicu(), vicu()
    swap_modules(model, backend="fast")
    video, current = data(seed=1)
    for m in (model, before):
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        F.cross_entropy(m(video, current), torch.tensor([0])).backward()
        opt.step()
    for (n, a), (_, b) in zip(model.state_dict().items(), before.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)


@interpreted
def test_swap_runs_the_original_forward_for_inputs_the_kernel_cannot_take(monkeypatch):
    model = vicu()
    swap_modules(model, backend="fast")
    calls = []
    orig = ref.ViTForViCu.forward
    monkeypatch.setattr(ref.ViTForViCu, "forward", lambda self, *a: calls.append(1) or orig(self, *a))
    video, current = data()
    video.requires_grad_(True)  # the fused tokenizer has no video gradient: original forward
    model(video, current).sum().backward()
    assert calls == [1] and video.grad is not None
    del model.forward  # undo: the class forward again
    model(video.detach(), current)
    assert calls == [1, 1]


@interpreted
@pytest.mark.parametrize("pe", ["learnable", "tri"])
def test_video_vit_swap(pe):
    torch.manual_seed(0)
    model = ref.ViTForVideo(**KW, PEType=pe, additional=True)
    before = copy.deepcopy(model)
    video, _ = data(seed=2)
    want, want_g = grads(before, video)
    report = swap_modules(model, backend="fast").fmfast_swap_report
    assert all(isinstance(layer[0], Attention) for layer in model.transformer.layers)
    assert any("ViTForVideo.forward" in w for _, w in report.replaced)
    got, got_g = grads(model, video)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    same_grads(want_g, got_g)


@interpreted
def test_current_vit_swap():
    torch.manual_seed(0)
    kw = {k: v for k, v in KW.items() if k not in ("image_size", "image_patch_size", "frames", "frame_patch_size")}
    model = ref.ViTForCurrent(num_patches=12, patch_dim=3, **kw)
    before = copy.deepcopy(model)
    _, current = data(b=2, seed=3)
    want, want_g = grads(before, current)
    report = swap_modules(model, backend="fast").fmfast_swap_report
    assert [w for _, w in report.replaced] == ["Attention -> fmfast.nn.Attention (same submodules)"] * KW["depth"]
    got, got_g = grads(model, current)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    same_grads(want_g, got_g)


def test_unknown_and_unfit_modules_are_left_alone():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.lookalike = nn.Linear(4, 4)
            self.lookalike.__class__ = type("Attention", (nn.Linear,), {})  # the name, not the structure
            self.dropped = ref.Attention(32, 2, 16, dropout=0.1)
            self.odd = ref.Attention(32, 2, 8)  # head dim 8: not a kernel size
            self.model = vicu(dropout=0.1)

    w = Wrapper()
    before = {n: type(m) for n, m in w.named_modules()}
    report = swap_modules(w, backend="fast").fmfast_swap_report
    skipped = dict(report.skipped)
    assert "attention dropout p=0.1" in skipped["dropped"]
    assert "head dim 8" in skipped["odd"]
    assert "not the published Attention structure" in skipped["lookalike"]
    assert "attention dropout" in skipped["model.transformer.layers.0.0"]
    # nothing of those was touched; the top-level forward (no dropout there) still swapped
    for n in ("conv", "lookalike", "dropped", "odd", "model.transformer.layers.0.0",
              "model.transformer.layers.0.0.stream1"):
        assert type(w.get_submodule(n)) is before[n]
    assert [n for n, _ in report.replaced] == ["model"]
    assert "swapped 1" in str(report) and "dropped" in str(report)


@interpreted
def test_fmfast_reference_model_gets_the_fast_backend():
    cfg = ModelConfig(image_size=32, num_frames=4, dim=32, depth=1, heads=2, dim_head=16, mlp_dim=48, current_len=12)
    torch.manual_seed(0)
    model = FmFormer(cfg, backend="reference")
    before = copy.deepcopy(model)
    report = swap_modules(model, backend="fast").fmfast_swap_report
    names = dict(report.replaced)
    assert names["video_embed"] == "MultiscaleTubeletEmbed: backend fast"
    assert names["transformer.layers.0.0"] == "MultiStreamAttention: backend fast"
    assert model.backend == "fast"
    video, current = data(float_video=False)
    with torch.no_grad():
        torch.testing.assert_close(model(video, current), before(video, current), rtol=1e-4, atol=1e-4)


def test_swap_rejects_an_attention_stage_as_the_model():
    with pytest.raises(ValueError, match="pass the model that holds it"):
        swap_modules(ref.Attention(32, 2, 16))

"""The CPU tubelet-LayerNorm kernel (``fmfast.kernels.cpu_patch_norm``): against float64 and its
fp32 twin on clips of several shapes (channels, patch and tubelet sizes, dilations, constant and
extreme tubelets), the sizes it refuses, its custom op, torch.compile, the tokenizer's dispatch and
the reasons it gives where it does not run."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fmfast.kernels import cpu_patch_norm as pn
from fmfast.nn.embed import MultiscaleTubeletEmbed

OK, WHY = pn.available()
needs_kernel = pytest.mark.skipif(not OK, reason=f"CPU patch-norm kernel unavailable here: {WHY}")


def clip(b, c, t, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randint(0, 256, (b, c, t, h, w), dtype=torch.uint8, generator=g)
    v[0, :, :, :8, :8] = 7  # constant tubelets (variance 0)
    v[-1, :, :, -8:, -8:] = torch.tensor([0, 255], dtype=torch.uint8).repeat(32)[:8]  # extremes
    return v


def exact(v, d, p, pf, w, b, eps=1e-5):
    x = v.double()[..., ::d, ::d]
    B, C, T, H, W = x.shape
    x = x.reshape(B, C, T // pf, pf, H // p, p, W // p, p).permute(0, 2, 4, 6, 5, 7, 3, 1).reshape(B, -1, p * p * pf * C)
    return F.layer_norm(x, w.shape, w.double(), b.double(), eps)


@needs_kernel
@pytest.mark.parametrize("shape,d,p,pf", [((2, 3, 10, 64, 64), 1, 8, 2), ((2, 3, 10, 64, 64), 2, 8, 2),
                                          ((1, 3, 4, 32, 48), 4, 4, 2), ((3, 1, 3, 16, 16), 1, 4, 1),
                                          ((1, 4, 2, 16, 32), 2, 4, 2)])
def test_matches_float64_like_its_fp32_twin(shape, d, p, pf):
    v = clip(*shape)
    K = p * p * pf * shape[1]
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(K, generator=g), torch.randn(K, generator=g)
    z, twin, want = pn.patch_norm(v, d, p, pf, w, b), pn.patch_norm_ref(v, d, p, pf, w, b), exact(v, d, p, pf, w, b)
    assert z.dtype == torch.bfloat16 and z.shape == want.shape
    ours, fp32 = ((t.double() - want).abs().max().item() for t in (z, twin))
    assert ours <= 2 * fp32 + 1e-3, (ours, fp32)
    # bf16 rounding of (nearly) the same fp32 value: at most one bf16 step apart
    assert ((z.float() - twin.float()).abs() <= twin.float().abs() * 2 ** -7 + 1e-6).all()


@needs_kernel
def test_sizes_it_does_not_take_raise_in_words():
    w = torch.ones(8)
    with pytest.raises(RuntimeError, match="unsupported sizes"):
        pn.patch_norm(torch.zeros(1, 1, 2, 4, 4, dtype=torch.uint8), 1, 2, 2, w, w)  # K = 8
    with pytest.raises(ValueError, match="uint8"):
        pn.patch_norm(torch.zeros(1, 3, 2, 16, 16), 1, 8, 2, torch.ones(384), torch.ones(384))
    with pytest.raises(ValueError, match=r"\[384\]"):
        pn.patch_norm(torch.zeros(1, 3, 2, 16, 16, dtype=torch.uint8), 1, 8, 2, w, w)


@needs_kernel
def test_custom_op_registration_and_compile():
    v = clip(2, 3, 4, 16, 16)
    w, b = torch.randn(384), torch.randn(384)
    torch.library.opcheck(pn._patch_norm, (v, 1, 8, 2, w, b, 1e-5),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    compiled = torch.compile(pn.patch_norm, fullgraph=True)
    assert torch.equal(compiled(v, 2, 4, 2, w[:96], b[:96]), pn.patch_norm(v, 2, 4, 2, w[:96], b[:96]))


def test_takes_only_uint8_clips_in_bf16_inference():
    v = torch.zeros(1, 3, 4, 16, 16, dtype=torch.uint8)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        assert pn.takes(v, 384) == OK
        assert not pn.takes(v.float(), 384)
        assert not pn.takes(v[0, :, 0], 384)  # a frame store
        assert not pn.takes(v, 8)  # K not a multiple of 16
    with torch.no_grad():
        assert not pn.takes(v, 384)  # fp32
    with torch.autocast("cpu", torch.bfloat16):
        assert not pn.takes(v, 384)  # records gradients


def ops_run(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def test_tokenizer_dispatch_and_parity():
    """The fused tokenizer takes the kernel for a uint8 clip in bf16 inference and gives what the
    same tokenizer gives without it (within twice that path's error against fp32); a frame store,
    training and the reference backend keep PyTorch's LayerNorm."""
    torch.manual_seed(0)
    emb = MultiscaleTubeletEmbed(frame_hw=32, num_frames=4, patch_size=8, frame_patch_size=2, dim=64,
                                 dilations=(1, 2)).eval()
    v = clip(3, 3, 4, 32, 32)
    with torch.no_grad():
        want = emb(v)
        with torch.autocast("cpu", torch.bfloat16):
            ran = ops_run(lambda: emb(v))
            fast = emb(v)
            store, index = v[0].transpose(0, 1), torch.arange(4)[None]  # [T, C, H, W] frames, one clip
            assert "fmfast::cpu_patch_norm" not in ops_run(lambda: emb(store, index))
            emb.backend = "reference"
            plain = emb(v)
            assert "fmfast::cpu_patch_norm" not in ops_run(lambda: emb(v))
            emb.backend = "auto"
    assert ("fmfast::cpu_patch_norm" in ran) == OK, WHY
    with torch.autocast("cpu", torch.bfloat16):
        assert "fmfast::cpu_patch_norm" not in ops_run(lambda: emb(v).float().sum().backward())
    e_fast, e_plain = ((t.float() - want).abs().max().item() for t in (fast, plain))
    assert e_fast <= 2 * e_plain + 2e-3, (e_fast, e_plain)


def test_off_switch_gives_its_reason(monkeypatch):
    try:
        monkeypatch.setenv("FMFAST_CPU_PATCH_NORM", "0")
        pn._library.cache_clear()
        assert pn.available() == (False, "turned off (FMFAST_CPU_PATCH_NORM=0)")
    finally:
        monkeypatch.undo()
        pn._library.cache_clear()

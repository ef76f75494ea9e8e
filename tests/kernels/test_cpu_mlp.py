"""The CPU feed-forward kernel (``fmfast.kernels.cpu_mlp``): against float64 and PyTorch's own bf16
Linear -> GELU -> Linear on the same inputs, on ragged row counts (not multiples of its 16-row
blocks, a single row), the sizes it takes, strided rows; the custom op's registration,
torch.compile, FeedForward's dispatch and the reasons it gives where it does not run."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fmfast.kernels import cpu_mlp as cm
from fmfast.nn.attention import FeedForward
from fmfast.nn.backend import set_backend

OK, WHY = cm.available()
needs_kernel = pytest.mark.skipif(not OK, reason=f"CPU feed-forward kernel unavailable here: {WHY}")


def weights(c, h, seed=0):
    g = torch.Generator().manual_seed(seed)
    w1, b1 = torch.randn(h, c, generator=g) / c ** 0.5, torch.randn(h, generator=g) * 0.1
    w2, b2 = torch.randn(c, h, generator=g) / h ** 0.5, torch.randn(c, generator=g) * 0.1
    return w1, b1, w2, b2


def errors(x, w1, b1, w2, b2):
    """(ours, PyTorch bf16) max abs error against float64 on the same bf16 inputs."""
    exact = F.linear(F.gelu(F.linear(x.double(), w1.double(), b1.double())), w2.double(), b2.double())
    ours = cm.cpu_mlp(x, w1, b1, w2, b2)
    lo = [t.bfloat16() for t in (w1, b1, w2, b2)]
    plain = F.linear(F.gelu(F.linear(x, lo[0], lo[1])), lo[2], lo[3])
    assert ours.dtype == torch.bfloat16 and ours.shape == x.shape
    return (ours.double() - exact).abs().max().item(), (plain.double() - exact).abs().max().item()


@needs_kernel
@pytest.mark.parametrize("rows", [1, 15, 16, 17, 1037])
@pytest.mark.parametrize("c,h", [(96, 384), (32, 64), (64, 2048), (512, 32)])
def test_matches_float64_within_twice_pytorch_bf16(rows, c, h):
    w = weights(c, h, seed=rows)
    x = (torch.randn(rows, c, generator=torch.Generator().manual_seed(rows)) * 2).bfloat16()
    x[0, :4] = torch.tensor([-30.0, 30.0, 0.0, -0.5])  # GELU's tails and its zero
    ours, plain = errors(x, *w)
    assert ours <= 2 * plain + 2e-3, (ours, plain)
    torch.testing.assert_close(cm.cpu_mlp(x, *w), cm.cpu_mlp_ref(x, *w), atol=3e-2, rtol=2e-2)


@needs_kernel
def test_strided_rows_and_leading_dims():
    """The model's [B, N, C] activations, and rows with a stride past C (a view of a wider
    tensor), give the same as their contiguous copy."""
    w = weights(96, 384)
    wide = torch.randn(3, 401, 128).bfloat16()
    x = wide[..., :96]
    assert x.stride(-2) == 128
    y = cm.cpu_mlp(x, *w)
    assert y.shape == (3, 401, 96)
    assert torch.equal(y, cm.cpu_mlp(x.contiguous(), *w))


@needs_kernel
def test_sizes_it_does_not_take_raise_in_words():
    w = weights(48, 96)
    with pytest.raises(RuntimeError, match="unsupported sizes"):
        cm.cpu_mlp(torch.randn(20, 48).bfloat16(), *w)
    w1, b1, w2, b2 = weights(32, 64)
    with pytest.raises(ValueError, match="bf16"):
        cm._mlp_infer(torch.randn(4, 32), cm.pack_pairs(w1), b1, cm.pack_pairs(w2), b2)


def test_pack_pairs_layout():
    w = torch.arange(6 * 4, dtype=torch.float32).reshape(6, 4)  # [N=6, K=4]
    p = cm.pack_pairs(w)
    assert p.shape == (2, 6, 2) and p.dtype == torch.bfloat16
    for pr in range(2):
        for j in range(6):
            assert p[pr, j].tolist() == [w[j, 2 * pr].item(), w[j, 2 * pr + 1].item()]


@needs_kernel
def test_custom_op_registration_and_compile():
    w1, b1, w2, b2 = weights(64, 128)
    x = torch.randn(40, 64).bfloat16()
    torch.library.opcheck(cm._mlp_infer, (x, cm.pack_pairs(w1), b1, cm.pack_pairs(w2), b2),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    compiled = torch.compile(cm.cpu_mlp, fullgraph=True)
    assert torch.equal(compiled(x, w1, b1, w2, b2), cm.cpu_mlp(x, w1, b1, w2, b2))


def ops_run(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def test_takes_only_bf16_inference_of_enough_rows_where_it_runs():
    big = torch.randn(cm.MIN_ROWS, 96)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        assert cm.takes(big, 384) == OK
        assert cm.takes(big.bfloat16(), 384) == OK
        assert not cm.takes(big[:-1], 384)  # fewer rows than MIN_ROWS
        assert not cm.takes(torch.randn(cm.MIN_ROWS, 48), 96)  # C not a multiple of 32
        assert not cm.takes(big, 4096)  # H past the kernel's buffer
    with torch.no_grad():
        assert not cm.takes(big, 384)  # fp32, no autocast
    with torch.autocast("cpu", torch.bfloat16):
        assert not cm.takes(big, 384)  # records gradients


def test_feed_forward_dispatch_and_parity():
    """FeedForward takes the kernel for bf16 inference on the fused backend and gives what its
    Linear -> GELU -> Linear gives in bf16 (within twice that path's error against fp32);
    training, fp32 and the reference backend keep the Linears."""
    torch.manual_seed(0)
    ff = FeedForward(96, 384).eval()
    x = torch.randn(4, 300, 96)
    with torch.no_grad():
        exact = ff.net(x)
        with torch.autocast("cpu", torch.bfloat16):
            plain = ff.net(x)
            ran = ops_run(lambda: ff(x))
            fast = ff(x)
        assert ("fmfast::cpu_mlp_infer" in ran) == OK, WHY
        assert "fmfast::cpu_mlp_infer" not in ops_run(lambda: ff(x))  # fp32
        set_backend(ff, "reference")
        with torch.autocast("cpu", torch.bfloat16):
            assert "fmfast::cpu_mlp_infer" not in ops_run(lambda: ff(x))
        set_backend(ff, "auto")
    with torch.autocast("cpu", torch.bfloat16):
        assert "fmfast::cpu_mlp_infer" not in ops_run(lambda: ff(x).float().sum().backward())
    e_fast, e_plain = ((t.float() - exact).abs().max().item() for t in (fast, plain))
    assert e_fast <= 2 * e_plain + 2e-3, (e_fast, e_plain)


def test_off_switch_and_amx_give_their_reasons(monkeypatch):
    try:
        monkeypatch.setenv("FMFAST_CPU_MLP", "0")
        cm._library.cache_clear()
        assert cm.available() == (False, "turned off (FMFAST_CPU_MLP=0)")
        monkeypatch.setenv("FMFAST_CPU_MLP", "auto")
        monkeypatch.setattr(cm, "supported_variants", lambda: ["AMX", "AVX512-BF16"])
        cm._library.cache_clear()
        ok, why = cm.available()
        assert not ok and "AMX" in why
    finally:
        monkeypatch.undo()
        cm._library.cache_clear()

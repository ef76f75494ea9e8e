"""``fmfast.Predictor``: the same logits as the model, whatever the batch size, from a module or
a checkpoint, from clips or a frame store; its precision and compile decisions; its captured
(static-buffer) path through the eager twin on the CPU; compilation and its fallback."""
from __future__ import annotations

import pytest
import torch

import fmfast
from fmfast import ModelConfig, Predictor, build_model
from fmfast.data.gather import gather_clip
from fmfast.engine import checkpoints as ckpt
from fmfast.engine import predictor as P
from fmfast.engine.device import native_bf16
from fmfast.errors import SettingsError

CASES = [("fmformer", "classification"), ("fmformer", "segmentation"), ("video", "segmentation"),
         ("current", "classification")]


def model(name="fmformer", task="classification", seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(task=task, image_size=16, num_frames=4, dim=32, depth=1, heads=2, dim_head=16, mlp_dim=48,
                      current_len=16, seg_hidden_dims=(8, 8, 8))
    return build_model(name, cfg).eval()


def inputs(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, 4, 16, 16), generator=g, dtype=torch.uint8),
            3000 + 800 * torch.randn(n, 16, 3, generator=g))


def eager(m, name, video, current):
    with torch.no_grad():
        return fmfast.models.call(m, name, video, current).float()


@pytest.mark.parametrize("name, task", CASES)
def test_same_logits_as_the_model_for_any_batch_size(name, task):
    m = model(name, task)
    pred = Predictor(m, precision="fp32", batch_size=4, compile="off")
    assert pred.name == name and "fp32" in pred.path and "eager" in pred.path
    for n in (1, 4, 9):  # a short chunk (padded), one full chunk, 4 + 4 + 1
        video, current = inputs(n)
        # (padded to the chunk size, a batch can take other matmul blocking: equal to rounding)
        torch.testing.assert_close(pred(video, current), eager(m, name, video, current), rtol=1e-5, atol=1e-6)
    p = pred.probabilities(*inputs(3))
    torch.testing.assert_close(p.sum(1), torch.ones_like(p.sum(1)))


@pytest.mark.parametrize("name, task", CASES)
def test_static_buffer_path_equals_eager(name, task):
    """The CUDA path's static buffers and chunking, run by their eager twin (no capture on a CPU)."""
    m = model(name, task)
    pred = Predictor(m, precision="fp32", batch_size=4, compile="off")
    pred._run = pred._build_captured(graph=False)
    for n in (3, 9):
        video, current = inputs(n, seed=n)
        torch.testing.assert_close(pred(video, current), eager(m, name, video, current), rtol=1e-6, atol=1e-6)


def test_frame_table_reads_the_store():
    m = model()
    pred = Predictor(m, precision="fp32", batch_size=8, compile="off")
    g = torch.Generator().manual_seed(3)
    store = torch.randint(0, 256, (20, 3, 16, 16), generator=g, dtype=torch.uint8)
    table = torch.randint(0, 20, (5, 4), generator=g)
    table[0, 1] = -1 - table[0, 1]  # a mirrored entry
    _, current = inputs(5)
    torch.testing.assert_close(pred(store, current, frame_index=table),
                               eager(m, "fmformer", gather_clip(store, table), current), rtol=1e-5, atol=1e-6)


def test_checkpoint_file(tmp_path):
    m = model("video", "segmentation")
    path = tmp_path / "m.pt"
    ckpt.save(path, ckpt.model_payload("video", m))
    pred = Predictor(path, precision="fp32", compile="off")
    video, current = inputs(2)
    assert pred.name == "video"
    torch.testing.assert_close(pred(video, current), eager(m, "video", video, current), rtol=1e-5, atol=1e-6)


def test_precision_decisions(monkeypatch):
    """auto means one thing for inference (precision) and training (amp): bf16 on CUDA and on
    CPUs with native bf16, fp32 on other CPUs."""
    from fmfast.engine import device as D

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(D, "native_bf16", lambda: True)
    assert P.resolve_precision("auto", cpu) is D.resolve_amp("auto", cpu) is torch.bfloat16
    monkeypatch.setattr(D, "native_bf16", lambda: False)  # emulated bf16 is slower than fp32: stay fp32
    assert P.resolve_precision("auto", cpu) is None and D.resolve_amp("auto", cpu) is None
    assert P.resolve_precision("auto", cuda) is D.resolve_amp("auto", cuda) is torch.bfloat16
    assert D.resolve_amp("off", cuda) is None and D.resolve_amp("bf16", cpu) is torch.bfloat16
    with pytest.raises(SettingsError, match="fp16 needs a CUDA device"):
        P.resolve_precision("fp16", cpu)
    with pytest.raises(SettingsError, match="precision must be one of"):
        P.resolve_precision("int4", cpu)


def test_bad_arguments():
    with pytest.raises(SettingsError, match="batch_size"):
        Predictor(model(), batch_size=0)
    with pytest.raises(SettingsError, match="compile must be"):
        Predictor(model(), compile="maybe")
    with pytest.raises(SettingsError, match="not one of fmfast's models"):
        Predictor(torch.nn.Linear(2, 2))


def test_compile_failure_falls_back_with_the_reason(monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    m = model()
    pred = Predictor(m, precision="fp32", compile="auto")
    assert "eager" in pred.path and "no C++ compiler here" in pred.note
    video, current = inputs(2)
    torch.testing.assert_close(pred(video, current), eager(m, "fmformer", video, current), rtol=1e-5, atol=1e-6)
    with pytest.raises(SettingsError, match="no C\\+\\+ compiler here"):
        Predictor(m, precision="fp32", compile="on")


@pytest.mark.slow
def test_compiled_cpu_path_agrees_with_eager():
    """torch.compile (inductor, freezing) on the CPU: compiled once at construction, then the same
    logits as eager fp32 within 1e-4."""
    m = model()
    pred = Predictor(m, precision="fp32", batch_size=4, compile="on")
    assert "torch.compile" in pred.path
    video, current = inputs(6)
    want = eager(m, "fmformer", video, current)
    torch.testing.assert_close(pred(video, current), want, rtol=1e-4, atol=1e-4)
    # float video (the models take uint8 or float 0-255): not the compiled example's signature, so
    # it runs the guarded call (its own program), never the uint8 one with its guards skipped
    torch.testing.assert_close(pred(video.float(), current), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pred(video, current), want, rtol=1e-4, atol=1e-4)


def linear_ops(pred, video, current) -> set[str]:
    from torch.profiler import profile

    with profile() as prof:
        pred(video, current)
    return {e.name for e in prof.events() if "linear" in e.name}


@pytest.mark.slow
def test_large_fp32_batches_compile_with_a_symbolic_batch_for_onednn():
    """fp32 from ONEDNN_MIN_BATCH rows a chunk: compiled with a symbolic batch, so freezing packs
    the Linears for oneDNN (faster than MKL's at the paper's B=32); smaller chunks keep the static
    compile (MKL's packed Linear where torch has MKL). Both agree with eager within 1e-4."""
    m = model()
    video, current = inputs(P.ONEDNN_MIN_BATCH + 3)
    want = eager(m, "fmformer", video, current)
    big = Predictor(m, precision="fp32", batch_size=P.ONEDNN_MIN_BATCH, compile="on")
    torch.testing.assert_close(big(video, current), want, rtol=1e-4, atol=1e-4)
    ops = linear_ops(big, video[:P.ONEDNN_MIN_BATCH], current[:P.ONEDNN_MIN_BATCH])
    assert "mkldnn::_linear_pointwise" in ops and "mkl::_mkl_linear" not in ops, ops
    small = Predictor(m, precision="fp32", batch_size=4, compile="on")
    torch.testing.assert_close(small(video, current), want, rtol=1e-4, atol=1e-4)
    if torch._C.has_mkl:
        assert "mkl::_mkl_linear" in linear_ops(small, video[:4], current[:4])


def generated_code(build) -> str:
    """The source inductor generated while ``build()`` ran (a Predictor compiles at construction)."""
    from torch._inductor.utils import run_and_get_code

    return "\n".join(run_and_get_code(build)[1])


@pytest.mark.slow
def test_tiny_chunks_compile_with_the_cpp_wrapper():
    """Chunks of at most CPP_WRAPPER_MAX_BATCH rows run inductor's C++ wrapper (the Python calls of
    ~150 small kernels were 8-10% of a B=1 forward), larger ones the Python wrapper; both agree
    with eager within 1e-4 in fp32, and the path says which."""
    m = model()
    video, current = inputs(3)
    want = eager(m, "fmformer", video, current)
    preds = {}
    for b in (P.CPP_WRAPPER_MAX_BATCH, P.CPP_WRAPPER_MAX_BATCH + 2):
        code = generated_code(lambda: preds.setdefault(b, Predictor(m, precision="fp32", batch_size=b, compile="on")))
        assert ("inductor_entry_impl" in code) == (b <= P.CPP_WRAPPER_MAX_BATCH), b
        torch.testing.assert_close(preds[b](video, current), want, rtol=1e-4, atol=1e-4)
    assert "C++ wrapper" in preds[P.CPP_WRAPPER_MAX_BATCH].path
    assert "C++ wrapper" not in preds[P.CPP_WRAPPER_MAX_BATCH + 2].path
    if native_bf16():  # the bf16 kernel's C++ inference operator, called from the C++ wrapper
        fast = Predictor(m, precision="bf16", batch_size=1, compile="on")
        slow = Predictor(m, precision="bf16", compile="off")
        assert "C++ wrapper" in fast.path
        torch.testing.assert_close(fast(video, current), slow(video, current), rtol=5e-2, atol=5e-2)


@pytest.mark.slow
def test_a_failing_cpp_wrapper_falls_back_to_the_python_one(monkeypatch):
    compile_ = Predictor._compile

    def no_cpp(self, video, current, dynamic, cpp_wrapper):
        if cpp_wrapper:
            raise RuntimeError("no aoti headers here")
        return compile_(self, video, current, dynamic, cpp_wrapper)

    monkeypatch.setattr(Predictor, "_compile", no_cpp)
    m = model()
    pred = Predictor(m, precision="fp32", batch_size=1, compile="on")
    assert "torch.compile" in pred.path and "C++ wrapper failed" in pred.note and "no aoti headers here" in pred.note
    video, current = inputs(2)
    torch.testing.assert_close(pred(video, current), eager(m, "fmformer", video, current), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(not native_bf16(), reason="bf16 inference needs a CPU with native bf16")
def test_compiled_bf16_cpu_path_freezes_the_weights():
    """Freezing is applied: the Linear weights' bf16 casts are folded into the compiled program's
    constants, so changing the model's weights afterwards does not reach it. (Passed as
    torch.compile(options={"freezing": True}), torch 2.13 silently did not freeze: the casts
    ran on every call, and this test failed.)"""
    m = model()
    pred = Predictor(m, precision="bf16", batch_size=4, compile="on")
    video, current = inputs(4)
    before = pred(video, current)
    with torch.no_grad():
        for lin in (x for x in m.modules() if isinstance(x, torch.nn.Linear)):
            lin.weight.mul_(0.5)
    assert not torch.allclose(Predictor(m, precision="bf16", compile="off")(video, current), before, atol=1e-2)
    torch.testing.assert_close(pred(video, current), before)


def test_the_path_says_what_the_model_really_runs():
    """A model built with backend="reference" keeps the published math under the Predictor, and
    its path says so instead of naming the fast attention it does not run."""
    from fmfast.kernels import cpu_attention

    m = model()
    fast = Predictor(m, precision="bf16", compile="off")
    ok, why = cpu_attention.available()
    assert (f"{cpu_attention.variant()} attention" if ok else why) in fast.path
    m.set_backend("reference")
    slow = Predictor(m, precision="bf16", compile="off")
    assert "reference math" in slow.path and "attention," not in slow.path


def test_the_path_says_whether_the_threads_are_pinned(monkeypatch):
    """On a CPU the Predictor asks cpu_attention.pin_threads and says what it did (here stubbed:
    what pinning does to threads is tested in tests/kernels)."""
    from fmfast.kernels import cpu_attention

    monkeypatch.setattr(cpu_attention, "pin_threads", lambda: (True, "1 worker thread(s) pinned to CPUs [1]"))
    pred = Predictor(model(), compile="off")
    assert pred.pinned and ", 1 worker thread(s) pinned to CPUs [1]" in pred.path
    monkeypatch.setattr(cpu_attention, "pin_threads", lambda: (False, "threads not pinned: one thread"))
    pred = Predictor(model(), compile="off")
    assert not pred.pinned and pred.threads == "threads not pinned: one thread" and "pinned" not in pred.path


@pytest.mark.slow
@pytest.mark.skipif(not native_bf16(), reason="bf16 inference needs a CPU with native bf16")
def test_compiled_bf16_cpu_path_takes_the_mlp_and_patch_norm_kernels_where_they_run():
    """Chunks with enough rows (96 clips of a model whose dim and hidden are multiples of 32)
    compile their feed-forwards into fmfast's CPU MLP kernel where it runs (AVX512-BF16 without
    AMX) and the tokenizer's tubelet LayerNorm into its patch-norm kernel (AVX512-BF16), and the
    logits stay within twice the eager bf16 path's error against fp32."""
    from fmfast.kernels import cpu_mlp, cpu_patch_norm

    torch.manual_seed(0)
    cfg = ModelConfig(task="classification", image_size=16, num_frames=4, dim=32, depth=1, heads=2, dim_head=16,
                      mlp_dim=64, current_len=16)
    m = build_model("fmformer", cfg).eval()
    video, current = inputs(96)
    preds = {}
    code = generated_code(lambda: preds.setdefault(0, Predictor(m, precision="bf16", batch_size=96, compile="on")))
    assert ("cpu_mlp_infer" in code) == cpu_mlp.available()[0], cpu_mlp.available()
    assert ("cpu_patch_norm" in code) == cpu_patch_norm.available()[0], cpu_patch_norm.available()
    exact = eager(m, "fmformer", video, current)
    plain = Predictor(m, precision="bf16", compile="off")(video, current)
    e_fast = (preds[0](video, current) - exact).abs().max().item()
    e_plain = (plain - exact).abs().max().item()
    assert e_fast <= 2 * e_plain + 2e-3, (e_fast, e_plain)

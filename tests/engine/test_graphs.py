"""CUDA-graph machinery (``fmfast.engine.graphs``), GPU-resident gathers (``fmfast.data.gather``) and the
runners training and evaluation use (``fmfast.engine.step``).

On a CPU everything but the capture runs: the static buffers, chunking, padding with a 0-weight
mask, the warm-up undo, the gathers and the eager twins of the captured paths, each checked
against plain eager code. Capture and replay are GPU-only tests (skipped here, said so)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fmfast import FmFormer, ModelConfig
from fmfast.errors import FmfastError
from fmfast.data import FMFDataset
from fmfast.data.gather import StableFlips, fits_on_device, gather_clip, store_bytes
from fmfast.engine.graphs import (
    GraphedForward,
    StaticForward,
    TrainStep,
    _restore,
    _snapshot,
    batch_coupled,
    chunks,
    make_capturable,
    masked_cross_entropy,
    pad_batch,
    portable_state_dict,
)
from fmfast.models import call
from fmfast.engine.step import EvalRunner, TrainRunner, train_blockers, use_graphs

GPU = torch.cuda.is_available()
_no_gpu = pytest.mark.skipif(not GPU, reason="needs CUDA: CUDA-graph capture and replay exist only on a GPU")


def gpu(test):
    return pytest.mark.gpu(_no_gpu(test))



def cfg16(task="classification", **kw) -> ModelConfig:
    # 16x16 frames, 8x8x2 tubelets: 8 standard + 2 dilated tokens; head dim 16 (a kernel size)
    return ModelConfig(task=task, image_size=16, num_frames=4, dim=16, depth=1, heads=2, dim_head=16, mlp_dim=32,
                       current_len=16, seg_hidden_dims=(8, 8, 8), **kw)


def dataset(root, task="classification", split="train"):
    return FMFDataset(root, split=split, num_frames=4, current_seconds=8, task=task, seed=1)


def model16(task="classification", seed=0, name="fmformer"):
    from fmfast.models import build_model

    torch.manual_seed(seed)
    return build_model(name, cfg16(task), backend="reference")


# --------------------------------------------------------------------------- losses, padding

@pytest.mark.parametrize("seg", [False, True])
def test_masked_cross_entropy_ignores_padding_value_and_gradient(seg):
    g = torch.Generator().manual_seed(0)
    shape = (5, 2, 3, 4) if seg else (5, 2)
    logits = torch.randn(shape, generator=g, requires_grad=True)
    labels = torch.randint(0, 2, (5, 3, 4) if seg else (5,), generator=g)
    ones = torch.ones(5)
    torch.testing.assert_close(masked_cross_entropy(logits, labels, ones), F.cross_entropy(logits, labels))
    assert torch.equal(masked_cross_entropy(logits, labels), F.cross_entropy(logits, labels))
    mask = torch.tensor([1.0, 1, 1, 0, 0])
    got = masked_cross_entropy(logits, labels, mask)
    (g_got,) = torch.autograd.grad(got, logits)
    want = F.cross_entropy(logits[:3], labels[:3])
    (g_want,) = torch.autograd.grad(want, logits)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g_got, g_want)
    assert g_got[3:].abs().sum() == 0


def test_pad_batch():
    idx, mask = pad_batch(torch.tensor([7, 3]), 4)
    assert idx.tolist() == [7, 3, 7, 7] and mask.tolist() == [1, 1, 0, 0] and mask.dtype == torch.float32
    idx, mask = pad_batch(torch.tensor([1, 2, 3]), 3)
    assert idx.tolist() == [1, 2, 3] and mask.tolist() == [1, 1, 1]
    for bad in (torch.tensor([], dtype=torch.long), torch.arange(5)):
        with pytest.raises(ValueError, match="pad_batch: need 1..4 indices"):
            pad_batch(bad, 4)


def test_chunks():
    assert chunks(1, 4) == [(0, 1)]
    assert chunks(4, 4) == [(0, 4)]
    assert chunks(9, 4) == [(0, 4), (4, 4), (8, 1)]
    with pytest.raises(ValueError):
        chunks(0, 4)


def test_batch_coupled():
    assert not batch_coupled(FmFormer(cfg16()))
    assert batch_coupled(FmFormer(cfg16("segmentation")))  # BatchNorm in the decoder


# --------------------------------------------------------------------------- static forward

def test_static_forward_any_batch_size_equals_the_model():
    model = model16().eval()
    g = torch.Generator().manual_seed(1)
    video = torch.randint(0, 256, (7, 3, 4, 16, 16), generator=g, dtype=torch.uint8)
    current = torch.randn(7, 16, 3, generator=g)
    with torch.no_grad():
        want = model(video, current)
        run = StaticForward(model, (video[:3], current[:3]), graph=False)
        for n in (1, 3, 7):  # fewer rows than the static batch, exactly, and chunks of 3 + 3 + 1
            got = run(video[:n], current[:n])
            torch.testing.assert_close(got, want[:n], rtol=1e-5, atol=1e-5)
            assert got.shape[0] == n and got.data_ptr() != run.outputs[0].data_ptr()  # a fresh tensor
    with pytest.raises(ValueError, match=r"input 1: expected torch.float32 of shape \['B', 16, 3\]"):
        run(video[:2], current[:2, :8])
    with pytest.raises(ValueError, match="differ in batch size"):
        run(video[:2], current[:3])
    with pytest.raises(ValueError, match="a CUDA graph needs CUDA inputs"):
        StaticForward(model, (video[:1], current[:1]), graph=True)
    with pytest.raises(ValueError, match="a CUDA graph needs CUDA inputs"):
        GraphedForward(model, (video[:1], current[:1]))


def test_static_forward_shared_store_and_tuple_outputs():
    model = model16().eval()
    g = torch.Generator().manual_seed(2)
    store = torch.randint(0, 256, (12, 3, 16, 16), generator=g, dtype=torch.uint8)
    index = torch.randint(0, 12, (5, 4), generator=g)
    current = torch.randn(5, 16, 3, generator=g)

    def fn(frames, cur, fi):
        out = model(frames, cur, frame_index=fi)
        return out, out.argmax(1)

    with torch.no_grad():
        run = StaticForward(fn, (store, current[:2], index[:2]), shared=(0,), graph=False)
        assert run.static[0] is store  # shared: used in place, not copied
        logits, pred = run(store, current, index)
        want = model(store, current, frame_index=index)
        torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(pred, want.argmax(1))
        other = store.flip(0).contiguous()  # another store of the same shape is copied in
        torch.testing.assert_close(run(other, current, index)[0], model(other, current, frame_index=index),
                                   rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match=r"input 0: expected torch.uint8 of shape \[12, 3, 16, 16\]"):
            run(store[:6], current, index)


# --------------------------------------------------------------------------- optimiser state

@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_make_capturable_and_portable_state_dict():
    model = model16()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    model(torch.zeros(1, 3, 4, 16, 16), torch.zeros(1, 16, 3)).sum().backward()
    opt.step()
    make_capturable(opt, torch.device("cpu"))
    g = opt.param_groups[0]
    assert g["capturable"] and isinstance(g["lr"], torch.Tensor) and float(g["lr"]) == pytest.approx(3e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    lr_tensor = g["lr"]
    sched.step()  # the scheduler writes into the same tensor: a captured step reads each new value
    assert g["lr"] is lr_tensor and float(lr_tensor) == pytest.approx(1.5e-4)
    sd = portable_state_dict(opt)
    assert isinstance(sd["param_groups"][0]["lr"], float) and sd["param_groups"][0]["capturable"] is False
    fresh = torch.optim.AdamW(model.parameters(), lr=1.0)
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["lr"] == pytest.approx(1.5e-4)
    with pytest.raises(ValueError, match="SGD cannot be captured"):
        make_capturable(torch.optim.SGD(model.parameters(), lr=0.1), torch.device("cpu"))


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_warmup_is_undone_exactly(task):
    """Snapshot, two steps, restore, one step == one step from the start (weights, BatchNorm
    buffers, Adam moments: state created after the snapshot restarts from zero)."""
    g = torch.Generator().manual_seed(3)
    video = torch.randint(0, 256, (3, 3, 4, 16, 16), generator=g, dtype=torch.uint8)
    current = torch.randn(3, 16, 3, generator=g)
    a, b = model16(task), model16(task)
    opt_a, opt_b = (torch.optim.Adam(m.parameters(), lr=1e-2) for m in (a, b))

    def step(m, opt):
        opt.zero_grad(set_to_none=True)
        out = m(video, current)
        target = torch.zeros(out.shape[0], *out.shape[2:], dtype=torch.long)
        F.cross_entropy(out, target).backward()
        opt.step()

    snap = _snapshot(a, opt_a)
    step(a, opt_a)
    step(a, opt_a)
    _restore(snap, opt_a)
    step(a, opt_a)
    step(b, opt_b)
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=k)


# --------------------------------------------------------------------------- device gathers

@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_inputs_equal_ds_batch(synth, task):
    ds = dataset(synth, task)  # train split: half the samples flipped, read mirrored by index
    assert ds.flips.any()
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:9]
    clips, currents, labels = ds.batch(idx)
    fi, cur, lab = ds.inputs(idx)
    assert torch.equal(gather_clip(ds.frames, fi), clips)
    assert torch.equal(cur, currents) and torch.equal(lab, labels) and lab.dtype == labels.dtype


def test_call_reads_frames_by_index(synth):
    ds = dataset(synth)
    idx = torch.arange(3)
    clips, currents, _ = ds.batch(idx)
    fi, cur, _ = ds.inputs(idx)
    for name in ("fmformer", "video", "current"):
        m = model16(name=name).eval()
        with torch.no_grad():
            torch.testing.assert_close(call(m, name, ds.frames, cur, fi), call(m, name, clips, currents))


def test_stable_flips_keeps_one_tensor(synth):
    ds, fresh = dataset(synth), dataset(synth)
    pinned = StableFlips(ds)
    t = ds.flips
    for epoch in (1, 2):
        pinned.set_epoch(epoch)
        fresh.set_epoch(epoch)
        assert ds.flips is t and torch.equal(t, fresh.flips)
    assert not torch.equal(t, dataset(synth).flips)  # epochs differ, so the copy really happened


def test_store_bytes_and_fit(synth):
    ds = dataset(synth)
    assert store_bytes(ds) >= ds.frames.numel()
    assert not fits_on_device([ds], torch.device("cpu"))


# --------------------------------------------------------------------------- runners

def eager_reference_training(model, ds, batches, lr=1e-2):
    """The trainer's eager step, written out: ds.batch, forward, mean cross-entropy, Adam."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for idx in batches:
        clips, currents, labels = ds.batch(idx)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(clips, currents).float(), labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("task,gather", [("classification", True), ("classification", False),
                                         ("segmentation", True)])
def test_train_runner_on_static_buffers_trains_like_eager(synth, task, gather):
    ds = dataset(synth, task)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(1))[:8]
    batches = order.split(3)  # 3, 3 and a short 2: padded (classification) or eager (BatchNorm)
    ref_model, model = model16(task), model16(task)
    want = eager_reference_training(ref_model, ds, batches)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    run = TrainRunner(model, "fmformer", ds, opt, 3, torch.device("cpu"), graph=False, static=True, gather=gather)
    got = [run(idx).item() for idx in batches]
    assert run.step is not None  # the static-buffer path really ran
    assert run.eager_steps == (1 if task == "segmentation" else 0)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    for (k, x), (_, y) in zip(model.state_dict().items(), ref_model.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=k)


def test_train_runner_rejects_fp16_and_oversized_batches(synth):
    ds = dataset(synth)
    model = model16()
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="fp16 needs GradScaler"):
        TrainRunner(model, "fmformer", ds, opt, 4, torch.device("cpu"), amp_dtype=torch.float16, graph=False)
    run = TrainRunner(model, "fmformer", ds, opt, 4, torch.device("cpu"), graph=False, static=True)
    with pytest.raises(ValueError, match="batch of 5 > batch_size 4"):
        run(torch.arange(5))


@pytest.mark.parametrize("gather", [True, False])
def test_eval_runner_static_equals_eager(synth, gather):
    ds = dataset(synth, split="test")
    model = model16().eval()
    eager = EvalRunner(model, "fmformer", ds, 4, torch.device("cpu"), static=False, gather=gather)
    static = EvalRunner(model, "fmformer", ds, 4, torch.device("cpu"), static=True, gather=gather)
    with torch.no_grad():
        for idx in (torch.arange(4), torch.arange(4, 11), torch.tensor([2])):
            (a, la), (b, lb) = eager(idx), static(idx)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            assert torch.equal(la, lb) and torch.equal(la, ds.batch(idx)[2])
    assert static.runner is not None and static.runner.batch == 4


def test_graph_policy():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_graphs("auto", cpu) == (False, "off (device is cpu, CUDA graphs need a GPU)")
    assert use_graphs(False, cpu) == (False, "off")  # YAML reads `off` as false
    assert use_graphs("auto", cuda) == (True, "on")
    assert use_graphs(True, cuda) == (True, "on")
    on, note = use_graphs("auto", cuda, ["sgd is not capturable (adam/adamw are)"])
    assert not on and "sgd" in note
    with pytest.raises(FmfastError, match="cuda_graphs on: device is cpu"):
        use_graphs("on", cpu)
    with pytest.raises(FmfastError, match="cuda_graphs must be one of"):
        use_graphs("sometimes", cpu)
    m = model16()
    assert train_blockers(torch.optim.Adam(m.parameters()), torch.bfloat16, 1) == []
    blocked = train_blockers(torch.optim.SGD(m.parameters(), lr=0.1), torch.float16, 2)
    assert len(blocked) == 3 and "sgd" in blocked[0] and "fp16" in blocked[1] and "Distributed" in blocked[2]


# --------------------------------------------------------------------------- GPU: capture and replay

@gpu
@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_gpu_captured_training_equals_eager(synth, task):
    """Captured steps (fast backend, device gathers, padded last batch) give the eager weights."""
    ds = dataset(synth, task).to("cuda")
    StableFlips(ds)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(1))[:11].cuda()
    batches = order.split(4)
    ref_model, model = model16(task).cuda(), model16(task).cuda()
    ref_model.set_backend("fast")
    model.set_backend("fast")
    opt_ref = torch.optim.Adam(ref_model.parameters(), lr=1e-2, fused=True)  # the same update math
    eager = TrainRunner(ref_model, "fmformer", ds, opt_ref, 4, torch.device("cuda"), graph=False)
    want = [eager(i).item() for i in batches]
    opt = make_capturable(torch.optim.Adam(model.parameters(), lr=1e-2, fused=True), torch.device("cuda"))
    run = TrainRunner(model, "fmformer", ds, opt, 4, torch.device("cuda"), graph=True, strict=True)
    got = [run(i).item() for i in batches]
    assert run.step.cuda_graph is not None
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
    for (k, x), (_, y) in zip(model.state_dict().items(), ref_model.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=k)


@gpu
def test_gpu_graphed_forward_and_eval_runner(synth):
    model = model16().cuda().eval()
    model.set_backend("fast")
    g = torch.Generator().manual_seed(4)
    video = torch.randint(0, 256, (9, 3, 4, 16, 16), generator=g, dtype=torch.uint8).cuda()
    current = torch.randn(9, 16, 3, generator=g).cuda()
    with torch.no_grad():
        want = model(video, current)
        run = GraphedForward(model, (video[:1], current[:1]))  # batch 1: the latency case
        torch.testing.assert_close(run(video, current), want, rtol=1e-4, atol=1e-4)
        bf = GraphedForward(model, (video[:4], current[:4]), amp_dtype=torch.bfloat16)
        assert (bf(video, current).float() - want).abs().max() < 0.1 * want.abs().max() + 0.05
    ds = dataset(synth, split="test").to("cuda")
    eager = EvalRunner(model, "fmformer", ds, 4, torch.device("cuda"), graph=False)
    graphed = EvalRunner(model, "fmformer", ds, 4, torch.device("cuda"), graph=True, strict=True)
    with torch.no_grad():
        for idx in (torch.arange(4), torch.arange(4, 11)):
            (a, la), (b, lb) = eager(idx), graphed(idx)
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
            assert torch.equal(la, lb)
    assert graphed.runner.cuda_graph is not None


@gpu
def test_gpu_train_step_refuses_a_non_capturable_optimizer():
    model = model16().cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)  # capturable=False, float lr
    x = {"mask": torch.ones(2, device="cuda")}
    with pytest.raises(ValueError, match="cannot capture the optimizer step"):
        TrainStep(lambda mask: mask.sum(), model, opt, x, graph=True)


# --------------------------------------------------------------------------- the training CLI

TINY_RUN = ["--num-frames", "4", "--current-seconds", "8", "--batch-size", "4", "--max-train-samples", "10",
            "--max-eval-samples", "8", "--epochs", "1", "model.depth=1", "model.dim=16", "model.heads=2",
            "model.dim_head=16", "model.mlp_dim=32"]


def test_train_cuda_graphs_on_without_a_gpu_is_a_clear_error(synth, tmp_path, capsys):
    from fmfast.cli.train import main

    with pytest.raises(FmfastError, match="cuda_graphs on: device is cpu, CUDA graphs need a GPU"):
        main(["--data", str(synth), "--out", str(tmp_path / "r"), "--device", "cpu", "--cuda-graphs", "on", *TINY_RUN])


@gpu
def test_gpu_train_cli_captured_equals_eager(synth, tmp_path):
    """`python -m fmfast.train` with the captured step (data on the GPU, a padded last batch of 2)
    ends where the eager run ends; the log says graphs were on."""
    from fmfast.cli.train import main

    runs = {}
    for mode in ("on", "off"):
        out = tmp_path / mode
        assert main(["--data", str(synth), "--out", str(out), "--device", "cuda", "--amp", "off",
                     "--cuda-graphs", mode, *TINY_RUN]) == 0
        runs[mode] = torch.load(out / "last.pt", weights_only=True)
    for k, v in runs["off"]["model"].items():
        torch.testing.assert_close(runs["on"]["model"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    assert runs["on"]["losses"] == pytest.approx(runs["off"]["losses"], rel=1e-4)


def test_trainer_graph_wiring_on_cpu(synth, tmp_path, monkeypatch):
    """The trainer's CUDA-graph branch end to end on a CPU: graphs forced on, the dataset treated
    as device-resident (pinned flips, uploaded order, gathers by index), the optimiser's learning
    rate a tensor the scheduler fills, portable checkpoints and resume -- with the eager
    static-buffer twin standing in for the capture. It must train exactly like the plain run."""
    import functools

    import fmfast.engine.trainer as tr
    from fmfast.cli.train import main

    runners = []

    def run(out, wired, *extra):
        with monkeypatch.context() as m:
            if wired:
                m.setattr(tr, "use_graphs", lambda *a, **k: (True, "on (CPU stand-in)"))
                m.setattr(tr, "fits_on_device", lambda *a, **k: True)
                m.setattr(tr, "TrainRunner", functools.partial(_CpuRunner, tr.TrainRunner, runners))
                # a tensor learning rate without capturable (Adam cannot capture on a CPU)
                m.setattr(tr, "make_capturable", _tensor_lr)
            assert main(["--data", str(synth), "--out", str(out), "--device", "cpu", *TINY_RUN, *extra]) == 0
        return torch.load(out / "last.pt", weights_only=True)

    plain, wired = run(tmp_path / "plain", False), run(tmp_path / "wired", True)
    assert len(runners) == 1 and runners[0].step is not None  # the static-buffer step really ran
    assert wired["losses"] == pytest.approx(plain["losses"], rel=1e-5)
    assert isinstance(wired["optimizer"]["param_groups"][0]["lr"], float)
    plain2 = run(tmp_path / "plain", False, "--epochs", "2", "--resume", "auto")
    wired2 = run(tmp_path / "wired", True, "--epochs", "2", "--resume", "auto")
    assert len(wired2["losses"]) == 6 and wired2["losses"] == pytest.approx(plain2["losses"], rel=1e-5)
    for k, v in plain2["model"].items():
        torch.testing.assert_close(wired2["model"][k], v, rtol=1e-5, atol=1e-6, msg=k)


def _CpuRunner(cls, made, *args, graph=True, **kw):
    runner = cls(*args, graph=False, static=True, **kw)
    assert runner.gather  # the dataset counts as resident: batches gathered by index
    made.append(runner)
    return runner


def _tensor_lr(opt, device):
    for g in opt.param_groups:
        g["lr"] = torch.tensor(float(g["lr"]), device=device)
    return opt

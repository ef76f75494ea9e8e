"""Export round trips: the exported file, loaded back by its own runtime, gives the PyTorch
model's outputs on fresh inputs of a batch size it was not traced with."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from fmfast.engine import checkpoints as checkpoint
from fmfast.cli.common import run_main
from fmfast.errors import FmfastError
from fmfast.models.config import ModelConfig
from fmfast.cli.export import main
from fmfast.engine.export import Exported, export
from fmfast.models import build_model


def tiny(tmp_path, name="fmformer", task="classification"):
    torch.manual_seed(0)
    cfg = ModelConfig(task=task, image_size=(32, 16), num_frames=4, dim=16, depth=1, heads=2, dim_head=8,
                      mlp_dim=32, current_len=8, seg_hidden_dims=(8, 8, 8))
    m = build_model(name, cfg)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval vs train mode would show
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    path = tmp_path / f"{name}_{task}.pt"
    checkpoint.save(path, checkpoint.model_payload(name, m, {}))
    return path, m.eval()


def inputs(m, name, batch=2):
    w = Exported(m, name)
    return w.example(batch, seed=7), w


MODELS = [("fmformer", "classification"), ("fmformer", "segmentation"), ("video", "classification"),
          ("current", "classification")]


@pytest.mark.parametrize("name,task", MODELS)
def test_official_round_trip(tmp_path, name, task):
    path, m = tiny(tmp_path, name, task)
    out = tmp_path / "official.pth"
    export(path, "official", out)
    sd = torch.load(out, weights_only=True)
    assert set(sd) == set(m.to_official())
    back = type(m).from_official(sd, task=task, cfg=m.config).eval()
    x, w = inputs(m, name)
    torch.testing.assert_close(Exported(back, name)(*x), w(*x), rtol=0, atol=0)


@pytest.mark.parametrize("name,task", MODELS)
def test_torchscript_round_trip(tmp_path, name, task):
    path, m = tiny(tmp_path, name, task)
    out = tmp_path / "model.ts"
    msg = export(path, "torchscript", out)
    assert "torch.jit.load" in msg
    loaded = torch.jit.load(str(out))
    x, w = inputs(m, name, batch=5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(*x), w(*x), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("onnx") is None, reason="the onnx package is not installed")
@pytest.mark.parametrize("name,task", [("fmformer", "classification"), ("fmformer", "segmentation")])
def test_onnx_round_trip(tmp_path, name, task):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    path, m = tiny(tmp_path, name, task)
    out = tmp_path / "model.onnx"
    export(path, "onnx", out)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["video", "current"]
    assert sess.get_inputs()[0].type == "tensor(uint8)"
    x, w = inputs(m, name, batch=4)
    got = sess.run(None, {"video": x[0].numpy(), "current": x[1].numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), w(*x), rtol=1e-4, atol=1e-4)


def test_failed_check_leaves_no_file(tmp_path, monkeypatch):
    import fmfast.engine.export as ex

    path, _ = tiny(tmp_path)
    out = tmp_path / "model.ts"

    def wrong(w, p):
        x = w.example(2)
        return ex._close(w(*x) + 1.0, w(*x), str(p))

    monkeypatch.setattr(ex, "check_torchscript", wrong)
    with pytest.raises(FmfastError, match="differs from PyTorch"):
        export(path, "torchscript", out)
    assert list(tmp_path.iterdir()) == [path]


def test_cli(tmp_path, capfd):
    path, _ = tiny(tmp_path)
    assert run_main(main, ["--checkpoint", str(path), "--format", "official", "--out", str(tmp_path / "o.pth")]) == 0
    assert "max |diff| 0" in capfd.readouterr().out
    (tmp_path / "junk.pt").write_bytes(b"junk")
    for argv, says in ((["--checkpoint", str(tmp_path / "junk.pt"), "--format", "onnx"], "junk.pt"),
                       (["--checkpoint", str(path), "--format", "tflite"], "--format"),
                       (["--checkpoint", str(path), "--format", "official", "--out", str(tmp_path)], "is a folder")):
        if "--out" not in argv:
            argv = argv + ["--out", str(tmp_path / "x.onnx")]
        with pytest.raises(SystemExit) as e:
            run_main(main, argv)
        err = capfd.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and says in err[0], err
    assert not (tmp_path / "x.onnx").exists()

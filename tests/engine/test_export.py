"""Export round trips: every format for every model and task the registry builds; the file,
loaded back by its own runtime (not through fmfast), gives the PyTorch model's outputs on fresh
inputs of a batch size it was not traced with, and carries the description fmfast reads back.
The export path raises no deprecation warning of its own; a failed check leaves no file."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from helpers.models import tiny_checkpoint, tiny_config
from fmfast.cli.common import run_main
from fmfast.cli.export import main
from fmfast.engine import checkpoints as checkpoint
from fmfast.engine.export import Exported, export
from fmfast.errors import FmfastError
from fmfast.models import MODELS, build_model
from fmfast.models.config import TASKS, ModelConfig

FORMATS = {"onnx": ".onnx", "pt2": ".pt2", "openvino": ".xml", "official": ".pth"}
# torch 2.13's own warnings on the way, none caused by fmfast's calls (fmfast/engine/export_graphs.py says why)
TORCH_INTERNAL = ("`isinstance(treespec, LeafSpec)` is deprecated",)


def buildable():
    """Every (model, task) pair the registry builds (the current-only model: classification only)."""
    out = []
    for name in MODELS:
        for task in TASKS:
            try:
                build_model(name, tiny_config(task))
            except ValueError:
                continue
            out.append((name, task))
    return out


CASES = buildable()


def tiny(tmp_path, name="fmformer", task="classification", **kw):
    return tiny_checkpoint(tmp_path, name, task, **kw)


def exporting(*args):
    """``export(*args)`` -> (its message, the warnings it raised, each recorded)."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        msg = export(*args)
    return msg, seen


def own_runtime(fmt, out, m, name, x):
    """The logits of the exported file at ``out``, read without fmfast, and its description."""
    feed = [t.numpy() for t in x]
    if fmt == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        assert [i.name for i in sess.get_inputs()] == list(Exported(m, name).input_names())
        assert [i.shape[0] for i in sess.get_inputs()] == ["batch"] * len(x)
        assert sess.get_inputs()[0].type == ("tensor(uint8)" if name != "current" else "tensor(float)")
        assert [o.name for o in sess.get_outputs()] == ["logits"]
        return sess.run(None, dict(zip([i.name for i in sess.get_inputs()], feed)))[0], \
            sess.get_modelmeta().custom_metadata_map["fmfast"]
    if fmt == "openvino":
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(out))
        assert all(i.get_partial_shape()[0].is_dynamic for i in model.inputs)
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return compiled(feed)[compiled.output(0)], model.get_rt_info(["fmfast"]).astype(str)
    if fmt == "pt2":
        extra = {"fmfast.json": ""}
        return torch.export.load(str(out), extra_files=extra).module()(*x), extra["fmfast.json"]
    sd = torch.load(out, weights_only=True)  # the reference code's own way in
    assert set(sd) == set(m.to_official())
    back = type(m).from_official(sd, cfg=m.config).eval()
    return Exported(back, name)(*x), (out.parent / f"{out.name}.json").read_text()


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("name,task", CASES)
def test_round_trip(tmp_path, name, task, fmt):
    path, m = tiny(tmp_path, name, task)
    out = tmp_path / f"model{FORMATS[fmt]}"
    msg, seen = exporting(path, fmt, out)
    assert "max |diff|" in msg
    ours = [w for w in seen if not str(w.message).startswith(TORCH_INTERNAL)]
    assert not ours, [f"{w.category.__name__} {w.filename}:{w.lineno}: {w.message}" for w in ours]
    x = Exported(m, name).example(5, seed=7)
    with torch.no_grad():
        got, description = own_runtime(fmt, out, m, name, x)
        torch.testing.assert_close(torch.as_tensor(got), Exported(m, name)(*x), rtol=1e-4, atol=1e-4)
    d = json.loads(description)
    assert d["model_name"] == name and ModelConfig.from_dict(d["model_config"]) == m.config
    assert d["threshold"] == 0.375 and d["data"]["stride"] == 2
    back, meta = checkpoint.load_model(out)  # and fmfast reads it back as it reads a checkpoint
    assert back.config == m.config and meta["task"] == task and meta["threshold"] == 0.375
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


@pytest.mark.parametrize("fmt", ["openvino", "official"])
def test_failed_check_leaves_no_file(tmp_path, monkeypatch, fmt):
    import fmfast.engine.export as ex

    path, _ = tiny(tmp_path, "current")
    out = tmp_path / f"model{FORMATS[fmt]}"

    def wrong(w, p, named):
        x = w.example(2)
        return ex._close(w(*x) + 1.0, w(*x), str(named))

    monkeypatch.setattr(ex, "check", wrong)
    with pytest.raises(FmfastError, match="differs from PyTorch"):
        export(path, fmt, out)
    assert list(tmp_path.iterdir()) == [path]


def test_a_new_pair_replaces_the_old_one_whole(tmp_path):
    """Re-exporting over an earlier official file + sidecar leaves the new pair, both halves."""
    a, _ = tiny(tmp_path, "current")
    b, mb = tiny(tmp_path / "b", "current", dim=24)
    out = tmp_path / "o.pth"
    export(a, "official", out)
    export(b, "official", out)
    back, _ = checkpoint.load_model(out)
    assert back.config == mb.config


def test_cli(tmp_path, capfd):
    path, _ = tiny(tmp_path)
    assert run_main(main, ["--checkpoint", str(path), "--format", "official", "--out", str(tmp_path / "o.pth")]) == 0
    assert "max |diff| 0" in capfd.readouterr().out
    (tmp_path / "junk.pt").write_bytes(b"junk")
    for argv, says in ((["--checkpoint", str(tmp_path / "junk.pt"), "--format", "onnx"], "junk.pt"),
                       (["--checkpoint", str(path), "--format", "tflite"], "--format"),
                       (["--checkpoint", str(path), "--format", "torchscript"], "--format"),
                       (["--checkpoint", str(path), "--format", "onnx", "--out", str(tmp_path / "x.xml")], ".onnx"),
                       (["--checkpoint", str(path), "--format", "official", "--out", str(tmp_path / "x.onnx")], ".pth"),
                       (["--checkpoint", str(tmp_path / "o.pth"), "--format", "official", "--out",
                         str(tmp_path / "x.pth")], "x.pth.json"),
                       (["--checkpoint", str(path), "--format", "official", "--out", str(tmp_path)], "is a folder")):
        if "--out" not in argv:
            argv = argv + ["--out", str(tmp_path / "x.onnx")]
        if "o.pth" in argv[1]:
            (tmp_path / "x.pth.json").mkdir()  # the sidecar's place is taken: refused before any work
        with pytest.raises(SystemExit) as e:
            run_main(main, argv)
        err = capfd.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and says in err[0], err
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "x.pth").exists()

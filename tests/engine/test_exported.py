"""Running exports (``fmfast.engine.exported``): ``Predictor`` on an exported file gives the
model's logits for any batch size; what it refuses (CUDA, bf16, compile on); bad exported files
(truncated, weights missing, no description, no sidecar) and a missing runtime are one error
naming the file."""
from __future__ import annotations

import shutil
import sys

import pytest
import torch

from helpers.models import tiny_checkpoint
from fmfast import Predictor
from fmfast.engine.checkpoints import load_model
from fmfast.engine.export import Exported, export
from fmfast.engine.exported import ExportedModel
from fmfast.errors import CheckpointError, ExportError, SettingsError

SUFFIX = {"onnx": ".onnx", "openvino": ".xml", "pt2": ".pt2"}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    d = tmp_path_factory.mktemp("exported")
    path, m = tiny_checkpoint(d, "fmformer", "segmentation")
    files = {fmt: d / f"m{suffix}" for fmt, suffix in SUFFIX.items()}
    for fmt, out in files.items():
        export(path, fmt, out)
    export(path, "official", d / "m.pth")
    return d, m, files


@pytest.mark.parametrize("fmt", list(SUFFIX))
def test_predictor_runs_an_export_like_the_model(exports, fmt):
    _, m, files = exports
    pred = Predictor(files[fmt], batch_size=4)  # defaults: auto device, precision, compile
    runtime = {"onnx": "onnxruntime", "openvino": "openvino", "pt2": "torch.export"}[fmt]
    assert isinstance(pred.model, ExportedModel) and runtime in pred.path and "fp32" in pred.path
    assert pred.device.type == "cpu" and pred.config == m.config
    w = Exported(m, "fmformer")
    for n in (1, 4, 9):  # padded, one chunk, 4 + 4 + 1
        x = w.example(n, seed=n)
        with torch.no_grad():
            torch.testing.assert_close(pred(*x), w(*x), rtol=1e-4, atol=1e-4)


def test_predictor_refuses_what_an_export_cannot_do(exports):
    _, _, files = exports
    for kw, says in (({"precision": "bf16"}, "fp32"), ({"compile": "on"}, "compile"), ({"device": "cuda"}, "cuda")):
        with pytest.raises(SettingsError, match=says):
            Predictor(files["onnx"], **kw)


def bad(tmp_path, exports, name, content=None, source=None, cut=None):
    d, _, files = exports
    p = tmp_path / name
    if source is not None:
        data = (d / source).read_bytes()
        p.write_bytes(data[:cut] if cut else data)
    elif content is not None:
        p.write_bytes(content)
    return p


def test_bad_exported_files_are_one_error_naming_the_file(tmp_path, exports):
    d, _, _ = exports
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    plain = helper.make_model(helper.make_graph([helper.make_node("Identity", ["video"], ["logits"])], "g",
                                               [helper.make_tensor_value_info("video", TensorProto.FLOAT, [1])],
                                               [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1])]))
    onnx.save(plain, tmp_path / "foreign.onnx")
    shutil.copy(d / "m.xml", tmp_path / "lonely.xml")  # its .bin left behind
    shutil.copy(d / "m.pth", tmp_path / "nosidecar.pth")
    cases = [(bad(tmp_path, exports, "cut.onnx", source="m.onnx", cut=2000), "not a readable ONNX"),
             (bad(tmp_path, exports, "cut.pt2", source="m.pt2", cut=2000), "not a readable torch.export"),
             (bad(tmp_path, exports, "junk.xml", content=b"<nope"), "weights"),
             (tmp_path / "lonely.xml", "lonely.bin"),
             (tmp_path / "foreign.onnx", "no fmfast description"),
             (tmp_path / "missing.onnx", "no such"),
             (bad(tmp_path, exports, "onnx_named.pt", source="m.onnx"), "not a readable PyTorch checkpoint"),
             (tmp_path / "nosidecar.pth", "nosidecar.pth.json"),
             (tmp_path / "junk.xml", "not a readable OpenVINO")]  # once junk.bin is there
    for path, says in cases:
        if says.endswith("OpenVINO"):
            (tmp_path / "junk.bin").write_bytes(b"\0" * 64)
        with pytest.raises(CheckpointError) as e:
            load_model(path)
        msg = str(e.value)
        assert "\n" not in msg and path.name in msg and says in msg, (path.name, msg)


def test_a_missing_runtime_names_the_extra(tmp_path, exports, monkeypatch):
    d, _, files = exports
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(SettingsError, match=r'fmfast\[export\]'):
        load_model(files["onnx"])
    monkeypatch.setitem(sys.modules, "openvino", None)
    ckpt, _ = tiny_checkpoint(tmp_path, "current")
    with pytest.raises(ExportError, match=r'fmfast\[export\]'):
        export(ckpt, "openvino", tmp_path / "c.xml")
    assert not (tmp_path / "c.xml").exists()


def test_an_export_is_not_exported_again(exports, tmp_path):
    _, _, files = exports
    with pytest.raises(SettingsError, match="already an export"):
        export(files["onnx"], "pt2", tmp_path / "again.pt2")

"""Running fmfast's exports: ``load_exported(FILE)`` -> ``(ExportedModel, meta)`` for an ONNX
file (onnxruntime), an OpenVINO IR ``FILE.xml`` + ``FILE.bin`` (OpenVINO's CPU runtime) or a
``.pt2`` ExportedProgram (``torch.export.load``).

    runner, meta = load_exported("fmformer.onnx")
    logits = runner(video, current)     # video uint8 [B,3,T,W,H], current float32 [B,2S,3] -> [B,2] or [B,2,W,H]

The runner takes the inputs the model takes (``fmfast.models.INPUTS``), in that order, any batch
size, and returns float32 CPU logits; ``config`` and ``meta`` come from the description the
export carries (``fmfast.engine.description``), so ``Predictor``, ``fmfast evaluate`` and
``fmfast detect`` run it as they run a checkpoint. It runs on the CPU, in fp32.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fmfast.engine.description import KEY, read_description
from fmfast.errors import CheckpointError, SettingsError
from fmfast.models import INPUTS

RUNTIMES = {".onnx": "onnxruntime", ".xml": "openvino", ".pt2": "torch.export"}
INSTALL = 'pip install "fmfast[export]"'


class ExportedModel:
    """An exported model as a function of CPU tensors; ``config``, ``name`` and ``runtime``
    say what it is. ``to``/``eval`` are there for callers written for modules."""

    def __init__(self, path: Path, name: str, config, runtime: str, run):
        self.path, self.name, self.config, self.runtime, self._run = path, name, config, runtime, run
        self.inputs = INPUTS[name]

    def __call__(self, *xs: torch.Tensor) -> torch.Tensor:
        if len(xs) != len(self.inputs):
            raise ValueError(f"{self.path}: takes {', '.join(self.inputs)}; got {len(xs)} inputs")
        dtypes = {"video": torch.uint8, "current": torch.float32}
        xs = [x.detach().to("cpu", dtypes[n]).contiguous() for n, x in zip(self.inputs, xs)]
        return torch.as_tensor(self._run(xs), dtype=torch.float32)

    def to(self, device):
        if torch.device(device).type != "cpu":
            raise SettingsError(f"{self.path}: an exported {self.runtime} model runs on the CPU, not {device}")
        return self

    def eval(self):
        return self

    def __repr__(self) -> str:
        return f"ExportedModel({self.path}, {self.name}, {self.runtime})"


def load_exported(path) -> tuple[ExportedModel, dict]:
    """The export at ``path`` (by its suffix: .onnx, .xml, .pt2) -> ``(runner, meta)``; a missing,
    unreadable or undescribed file is one CheckpointError naming it."""
    path = Path(path)
    runtime = RUNTIMES.get(path.suffix)
    if runtime is None:
        raise CheckpointError(f"{path}: not an fmfast export (expected .onnx, .xml or .pt2)")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such exported model file")
    load = {".onnx": _onnx, ".xml": _openvino, ".pt2": _pt2}[path.suffix]
    run, text = load(path)
    name, cfg, meta = read_description(path, text, f"the {runtime} model's metadata")
    return ExportedModel(path, name, cfg, runtime, run), {**meta, "source": runtime}


def _unreadable(path, what: str, e: Exception) -> CheckpointError:
    # OpenVINO leads with "Exception from src/...cpp:84:" lines; the reason follows them
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith("Exception from ")]
    first = (lines or [""])[0][:160]
    return CheckpointError(f"{path}: not a readable {what} ({type(e).__name__}: {first})")


def need(module: str, what: str, error: type[Exception] = SettingsError):
    """``import module``, or one ``error`` saying that ``what`` needs it and which extra brings it."""
    try:
        return __import__(module)
    except ImportError:
        raise error(f"{what} needs {module}, which is not installed: {INSTALL}") from None


def _onnx(path: Path):
    ort = need("onnxruntime", f"{path}: running an ONNX export")
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 -- onnxruntime raises its own classes for a bad file
        raise _unreadable(path, "ONNX model", e) from None
    names = [i.name for i in sess.get_inputs()]
    text = sess.get_modelmeta().custom_metadata_map.get(KEY)

    def run(xs):
        return sess.run(["logits"], dict(zip(names, (x.numpy() for x in xs))))[0]

    return run, text


def _openvino(path: Path):
    ov = need("openvino", f"{path}: running an OpenVINO export")
    if not path.with_suffix(".bin").is_file():
        raise CheckpointError(f"{path}: its weights {path.with_suffix('.bin').name} are missing")
    core = ov.Core()
    try:
        model = core.read_model(str(path))
        text = model.get_rt_info([KEY]).astype(str) if model.has_rt_info([KEY]) else None
        # f32: OpenVINO would otherwise run bf16 on CPUs that have it, and differ from PyTorch
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    except Exception as e:  # noqa: BLE001 -- OpenVINO raises RuntimeError and its own classes
        raise _unreadable(path, "OpenVINO model", e) from None
    out = compiled.output(0)

    def run(xs):
        return np.asarray(compiled([x.numpy() for x in xs])[out])

    return run, text


def _pt2(path: Path):
    extra = {f"{KEY}.json": ""}
    try:
        module = torch.export.load(str(path), extra_files=extra).module()
    except Exception as e:  # noqa: BLE001 -- a truncated zip, a foreign archive ...
        raise _unreadable(path, "torch.export program", e) from None

    def run(xs):
        with torch.no_grad():
            return module(*xs)

    return run, extra[f"{KEY}.json"]

"""Export a trained model for deployment outside fmfast (``fmfast export``).

onnx / torchscript: a graph taking ``video`` uint8 [B,3,T,W,H] (frames in the stored V2 axis
order) and/or ``current`` float32 [B,2S,3] amperes, returning the logits [B,2] or [B,2,W,H];
the batch size is free. official: the reference code's ``state_dict`` (its key names), which
its ``torch.load`` + ``load_state_dict`` read.

Every export is checked before it is put in place: the file is loaded back and run on a batch
of a different size than the one it was traced with (ONNX through onnxruntime when installed)
and compared with the PyTorch model; a mismatch is an error and leaves no file.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from fmfast.engine.checkpoints import load_model
from fmfast.errors import ExportError, SettingsError
from fmfast.files import atomic_write, check_output
from fmfast.models import INPUTS

FORMATS = ("onnx", "torchscript", "official")


class Exported(nn.Module):
    """The model with plain tensor inputs named for the export (no frame-store indexing)."""

    def __init__(self, model: nn.Module, model_name: str):
        super().__init__()
        self.model, self.model_name = model, model_name

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(x) if y is None else self.model(x, y)

    def input_names(self) -> list[str]:
        return list(INPUTS[self.model_name])

    def example(self, batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
        cfg = self.model.config
        g = torch.Generator().manual_seed(seed)
        video = torch.randint(0, 256, (batch, cfg.channels, cfg.num_frames, *cfg.frame_hw), generator=g,
                              dtype=torch.uint8)
        current = 8000 + 2000 * torch.randn(batch, cfg.current_len, cfg.current_channels, generator=g)
        return tuple({"video": video, "current": current}[n] for n in self.input_names())


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> str:
    got = torch.as_tensor(got, dtype=torch.float32)
    if got.shape != want.shape:
        raise ExportError(f"{what}: output shape {tuple(got.shape)} differs from PyTorch's {tuple(want.shape)}")
    err = (got - want).abs().max().item()
    tol = 1e-4 * max(1.0, want.abs().max().item())
    if not err <= tol:
        raise ExportError(f"{what}: output differs from PyTorch by {err:.3g} (tolerance {tol:.3g})")
    return f"max |diff| {err:.2g} vs PyTorch"


@contextlib.contextmanager
def _silenced():
    """The exporters print graphs, progress and warnings, some from C++ straight to file
    descriptors 1 and 2; keep the CLI's output to its one line."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    old_level = logging.root.manager.disable
    with tempfile.TemporaryFile() as sink, warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            logging.disable(old_level)


def export_onnx(w: Exported, path: Path, opset: int = 17) -> None:
    names = w.input_names()
    example = w.example(1)
    with _silenced():
        try:
            torch.onnx.export(w, example, str(path), input_names=names, output_names=["logits"],
                              dynamic_axes={n: {0: "batch"} for n in names + ["logits"]},
                              opset_version=opset, dynamo=False)
            return
        except Exception as e:  # the TorchScript-based exporter cannot take every graph
            legacy = e
        try:
            import onnxscript  # noqa: F401  (the torch.export-based exporter needs it)
        except ImportError:
            raise ExportError(f"ONNX export failed ({type(legacy).__name__}: {str(legacy).splitlines()[0][:200]}); "
                            f"installing onnxscript enables the torch.export-based exporter") from None
        batch = torch.export.Dim("batch", min=1, max=65536)
        torch.onnx.export(w, w.example(2), str(path), input_names=names, output_names=["logits"],
                          dynamic_shapes={"x": {0: batch}, "y": {0: batch} if len(names) == 2 else None},
                          opset_version=max(opset, 18),
                          dynamo=True, verbose=False)


def check_onnx(w: Exported, path: Path) -> str:
    try:
        import onnxruntime as ort
    except ImportError:
        return "not checked: onnxruntime is not installed"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = w.example(3, seed=1)
    got = sess.run(None, {n: t.numpy() for n, t in zip(w.input_names(), x)})[0]
    return "onnxruntime " + _close(torch.from_numpy(got), w(*x), str(path))


def export_torchscript(w: Exported, path: Path) -> None:
    with _silenced():
        traced = torch.jit.trace(w, w.example(1), check_trace=False)
        torch.jit.save(traced, str(path))


def check_torchscript(w: Exported, path: Path) -> str:
    with _silenced():
        loaded = torch.jit.load(str(path), map_location="cpu")
    x = w.example(3, seed=1)
    return "torch.jit.load " + _close(loaded(*x), w(*x), str(path))


def export_official(w: Exported, path: Path) -> None:
    torch.save({k: v.detach().cpu().clone() for k, v in w.model.to_official().items()}, path)


def check_official(w: Exported, path: Path) -> str:
    sd = torch.load(path, map_location="cpu", weights_only=True)
    back = type(w.model).from_official(sd, task=w.model.config.task, cfg=w.model.config).eval()
    x = w.example(3, seed=1)
    return f"{len(sd)} tensors, reloaded with from_official: " + _close(Exported(back, w.model_name)(*x), w(*x),
                                                                          str(path))


def export(checkpoint: str, fmt: str, out: str, opset: int = 17) -> str:
    """Write ``out`` in ``fmt`` after checking it; returns what the check found."""
    if fmt not in FORMATS:
        raise SettingsError(f"export format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    check_output(out, "file")
    model, meta = load_model(checkpoint)
    w = Exported(model.eval(), meta["model_name"]).eval()
    write, check = {"onnx": (export_onnx, check_onnx), "torchscript": (export_torchscript, check_torchscript),
                    "official": (export_official, check_official)}[fmt]
    out = Path(out)
    with torch.inference_mode(False), torch.no_grad(), atomic_write(out) as tmp:
        write(w, *( (tmp, opset) if fmt == "onnx" else (tmp,) ))
        w.eval()  # exporters restore the mode they found; keep BatchNorm in eval for the check
        return check(w, tmp)

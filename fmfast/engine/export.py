"""Export a trained model for deployment outside fmfast (``fmfast export``).

onnx (FILE.onnx), pt2 (FILE.pt2, ``torch.export``) and openvino (FILE.xml + FILE.bin): a graph
taking ``video`` uint8 [B,3,T,W,H] (frames in the stored V2 axis order) and/or ``current``
float32 [B,2S,3] amperes, returning ``logits`` [B,2] or [B,2,W,H]; the batch size is free
(``fmfast.engine.export_graphs``). official: the reference code's ``state_dict`` (its key
names, read by its ``torch.load`` + ``load_state_dict``) and a sidecar FILE.json.

Every export carries fmfast's description of the model (name, task, config shapes, data
settings, threshold: ``fmfast.engine.description``), so ``fmfast.engine.checkpoints.load_model``,
``Predictor``, ``fmfast evaluate`` and ``fmfast detect`` read it back. Every export is checked
before it is put in place: loaded back by its own runtime (``fmfast.engine.exported``; the
official file through ``load_model`` and its sidecar), run on a batch of a different size than
the one it was traced with and compared with the PyTorch model; a mismatch is an error and
leaves no file. Warnings from the exporters are not hidden.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fmfast.engine.checkpoints import load_model
from fmfast.engine.description import describe, sidecar
from fmfast.engine.export_graphs import SUFFIX, WRITERS
from fmfast.engine.exported import RUNTIMES
from fmfast.errors import ExportError, SettingsError
from fmfast.files import atomic_files, check_output
from fmfast.models import INPUTS

FORMATS = ("onnx", "pt2", "openvino", "official")
OPSET = 18  # the torch.export-based ONNX exporter's own opset; an older one is a lossy down-conversion


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


def check(w: Exported, path: Path, out: Path) -> str:
    """Load ``path`` as fmfast reads it and compare its logits with ``w``'s on a batch of 3
    (the graphs were traced at 2); ``out`` names the file in the messages."""
    runner, meta = load_model(path)
    if meta["model_name"] != w.model_name or runner.config != w.model.config:
        raise ExportError(f"{out}: the description read back ({meta['model_name']}, {runner.config}) "
                          f"is not the model's")
    if isinstance(runner, nn.Module):  # the official format: a module rebuilt from the state_dict
        runner = Exported(runner.eval(), w.model_name)
    x = w.example(3, seed=1)
    how = getattr(runner, "runtime", None) or f"{len(w.model.to_official())} tensors, reloaded with its sidecar"
    return f"{how}: " + _close(runner(*x), w(*x), str(out))


def _official(w: Exported, path: Path, description: str, opset: int = OPSET) -> None:
    torch.save({k: v.detach().cpu().clone() for k, v in w.model.to_official().items()}, path)
    sidecar(path).write_text(description + "\n")


def outputs(fmt: str, out: Path) -> list[Path]:
    """The files an export to ``out`` writes, the one a reader opens first."""
    want = SUFFIX.get(fmt)
    if want is not None and out.suffix != want:
        raise SettingsError(f"{out}: {fmt} exports are read back by their name; give a file name ending in {want}")
    if fmt == "official" and out.suffix in (*RUNTIMES, ".json"):
        raise SettingsError(f"{out}: name the official state_dict .pth or .pt ({out.suffix} is read as another format)")
    return [out] + ([out.with_suffix(".bin")] if fmt == "openvino" else [sidecar(out)] if fmt == "official" else [])


def export(checkpoint: str, fmt: str, out: str, opset: int = OPSET) -> str:
    """Write ``out`` in ``fmt`` after checking it; returns what the check found."""
    if fmt not in FORMATS:
        raise SettingsError(f"export format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out)
    files = outputs(fmt, out)
    for f in files:
        check_output(f, "file")
    model, meta = load_model(checkpoint)
    if not isinstance(model, nn.Module):
        raise SettingsError(f"{checkpoint}: already an export ({meta['source']}); export from the checkpoint")
    w = Exported(model.eval(), meta["model_name"]).eval()
    write = WRITERS.get(fmt, _official)
    with torch.inference_mode(False), torch.no_grad(), atomic_files(*files) as tmp:
        write(w, tmp / out.name, describe(meta["model_name"], model.config, meta), opset)
        w.eval()  # exporters restore the mode they found; keep BatchNorm in eval for the check
        return check(w, tmp / out.name, out)

"""fmfast checkpoints: one self-describing file with the model's weights and config, plus
(for training runs) the optimiser, scheduler, sampler and RNG state needed to resume; a run's
``best.pt`` also records what chose it (``selected_by``) and its calibrated ``threshold``.
Reference-code ``state_dict`` files are read too."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import torch

from fmfast.engine.description import described_model, read_description, sidecar
from fmfast.engine.exported import RUNTIMES, load_exported
from fmfast.errors import CheckpointError, CheckpointMismatch, OutputError
from fmfast.files import atomic_write, output_error
from fmfast.models import MODELS, build_model
from fmfast.models.registry import guess_official

FORMAT = "fmfast"
__all__ = ["FORMAT", "CheckpointError", "calibrated_threshold", "load_model", "model_payload", "read", "save"]


def save(path: str | os.PathLike, payload: dict) -> None:
    """Write ``payload`` atomically (temporary file, then rename). A full or read-only disk is
    one OutputError naming ``path`` (torch.save reports it as a zip-writer RuntimeError)."""
    with atomic_write(path) as tmp:
        try:
            torch.save(payload, tmp)
        except RuntimeError as e:  # "PytorchStreamWriter failed writing file data/3: file write failed"
            if "write" not in str(e):
                raise
            if _nearly_full(tmp):
                raise output_error(path, OSError(errno.ENOSPC, "no space left")) from None
            raise OutputError(f"{path}: cannot write the checkpoint ({str(e).splitlines()[0][:160]})") from None


def _nearly_full(path: Path) -> bool:
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 64 << 20  # the miniz error names no errno; a near-full disk it is


def read(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint file as a dict; corrupt or missing files raise CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickle garbage, wrong format ...
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
    return obj


def model_payload(model_name: str, model, data: dict | None = None) -> dict:
    """The part of a checkpoint that describes and holds the model."""
    return {
        "format": FORMAT,
        "version": 1,
        "model_name": model_name,
        "model_config": model.config.to_dict(),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "data": dict(data or {}),
    }


def _load_weights(path, model, sd) -> None:
    """Weights into ``model``; missing/unexpected keys and shape differences named on one line."""
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: no weights (expected a dict of tensors under 'model')")
    want = model.state_dict()
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    shapes = [f"{k} {list(sd[k].shape)} vs {list(want[k].shape)}" for k in sorted(set(sd) & set(want))
              if sd[k].shape != want[k].shape]
    parts = [f"{what} ({len(ks)}): {', '.join(ks[:6])}{', ...' if len(ks) > 6 else ''}"
             for what, ks in (("missing keys", missing), ("unexpected keys", unexpected), ("shape differences", shapes)) if ks]
    if parts:
        raise CheckpointError(f"{path}: weights do not fit the stored config: {'; '.join(parts)}")
    model.load_state_dict(sd)


def calibrated_threshold(state: dict) -> float | None:
    """The p(abnormal) threshold that maximised F1 (segmentation: pixel F1) on the validation
    split at the epoch a training run's ``best.pt`` was chosen; None where none was stored."""
    t = state.get("threshold")
    return float(t) if isinstance(t, (int, float)) and 0.0 <= t <= 1.0 else None


def load_model(path: str | os.PathLike, map_location="cpu", task: str | None = None, model_name: str | None = None):
    """Build the model stored in ``path`` -> ``(model, meta)``.

    Reads fmfast checkpoints, the reference code's ``state_dict`` files (model type and task
    inferred from their keys, or read from the ``FILE.json`` sidecar that ``fmfast export
    --format official`` writes) and fmfast's exports (.onnx, OpenVINO .xml, .pt2: a runner,
    ``fmfast.engine.exported.ExportedModel``, in place of the module). ``task``/``model_name``,
    when given, must match.
    """
    if Path(path).suffix in RUNTIMES:  # an fmfast export: its own runtime
        model, meta = load_exported(path)
    else:
        model, meta = _load_torch(path, map_location, task)
    if task is not None and meta["task"] != task:
        raise CheckpointError(f"{path}: a {meta['task']} checkpoint, but {task} was asked for")
    if model_name is not None and meta["model_name"] != model_name:
        raise CheckpointError(f"{path}: holds a '{meta['model_name']}' model, but '{model_name}' was asked for")
    assert meta["model_name"] in MODELS
    return model, meta


def _load_torch(path, map_location, task):
    obj = read(path, map_location)
    if obj.get("format") == FORMAT:
        name, cfg = described_model(path, obj)
        try:
            model = build_model(name, cfg)
        except (TypeError, ValueError, RuntimeError) as e:  # a config value of the wrong type or size
            raise CheckpointError(f"{path}: cannot build the stored {name} model ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
        _load_weights(path, model, obj.get("model"))
        return model, {"model_name": name, "task": cfg.task, "data": obj.get("data", {}), "source": "fmfast",
                       "threshold": calibrated_threshold(obj), "selected_by": obj.get("selected_by")}
    side = sidecar(path)
    if side.is_file():  # an fmfast export in the reference format: its sidecar says what it holds
        try:
            text = side.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{side}: cannot read the sidecar ({type(e).__name__})") from None
        name, cfg, meta = read_description(side, text, "the sidecar")
        try:
            model = MODELS[name].from_official(obj, cfg=cfg)
        except CheckpointMismatch as e:
            raise CheckpointError(f"{path}: does not fit its sidecar {side.name}: {e}") from None
        return model, {**meta, "source": "official"}
    try:
        name, model = guess_official(obj, task=task)
    except CheckpointMismatch as e:
        msg = str(e)
        if "cannot tell" in msg:  # the shapes a sidecar carries; the keyword hint is for from_official's callers
            msg = (msg.split("; pass image_size")[0] + f": no sidecar {side.name} next to it, as fmfast's official "
                   "export writes (from Python: from_official(..., image_size=, num_frames=))")
        raise CheckpointError(f"{path}: {msg}") from None
    return model, {"model_name": name, "task": model.config.task, "data": {}, "source": "official", "threshold": None}

"""fmfast checkpoints: one self-describing file with the model's weights and config, plus
(for training runs) the optimiser, scheduler, sampler and RNG state needed to resume; a run's
``best.pt`` also records what chose it (``selected_by``) and its calibrated ``threshold``.
Reference-code ``state_dict`` files are read too."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from fmfast.errors import CheckpointError, CheckpointMismatch
from fmfast.files import atomic_write
from fmfast.models import MODELS, ModelConfig, build_model
from fmfast.models.registry import guess_official

FORMAT = "fmfast"
__all__ = ["FORMAT", "CheckpointError", "calibrated_threshold", "load_model", "model_payload", "read", "save"]


def save(path: str | os.PathLike, payload: dict) -> None:
    """Write ``payload`` atomically (temporary file, then rename)."""
    with atomic_write(path) as tmp:
        torch.save(payload, tmp)


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


def calibrated_threshold(state: dict) -> float | None:
    """The p(abnormal) threshold that maximised F1 (segmentation: pixel F1) on the validation
    split at the epoch a training run's ``best.pt`` was chosen; None where none was stored."""
    t = state.get("threshold")
    return float(t) if isinstance(t, (int, float)) and 0.0 <= t <= 1.0 else None


def load_model(path: str | os.PathLike, map_location="cpu", task: str | None = None, model_name: str | None = None):
    """Build the model stored in ``path`` -> ``(model, meta)``.

    Reads fmfast checkpoints and the reference code's ``state_dict`` files (whose model type
    and task are inferred from their keys). ``task``/``model_name``, when given, must match.
    """
    obj = read(path, map_location)
    if obj.get("format") == FORMAT:
        name = obj["model_name"]
        cfg = ModelConfig.from_dict(obj["model_config"])
        model = build_model(name, cfg)
        try:
            model.load_state_dict(obj["model"])
        except RuntimeError as e:
            raise CheckpointError(f"{path}: weights do not fit the stored config: {str(e).splitlines()[0]}") from None
        meta = {"model_name": name, "task": cfg.task, "data": obj.get("data", {}), "source": "fmfast",
                "threshold": calibrated_threshold(obj), "selected_by": obj.get("selected_by")}
    else:
        try:
            name, model = guess_official(obj, task=task)
        except CheckpointMismatch as e:
            raise CheckpointError(f"{path}: {e}") from None
        meta = {"model_name": name, "task": model.config.task, "data": {}, "source": "official", "threshold": None}
    if task is not None and meta["task"] != task:
        raise CheckpointError(f"{path}: a {meta['task']} checkpoint, but {task} was asked for")
    if model_name is not None and meta["model_name"] != model_name:
        raise CheckpointError(f"{path}: holds a '{meta['model_name']}' model, but '{model_name}' was asked for")
    assert meta["model_name"] in MODELS
    return model, meta

"""What an fmfast file says about the model it holds: the model name, the ``ModelConfig``
(task, frame size, clip length, current window, ...), the data settings it was trained with
and its calibrated threshold. Checkpoints store it next to their weights; every export carries
it as JSON (ONNX metadata, OpenVINO rt_info, a pt2 extra file, the official format's
``FILE.json`` sidecar), so that fmfast reads each of them back as it reads a checkpoint."""
from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path

from fmfast.errors import CheckpointError
from fmfast.models import MODELS, ModelConfig

KEY = "fmfast"  # the metadata key (ONNX, OpenVINO) and, as KEY.json, the pt2 extra file
FORMAT = "fmfast"


def describe(model_name: str, config: ModelConfig, meta: dict | None = None) -> str:
    """The description of a model as one JSON string."""
    meta = meta or {}
    threshold = meta.get("threshold")
    return json.dumps({"format": FORMAT, "version": 1, "model_name": model_name, "model_config": config.to_dict(),
                       "data": _plain(meta.get("data") or {}),
                       "threshold": threshold if isinstance(threshold, float) and math.isfinite(threshold) else None,
                       "selected_by": _plain(meta.get("selected_by"))}, sort_keys=True)


def _plain(x):
    """JSON-safe: numbers, strings, lists and dicts as they are; anything else by its str()."""
    return json.loads(json.dumps(x, default=str))


def sidecar(path) -> Path:
    """Where the description of a reference-format ``state_dict`` lives: ``FILE.json``."""
    return Path(f"{path}.json")


def described_model(path, obj: dict) -> tuple[str, ModelConfig]:
    """The model name and config a description (or an fmfast checkpoint) stores, each checked."""
    name = obj.get("model_name")
    if name not in MODELS:
        raise CheckpointError(f"{path}: unknown model name {name!r} (expected one of {', '.join(sorted(MODELS))})")
    d = obj.get("model_config")
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: no model config (expected a dict under 'model_config')")
    want = {f.name: f for f in fields(ModelConfig)}
    unknown, missing = sorted(set(d) - set(want)), sorted(set(want) - set(d))
    if unknown or missing:
        raise CheckpointError(f"{path}: model config does not fit this fmfast version ("
                              + "; ".join(x for x in (f"unknown keys: {', '.join(map(str, unknown))}" if unknown else "",
                                                      f"missing keys: {', '.join(missing)}" if missing else "") if x)
                              + ")")
    try:
        cfg = ModelConfig.from_dict(d)
    except (TypeError, ValueError, AttributeError, ZeroDivisionError) as e:  # __post_init__ checks
        raise CheckpointError(f"{path}: unusable model config ({type(e).__name__}: {str(e)[:160]})") from None
    return name, cfg


def read_description(path, text: str | bytes | None, source: str) -> tuple[str, ModelConfig, dict]:
    """Parse a description found in ``source`` (what held it, for the error) of ``path``
    -> ``(model name, config, meta)``, meta as ``load_model`` returns it."""
    if not text:
        raise CheckpointError(f"{path}: {source} holds no fmfast description (was it written by fmfast export?)")
    try:
        obj = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: {source}: not fmfast's description ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path}: {source}: not fmfast's description")
    name, cfg = described_model(path, obj)
    threshold = obj.get("threshold")
    meta = {"model_name": name, "task": cfg.task, "data": obj.get("data") or {},
            "threshold": float(threshold) if isinstance(threshold, (int, float)) and 0 <= threshold <= 1 else None,
            "selected_by": obj.get("selected_by")}
    return name, cfg, meta

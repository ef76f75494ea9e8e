"""Run settings for ``fmfast.train``: defaults, YAML files (fmfast's own or the reference
code's ``CfgFor*.yaml``), command-line flags and dotted overrides, resolved in that order."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import yaml

from fmfast.errors import SettingsError
from fmfast.models.config import ModelConfig

MODEL_NAMES = ("fmformer", "video", "current")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "step", "constant")
AMP = ("auto", "bf16", "fp16", "off")
BACKENDS = ("auto", "reference", "fast")

# Model fields that follow from the data and are therefore not set under `model:`.
_DATA_DERIVED = {"task", "num_frames", "current_len", "image_size"}

DEFAULTS = {
    "data": {
        "root": None,  # None: the built-in synthetic furnace benchmark (generated once, cached)
        "num_frames": 10,
        "stride": 1,
        "current_seconds": 120,
        "synthetic": {"recordings": 8, "frames": 12000, "seed": 0, "size": 64},
        "val_fraction": 0.1,  # the end of each recording's train samples, behind a guard gap (data/splits.py)
        "val_split": None,  # or a JSON file {"<name>.mat": [train frames]} naming the validation samples
    },
    "model": {
        "name": "fmformer",
        "task": "classification",
        **{k: v for k, v in ModelConfig().to_dict().items() if k not in _DATA_DERIVED},
    },
    "optim": {"name": "adam", "lr": 5e-4, "weight_decay": 0.0, "momentum": 0.9, "nesterov": True},
    "schedule": {"name": "cosine", "end_lr": 0.0, "steps": [20], "gamma": 0.1, "warmup_epochs": 0},
    "train": {
        "epochs": 3,
        "batch_size": 32,
        "eval_batch_size": 128,
        "amp": "auto",
        "device": "auto",
        "seed": 0,
        "out": None,  # default: runs/<model>-<task>-<timestamp>
        "checkpoint_every": 0,  # steps between last.pt writes; 0 = once per epoch
        "max_train_samples": 0,  # 0 = the whole split each epoch; else a seeded subset per epoch
        "max_eval_samples": 0,
        "cuda_graphs": "auto",
        "backend": "auto",  # fmfast.nn.backend: auto | reference | fast (the same weights under each)
        "monitor": "auto",  # the validation metric best.pt is chosen on (auto: val/f1, val/miou)
        "patience": 0,  # stop after this many epochs without improvement (0: never)
    },
}
DEFAULTS["model"]["seg_hidden_dims"] = list(DEFAULTS["model"]["seg_hidden_dims"])


# command-line flag (and fmfast.fit keyword) -> (section, key); flags left unset override nothing
FLAGS = {
    "data": ("data", "root"), "num_frames": ("data", "num_frames"), "stride": ("data", "stride"),
    "current_seconds": ("data", "current_seconds"), "task": ("model", "task"), "model": ("model", "name"),
    "epochs": ("train", "epochs"), "batch_size": ("train", "batch_size"), "lr": ("optim", "lr"),
    "optimizer": ("optim", "name"), "weight_decay": ("optim", "weight_decay"), "momentum": ("optim", "momentum"),
    "schedule": ("schedule", "name"), "amp": ("train", "amp"), "device": ("train", "device"),
    "seed": ("train", "seed"), "out": ("train", "out"), "checkpoint_every": ("train", "checkpoint_every"),
    "max_train_samples": ("train", "max_train_samples"), "max_eval_samples": ("train", "max_eval_samples"),
    "cuda_graphs": ("train", "cuda_graphs"), "backend": ("train", "backend"), "monitor": ("train", "monitor"),
    "patience": ("train", "patience"),
    "val_fraction": ("data", "val_fraction"), "val_split": ("data", "val_split"),
}


# What changes when no dataset is named: the built-in synthetic benchmark at a size that
# trains FmFormer (the paper's architecture) on two CPU cores in under 2 minutes -- 32x32 px,
# 4-frame clips, 8 s of current, 6 x 4000 samples in batches of 32. Anything the user sets wins;
# `data.synthetic.size=64 --num-frames 10 --current-seconds 120` gives the paper's shapes.
# Measured at seed 0 on 2 quiet threads (wall with a warm cache; generating it adds ~7 s):
# 5 x 4000 in batches of 16 -> test F1 0.913 in 103 s; batches of 32 -> 0.940 in 90 s (the
# fused CPU path made a step of 32 cost less than two of 16); 6 epochs of those -> 0.956 in 108 s
# (seeds 1, 2: 0.954, 0.941); 5 x 5000 -> 0.949 in 110 s; 5 x 6000 -> 0.965 in 135 s. All in
# fp32; at --amp auto = bf16 (native-bf16 CPUs, attention differentiated in fp32) the chosen
# profile gave 0.954, 0.962, 0.951 at seeds 0, 1, 2 in 93-95 s. With the AMX attention kernels
# (forward and backward) 6 epochs took 74 s at F1 0.945 (seed 0); 7 epochs: 0.959 in 89 s. On a Zen 5
# (AVX512-BF16 kernels, fused Adam), 7 epochs from an empty cache: 0.968 / 0.965 / 0.942 at seeds
# 0 / 1 / 2 in 87 / 93 / 103 s; 8 epochs gave 0.958 / 0.962 / 0.943 in 94 / 87 / 99 s (no better).
QUICK = {
    "data": {"num_frames": 4, "current_seconds": 8, "synthetic": {"size": 32}},
    "optim": {"lr": 1e-3},
    "train": {"epochs": 7, "batch_size": 32, "max_train_samples": 4000, "max_eval_samples": 2000},
}


def _is_reference_cfg(d: dict) -> bool:
    return any(k in d for k in ("SOLVER", "DATA", "TRAIN", "MODEL", "TASK")) and not any(k.islower() for k in d)


_REF_MODELS = {"vit_for_vicu": "fmformer", "vit_for_video": "video", "vit_for_current": "current"}


def from_reference_cfg(d: dict, source: str = "config") -> dict:
    """Translate the reference code's YAML (``DATA.NUM_FRAMES``, ``SOLVER.BASE_LR`` ...) into
    fmfast settings, so its users keep their files. Keys fmfast has no use for are ignored."""
    out: dict = {"data": {}, "model": {}, "optim": {}, "schedule": {}, "train": {}}
    data, solver, model = d.get("DATA", {}) or {}, d.get("SOLVER", {}) or {}, d.get("MODEL", {}) or {}
    train, test = d.get("TRAIN", {}) or {}, d.get("TEST", {}) or {}
    pick = [
        (data, "PATH_TO_DATA_DIR", "data", "root"),
        (data, "NUM_FRAMES", "data", "num_frames"),
        (data, "SAMPLING_RATE", "data", "stride"),
        (data, "CURRENT_SECONDS", "data", "current_seconds"),
        (data, "CURRENT_PATCH_DIMS", "model", "current_channels"),
        (model, "NUM_CLASSES", "model", "num_classes"),
        (model, "IMAGE_PATCH_SIZE", "model", "patch_size"),
        (model, "FRAME_PATCH_SIZE", "model", "frame_patch_size"),
        (model, "ADDITIONAL_TOKENS", "model", "dilated_tokens"),
        (solver, "BASE_LR", "optim", "lr"),
        (solver, "WEIGHT_DECAY", "optim", "weight_decay"),
        (solver, "MOMENTUM", "optim", "momentum"),
        (solver, "NESTEROV", "optim", "nesterov"),
        (solver, "COSINE_END_LR", "schedule", "end_lr"),
        (solver, "STEPS", "schedule", "steps"),
        (solver, "GAMMA", "schedule", "gamma"),
        (solver, "WARMUP_EPOCHS", "schedule", "warmup_epochs"),
        (solver, "MAX_EPOCH", "train", "epochs"),
        (train, "BATCH_SIZE", "train", "batch_size"),
        (test, "BATCH_SIZE", "train", "eval_batch_size"),
        (d, "RNG_SEED", "train", "seed"),
        (d, "TASK", "model", "task"),
    ]
    for src, key, sec, name in pick:
        if key in src:
            out[sec][name] = src[key]
    if "OPTIMIZING_METHOD" in solver:
        out["optim"]["name"] = str(solver["OPTIMIZING_METHOD"]).lower()
    if "LR_POLICY" in solver:
        policy = str(solver["LR_POLICY"]).lower()
        out["schedule"]["name"] = {"steps_with_relative_lrs": "step", "cosine": "cosine", "step": "step"}.get(policy, policy)
    if "MODEL_NAME" in model:
        name = str(model["MODEL_NAME"])
        if name not in _REF_MODELS:
            raise SettingsError(f"{source}: unknown MODEL.MODEL_NAME {name!r} (known: {', '.join(_REF_MODELS)})")
        out["model"]["name"] = _REF_MODELS[name]
    if d.get("OUTPUT_DIR"):
        out["train"]["out"] = d["OUTPUT_DIR"]
    if out["data"].get("root") in ("", None):
        out["data"].pop("root", None)
    return out


def merge(base: dict, update: dict, where: str = "") -> dict:
    """Deep-merge ``update`` into a copy of ``base``; unknown keys are an error."""
    out = copy.deepcopy(base)
    for k, v in update.items():
        path = f"{where}{k}"
        if k not in out:
            raise SettingsError(f"unknown setting '{path}' (known: {', '.join(sorted(out))})")
        if isinstance(out[k], dict):
            if not isinstance(v, dict):
                raise SettingsError(f"setting '{path}' is a section; give one of its keys, e.g. {path}.{next(iter(out[k]))}=...")
            out[k] = merge(out[k], v, path + ".")
        else:
            if isinstance(out[k], float) and isinstance(v, str):
                try:  # YAML 1.1 reads "1e-3" as a string
                    v = float(v)
                except ValueError:
                    pass
            out[k] = v
    return out


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SettingsError(f"{path}: config file not found")
    try:
        d = yaml.safe_load(path.read_bytes().decode("utf-8-sig")) or {}
    except UnicodeDecodeError as e:
        raise SettingsError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    except yaml.YAMLError as e:
        raise SettingsError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise SettingsError(f"{path}: expected a mapping at the top level")
    return from_reference_cfg(d, str(path)) if _is_reference_cfg(d) else d


def parse_override(text: str) -> dict:
    """``"model.depth=4"`` -> ``{"model": {"depth": 4}}`` (the value is read as YAML)."""
    if "=" not in text:
        raise SettingsError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            value = float(value)
        except ValueError:
            pass
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


# Integer settings that may be 0 and number settings that may be 0 (all others must be >= 1 or
# > 0); data.val_fraction lies in [0, 1). train.cuda_graphs is checked with the choices below.
_MAY_BE_ZERO = {"data.synthetic.seed", "train.seed", "train.checkpoint_every", "train.max_train_samples",
                "train.max_eval_samples", "train.patience", "schedule.warmup_epochs", "schedule.steps",
                "optim.weight_decay", "optim.momentum", "schedule.end_lr", "data.val_fraction"}
_UNCHECKED = {"train.cuda_graphs"}


def _problem(name: str, v, default) -> str | None:
    """What is wrong with ``v`` as the value of a setting whose default is ``default``, or None."""
    if default is None:
        return None if v is None or isinstance(v, str) else "expected a path"
    if isinstance(default, bool):
        return None if isinstance(v, bool) else "expected true or false"
    if isinstance(default, str):
        return None if isinstance(v, str) else "expected a string"
    if isinstance(default, list):
        if not isinstance(v, list):
            return "expected a list, e.g. [1, 2]"
        return next((p for x in v if (p := _problem(name, x, default[0] if default else 0))), None)
    floor = 0 if name in _MAY_BE_ZERO else 1
    if isinstance(default, int):
        if not isinstance(v, int) or isinstance(v, bool):
            return "expected an integer"
        return None if v >= floor else f"must be >= {floor}"
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        return "expected a finite number"
    if abs(v) > 3.4028234663852886e38:  # learning rates and the like become float32 tensors
        return "too large (beyond float32's range)"
    if name == "data.val_fraction" and not v < 1:
        return "must be below 1"
    return None if (v >= 0 if floor == 0 else v > 0) else ("must be >= 0" if floor == 0 else "must be > 0")


def check_types(s: dict, defaults: dict = DEFAULTS, where: str = "") -> None:
    """Every setting against the type and range of its default: one SettingsError naming it."""
    for k, d in defaults.items():
        name = f"{where}{k}"
        if isinstance(d, dict):
            check_types(s[k], d, name + ".")
        elif name not in _UNCHECKED and (p := _problem(name, s[k], d)):
            raise SettingsError(f"{name}={s[k]!r}: {p}")


def validate(s: dict) -> dict:
    """Types and ranges (``check_types``), then the choices and combinations; -> ``s``."""
    from fmfast.engine.selection import resolve_monitor

    check_types(s)
    m, o, sc, t = s["model"], s["optim"], s["schedule"], s["train"]
    checks = [
        (m["name"] in MODEL_NAMES, f"model.name must be one of {MODEL_NAMES}, got {m['name']!r}"),
        (m["task"] in ("classification", "segmentation"), f"model.task must be classification or segmentation, got {m['task']!r}"),
        (o["name"] in OPTIMIZERS, f"optim.name must be one of {OPTIMIZERS}, got {o['name']!r}"),
        (sc["name"] in SCHEDULES, f"schedule.name must be one of {SCHEDULES}, got {sc['name']!r}"),
        (t["amp"] in AMP, f"train.amp must be one of {AMP}, got {t['amp']!r}"),
        (t["backend"] in BACKENDS, f"train.backend must be one of {BACKENDS}, got {t['backend']!r}"),
        # YAML 1.1 reads a bare on/off as true/false
        (t["cuda_graphs"] in ("auto", "on", "off", True, False), f"train.cuda_graphs must be auto, on or off, got {t['cuda_graphs']!r}"),
        (not (m["name"] == "current" and m["task"] == "segmentation"), "the current-only model has no segmentation head; use model fmformer or video"),
    ]
    for ok, msg in checks:
        if not ok:
            raise SettingsError(msg)
    resolve_monitor(s)
    return s


def model_config(s: dict, frame_hw: tuple[int, int]) -> ModelConfig:
    """The ModelConfig a run trains, from its settings and the data's frame size."""
    fields = {k: v for k, v in s["model"].items() if k != "name"}
    fields.update(
        num_frames=s["data"]["num_frames"],
        current_len=2 * s["data"]["current_seconds"],
        image_size=frame_hw if frame_hw[0] != frame_hw[1] else frame_hw[0],
    )
    try:
        return ModelConfig(**fields)
    except (TypeError, ValueError) as e:
        raise SettingsError(f"model settings do not fit the data: {e}") from None

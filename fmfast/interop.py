"""Checkpoint interop with the published reference code (GaochangWu/FMF-Benchmark).

``KEY_MAP`` is the one table of key names: for each model, (fmfast prefix, official prefix)
pairs, listed in the order the reference model's ``state_dict`` holds them. A prefix ending in
"." renames a module subtree; any other entry is one whole key. ``transformer.*`` and
``head.*`` / ``mlp_head.*`` keep their names (fmfast's modules mirror the reference's there).
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from fmfast.config import ModelConfig

KEY_MAP: dict[str, tuple[tuple[str, str], ...]] = {
    # reference class ViTForViCu (MODEL_NAME vit_for_vicu)
    "fmformer": (
        ("video_embed.scales.0.pos_embedding", "pos_embedding1"),
        ("video_embed.cls_token", "cls_token1"),
        ("current_embed.pos_embedding", "pos_embedding2"),
        ("current_embed.cls_token", "cls_token2"),
        ("video_embed.scales.0.norm_in.", "to_patch_embedding1.1."),
        ("video_embed.scales.0.proj.", "to_patch_embedding1.2."),
        ("video_embed.scales.0.norm_out.", "to_patch_embedding1.3."),
        ("video_embed.scales.1.pos_embedding", "get_additional_tokens.pos_embedding"),
        ("video_embed.scales.1.norm_in.", "get_additional_tokens.to_patch_embedding.1."),
        ("video_embed.scales.1.proj.", "get_additional_tokens.to_patch_embedding.2."),
        ("video_embed.scales.1.norm_out.", "get_additional_tokens.to_patch_embedding.3."),
        ("current_embed.norm_in.", "to_patch_embedding2.0."),
        ("current_embed.proj.", "to_patch_embedding2.1."),
        ("current_embed.norm_out.", "to_patch_embedding2.2."),
        ("transformer.", "transformer."),
        ("head.", "head."),
    ),
    # reference class ViTForVideo (vit_for_video, PETYPE learnable; a 'tri' table has the same key)
    "video": (
        ("video_embed.cls_token", "cls_token"),
        ("video_embed.scales.0.norm_in.", "to_patch_embedding.1."),
        ("video_embed.scales.0.proj.", "to_patch_embedding.2."),
        ("video_embed.scales.0.norm_out.", "to_patch_embedding.3."),
        ("video_embed.scales.0.pos_embedding", "pos_embedding.pe"),
        ("video_embed.scales.1.pos_embedding", "get_additional_tokens.pos_embedding"),
        ("video_embed.scales.1.norm_in.", "get_additional_tokens.to_patch_embedding.1."),
        ("video_embed.scales.1.proj.", "get_additional_tokens.to_patch_embedding.2."),
        ("video_embed.scales.1.norm_out.", "get_additional_tokens.to_patch_embedding.3."),
        ("transformer.", "transformer."),
        ("head.", "head."),
    ),
    # reference class ViTForCurrent (vit_for_current)
    "current": (
        ("current_embed.pos_embedding", "pos_embedding"),
        ("current_embed.cls_token", "cls_token"),
        ("current_embed.norm_in.", "to_patch_embedding.0."),
        ("current_embed.proj.", "to_patch_embedding.1."),
        ("current_embed.norm_out.", "to_patch_embedding.2."),
        ("transformer.", "transformer."),
        ("mlp_head.", "mlp_head."),
    ),
}

# the reference's names for the three models, for messages
OFFICIAL_NAMES = {"fmformer": "ViTForViCu (vit_for_vicu)", "video": "ViTForVideo (vit_for_video)",
                  "current": "ViTForCurrent (vit_for_current)"}
FMFAST_NAMES = {"fmformer": "FmFormer", "video": "VideoViT", "current": "CurrentViT"}


class CheckpointMismatch(ValueError):
    """A reference-code checkpoint that cannot be read or does not fit the requested model."""


def _match(key: str, prefix: str) -> bool:
    return key.startswith(prefix) if prefix.endswith(".") else key == prefix


def _rename(key: str, kind: str, to_official: bool) -> tuple[int, str] | None:
    """(rule index, renamed key), or None when no rule of ``kind`` covers ``key``."""
    for i, (ours, theirs) in enumerate(KEY_MAP[kind]):
        src, dst = (ours, theirs) if to_official else (theirs, ours)
        if _match(key, src):
            return i, dst + key[len(src):]
    return None


def to_official_keys(state_dict: Mapping[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """fmfast ``state_dict`` -> reference names, in the reference's ``state_dict`` order."""
    out = []
    for pos, (k, v) in enumerate(state_dict.items()):
        r = _rename(k, kind, to_official=True)
        if r is None:
            raise KeyError(f"fmfast key {k!r} has no official name for a {FMFAST_NAMES[kind]}")
        out.append((r[0], pos, r[1], v))
    return {k: v for _, _, k, v in sorted(out, key=lambda e: e[:2])}


def from_official_keys(state_dict: Mapping[str, torch.Tensor], kind: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Reference ``state_dict`` -> (fmfast-named dict, official keys no rule covers)."""
    out, unknown = {}, []
    for k, v in state_dict.items():
        r = _rename(k, kind, to_official=False)
        if r is None:
            unknown.append(k)
        else:
            out[r[1]] = v
    return out, unknown


# --------------------------------------------------------------------------- reading files

_WRAPPER_KEYS = ("model_state_dict", "state_dict", "model", "model_state")
_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DDP, torch.compile


def read_official(source, name: str | None = None) -> dict[str, torch.Tensor]:
    """A reference ``state_dict`` from a dict or a ``torch.save`` file (plain, or wrapped under
    'model_state_dict' / 'state_dict' / 'model' / 'model_state'); ``module.`` prefixes removed."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = str(path)
        if not path.is_file():
            raise CheckpointMismatch(f"{path}: no such checkpoint file")
        try:
            source = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated zip, not a torch file, pickled objects ...
            raise CheckpointMismatch(
                f"{path}: cannot read as a PyTorch state_dict ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
            ) from None
    name = name or "state_dict"
    if not isinstance(source, Mapping):
        raise CheckpointMismatch(f"{name}: expected a state_dict (a dict of tensors), found {type(source).__name__}")
    if not all(isinstance(v, torch.Tensor) for v in source.values()):
        for w in _WRAPPER_KEYS:
            if isinstance(source.get(w), Mapping):
                source = source[w]
                break
    bad = [k for k, v in source.items() if not isinstance(v, torch.Tensor)]
    if bad or not source:
        raise CheckpointMismatch(
            f"{name}: not a state_dict of tensors (non-tensor entries: {bad[:5]})" if bad else f"{name}: empty state_dict"
        )
    out = {}
    for k, v in source.items():
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


# --------------------------------------------------------------------------- recognising checkpoints

def guess_kind(sd: Mapping[str, torch.Tensor]) -> str | None:
    """Which reference model a state_dict belongs to, from its keys."""
    keys = set(sd)
    if "cls_token1" in keys or any(k.startswith(("to_patch_embedding1.", "to_patch_embedding2.")) for k in keys):
        return "fmformer"
    # the current ViT's tokenizer starts at index 0 (the video ones at 1, after the rearrange)
    if "mlp_head.weight" in keys or "to_patch_embedding.0.weight" in keys or "transformer.norm.weight" in keys:
        return "current"
    if "pos_embedding.pe" in keys or "to_patch_embedding.1.weight" in keys or any(k.startswith("head.") for k in keys):
        return "video"
    return None


def guess_task(sd: Mapping[str, torch.Tensor]) -> str | None:
    if any(k.startswith(("head.de_patch_embedding", "head.decode")) for k in sd):
        return "segmentation"
    if any(k.startswith(("head.mlp_head", "mlp_head.")) for k in sd):
        return "classification"
    return None


def _shape(sd, key, dim=None):
    t = sd.get(key)
    if t is None:
        return None
    return tuple(t.shape) if dim is None else (t.shape[dim] if t.dim() > dim else None)


def infer_config(kind: str, sd: Mapping[str, torch.Tensor], task: str, **overrides) -> ModelConfig:
    """A ModelConfig that fits ``sd`` (sizes read from the tensors; ``overrides`` win).

    What the tensors cannot tell is taken from ``overrides`` or the defaults: heads vs dim_head
    (3 x 32 in every published model), channels and frames per tubelet, and how the video token
    count splits into clip length and frame size (64x64 frames assumed, the FMF size).
    Keys missing for inference fall back to the defaults; the key check reports them later.
    """
    c = dict(task=task)
    given = dict(overrides)
    D = ModelConfig()
    emb = "to_patch_embedding1" if kind == "fmformer" else "to_patch_embedding"
    cls_key = {"fmformer": "cls_token1"}.get(kind, "cls_token")
    dim = _shape(sd, cls_key, -1) or D.dim
    c["dim"] = dim
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"transformer\.layers\.(\d+)\.", k))}
    if layers:
        c["depth"] = max(layers) + 1
    if kind == "fmformer":
        qkv, mlp = "transformer.layers.0.0.stream1.to_qkv.weight", "transformer.layers.0.1.ff1.net.1.weight"
    else:
        qkv, mlp = "transformer.layers.0.0.to_qkv.weight", "transformer.layers.0.1.net.1.weight"
    if (m := _shape(sd, mlp, 0)) is not None:
        c["mlp_dim"] = m
    if (q := _shape(sd, qkv, 0)) is not None and q % 3 == 0:
        inner = q // 3
        if "heads" in given and inner % given["heads"] == 0:
            c["dim_head"] = inner // given["heads"]
        else:
            dh = given.get("dim_head", D.dim_head)
            c["heads"], c["dim_head"] = (inner // dh, dh) if inner % dh == 0 else (1, inner)
    ncls = _shape(sd, {"current": "mlp_head.weight"}.get(kind, "head.mlp_head1.1.weight"), 0) or _shape(
        sd, "head.decode_out.weight", 0
    )
    if ncls:
        c["num_classes"] = ncls
    hidden = [_shape(sd, f"head.decode{i}.0.weight", 1) for i in (1, 2, 3)]
    if all(hidden):
        c["seg_hidden_dims"] = tuple(hidden)
    if kind in ("fmformer", "current"):
        cur_pos, cur_norm = ("pos_embedding2", "to_patch_embedding2.0.weight") if kind == "fmformer" else (
            "pos_embedding", "to_patch_embedding.0.weight")
        if (n := _shape(sd, cur_pos, 1)) is not None:
            c["current_len"] = n - 1
        if (n := _shape(sd, cur_norm, 0)) is not None:
            c["current_channels"] = n
    if kind in ("fmformer", "video"):
        c["dilated_tokens"] = any(k.startswith("get_additional_tokens.") for k in sd)
        pos0 = "pos_embedding1" if kind == "fmformer" else "pos_embedding.pe"
        patch_dim = _shape(sd, f"{emb}.1.weight", 0)
        n0 = _shape(sd, pos0, 1)
        seg_in = _shape(sd, "head.de_patch_embedding.1.weight", 1)
        t_grid = seg_in // dim if seg_in and seg_in % dim == 0 else None
        if patch_dim and n0:
            c.update(_video_geometry(patch_dim, n0 - 1, t_grid, given))
    c.update(given)
    try:
        return ModelConfig(**c)
    except (TypeError, ValueError) as e:
        raise CheckpointMismatch(f"no model config fits this checkpoint: {e}") from None


def _video_geometry(patch_dim: int, n0: int, t_grid: int | None, given: dict) -> dict:
    """Patch size, clip length and frame size from the patch vector length and the token count."""
    D = ModelConfig()
    ch = given.get("channels", D.channels)
    pf = given.get("frame_patch_size", D.frame_patch_size)
    p = given.get("patch_size") or math.isqrt(patch_dim // (ch * pf))
    if ch * pf * p * p != patch_dim:
        return {}  # let the shape check report it
    out = {"patch_size": p}
    if "image_size" in given:
        h, w = ModelConfig(image_size=given["image_size"], patch_size=p, dilated_tokens=False).frame_hw
        if n0 % ((h // p) * (w // p)) == 0:
            out["num_frames"] = given.get("num_frames", n0 // ((h // p) * (w // p)) * pf)
        return out
    t = t_grid or (given["num_frames"] // pf if "num_frames" in given else None)
    if t is None and D.image_size % p == 0 and n0 % ((D.image_size // p) ** 2) == 0:
        return {**out, "num_frames": n0 // ((D.image_size // p) ** 2) * pf, "image_size": D.image_size}
    t = t or D.num_frames // pf
    side = math.isqrt(n0 // t) if n0 % t == 0 else 0
    if side * side * t != n0:
        raise CheckpointMismatch(
            f"cannot tell clip length and frame size from {n0} video tokens of {pf}x{p}x{p}; "
            "pass image_size=... and num_frames=..."
        )
    out.update(num_frames=t * pf, image_size=side * p)
    if "num_frames" in given:
        out["num_frames"] = given["num_frames"]
    return out


# --------------------------------------------------------------------------- loading

def _listing(keys, limit: int = 12) -> str:
    """Sorted keys, a module's keys folded into ``module.* (n keys)`` when there are many."""
    groups: dict[str, list[str]] = {}
    for k in sorted(keys):
        parts = k.split(".")
        depth = 3 if len(parts) > 3 and parts[1] == "layers" else 2  # one group per encoder layer
        groups.setdefault(".".join(parts[:depth]), []).append(k)
    items = []
    for g, ks in groups.items():
        items += ks if len(ks) <= 3 else [f"{g}.* ({len(ks)} keys)"]
    more = f", ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def check_fits(model, sd: Mapping[str, torch.Tensor], name: str = "state_dict", asked_task: str | None = None) -> None:
    """Raise CheckpointMismatch listing missing/unexpected keys and shape differences."""
    kind = model.KIND
    want = {k: tuple(v.shape) for k, v in model.to_official().items()}
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    shapes = [f"{k}: checkpoint {list(sd[k].shape)} vs model {list(want[k])}"
              for k in want if k in sd and tuple(sd[k].shape) != want[k]]
    if not (missing or unexpected or shapes):
        return
    lines = [f"{name} does not fit fmfast.{FMFAST_NAMES[kind]} "
             f"(reference {OFFICIAL_NAMES[kind]}, task={model.config.task}):"]
    other, task = guess_kind(sd), guess_task(sd)
    if other and other != kind:  # hints first: they name the fix
        lines.append(f"  hint: this looks like a {OFFICIAL_NAMES[other]} checkpoint; "
                     f"load it with fmfast.{FMFAST_NAMES[other]}.from_official")
    if task and task != model.config.task:
        lines.append(f"  hint: this is a {task} checkpoint; pass task={task!r}")
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    if shapes:
        lines.append(f"  shape differences ({len(shapes)}): " + "; ".join(shapes[:8])
                     + (f"; ... and {len(shapes) - 8} more" if len(shapes) > 8 else ""))
    raise CheckpointMismatch("\n".join(lines))


def load_official(cls, source, task: str | None = None, cfg: ModelConfig | None = None,
                  name: str | None = None, **overrides):
    """Implementation of ``<Model>.from_official`` (see there)."""
    name = name or (str(source) if isinstance(source, (str, os.PathLike)) else "state_dict")
    sd = read_official(source, name)
    kind = cls.KIND
    if cfg is not None:
        if task is not None and task != cfg.task:
            raise ValueError(f"task={task!r} disagrees with cfg.task={cfg.task!r}")
        if overrides:
            raise ValueError("pass either cfg or config overrides, not both")
    else:
        task = task or guess_task(sd) or "classification"
        try:
            cfg = infer_config(kind, sd, task, **overrides)
        except CheckpointMismatch as e:
            raise CheckpointMismatch(f"{name}: {e}") from None
    try:
        model = cls(cfg)
    except ValueError as e:
        raise CheckpointMismatch(f"{name}: {e}") from None
    check_fits(model, sd, name)
    ours, _ = from_official_keys(sd, kind)
    model.load_state_dict(ours, strict=True)
    return model


def guess_official(source, task: str | None = None, **overrides):
    """Recognise a reference checkpoint (dict or path) -> ``(model name, loaded model)``."""
    from fmfast.models import MODELS

    name = str(source) if isinstance(source, (str, os.PathLike)) else "state_dict"
    sd = read_official(source, name)
    kind = guess_kind(sd)
    if kind is None:
        raise CheckpointMismatch(
            f"{name}: not a reference FMF-Benchmark state_dict (no known keys; first keys: {_listing(list(sd)[:5], 5)})"
        )
    return kind, load_official(MODELS[kind], sd, task=task, name=name, **overrides)

"""Checkpoint interop with the published reference code (GaochangWu/FMF-Benchmark).

``KEY_MAP`` is the one table of key names: for each model, (fmfast prefix, official prefix)
pairs, listed in the order the reference model's ``state_dict`` holds them. A prefix ending in
"." renames a module subtree; any other entry is one whole key. ``transformer.*`` and
``head.*`` / ``mlp_head.*`` keep their names (fmfast's modules mirror the reference's there).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from fmfast.errors import CheckpointMismatch
from fmfast.models.config import ModelConfig
from fmfast.models.official_config import guess_kind, guess_task, infer_config

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
    if isinstance(source, Mapping) and source.get("format") == "fmfast":
        raise CheckpointMismatch(f"{name}: an fmfast checkpoint, not a reference-code state_dict; load it with "
                                 f"fmfast.engine.checkpoints.load_model (fmfast evaluate/detect/export read it as is)")
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
             f"(reference {OFFICIAL_NAMES[kind]}, task={model.config.task})"]
    other, task = guess_kind(sd), guess_task(sd)
    if other and other != kind:  # hints first: they name the fix
        lines.append(f"hint: this looks like a {OFFICIAL_NAMES[other]} checkpoint; "
                     f"load it with fmfast.{FMFAST_NAMES[other]}.from_official")
    if task and task != model.config.task:
        lines.append(f"hint: this is a {task} checkpoint; pass task={task!r}")
    if missing:
        lines.append(f"missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected:
        lines.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    if shapes:
        lines.append(f"shape differences ({len(shapes)}): " + "; ".join(shapes[:8])
                     + (f"; ... and {len(shapes) - 8} more" if len(shapes) > 8 else ""))
    raise CheckpointMismatch(lines[0] + ": " + "; ".join(lines[1:]))  # one line, as every library error


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


class OfficialInterop:
    """``from_official`` / ``to_official`` for a model whose ``KIND`` is a key of ``fmfast.models.interop.KEY_MAP``."""

    KIND: str

    @classmethod
    def from_official(cls, source, task: str | None = None, cfg: ModelConfig | None = None, **overrides):
        """Build the model from a reference-code ``state_dict`` (a dict or a file path).

        Sizes are read from the tensors (``task`` too, when not given). Two things cannot be:
        how the video token count splits into clip length and frame size (64x64 frames are
        assumed unless ``image_size`` or ``num_frames`` says otherwise) and how ``heads *
        dim_head`` splits (``dim_head`` 32 assumed, as in every published model). Config
        ``overrides`` or a full ``cfg`` settle them. Raises ``CheckpointMismatch``.
        """
        return load_official(cls, source, task=task, cfg=cfg, **overrides)

    def to_official(self) -> dict[str, torch.Tensor]:
        """This model's ``state_dict`` under the reference code's key names (shares storage)."""
        return to_official_keys(self.state_dict(), self.KIND)

"""Recognising a published (reference-code) checkpoint: which model it holds, for which task,
and the ModelConfig its tensors fit."""
from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch

from fmfast.errors import CheckpointMismatch
from fmfast.models.config import ModelConfig


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



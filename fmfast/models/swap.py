"""``swap_modules``: give a model built from the published code (or fmfast's reference model)
fmfast's tokenizer and attention kernels without rewriting it.

The published classes (GaochangWu/FMF-Benchmark ``FMF/models``) cannot be imported here, so they
are recognised by class name *and* attribute structure:

- ``MultiStreamAttention`` (``stream1``, ``stream2``, ``cross_attn``) -> ``fmfast.nn.MultiStreamAttention``
  holding the very same ``stream1``/``stream2``/``cross_attn`` submodules: one packed launch per
  phase on the fast path, the original math on the reference path;
- ``Attention`` (``norm``, ``to_qkv``, ``to_out``, ``heads``, ``scale``) elsewhere, as in the
  baselines' encoders -> ``fmfast.nn.Attention`` holding the same submodules;
- ``ViTForViCu`` / ``ViTForVideo``: their video tokenizer is not a module but steps inline in
  the top-level ``forward`` (rearrange, LN-Linear-LN, cls concat, position add, and for the
  dilated tokens a nearest interpolation). Swapping it therefore means replacing that
  ``forward``: the instance gets a ``forward`` that runs fmfast's fused tokenizer op on the
  model's own parameters (read at call time, never copied), then the model's own
  ``transformer`` and ``head``. Inputs the fused tokenizer cannot take (other shapes, a video
  that needs a gradient) run the original ``forward``. ``del model.forward`` undoes it.

Parameters are shared, never copied: ``state_dict`` keys and tensors, and optimisers built
before the swap, stay valid. Modules that match a name but not the structure, or that the
kernels cannot run exactly (attention dropout > 0, unsupported head sizes), are left alone and
listed in the report with the reason; everything else is left alone silently.
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field

import torch
from torch import nn

from fmfast.nn.attention import Attention, MultiStreamAttention
from fmfast.nn.backend import Dispatching, check_backend
from fmfast.nn.embed import LN_EPS, ScaleParams, current_tokens, multiscale_tokens
_PATTERN = "b c (f pf) (h p1) (w p2) -> b (f h w) (p1 p2 pf c)"


@dataclass
class SwapReport:
    replaced: list[tuple[str, str]] = field(default_factory=list)  # (module path, what was done)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (module path, why not)

    def __str__(self) -> str:
        lines = [f"swapped {len(self.replaced)}, left {len(self.skipped)}"]
        lines += [f"  + {name or '<model>'}: {what}" for name, what in self.replaced]
        lines += [f"  - {name or '<model>'}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


class _Skip(Exception):
    """A module that looks like a published class but cannot be swapped exactly."""


# ---- recognisers -------------------------------------------------------------------------------
def _attn_dropout(m: nn.Module) -> float:
    d = getattr(m, "dropout", None)
    return float(d.p) if isinstance(d, nn.Dropout) else 0.0


def _out_proj_ok(m) -> bool:
    return isinstance(m, nn.Identity) or (isinstance(m, nn.Sequential) and isinstance(m[0], nn.Linear))


def _head_dim(qkv: nn.Linear, heads: int) -> int:
    return qkv.out_features // (3 * heads)


def _check_attention(m: nn.Module, where: str = "") -> None:
    """Raise _Skip unless ``m`` is the published single-stream attention branch."""
    ok = (isinstance(getattr(m, "norm", None), nn.LayerNorm) and isinstance(getattr(m, "to_qkv", None), nn.Linear)
          and m.to_qkv.bias is None and _out_proj_ok(getattr(m, "to_out", None))
          and isinstance(getattr(m, "heads", None), int) and isinstance(getattr(m, "scale", None), float))
    if not ok:
        raise _Skip(f"{where}not the published Attention structure (norm, to_qkv without bias, to_out, heads, scale)")
    if _attn_dropout(m) > 0:
        raise _Skip(f"{where}attention dropout p={_attn_dropout(m)} (the kernel has none)")
    from fmfast.kernels.attention import HEAD_DIMS

    d = _head_dim(m.to_qkv, m.heads)
    if d not in HEAD_DIMS:
        raise _Skip(f"{where}head dim {d} (the kernel runs {HEAD_DIMS})")


def _check_cross(m: nn.Module) -> None:
    names = ("norm1", "norm2", "to_qkv1", "to_qkv2", "to_out1", "to_out2", "heads", "scale")
    if not all(hasattr(m, n) for n in names) or not all(_out_proj_ok(getattr(m, n)) for n in ("to_out1", "to_out2")):
        raise _Skip("cross_attn: not the published CrossAttention structure")
    if _attn_dropout(m) > 0:
        raise _Skip(f"cross_attn: attention dropout p={_attn_dropout(m)} (the kernel has none)")


def _swap_multistream(m: nn.Module, backend: str) -> nn.Module:
    for s in ("stream1", "stream2"):
        _check_attention(getattr(m, s, None), f"{s}: ")
    if m.stream1.heads != m.stream2.heads or m.stream1.to_qkv.out_features != m.stream2.to_qkv.out_features:
        raise _Skip("the two streams have different head layouts")
    cross = getattr(m, "cross_attn", None)
    if cross is not None:
        _check_cross(cross)
    s1 = m.stream1
    dim = s1.norm.normalized_shape[0]
    new = MultiStreamAttention(dim, s1.heads, _head_dim(s1.to_qkv, s1.heads), cross_attention=cross is not None,
                               backend=backend)
    # the published submodules themselves: same Parameters, same state_dict keys, and on the
    # reference path their own forward
    new.stream1, new.stream2 = m.stream1, m.stream2
    if cross is not None:
        new.cross_attn = cross
    return new


def _check_patch_embedding(seq, where: str) -> tuple[int, int]:
    """(patch_size, frame_patch_size) of a published ``Rearrange, LN, Linear, LN`` tokenizer."""
    ok = isinstance(seq, nn.Sequential) and len(seq) == 4 and type(seq[0]).__name__ == "Rearrange" \
        and isinstance(seq[1], nn.LayerNorm) and isinstance(seq[2], nn.Linear) and isinstance(seq[3], nn.LayerNorm)
    if not ok:
        raise _Skip(f"{where}: not the published Rearrange, LayerNorm, Linear, LayerNorm tokenizer")
    pattern = " ".join(str(getattr(seq[0], "pattern", "")).split())
    lengths = dict(getattr(seq[0], "axes_lengths", {}) or {})
    if pattern != _PATTERN or not {"p1", "p2", "pf"} <= set(lengths) or lengths["p1"] != lengths["p2"]:
        raise _Skip(f"{where}: tubelet rearrange {pattern!r} {lengths} is not the published square-tubelet one")
    if any(ln.eps != LN_EPS or not ln.elementwise_affine for ln in (seq[1], seq[3])):
        raise _Skip(f"{where}: LayerNorm eps/affine differ from the fused tokenizer's")
    return int(lengths["p1"]), int(lengths["pf"])


def _video_spec(m: nn.Module, kind: str) -> dict:
    stem = "to_patch_embedding1" if kind == "ViTForViCu" else "to_patch_embedding"
    p, pf = _check_patch_embedding(getattr(m, stem, None), stem)
    spec = {"stem": stem, "p": p, "pf": pf, "additional": bool(getattr(m, "additional", False))}
    if spec["additional"]:
        add = getattr(m, "get_additional_tokens", None)
        if add is None or type(add).__name__ != "AdditionalVideoTokens" or not isinstance(getattr(add, "image_size", None), int):
            raise _Skip("get_additional_tokens: not the published AdditionalVideoTokens (dilated tokens)")
        if _check_patch_embedding(getattr(add, "to_patch_embedding", None), "get_additional_tokens") != (p, pf):
            raise _Skip("get_additional_tokens: tubelet size differs from the standard tokens'")
    if kind == "ViTForViCu":
        emb = getattr(m, "to_patch_embedding2", None)
        if not (isinstance(emb, nn.Sequential) and len(emb) == 3 and isinstance(emb[0], nn.LayerNorm)
                and isinstance(emb[1], nn.Linear) and isinstance(emb[2], nn.LayerNorm)):
            raise _Skip("to_patch_embedding2: not the published current tokenizer")
        for n in ("cls_token1", "pos_embedding1", "cls_token2", "pos_embedding2"):
            if not isinstance(getattr(m, n, None), torch.Tensor):
                raise _Skip(f"{n}: missing")
    else:
        pe = getattr(m, "pos_embedding", None)
        if not isinstance(getattr(pe, "pe", None), torch.Tensor) or getattr(pe, "PEType", None) not in ("tri", "learnable"):
            raise _Skip("pos_embedding: not the published PositionalEncoding")
        if not isinstance(getattr(m, "cls_token", None), torch.Tensor):
            raise _Skip("cls_token: missing")
    return spec


# ---- the replacement forwards ------------------------------------------------------------------
def _scale(seq: nn.Sequential, pos: torch.Tensor) -> ScaleParams:
    return ScaleParams(seq[1].weight, seq[1].bias, seq[2].weight, seq[2].bias, seq[3].weight, seq[3].bias, pos)


def _video_tokens(m: nn.Module, spec: dict, video: torch.Tensor, cls: torch.Tensor, pos0: torch.Tensor, exact0: bool):
    """Fused tokens ``[B, 1 + n0 (+ n1), D]`` with the model's parameters, or None when the inputs
    are not ones the fused path reproduces exactly (the caller then runs the original forward)."""
    p, pf = spec["p"], spec["pf"]
    if not isinstance(video, torch.Tensor) or video.dim() != 5 or (video.requires_grad and torch.is_grad_enabled()):
        return None
    _, c, t, h, w = video.shape
    if h % p or w % p or t % pf:
        return None
    n0 = (t // pf) * (h // p) * (w // p)
    if pos0.shape[1] < 1 + n0 or (exact0 and pos0.shape[1] != 1 + n0):
        return None
    scales, dil = [_scale(getattr(m, spec["stem"]), pos0[:, :1 + n0])], [1]
    if spec["additional"]:
        add = m.get_additional_tokens
        # the reference interpolates to (frames, size/2, size/2): every 2nd pixel iff this holds
        if (h, w, t) != (add.image_size, add.image_size, add.frames) or h % (2 * p):
            return None
        n1 = (t // pf) * (h // (2 * p)) * (w // (2 * p))
        if add.pos_embedding.shape[1] < n1:
            return None
        scales.append(_scale(add.to_patch_embedding, add.pos_embedding[:, :n1]))
        dil.append(2)
    if scales[0].proj_weight.shape[1] != c * p * p * pf:
        return None
    x = multiscale_tokens(video, cls, scales, patch_size=p, frame_patch_size=pf, dilations=dil,
                          backend=spec["backend"])
    return _dropouts(m, x, 1 + n0)


def _dropouts(m: nn.Module, x: torch.Tensor, n: int) -> torch.Tensor:
    """The reference's embedding dropouts (identity at p = 0, the published setting)."""
    d0 = m.dropout if isinstance(getattr(m, "dropout", None), nn.Dropout) else None
    d1 = getattr(getattr(m, "get_additional_tokens", None), "dropout", None) if getattr(m, "additional", False) else None
    if not any(isinstance(d, nn.Dropout) and d.p > 0 and d.training for d in (d0, d1)):
        return x
    parts = [d0(x[:, :n]) if d0 is not None else x[:, :n]]
    if x.shape[1] > n:
        parts.append(d1(x[:, n:]) if d1 is not None else x[:, n:])
    return torch.cat(parts, 1)


def _vicu_forward(self, video, current):
    spec = self._fmfast_swap
    x1 = _video_tokens(self, spec, video, self.cls_token1, self.pos_embedding1, exact0=False)
    if x1 is None or current.dim() != 3:
        return type(self).forward(self, video, current)
    emb = self.to_patch_embedding2
    x2 = current_tokens(current, self.cls_token2, ScaleParams(
        emb[0].weight, emb[0].bias, emb[1].weight, emb[1].bias, emb[2].weight, emb[2].bias,
        self.pos_embedding2[:, :current.shape[1] + 1]))
    if isinstance(getattr(self, "dropout", None), nn.Dropout):
        x2 = self.dropout(x2)
    x1, x2 = self.transformer(x1, x2)
    return self.head(x1, x2)


def _video_forward(self, video):
    spec = self._fmfast_swap
    pe = self.pos_embedding
    x = _video_tokens(self, spec, video, self.cls_token, pe.pe, exact0=pe.PEType == "learnable")
    if x is None:
        return type(self).forward(self, video)
    return self.head(self.transformer(x))


_TOP = {"ViTForViCu": _vicu_forward, "ViTForVideo": _video_forward}


# ---- the walk ----------------------------------------------------------------------------------
def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def swap_modules(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace the tokenizers and attention stages of ``model`` with fmfast's, in place, and
    return ``model`` (as ``torch.compile`` returns its module).

    ``backend`` ("auto" | "reference" | "fast", see ``fmfast.nn.backend``) is what the swapped
    modules run. ``print(model.fmfast_swap_report)`` lists what was replaced and what was left
    alone and why."""
    check_backend(backend)
    report = SwapReport()
    swaps: list[tuple[str, nn.Module]] = []
    done: list[str] = []  # subtrees already handled

    def inside(name):
        return any(name == d or name.startswith(d + ".") for d in done if d)

    for name, m in model.named_modules():
        if inside(name):
            continue
        kind = type(m).__name__
        try:
            if isinstance(m, Dispatching):
                m.backend = backend  # fmfast's own modules: just the flag
                report.replaced.append((name, f"{kind}: backend {backend}"))
            elif type(m).__module__.startswith("fmfast."):
                pass  # fmfast's other modules have nothing to swap
            elif kind == "MultiStreamAttention":
                swaps.append((name, _swap_multistream(m, backend)))
                report.replaced.append((name, "MultiStreamAttention -> fmfast.nn.MultiStreamAttention (same submodules)"))
                done.append(name)
            elif kind == "Attention":
                _check_attention(m)
                swaps.append((name, Attention.wrap(m, backend)))
                report.replaced.append((name, "Attention -> fmfast.nn.Attention (same submodules)"))
                done.append(name)
            elif kind in _TOP:
                spec = _video_spec(m, kind)
                spec["backend"] = backend
                m._fmfast_swap = spec  # a plain attribute: not in the state_dict
                m.forward = types.MethodType(_TOP[kind], m)
                report.replaced.append((name, (f"{kind}.forward -> fused video tokenizer (backend {backend}), "
                                               "then its own transformer and head")))
        except _Skip as e:
            report.skipped.append((name, f"{kind}: {e}"))
            if kind in ("MultiStreamAttention", "Attention"):
                done.append(name)  # do not swap parts of a stage that must stay whole
    for name, new in swaps:
        if not name:
            raise ValueError("swap_modules: the model itself is an attention stage; pass the model that holds it")
        _set_child(model, name, new)
    if hasattr(model, "set_backend") and type(model).__module__.startswith("fmfast."):
        model.backend = backend
    model.fmfast_swap_report = report  # a plain attribute: not in the state_dict
    return model

"""Backends: one set of weights, two ways to run it, one vocabulary from the model down.

- ``"reference"``: plain PyTorch, the published model's operation order.
- ``"fast"``: the fused Triton tokenizer (``fmfast.kernels.tokenize``) and the block-sparse
  attention kernel (``fmfast.kernels.attention``): FmFormer packs its two streams so each
  attention phase is one launch; a single-stream encoder runs its attention as one dense
  segment of the same kernel. On a CPU this needs ``TRITON_INTERPRET=1`` (the tests set it).
- ``"auto"``: fast for CUDA inputs, reference elsewhere, decided per call from the input's device.

A backend is an attribute of the modules that dispatch (``MultiscaleTubeletEmbed``,
``Attention``, ``MultiStreamAttention``), read inside their ``forward`` (timm's
``use_fused_attn`` pattern). Parameters, their order and ``state_dict`` keys are the same under
every backend, so checkpoints and optimisers move freely between them. Inputs the kernels do not
take (head sizes outside ``fmfast.kernels.attention.HEAD_DIMS``, float64) run the reference.
"""
from __future__ import annotations

import torch
from torch import nn

BACKENDS = ("auto", "reference", "fast")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def use_fast(backend: str, device: torch.device) -> bool:
    """Whether a module with this ``backend`` runs its kernel for inputs on ``device``."""
    return backend == "fast" or (backend == "auto" and device.type == "cuda")


class Dispatching:
    """Marks a module whose ``forward`` reads ``self.backend`` (what :func:`set_backend` sets)."""

    backend: str = "auto"


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Set ``backend`` ("auto" | "reference" | "fast") on every dispatching module in ``model``.
    Returns ``model``; its parameters stay the same objects, so an optimiser built before keeps
    working."""
    check_backend(backend)
    for m in model.modules():
        if isinstance(m, Dispatching):
            m.backend = backend
    if hasattr(model, "set_backend"):
        model.backend = backend
    return model


class BackendMixin:
    """``model.set_backend(name)`` for the fmfast models."""

    backend: str = "auto"

    def set_backend(self, backend: str):
        return set_backend(self, backend)

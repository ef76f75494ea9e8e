"""Backends: one set of weights, three ways to run it, one vocabulary from the model down.

A module's ``backend`` is what the user asks for; :func:`implementation` turns it, per call and
from the input's device, into what runs:

- ``"reference"`` -> **reference**: plain PyTorch in the published model's operation order
  (``softmax(q k^T * scale) v`` as two matmuls), bit for bit the published numbers.
- ``"auto"`` (the default) -> the fastest path for the device: **triton** on CUDA -- the fused
  Triton tokenizer (``fmfast.kernels.tokenize``) and the block-sparse attention kernel
  (``fmfast.kernels.attention``), FmFormer packing its two streams so each attention phase is
  one launch -- and **fused** on a CPU: the same math through PyTorch's fused CPU operators
  (``F.scaled_dot_product_attention``: flash attention with an online softmax instead of a
  materialised ``[N, M]`` logit matrix), which agrees with the reference within 1e-6 in fp32.
- ``"fast"`` -> **triton** wherever Triton can run it (CUDA, or a CPU under
  ``TRITON_INTERPRET=1``, which is how the tests check the kernels), **fused** elsewhere,
  including where Triton is not installed (it is optional: CUDA builds of torch bring it).

A backend is an attribute of the modules that dispatch (``MultiscaleTubeletEmbed``,
``Attention``, ``MultiStreamAttention``), read inside their ``forward`` (timm's
``use_fused_attn`` pattern). Parameters, their order and ``state_dict`` keys are the same under
every backend, so checkpoints and optimisers move freely between them. Inputs the kernels do not
take (head sizes outside ``fmfast.kernels.attention.HEAD_DIMS``, float64) run the reference.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from fmfast.kernels.triton_shim import HAVE_TRITON

BACKENDS = ("auto", "reference", "fast")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


IMPLEMENTATIONS = ("reference", "triton", "fused")


def implementation(backend: str, device: torch.device) -> str:
    """What a module with ``backend`` runs for inputs on ``device``: one of IMPLEMENTATIONS."""
    if backend == "reference":
        return "reference"
    if HAVE_TRITON and (device.type == "cuda" or (backend == "fast" and os.environ.get("TRITON_INTERPRET") == "1")):
        return "triton"
    return "fused"  # (also on a GPU where Triton is not installed: Windows, a source build of torch)


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

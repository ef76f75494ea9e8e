"""Backends: one set of weights, two ways to run it.

- ``"reference"``: plain PyTorch everywhere, the published model's operation order.
- ``"fast"``: the fused Triton tokenizer (``fmfast.kernels.tokenize``) and block-sparse attention
  (``fmfast.kernels.attention``). FmFormer packs its two streams so each attention phase is one
  launch; the single-stream baselines run their attention as one segment of the same kernel. On
  a CPU this needs ``TRITON_INTERPRET=1`` (the tests set it).
- ``"auto"``: fast for CUDA inputs, reference elsewhere, decided per call from the input's device.

A backend is a flag on the modules that dispatch (``MultiscaleTubeletEmbed``,
``MultiStreamAttention``, ``StreamAttention``); parameters, their order and ``state_dict`` keys
are the same under every backend, so checkpoints and optimisers move freely between them.

No further fusion (LayerNorm + QKV, the MLP) is added: with the step captured in a CUDA graph
the launch overhead such fusions save is gone, and the bytes they save (one ``[B, N, 96]``
activation per fusion) could not be measured here; they wait for a profile that asks for them.
"""
from __future__ import annotations

import torch
from torch import nn

from fmfast.nn.attention import Attention, MultiStreamAttention
from fmfast.nn.embed import MultiscaleTubeletEmbed
from fmfast.nn.transformer import Transformer
from fmfast.ops.attention import packed_attention, packed_layout_key, resolve_backend
from fmfast.ops.layout import self_attention_layout

BACKENDS = ("auto", "reference", "fast")
# model backend -> the ops' backend argument
OP_BACKEND = {"auto": "auto", "reference": "torch", "fast": "triton"}


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


@torch.compiler.assume_constant_result
def _one_segment_layout(n: int, block: int) -> int:
    """Key of the dense one-segment layout of n tokens (a constant for torch.compile)."""
    return packed_layout_key(self_attention_layout((n,), block, block))


class StreamAttention(Attention):
    """Single-stream attention branch (the baselines' encoder) with a backend: "triton" runs the
    block-sparse kernel over one dense segment, "torch" the reference math. Same parameters
    and keys as :class:`fmfast.nn.Attention`; head dims outside 16/32/64/128 always use "torch"."""

    _HEAD_DIMS = (16, 32, 64, 128)

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, backend: str = "auto", block_size: int = 64):
        super().__init__(dim, heads, dim_head)
        resolve_backend(backend, torch.device("cpu"))  # validate early
        self.backend, self.block_size = backend, block_size

    @classmethod
    def wrap(cls, attn: nn.Module, backend: str = "auto", block_size: int = 64) -> "StreamAttention":
        """A StreamAttention holding ``attn``'s own ``norm``, ``to_qkv`` and ``to_out`` modules
        (the Parameters are shared, not copied). ``attn`` may be fmfast's ``Attention`` or the
        reference code's class of that name."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.heads, new.scale = attn.heads, attn.scale
        new.norm, new.to_qkv, new.to_out = attn.norm, attn.to_qkv, attn.to_out
        resolve_backend(backend, torch.device("cpu"))
        new.backend, new.block_size = backend, block_size
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim_head = self.to_qkv.out_features // (3 * self.heads)
        if resolve_backend(self.backend, x.device) != "triton" or dim_head not in self._HEAD_DIMS:
            return super().forward(x)
        b, n, _ = x.shape
        q, k, v = self.to_qkv(self.norm(x)).view(b, n, 3, self.heads, dim_head).permute(2, 0, 3, 1, 4).unbind(0)
        o = packed_attention(q, k, v, _one_segment_layout(n, self.block_size), self.scale, "triton")
        return self.to_out(o.transpose(1, 2).reshape(b, n, self.heads * dim_head))


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Switch every dispatching module in ``model`` to ``backend`` ("auto" | "reference" | "fast").

    The single-stream encoders' ``Attention`` branches become :class:`StreamAttention` (holding
    the same submodules), so the baselines get the kernel too. Returns ``model``; its parameters
    stay the same objects, so an optimiser built before the switch keeps working."""
    op = OP_BACKEND[check_backend(backend)]
    wrap = []
    for m in model.modules():
        if isinstance(m, (MultiscaleTubeletEmbed, MultiStreamAttention, StreamAttention)):
            m.backend = op
        elif isinstance(m, Transformer):
            wrap += [layer for layer in m.layers if type(layer[0]) is Attention]
    for layer in wrap:
        layer[0] = StreamAttention.wrap(layer[0], op)
    model.backend = backend
    return model


class BackendMixin:
    """``model.set_backend(name)`` for the fmfast models."""

    backend: str = "auto"

    def set_backend(self, backend: str):
        return set_backend(self, backend)

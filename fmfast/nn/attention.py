"""Attention and feed-forward blocks with the reference model's attribute names and
``nn.Sequential`` indices, so ``state_dict`` keys are the reference's.

``Attention``, ``CrossAttention`` and ``MultiStreamAttention`` dispatch inside ``forward`` on
``self.backend`` (``fmfast.nn.backend``): the reference path is the published math
(``softmax(q k^T * scale) v``, four separate attentions per FmFormer layer), the fused path the
same four through ``F.scaled_dot_product_attention``, the triton path the block-sparse kernel
over a packed sequence (one launch per phase)."""
from __future__ import annotations

import math

import torch
from torch import nn

import torch.nn.functional as F

from fmfast.kernels import cpu_attention, cpu_mlp
from fmfast.nn.backend import Dispatching, check_backend, implementation


def _out_proj(inner_dim: int, dim: int, project_out: bool) -> nn.Module:
    # Identity stands where the reference has Dropout(0): keeps the Linear at index 0.
    return nn.Sequential(nn.Linear(inner_dim, dim), nn.Identity()) if project_out else nn.Identity()


def _qkv_heads(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[B, N, 3*H*Dh]`` -> q, k, v each ``[B, H, N, Dh]``."""
    b, n, _ = qkv.shape
    return qkv.view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, N, Dh]`` -> ``[B, N, H*Dh]``."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` on ``[B, H, N, Dh]`` (k, v: M keys), the reference model's
    operation order (the scale multiplies the logits, not q)."""
    dots = torch.matmul(q, k.transpose(-1, -2)) * scale
    return torch.matmul(dots.softmax(dim=-1), v)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, fused: bool) -> torch.Tensor:
    """``[B, H, N, Dh]`` attention: the fused path (``fused``) or the reference's matmuls. Fused on
    a CPU with AMX-BF16 tiles or AVX512-BF16, bf16 runs fmfast's CPU kernel, forward and backward
    (``fmfast.kernels.cpu_attention``; at FmFormer's shapes, AMX: 1.6-1.9x PyTorch's bf16 flash
    attention forward, 3.2-3.8x its fp32 forward + backward; AVX512-BF16 on Zen 5: about 3x and
    2.4-2.7x); fp32 fmfast's AVX2 kernel, forward and backward (on a Zen 3 at B=32: forward
    1.3-1.5x PyTorch's fp32 flash attention at 241-401 tokens, forward + backward 1.26-1.35x);
    short fp32 sequences on a CPU the reference's matmuls (``_short_on_cpu``) where they will be
    differentiated (0.83-0.90x of the kernel's time there) or the kernel cannot run;
    everything else PyTorch's SDPA."""
    if fused:
        if _cpu_kernel_takes(q, k, v):
            return cpu_attention.cpu_attention(q, k, v, scale)
        if _short_on_cpu(q, k):
            return attention_ref(q, k, v, scale)
        if _train_sdpa_in_fp32(q, k, v):
            with torch.autocast("cpu", enabled=False):  # (autocast would cast SDPA's inputs back)
                return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return attention_ref(q, k, v, scale)


def attend_pair(q1: torch.Tensor, k1: torch.Tensor, v1: torch.Tensor, q2: torch.Tensor, k2: torch.Tensor,
                v2: torch.Tensor, scale1: float, scale2: float, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(attend(q1, k1, v1, scale1, ...), attend(q2, k2, v2, scale2, ...))``, the same numbers;
    where fmfast's CPU kernel takes both, in one call of it (a layer's two independent
    attentions: half the calls, about 0.3 ms of a 10 ms FmFormer forward at B=1)."""
    if fused and q1.dtype == q2.dtype and _cpu_kernel_takes(q1, k1, v1) and _cpu_kernel_takes(q2, k2, v2):
        return cpu_attention.cpu_attention_pair(q1, k1, v1, q2, k2, v2, scale1, scale2)
    return attend(q1, k1, v1, scale1, fused), attend(q2, k2, v2, scale2, fused)


def _cpu_kernel_takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """fmfast's CPU kernel takes it, unless the reference's matmuls are faster: a short fp32
    attention that will be differentiated (``_short_on_cpu``)."""
    return cpu_attention.takes(q, k, v) and not (_short_on_cpu(q, k) and _differentiated(q, k, v))


def _differentiated(*xs: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


SHORT_SEQ, SHORT_MIN_SLICES = 48, 24  # _short_on_cpu's bounds, measured (its docstring)


def _short_on_cpu(q: torch.Tensor, k: torch.Tensor) -> bool:
    """An fp32 CPU attention over at most 48 queries and 48 keys with at least 24 (batch x head)
    slices, where the reference's two matmuls and softmax beat PyTorch's CPU flash attention:
    1.3-2.3x forward and forward + backward at B=8-32, 3 heads x 32, 17-41 tokens (the main
    job's shapes, ``fmfast train`` with no arguments; 2-core Zen 3, torch 2.13). Longer
    sequences (64 queries and keys at B=32: SDPA's forward 1.5x faster) and fewer slices (B=1:
    SDPA 1.4-1.7x faster) keep SDPA. Symbolic sizes (an export or compile with a dynamic batch)
    keep SDPA too: a branch on them would specialise the traced graph to one batch size."""
    if q.device.type != "cpu" or q.dtype != torch.float32:
        return False
    sizes = (*q.shape[:-1], k.shape[-2])  # (torch.Size.numel would specialise symbolic sizes)
    if not all(isinstance(n, int) for n in sizes):
        return False
    return max(sizes[-2:]) <= SHORT_SEQ and math.prod(sizes[:-2]) >= SHORT_MIN_SLICES


def _train_sdpa_in_fp32(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """A 16-bit CPU attention that will be differentiated, where fmfast's kernel cannot take it
    (no bf16 hardware, another head dim), runs in fp32: PyTorch's CPU
    flash-attention forward + backward is 1.1-1.5x slower on bf16 than on the same inputs cast to
    fp32 at FmFormer's shapes (B=32, 3 heads x 32, 401/241 tokens: the attention case of
    bench/test_bench_cpu.py) and its gradients are less exact; it made a bf16 training step
    slower than an fp32 one. Inference keeps the faster 16-bit forward."""
    return q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and _differentiated(q, k, v)


def _kernel_takes(x: torch.Tensor, dim_head: int) -> bool:
    from fmfast.kernels.attention import HEAD_DIMS  # the fast path imports Triton anyway

    return dim_head in HEAD_DIMS and x.dtype != torch.float64


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout_key: int, scale: float) -> torch.Tensor:
    """The block-sparse kernel over a packed ``[B, H, N, Dh]`` sequence under a registered layout."""
    from fmfast.kernels.attention import block_sparse_attention

    return block_sparse_attention(q, k, v, layout_key, scale)


@torch.compiler.assume_constant_result
def _layout_key(lengths: tuple[int, ...], block: int, cross: bool) -> int:
    """Key of the packed layout of segments ``lengths``: self-attention (block diagonal) or
    cross (off diagonal). A constant for torch.compile, which so never traces layout building
    (a model's sequence lengths are static)."""
    from fmfast.kernels.attention import register_layout
    from fmfast.kernels.layout import cross_attention_layout, self_attention_layout

    make = cross_attention_layout if cross else self_attention_layout
    return register_layout(make(lengths, block, block))


class Attention(Dispatching, nn.Module):
    """Pre-LN multi-head self-attention branch: ``to_out(attn(to_qkv(norm(x))))`` (no residual).

    ``x [B, N, dim] -> [B, N, dim]``. ``backend`` (see ``fmfast.nn.backend``): the triton path
    runs the block-sparse kernel over one dense segment."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, backend: str = "auto", block_size: int = 64):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.scale = heads, dim_head ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = _out_proj(inner, dim, not (heads == 1 and dim_head == dim))
        self.backend, self.block_size = check_backend(backend), block_size

    @classmethod
    def wrap(cls, attn: nn.Module, backend: str = "auto", block_size: int = 64) -> "Attention":
        """An Attention holding ``attn``'s own ``norm``, ``to_qkv`` and ``to_out`` modules (the
        Parameters are shared, not copied). ``attn`` may be the reference code's class of that name."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.heads, new.scale = attn.heads, attn.scale
        new.norm, new.to_qkv, new.to_out = attn.norm, attn.to_qkv, attn.to_out
        new.backend, new.block_size = check_backend(backend), block_size
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        impl = implementation(self.backend, x.device)
        q, k, v = _qkv_heads(self.to_qkv(self.norm(x)), self.heads)
        if impl == "triton" and _kernel_takes(x, q.shape[-1]):
            o = packed_attention(q, k, v, _layout_key((x.shape[1],), self.block_size, False), self.scale)
        else:
            o = attend(q, k, v, self.scale, impl == "fused")
        return self.to_out(_merge_heads(o))


class CrossAttention(Dispatching, nn.Module):
    """Bidirectional cross-attention branches: stream 1 queries stream 2 and vice versa,
    both from the same inputs. ``x1 [B, N1, dim], x2 [B, N2, dim] -> (r1, r2)`` (no residual).
    ``backend``: reference or fused (SDPA) math; inside a MultiStreamAttention the stage decides."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, backend: str = "auto"):
        super().__init__()
        self.backend = check_backend(backend)
        inner = heads * dim_head
        project_out = not (heads == 1 and dim_head == dim)
        self.heads, self.scale = heads, dim_head ** -0.5
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_qkv1 = nn.Linear(dim, inner * 3, bias=False)
        self.to_qkv2 = nn.Linear(dim, inner * 3, bias=False)
        self.to_out1 = _out_proj(inner, dim, project_out)
        self.to_out2 = _out_proj(inner, dim, project_out)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return cross_branches(self, x1, x2, implementation(self.backend, x1.device) == "fused")


class MultiStreamAttention(Dispatching, nn.Module):
    """One FmFormer attention stage on streams (x1 video ``[B, N1, dim]``, x2 current
    ``[B, N2, dim]``), residuals included: self-attention per stream, then the bidirectional
    cross-attention on the updated streams.

    ``backend`` (see ``fmfast.nn.backend``): the triton path packs both streams into one sequence
    and runs each phase as one block-sparse launch (self: block-diagonal layout, cross:
    off-diagonal); the reference and fused paths run four attentions (matmuls, SDPA, or on a CPU
    fmfast's kernel, two calls: the self-attentions as one pair, the cross-attentions as another).
    The stage decides for its branches: it uses their weights, not their forward, so the
    published code's branch modules (``swap_modules``) run the same paths."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, cross_attention: bool = True,
                 backend: str = "auto", block_size: int = 64):
        super().__init__()
        self.stream1 = Attention(dim, heads, dim_head, backend="reference")
        self.stream2 = Attention(dim, heads, dim_head, backend="reference")
        self.cross_attn = CrossAttention(dim, heads, dim_head) if cross_attention else None
        self.backend, self.block_size = check_backend(backend), block_size

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        impl = implementation(self.backend, x1.device)
        dim_head = self.stream1.to_qkv.out_features // (3 * self.stream1.heads)
        if impl == "triton" and _kernel_takes(x1, dim_head):
            return self._forward_packed(x1, x2)
        fused = impl == "fused"
        r1, r2 = self_branches(self.stream1, self.stream2, x1, x2, fused)
        x1, x2 = x1 + r1, x2 + r2
        if self.cross_attn is not None:
            r1, r2 = cross_branches(self.cross_attn, x1, x2, fused)
            x1, x2 = x1 + r1, x2 + r2
        return x1, x2

    def _forward_packed(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Same math, one attention launch per phase over the packed [x1 tokens | x2 tokens]."""
        n1, n2 = x1.shape[1], x2.shape[1]
        s1, s2, heads, scale = self.stream1, self.stream2, self.stream1.heads, self.stream1.scale
        bs = self.block_size
        qkv = torch.cat([s1.to_qkv(s1.norm(x1)), s2.to_qkv(s2.norm(x2))], 1)
        o = _merge_heads(packed_attention(*_qkv_heads(qkv, heads), _layout_key((n1, n2), bs, False), scale))
        x1, x2 = x1 + s1.to_out(o[:, :n1]), x2 + s2.to_out(o[:, n1:])
        ca = self.cross_attn
        if ca is not None:
            qkv = torch.cat([ca.to_qkv1(ca.norm1(x1)), ca.to_qkv2(ca.norm2(x2))], 1)
            o = _merge_heads(packed_attention(*_qkv_heads(qkv, heads), _layout_key((n1, n2), bs, True), ca.scale))
            x1, x2 = x1 + ca.to_out1(o[:, :n1]), x2 + ca.to_out2(o[:, n1:])
        return x1, x2


def self_branches(m1: nn.Module, m2: nn.Module, x1: torch.Tensor, x2: torch.Tensor, fused: bool = False):
    """The math of two self-attention branches (fmfast's ``Attention`` or the reference code's:
    same attributes), ``m1`` on stream 1 and ``m2`` on stream 2, by their weights, whatever their
    own backend: reference matmuls or the fused path, the two attentions as one pair."""
    q1, k1, v1 = _qkv_heads(m1.to_qkv(m1.norm(x1)), m1.heads)
    q2, k2, v2 = _qkv_heads(m2.to_qkv(m2.norm(x2)), m2.heads)
    o1, o2 = attend_pair(q1, k1, v1, q2, k2, v2, m1.scale, m2.scale, fused)
    return m1.to_out(_merge_heads(o1)), m2.to_out(_merge_heads(o2))


def cross_branches(m: nn.Module, x1: torch.Tensor, x2: torch.Tensor, fused: bool = False):
    """The two branches of a cross-attention ``m`` (fmfast's or the reference code's) by its
    weights: stream 1 queries stream 2 and vice versa, both from the same inputs."""
    q1, k1, v1 = _qkv_heads(m.to_qkv1(m.norm1(x1)), m.heads)
    q2, k2, v2 = _qkv_heads(m.to_qkv2(m.norm2(x2)), m.heads)
    r1, r2 = attend_pair(q1, k2, v2, q2, k1, v1, m.scale, m.scale, fused)
    return m.to_out1(_merge_heads(r1)), m.to_out2(_merge_heads(r2))


class FeedForward(Dispatching, nn.Module):
    """Pre-LN MLP branch ``LN -> Linear -> GELU -> Linear`` (no residual), ``[..., dim]`` ->
    ``[..., dim]``. ``net`` indices 0, 1, 4 hold the weights, as in the reference (3 and 5 were
    Dropout(0)). On the fused backend, bf16 inference on a CPU with AVX512-BF16 and no AMX runs
    ``Linear -> GELU -> Linear`` as one fmfast kernel (``fmfast.kernels.cpu_mlp``, where its
    ``takes`` says so: the compiled paper-shape FmFormer forward 4-6% faster on a Zen 4)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, hidden_dim), nn.GELU(), nn.Identity(),
            nn.Linear(hidden_dim, dim), nn.Identity(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc1, fc2 = self.net[1], self.net[4]
        if implementation(self.backend, x.device) == "fused" and cpu_mlp.takes(x, fc1.out_features):
            return cpu_mlp.cpu_mlp(self.net[0](x), fc1.weight, fc1.bias, fc2.weight, fc2.bias)
        return self.net(x)


class MultiStreamFeedForward(nn.Module):
    """Per-stream feed-forward with residuals: ``(x1 + ff1(x1), x2 + ff2(x2))``."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.ff1 = FeedForward(dim, hidden_dim)
        self.ff2 = FeedForward(dim, hidden_dim)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x1 + self.ff1(x1), x2 + self.ff2(x2)

"""The transformer feed-forward ``fc2(gelu(fc1(x)))`` in one C kernel, for bf16 inference on x86
CPUs with AVX512-BF16 but no AMX (AMD Zen 4/5, Intel Cooper Lake): ``csrc/cpu_mlp.c``, built
once with the system C compiler and called through ctypes inside the custom op
``fmfast::cpu_mlp_infer``; ``cpu_mlp_ref`` is its plain-PyTorch twin.

``cpu_mlp(x, w1, b1, w2, b2) -> y``: x ``[..., C]`` bf16 on the CPU; fc1 ``w1 [H, C]``, ``b1 [H]``;
fc2 ``w2 [C, H]``, ``b2 [C]`` (any float dtype: weights are used in bf16, biases in fp32);
y ``[..., C]`` bf16. C and H multiples of 32, C <= 512, H <= 2048. GELU is the exact (erf) one,
to about 1e-4 (the C file says how), and the hidden is rounded to bf16 before fc2, as the bf16
Linear's output is. No autograd: ``takes`` routes only calls that record no gradient.

Why: oneDNN runs the two Linears as two calls, the first with exact GELU in its epilogue, which
made it run at about 45% of the second's rate, and the ``[M, H]`` hidden goes to memory and back.
Here each 16-row block's hidden stays in cache and GELU is computed on the accumulators. At the
paper shape (C=96, H=384), bf16, 2 cores of a Zen 4: the compiled FmFormer forward at B=32
291.1 -> 273.7 ms, at B=16 136.0 -> 130.7 ms; both Linears alone at 6416 rows 2.9-3.5 ms with
oneDNN against 2.7-3.0 ms here. On AMX CPUs oneDNN's Linears run on the tiles, so it stays
there (``available()`` says so). Below ``MIN_ROWS`` rows the Python op's ~50 µs would eat the gain.

The weights' pair layout (``pack_pairs``) is built with torch ops, so under ``torch.compile``
with freezing it is folded into constants once; eagerly it costs a few microseconds a call.
``FMFAST_CPU_MLP=0`` turns the kernel off. The library is cached like the attention kernels'
(``cpu_attention.cache_dir``).
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
import torch.nn.functional as F

from .cpu_attention import FLAGS, availability, load_switched, supported_variants

SOURCE = Path(__file__).parent / "csrc" / "cpu_mlp.c"
MAX_C, MAX_H = 512, 2048  # the kernel's per-thread buffers
MIN_ROWS = 1024  # fewer rows: oneDNN's two calls (the Python op's overhead exceeds the gain)
_ERRORS = {1: "unsupported sizes", 3: "out of memory"}


@functools.lru_cache(maxsize=None)
def _library() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded kernel, "") or (None, why it does not run here)."""
    have = supported_variants()
    refusal = ("this CPU has AMX-BF16 tiles, on which oneDNN's Linears run faster" if "AMX" in have else
               None if "AVX512-BF16" in have else "this CPU lacks AVX512-BF16")
    lib, why = load_switched("FMFAST_CPU_MLP", refusal, SOURCE, FLAGS)
    if lib is not None:
        lib.fmf_mlp_fwd.restype = ctypes.c_int
        lib.fmf_mlp_fwd.argtypes = ([ctypes.c_void_p] + [ctypes.c_int64] * 4 + [ctypes.c_void_p] * 5
                                    + [ctypes.c_int64])
    return lib, why


# available() -> (True, "") where the feed-forward kernel runs on this machine, else (False, the reason)
available, _available_constant = availability(_library)


def takes(x: torch.Tensor, hidden: int) -> bool:
    """Whether a feed-forward of input ``x [..., C]`` (or the bf16 autocast of it) and ``hidden``
    units runs here: a CPU call that records no gradient, not under ``torch.export`` (its graph
    must run without fmfast), bf16, sizes the kernel takes, at least ``MIN_ROWS`` rows (static
    sizes only: a branch on a symbolic size would specialise the traced graph), and the kernel
    available."""
    if x.device.type != "cpu" or torch.is_grad_enabled() or torch.compiler.is_exporting():
        return False
    bf16 = x.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cpu")
                                         and torch.get_autocast_dtype("cpu") == torch.bfloat16)
    c = x.shape[-1]
    rows = x.shape[:-1]
    if not bf16 or not all(isinstance(n, int) for n in (*rows, c)):
        return False
    return (c % 32 == 0 and hidden % 32 == 0 and c <= MAX_C and hidden <= MAX_H
            and x.numel() // c >= MIN_ROWS and _available_constant())


def pack_pairs(w: torch.Tensor) -> torch.Tensor:
    """A Linear's weight ``[N, K]`` -> ``[K/2, N, 2]`` bf16, element ``[p, j]`` = ``(w[j, 2p], w[j, 2p+1])``:
    the operand layout of vdpbf16ps."""
    n, k = w.shape
    return w.to(torch.bfloat16).t().reshape(k // 2, 2, n).permute(0, 2, 1).contiguous()


@torch.library.custom_op("fmfast::cpu_mlp_infer", mutates_args=())
def _mlp_infer(x: torch.Tensor, w1p: torch.Tensor, b1: torch.Tensor, w2p: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """x ``[M, C]`` bf16 (unit stride over C), the packed weights and fp32 biases -> y ``[M, C]`` bf16."""
    lib, why = _library()
    if lib is None:
        raise RuntimeError(f"cpu_mlp: the kernel does not run here: {why}")
    m, c = x.shape
    h = b1.shape[0]
    if (x.dtype, w1p.dtype, w2p.dtype, b1.dtype, b2.dtype) != (torch.bfloat16,) * 3 + (torch.float32,) * 2:
        raise ValueError("cpu_mlp: x and the packed weights bf16, the biases fp32")
    if x.stride(1) != 1 or tuple(w1p.shape) != (c // 2, h, 2) or tuple(w2p.shape) != (h // 2, c, 2) \
            or tuple(b2.shape) != (c,) or not (w1p.is_contiguous() and w2p.is_contiguous()):
        raise ValueError(f"cpu_mlp: x [M, C] with unit stride over C, w1p [C/2, H, 2], w2p [H/2, C, 2], b2 [C]; "
                         f"got x {list(x.shape)} (strides {x.stride()}), w1p {list(w1p.shape)}, "
                         f"w2p {list(w2p.shape)}, b1 {list(b1.shape)}, b2 {list(b2.shape)}")
    b1, b2 = b1.contiguous(), b2.contiguous()
    y = torch.empty(m, c, dtype=torch.bfloat16)
    rc = lib.fmf_mlp_fwd(x.data_ptr(), x.stride(0), m, c, h, w1p.data_ptr(), b1.data_ptr(), w2p.data_ptr(),
                         b2.data_ptr(), y.data_ptr(), y.stride(0))
    if rc:
        raise RuntimeError(f"cpu_mlp: {_ERRORS.get(rc, f'error {rc}')} (C={c}, H={h})")
    return y


@_mlp_infer.register_fake
def _(x, w1p, b1, w2p, b2):
    return x.new_empty(x.shape, dtype=torch.bfloat16)


def cpu_mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """``fc2(gelu(fc1(x)))`` for ``x [..., C]``, in bf16: see the module docstring."""
    c = x.shape[-1]
    rows = x.to(torch.bfloat16).reshape(-1, c)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    y = _mlp_infer(rows, pack_pairs(w1), b1.float(), pack_pairs(w2), b2.float())
    return y.reshape(x.shape)


def cpu_mlp_ref(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """The same in fp32 PyTorch on the bf16-rounded x and weights (exact GELU, fp32 biases, the
    hidden rounded to bf16), returned in bf16."""
    def bf(t):
        return t.to(torch.bfloat16).float()

    h = F.gelu(F.linear(bf(x), bf(w1), b1.float()))
    return F.linear(bf(h), bf(w2), b2.float()).to(torch.bfloat16)

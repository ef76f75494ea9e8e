"""The video tokenizer's tubelet LayerNorm in one C kernel, for bf16 inference on x86 CPUs with
AVX512-BF16 (``csrc/cpu_patch_norm.c``, built once with the system C compiler, called through
ctypes inside the custom op ``fmfast::cpu_patch_norm``); ``patch_norm_ref`` is its plain-PyTorch
twin.

``patch_norm(video, dilation, patch_size, frame_patch_size, w, b, eps) -> z``: video
``[B, C, T, H, W]`` uint8 on the CPU; one scale of the multiscale tokenizer: the frame sampled
every ``dilation`` pixels, cut into ``frame_patch_size`` x ``patch_size`` x ``patch_size``
tubelets flattened in the reference's order ``(p1, p2, pf, c)``; each tubelet LayerNormed with
``w, b [K]`` (K = p*p*pf*C) -> z ``[B, n, K]`` bf16, n tubelets in ``(t, h, w)`` order. The sums
are exact integers, so z is the fp32 LayerNorm rounded to bf16 (what autocast hands the
tokenizer's Linear). No autograd: ``takes`` routes only calls that record no gradient.

Why: inductor's loop for this LayerNorm reads one 8-byte patch row per vector; it was 3.7% of
the compiled bf16 FmFormer forward at B=16 (5.6 ms of 150 on a Zen 4), the largest of inductor's
own kernels. ``FMFAST_CPU_PATCH_NORM=0`` turns the kernel off.
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
import torch.nn.functional as F

from .cpu_attention import FLAGS, availability, load_switched, supported_variants

SOURCE = Path(__file__).parent / "csrc" / "cpu_patch_norm.c"
MAX_K = 4096  # the kernel's per-thread tubelet buffer


@functools.lru_cache(maxsize=None)
def _library() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded kernel, "") or (None, why it does not run here)."""
    refusal = None if supported_variants() else "this CPU lacks AVX512-BF16"
    lib, why = load_switched("FMFAST_CPU_PATCH_NORM", refusal, SOURCE, FLAGS)
    if lib is not None:
        lib.fmf_patch_norm.restype = ctypes.c_int
        lib.fmf_patch_norm.argtypes = ([ctypes.c_void_p] + [ctypes.c_int64] * 8 + [ctypes.c_void_p] * 2
                                       + [ctypes.c_float, ctypes.c_void_p])
    return lib, why


# available() -> (True, "") where the patch-norm kernel runs on this machine, else (False, the reason)
available, _available_constant = availability(_library)


def takes(video: torch.Tensor, patch_dim: int) -> bool:
    """Whether the tokenizer's tubelet LayerNorm of ``video`` runs here: a uint8 ``[B, C, T, H, W]``
    clip on the CPU (not a frame store), bf16 autocast, no gradient recorded, not under
    ``torch.export``, static sizes, ``patch_dim`` a multiple of 16 up to ``MAX_K``, and the kernel
    available."""
    if video.device.type != "cpu" or video.dtype != torch.uint8 or video.dim() != 5:
        return False
    if torch.is_grad_enabled() or torch.compiler.is_exporting():
        return False
    if not (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16):
        return False
    if not all(isinstance(n, int) for n in video.shape):
        return False
    return patch_dim % 16 == 0 and patch_dim <= MAX_K and _available_constant()


@torch.library.custom_op("fmfast::cpu_patch_norm", mutates_args=())
def _patch_norm(video: torch.Tensor, dilation: int, patch_size: int, frame_patch_size: int, w: torch.Tensor,
                b: torch.Tensor, eps: float) -> torch.Tensor:
    lib, why = _library()
    if lib is None:
        raise RuntimeError(f"patch_norm: the kernel does not run here: {why}")
    if video.dtype != torch.uint8 or video.dim() != 5:
        raise ValueError(f"patch_norm: video must be uint8 [B, C, T, H, W], got {video.dtype} {list(video.shape)}")
    video = video.contiguous()
    B, C, T, H, W = video.shape
    d, p, pf = dilation, patch_size, frame_patch_size
    K = p * p * pf * C
    w, b = w.float().contiguous(), b.float().contiguous()
    if tuple(w.shape) != (K,) or tuple(b.shape) != (K,):
        raise ValueError(f"patch_norm: w and b must be [{K}], got {list(w.shape)} and {list(b.shape)}")
    n = (T // pf) * (H // max(d * p, 1)) * (W // max(d * p, 1))
    z = torch.empty(B, n, K, dtype=torch.bfloat16)
    rc = lib.fmf_patch_norm(video.data_ptr(), B, C, T, H, W, d, p, pf, w.data_ptr(), b.data_ptr(), eps, z.data_ptr())
    if rc:
        raise RuntimeError(f"patch_norm: unsupported sizes (video {list(video.shape)}, dilation {d}, patch {p}, "
                           f"frames per tubelet {pf}: K={K} must be a multiple of 16 up to {MAX_K} and the "
                           f"tubelets must tile the clip)")
    return z


@_patch_norm.register_fake
def _(video, dilation, patch_size, frame_patch_size, w, b, eps):
    B, C, T, H, W = video.shape
    d, p, pf = dilation, patch_size, frame_patch_size
    return video.new_empty(B, (T // pf) * (H // (d * p)) * (W // (d * p)), p * p * pf * C, dtype=torch.bfloat16)


def patch_norm(video: torch.Tensor, dilation: int, patch_size: int, frame_patch_size: int, w: torch.Tensor,
               b: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """See the module docstring."""
    return _patch_norm(video, int(dilation), int(patch_size), int(frame_patch_size), w, b, float(eps))


def patch_norm_ref(video: torch.Tensor, dilation: int, patch_size: int, frame_patch_size: int, w: torch.Tensor,
                   b: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The same in fp32 PyTorch (``F.layer_norm``), returned in bf16."""
    d, p, pf = dilation, patch_size, frame_patch_size
    x = video.float()[..., ::d, ::d]
    B, C, T, H, W = x.shape
    x = x.reshape(B, C, T // pf, pf, H // p, p, W // p, p).permute(0, 2, 4, 6, 5, 7, 3, 1)  # b t h w p1 p2 pf c
    x = x.reshape(B, -1, p * p * pf * C)
    return F.layer_norm(x, w.shape, w.float(), b.float(), eps).to(torch.bfloat16)

"""Every kernel variant the model and the public API launch, compiled for sm_90 through the
kernels' own host code (``tools/sm90.py`` turns each launch into a compile): the paper shape in
bf16 (autocast) and fp32, clip and frame-store sources; ``sweep()`` adds every dtype and width
the kernels' docstrings promise, for the shared-memory limit.

Paper shape: batch 256; video 3 x 10 x 64 x 64 uint8, tubelets 8 x 8 x 2 (patch dim 384) -> 96 at
dilations 1 and 2 (320 + 80 tokens + cls = 401); current 240 + cls = 241 tokens; 3 heads x 32.
"""
from __future__ import annotations

import torch

from tools import sm90

B = 256
VIDEO = dict(C=3, T=10, H=64, W=64, p=8, pf=2, dilations=(1, 2))
DIM, HEADS, DIM_HEAD = 96, 3, 32
SEGMENTS = (401, 241)  # video tokens, current tokens (cls each)
TOK_KERNELS = ("_tokenize_prep", "_tokenize_fwd", "_tokenize_bwd_tok", "_tokenize_bwd_w", "_tokenize_bwd_sum")
ATT_KERNELS = ("_fwd_kernel", "_bwd_kernel")
_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _tokenizer_args(b: int, dim: int, frame_store: bool):
    v = VIDEO
    C, T, H, W, p, pf, dil = v["C"], v["T"], v["H"], v["W"], v["p"], v["pf"], v["dilations"]
    K = C * p * p * pf
    n = [(T // pf) * (H // d // p) * (W // d // p) for d in dil]
    S = len(dil)
    if frame_store:
        video = torch.zeros(4 * b, C, H, W, dtype=torch.uint8)  # a store bigger than one batch's frames
        index = torch.zeros(b, T, dtype=torch.int64)
    else:
        video, index = torch.zeros(b, C, T, H, W, dtype=torch.uint8), None
    params = (torch.zeros(dim), torch.zeros(1 + sum(n), dim), torch.zeros(S, K), torch.zeros(S, K),
              torch.zeros(S, dim, K), torch.zeros(S, dim), torch.zeros(S, dim), torch.zeros(S, dim))
    return video, index, params, (p, pf, list(dil), 1e-5), b * (1 + sum(n)) * dim


def tokenizer(dtype: str, frame_store: bool, b: int = B, dim: int = DIM) -> list[dict]:
    """Compile the tokenizer's forward and backward launches as ``_fwd_impl``/``_bwd_impl`` plan them."""
    from fmfast.kernels import tokenize as tk

    video, index, params, geo, n_out = _tokenizer_args(b, dim, frame_store)
    saved = tk._gpu_sms, tk._check_device
    tk._gpu_sms, tk._check_device = (lambda device: sm90.SMS), (lambda t: None)
    try:
        with sm90.capture(tk, TOK_KERNELS) as launches:
            out, *for_bwd = tk._fwd_impl(video, index, *params, *geo, dtype, "float32", True)
            tk._bwd_impl(torch.zeros_like(out), video, index, *for_bwd, *params, *geo, dtype)
    finally:
        tk._gpu_sms, tk._check_device = saved
    src = "store" if frame_store else "clip"
    shape = f"B={b} D={dim} {src}"
    grids = {L.name: L.grid for L in launches}
    # the partial buffers the last launch reduces: batch slices and token blocks of bwd_tok, batch
    # slices of bwd_w
    plan = dict(n_bs=grids["_tokenize_bwd_tok"][1], nblk=grids["_tokenize_bwd_tok"][0],
                n_split=grids["_tokenize_bwd_w"][1])
    return [dict(kernel="tokenize" + L.name.removeprefix("_tokenize"), variant=f"{_NAMES[dtype]} {shape}",
                 dtype=_NAMES[dtype], shape=dict(batch=b, dim=dim, source=src, **plan), grid=list(L.grid),
                 launch=L) for L in launches]


def _qkv(b: int, n: int, heads: int, dh: int, dtype: torch.dtype):
    """q, k, v as the model makes them: views of one [B, N, 3, H, Dh] projection."""
    qkv = torch.zeros(b, n, 3, heads, dh, dtype=dtype).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def attention(dtype: str, cross: bool, b: int = B, heads: int = HEADS, dh: int = DIM_HEAD,
              segments=SEGMENTS) -> list[dict]:
    """Compile one packed attention launch (self or cross layout) forward and backward."""
    from fmfast.kernels import attention as ka
    from fmfast.kernels.layout import cross_attention_layout, self_attention_layout

    lay = (cross_attention_layout if cross else self_attention_layout)(segments, 64, 64)
    dt = getattr(torch, dtype)
    n = lay.seq_len
    q, k, v = _qkv(b, n, heads, dh, dt)
    t = lay.device_tensors("cpu")
    names = [x for x in ATT_KERNELS if hasattr(ka, x)]
    with sm90.capture(ka, names) as launches:
        o, lse = ka._fwd_impl(q, k, v, t, dh ** -0.5, lay.block_m, lay.block_n, (0, 0, 0))
        ka._bwd_impl(torch.zeros_like(o), q, k, v, o, lse, t, dh ** -0.5, lay.block_m, lay.block_n, (0, 0, 0))
    shape = f"B={b} H={heads} Dh={dh} {'cross' if cross else 'self'}"
    def name(L):  # the backward's two roles are one kernel launched twice (DKDV constexpr)
        role = {True: "_dkdv", False: "_dq"}.get(L.meta.get("DKDV"), "")
        return "attn" + L.name.removesuffix("_kernel") + role

    return [dict(kernel=name(L), variant=f"{_NAMES[dtype]} {shape}",
                 dtype=_NAMES[dtype], shape=dict(batch=b, heads=heads, head_dim=dh, seq=n, cross=cross,
                                                 computed_blocks=lay.num_computed_blocks,
                                                 full_blocks=lay.num_full_blocks,
                                                 block_m=lay.block_m, block_n=lay.block_n),
                 grid=list(L.grid), launch=L) for L in launches]


def paper(dtypes=("bfloat16", "float32")) -> list[dict]:
    """The variants at the paper shape the model launches (bf16 autocast = the training step)."""
    rows = []
    for dtype in dtypes:
        for fs in (False, True):
            rows += tokenizer(dtype, fs)
        for cross in (False, True):
            rows += attention(dtype, cross)
    return rows


def sweep(full: bool = False) -> list[dict]:
    """The widths the docstrings promise (tokenizer D <= MAX_DIM = 1024, attention HEAD_DIMS) at
    the widest width of each tile bucket (shared memory grows with the width inside a bucket:
    tokenizer D 128 / 256 / 1024, attention head dim 64 (2 stages) / 128 (fp32: 1 stage)), in
    fp32; bf16 at the widest (its tiles are fp32's at half the bytes; fp16 is bf16's size).
    ``full``: every width and both dtypes (slow: about 10 minutes on 2 cores)."""
    from fmfast.kernels.attention import HEAD_DIMS
    from fmfast.kernels.tokenize import MAX_DIM

    if full:
        tok = [(dt, dim) for dt in ("bfloat16", "float32") for dim in (16, 128, 256, 512, MAX_DIM)]
        att = [(dt, dh) for dt in ("bfloat16", "float32") for dh in HEAD_DIMS]
    else:
        tok = [("float32", 128), ("float32", 256), ("float32", MAX_DIM), ("bfloat16", MAX_DIM)]
        att = [("float32", 64), ("float32", max(HEAD_DIMS)), ("bfloat16", max(HEAD_DIMS))]
    rows = []
    for dtype, dim in tok:
        rows += tokenizer(dtype, True, b=2, dim=dim)
    for dtype, dh in att:
        rows += attention(dtype, False, b=2, heads=1, dh=dh, segments=(70, 50))
    # a batch whose batch x heads passes 65535 (grid axis 1's limit): the grid must still launch
    rows += attention("bfloat16", True, b=21846, heads=3, dh=16, segments=(40, 24))
    return rows

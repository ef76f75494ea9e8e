"""Fused multiscale video tokenization: video -> cls + tubelet tokens of every scale, one gather pass.

For each scale (dilation d = 1, 2, ...) the clip is read at rows/cols 0, d, 2d, ... (a strided read,
the same pixels as nearest-neighbour downsampling by d), cut into tubelets of pf frames x p x p,
each tubelet flattened in the order (p1, p2, pf, c) -- index ((p1*p + p2)*pf + f)*C + c -- then
``LayerNorm(patch) -> Linear -> LayerNorm(D) -> + pos``. Tokens are ordered (t, h, w); the output is
``[B, 1 + sum_s n_s, D]``: row 0 is ``cls + pos_0[0]``, then scale 0 (``pos_0[1:]``), scale 1, ...

Input is a clip ``[B, C, T, H, W]`` (uint8 or float, any strides) or a frame store ``[N, C, H, W]``
plus a ``[B, T]`` integer table of frame indices, so clips are never materialised: entry ``i``
reads frame ``i``, entry ``~i`` (= -1-i) reads frame ``i`` mirrored along W (training flips cost
no flipped copy of the store); frames are clamped into ``[0, N-1]``. Each program gathers its
tubelets' pixels straight from that memory.

Kernels (two launches forward, three backward; blocks never span scales; a block's scale and
geometry come from its program id):
  ``_tokenize_prep``    one program per weight row: W and W' = patch-LN weight * W (in the compute
                        dtype), W's row sums c1 = sum_k W'[k] and c2 = sum_k patch-LN bias[k] W[k],
                        and the patch-LN parameters, all in kernel column order (below).
  ``_tokenize_fwd``     grid = token blocks of all scales (64 tokens on GPU) x batch: ONE gather
                        pass, since Linear(LN(x)) = rstd * (x @ W'^T - mean * c1) + c2 + bias: each
                        chunk of pixels feeds the LN sums and the tl.dot at once (shifted by the
                        row's first pixel, so nothing large cancels; uint8 stays exact in 16 bits);
                        then LN(D), + pos, store in the final row; the first block also writes the
                        cls row. When a backward can follow (SAVE) it also stores z (= pre-LN(D)
                        activations, in the GEMM's dtype) and the patch LN stats, so the backward
                        recomputes nothing.
  ``_tokenize_bwd_tok`` grid = token blocks (32) x batch slices: from the saved z, writes dL/dz and
                        per-program partials of the D-sized gradients (norm_out, proj bias, pos,
                        cls) over its slice (no gather, no GEMM).
  ``_tokenize_bwd_w``   grid = patch-dim chunks x batch slices x scales: G = dz^T @ LN(patch)
                        without its affine, one GEMM, from which dW = G * gamma + colsum(dz) beta^T
                        and the norm_in gradients colsum(W * G), colsum(W * colsum(dz)) follow (all
                        linear in G: each program a deterministic partial; no dz @ W GEMM).
  ``_tokenize_bwd_sum`` one program per gradient row (and column chunk): sums the partials in a
                        fixed order and writes the eight gradients, in reference column order.
The gradient with respect to the video is NOT computed (video is data, not a parameter).
Precision: LayerNorm statistics and accumulation in fp32 always; the GEMMs in the autocast dtype
when autocast is on, else in the parameters' dtype -- fp32 as 3xTF32 (near-fp32 on tensor cores;
IEEE FMA dots ran on scalar FFMA at a twelfth of the rate).

Internally the patch dimension is walked in the memory-friendly order (c, f, p1, p2) (p2 fastest,
so a warp reads contiguous pixel rows); LayerNorm and the dot product do not care about the order:
the host hands the kernels W, W' and the patch-LayerNorm parameters permuted into it
(``_internal_order``, so weight tiles load as contiguous rows, not 2-byte gathers; once per forward,
W and the LN parameters saved for the backward), and ``_tokenize_bwd_sum`` writes their gradients
back in reference order.

Supported: 1-4 scales, D <= 1024, T % pf == 0, H and W divisible by d and H/d, W/d by p.
"""
import os
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .triton_shim import tl, triton  # (a stand-in where Triton does not install)

MAX_SCALES = 4
MAX_DIM = 1024
SMEM_BUDGET = 200 * 1024  # of sm_90's 227 KB a block may use, with room for the compiler's scratch


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _scale(pid, H, W, TG, d0, d1, d2, d3, P: tl.constexpr, BM: tl.constexpr, BY_BLOCK: tl.constexpr):
    """Geometry of one scale: (s, its first token block, d, gh, gw, n_tok, first output row).
    BY_BLOCK: ``pid`` is a token-block index (blocks never span scales; unused scales carry d = 1,
    so their start lies at or past the grid's end); else ``pid`` is the scale index."""
    n0 = TG * (H // (d0 * P)) * (W // (d0 * P))
    n1 = TG * (H // (d1 * P)) * (W // (d1 * P))
    n2 = TG * (H // (d2 * P)) * (W // (d2 * P))
    if BY_BLOCK:
        e1 = tl.cdiv(n0, BM)
        e2 = e1 + tl.cdiv(n1, BM)
        e3 = e2 + tl.cdiv(n2, BM)
        s = (pid >= e1).to(tl.int32) + (pid >= e2).to(tl.int32) + (pid >= e3).to(tl.int32)
        blk0 = tl.where(s == 0, 0, tl.where(s == 1, e1, tl.where(s == 2, e2, e3)))
    else:
        s = pid
        blk0 = 0
    d = tl.where(s == 0, d0, tl.where(s == 1, d1, tl.where(s == 2, d2, d3)))
    row0 = 1 + tl.where(s == 0, 0, tl.where(s == 1, n0, tl.where(s == 2, n0 + n1, n0 + n1 + n2)))
    gh = H // (d * P)
    gw = W // (d * P)
    return s, blk0, d, gh, gw, TG * gh * gw, row0


@triton.jit
def _rows(bb, tok, gh, gw, d, s_b, s_t, s_h, s_w, s_ib, s_it,
          P: tl.constexpr, PF: tl.constexpr, FRAME_STORE: tl.constexpr):
    """Per-token part of the pixel offset (and of the frame-index offset) for tokens ``tok`` of
    batch rows ``bb`` (int64): offsets are row part + column part, so they are computed once.
    Also each token's first pixel column (a mirrored frame reads column W-1-w instead of w)."""
    ti = tok // (gh * gw)
    hi = (tok // gw) % gh
    wi = tok % gw
    px = (hi * (P * d)).to(tl.int64) * s_h + (wi * (P * d)).to(tl.int64) * s_w
    ix = bb * s_ib + (ti * PF) * s_it
    if not FRAME_STORE:
        px += bb * s_b + (ti * PF).to(tl.int64) * s_t
    return px, ix, wi * (P * d)


@triton.jit
def _cols(kk, d, s_c, s_t, s_h, s_w, s_it,
          C: tl.constexpr, P: tl.constexpr, PF: tl.constexpr, FRAME_STORE: tl.constexpr):
    """Per-column part of the offsets for internal patch columns ``kk`` (order c, f, p1, p2): pixel
    offset, frame-index offset, pixel column."""
    p2 = kk % P
    p1 = (kk // P) % P
    f = (kk // (P * P)) % PF
    c = kk // (P * P * PF)
    px = c * s_c + (p1 * d) * s_h + (p2 * d) * s_w  # dilation: a strided read, no resampled copy
    if not FRAME_STORE:
        px += f * s_t
    return px, f * s_it, p2 * d


@triton.jit
def _gather(src_ptr, idx_ptr, rpx, rix, rw, rm, cpx, cix, cw, m, k0, n_store, W, s_b, s_w, s_it,
            P: tl.constexpr, PF: tl.constexpr, FRAME_STORE: tl.constexpr, ROW_FRAME: tl.constexpr):
    """Pixels [BM, BK] as fp32 of the chunk of patch columns starting at ``k0``. Frame-store
    entries: i reads frame i, ~i (= -1-i) frame i mirrored along W (a training flip, so no flipped
    copy of the store is needed); the frame is clamped into [0, n_store - 1]. ROW_FRAME: the chunk
    lies within one (channel, frame) of the tubelet (BK divides p*p), so each row's frame index is
    loaded, decoded and made a 64-bit offset once per row, not per pixel."""
    if FRAME_STORE:
        if ROW_FRAME:
            f = (k0 // (P * P)) % PF
            fid = tl.load(idx_ptr + rix + f * s_it, mask=rm, other=0).to(tl.int64)  # [BM]
            flip = fid < 0
            fid = tl.where(flip, -1 - fid, fid)
            roff = rpx + tl.minimum(fid, n_store - 1) * s_b
            col = rw[:, None] + cw[None, :]
            # within one frame the column part fits int32: column w -> W-1-w on mirrored rows
            off = roff[:, None] + (cpx[None, :] + tl.where(flip[:, None], (W - 1 - 2 * col) * s_w, 0))
        else:
            fid = tl.load(idx_ptr + rix[:, None] + cix[None, :], mask=m, other=0).to(tl.int64)
            flip = fid < 0
            fid = tl.where(flip, -1 - fid, fid)
            off = rpx[:, None] + cpx[None, :] + tl.minimum(fid, n_store - 1) * s_b
            col = rw[:, None] + cw[None, :]
            off += tl.where(flip, (W - 1 - 2 * col).to(tl.int64) * s_w, 0)  # column w -> W-1-w
    else:
        off = rpx[:, None] + cpx[None, :]
    return tl.load(src_ptr + off, mask=m, other=0).to(tl.float32)


@triton.jit
def _chunk_pixels(src_ptr, idx_ptr, rpx, rix, rw, rm, k0, d, n_store, W, s_b, s_c, s_t, s_h, s_w, s_it,
                  C: tl.constexpr, P: tl.constexpr, PF: tl.constexpr, FRAME_STORE: tl.constexpr,
                  BK: tl.constexpr):
    """Patch columns [k0, k0 + BK) of the block's rows: (kk, column mask, element mask, pixels
    [BM, BK] as fp32)."""
    K: tl.constexpr = C * P * P * PF
    kk = k0 + tl.arange(0, BK)
    km = kk < K
    cpx, cix, cw = _cols(kk, d, s_c, s_t, s_h, s_w, s_it, C, P, PF, FRAME_STORE)
    m = rm[:, None] & km[None, :]
    x = _gather(src_ptr, idx_ptr, rpx, rix, rw, rm, cpx, cix, cw, m, k0, n_store, W, s_b, s_w, s_it,
                P, PF, FRAME_STORE, (P * P) % BK == 0)
    return kk, km, m, x


@triton.jit
def _fwd_chunk(x, xr, m, km, K, sx, sxx, acc, wg_ptr, nn, nm, kk,
               CDT: tl.constexpr, SPLIT_X: tl.constexpr):
    """One patch-column chunk of the single pass: shift the pixels [BM, BK] by each row's first
    pixel ``xr``, add them and their squares into per-element sums (reduced over columns once,
    after the last chunk: no cross-thread reduction per chunk) and accumulate (x - xr) @ W'^T."""
    xs = tl.where(m, x - xr[:, None], 0.0)
    sx += xs
    sxx += xs * xs
    wt = tl.load(wg_ptr + nn[None, :] * K + kk[:, None], mask=km[:, None] & nm[None, :], other=0.0)  # W'^T [BK, BD]
    if CDT == tl.float32:  # near-fp32 on tensor cores (3xTF32); "ieee" was scalar FFMA
        acc = tl.dot(xs, wt.to(tl.float32), acc, input_precision="tf32x3")
    else:
        hi = xs.to(CDT)
        acc = tl.dot(hi, wt.to(CDT), acc)
        if SPLIT_X:  # float pixels: the shifted values are not exact in 16 bits, so add the rest
            acc = tl.dot((xs - hi.to(tl.float32)).to(CDT), wt.to(CDT), acc)
    return sx, sxx, acc


@triton.jit
def _token_block_fwd(src_ptr, idx_ptr, rpx, rix, rw, rm, d, n_store, W, s_b, s_c, s_t, s_h, s_w, s_it,
                     wg_ptr, c1_ptr, c2_ptr, bp_ptr, s, eps, D,
                     C: tl.constexpr, P: tl.constexpr, PF: tl.constexpr, FRAME_STORE: tl.constexpr,
                     BM: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, CDT: tl.constexpr,
                     SPLIT_X: tl.constexpr):
    """LN(patch) -> Linear for a block of tokens, in ONE pass over the pixels. With xh = (x - mu) *
    rstd and W' = gamma * W (the prep kernel's), Linear(LN(x)) = rstd * (x @ W'^T - mu * c1) + c2 +
    bias, c1 = rowsum(W'), c2 = W @ beta: the stats and the dot come from the same gathered chunk.
    The pixels are shifted by each row's first pixel first, so the subtraction cancels nothing
    large: a flat (e.g. saturated) patch gives exactly 0 before the dot, and uint8 pixels shifted
    stay integers in [-255, 255], exact in bf16 and fp16. Returns z [BM, BD] (fp32, zero past D)
    and the patch LN mean and rstd [BM]."""
    K: tl.constexpr = C * P * P * PF
    nn = tl.arange(0, BD)
    nm = nn < D
    wg_ptr += s * D * K
    kk, km, m, x = _chunk_pixels(src_ptr, idx_ptr, rpx, rix, rw, rm, 0, d, n_store, W, s_b, s_c, s_t, s_h, s_w, s_it,
                                 C, P, PF, FRAME_STORE, BK)
    xr = tl.sum(tl.where(kk[None, :] == 0, x, 0.0), axis=1)  # each row's first pixel: the shift
    sx = tl.zeros([BM, BK], dtype=tl.float32)
    sxx = tl.zeros([BM, BK], dtype=tl.float32)
    acc = tl.zeros([BM, BD], dtype=tl.float32)
    sx, sxx, acc = _fwd_chunk(x, xr, m, km, K, sx, sxx, acc, wg_ptr, nn, nm, kk, CDT, SPLIT_X)
    for k0 in range(BK, K, BK):  # (the first chunk, peeled, gave the shift)
        kk, km, m, x = _chunk_pixels(src_ptr, idx_ptr, rpx, rix, rw, rm, k0, d, n_store, W, s_b, s_c, s_t, s_h, s_w,
                                     s_it, C, P, PF, FRAME_STORE, BK)
        sx, sxx, acc = _fwd_chunk(x, xr, m, km, K, sx, sxx, acc, wg_ptr, nn, nm, kk, CDT, SPLIT_X)
    # shifted sums: the shift is one of the row's own pixels, so mean^2 is at most ~K times the
    # variance and fp32 keeps it (a flat patch sums exact zeros)
    mean = tl.sum(sx, axis=1) / K
    var = tl.maximum(tl.sum(sxx, axis=1) / K - mean * mean, 0.0)
    rstd = 1.0 / tl.sqrt(var + eps)
    c1 = tl.load(c1_ptr + s * D + nn, mask=nm, other=0.0)
    c2 = tl.load(c2_ptr + s * D + nn, mask=nm, other=0.0)
    bp = tl.load(bp_ptr + s * D + nn, mask=nm, other=0.0).to(tl.float32)
    z = rstd[:, None] * (acc - mean[:, None] * c1[None, :]) + (c2 + bp)[None, :]
    return z, mean + xr, rstd


@triton.jit
def _ln_d(z, nm, D, eps):
    zm = tl.sum(z, axis=1) / D
    zc = tl.where(nm[None, :], z - zm[:, None], 0.0)
    zr = 1.0 / tl.sqrt(tl.sum(zc * zc, axis=1) / D + eps)
    return zc * zr[:, None], zr


@triton.jit
def _tokenize_fwd(src_ptr, idx_ptr, out_ptr, cls_ptr, pos_ptr, z_ptr, mean_ptr, rstd_ptr,
                  wg_ptr, c1_ptr, c2_ptr, bp_ptr, wout_ptr, bout_ptr,
                  H, W, TG, D, N_OUT, n_store, d0, d1, d2, d3, eps,
                  s_b, s_c, s_t, s_h, s_w, s_ib, s_it,
                  C: tl.constexpr, P: tl.constexpr, PF: tl.constexpr, FRAME_STORE: tl.constexpr,
                  BM: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, CDT: tl.constexpr,
                  SAVE: tl.constexpr, SPLIT_X: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    s, blk0, d, gh, gw, n_tok, row0 = _scale(pid, H, W, TG, d0, d1, d2, d3, P, BM, True)
    tok = (pid - blk0) * BM + tl.arange(0, BM)
    rm = tok < n_tok
    bb = tl.zeros([BM], dtype=tl.int64) + b
    rpx, rix, rw = _rows(bb, tok, gh, gw, d, s_b, s_t, s_h, s_w, s_ib, s_it, P, PF, FRAME_STORE)
    z, mu, rs = _token_block_fwd(src_ptr, idx_ptr, rpx, rix, rw, rm, d, n_store, W, s_b, s_c, s_t, s_h, s_w, s_it,
                                 wg_ptr, c1_ptr, c2_ptr, bp_ptr, s, eps, D,
                                 C, P, PF, FRAME_STORE, BM, BK, BD, CDT, SPLIT_X)
    nn = tl.arange(0, BD)
    nm = nn < D
    rows = row0 + tok
    m = rm[:, None] & nm[None, :]
    z = z.to(CDT).to(tl.float32)  # the GEMM's output dtype, as the reference's Linear under autocast
    if SAVE:  # for the backward, which so needs no recompute: z and the patch LN stats
        r = bb * (N_OUT - 1) + (rows - 1)  # row among all non-cls tokens
        tl.store(z_ptr + r[:, None] * D + nn[None, :], z.to(z_ptr.dtype.element_ty), mask=m)
        tl.store(mean_ptr + r, mu, mask=rm)
        tl.store(rstd_ptr + r, rs, mask=rm)
    zh, _ = _ln_d(z, nm, D, eps)
    go = tl.load(wout_ptr + s * D + nn, mask=nm, other=0.0).to(tl.float32)
    bo = tl.load(bout_ptr + s * D + nn, mask=nm, other=0.0).to(tl.float32)
    pos = tl.load(pos_ptr + rows[:, None] * D + nn[None, :], mask=m, other=0.0).to(tl.float32)
    y = zh * go[None, :] + bo[None, :] + pos
    out_base = out_ptr + b.to(tl.int64) * N_OUT * D
    tl.store(out_base + rows[:, None] * D + nn[None, :], y.to(out_ptr.dtype.element_ty), mask=m)
    if pid == 0:  # the cls row rides along with the first block
        cv = tl.load(cls_ptr + nn, mask=nm, other=0.0).to(tl.float32)
        cv += tl.load(pos_ptr + nn, mask=nm, other=0.0).to(tl.float32)
        tl.store(out_base + nn, cv.to(out_ptr.dtype.element_ty), mask=nm)


@triton.jit
def _tokenize_bwd_tok(z_ptr, gout_ptr, dz_ptr, part_d_ptr, part_pos_ptr, wout_ptr,
                      B, B_CHUNK, NBLK, H, W, TG, D, N_OUT, d0, d1, d2, d3, eps,
                      P: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr):
    pid = tl.program_id(0)
    pb = tl.program_id(1)
    s, blk0, d, gh, gw, n_tok, row0 = _scale(pid, H, W, TG, d0, d1, d2, d3, P, BM, True)
    tok = (pid - blk0) * BM + tl.arange(0, BM)
    rm = tok < n_tok
    rows = row0 + tok
    nn = tl.arange(0, BD)
    nm = nn < D
    m = rm[:, None] & nm[None, :]
    go = tl.load(wout_ptr + s * D + nn, mask=nm, other=0.0).to(tl.float32)
    # partials over this program's slice of the batch, kept in registers
    acc_pos = tl.zeros([BM, BD], dtype=tl.float32)
    acc_go = tl.zeros([BD], dtype=tl.float32)
    acc_bo = tl.zeros([BD], dtype=tl.float32)
    acc_bp = tl.zeros([BD], dtype=tl.float32)
    acc_cls = tl.zeros([BD], dtype=tl.float32)
    b_lo = pb * B_CHUNK
    b_hi = tl.minimum(b_lo + B_CHUNK, B)
    for b in range(b_lo, b_hi):
        # the batch index as an int64 vector (the loop variable is a plain int in the interpreter)
        bb = tl.zeros([BM], dtype=tl.int64) + b
        r = bb * (N_OUT - 1) + (rows - 1)  # row among all non-cls tokens
        z = tl.load(z_ptr + r[:, None] * D + nn[None, :], mask=m, other=0.0).to(tl.float32)
        zh, zr = _ln_d(z, nm, D, eps)
        g = tl.load(gout_ptr + (bb * N_OUT + rows)[:, None] * D + nn[None, :], mask=m, other=0.0).to(tl.float32)
        acc_pos += g
        acc_go += tl.sum(g * zh, axis=0)
        acc_bo += tl.sum(g, axis=0)
        dzh = g * go[None, :]
        c1 = tl.sum(dzh, axis=1) / D
        c2 = tl.sum(dzh * zh, axis=1) / D
        dz = tl.where(nm[None, :], zr[:, None] * (dzh - c1[:, None] - zh * c2[:, None]), 0.0)
        acc_bp += tl.sum(dz, axis=0)
        tl.store(dz_ptr + r[:, None] * D + nn[None, :], dz.to(dz_ptr.dtype.element_ty), mask=m)
        if pid == 0:
            acc_cls += tl.load(gout_ptr + (tl.zeros([BD], dtype=tl.int64) + b) * N_OUT * D + nn,
                               mask=nm, other=0.0).to(tl.float32)
    pp = part_pos_ptr + pb.to(tl.int64) * N_OUT * D
    tl.store(pp + rows[:, None] * D + nn[None, :], acc_pos, mask=m)
    if pid == 0:
        tl.store(pp + nn, acc_cls, mask=nm)
    # part_d: [3, n_bsplit, NBLK, D] -> norm_out weight, norm_out bias, proj bias
    stride3 = tl.num_programs(1) * NBLK * D
    pd = part_d_ptr + (pb * NBLK + pid) * D + nn
    tl.store(pd, acc_go, mask=nm)
    tl.store(pd + stride3, acc_bo, mask=nm)
    tl.store(pd + 2 * stride3, acc_bp, mask=nm)


@triton.jit
def _tokenize_bwd_w(src_ptr, idx_ptr, dz_ptr, mean_ptr, rstd_ptr, part_w_ptr, part_k_ptr,
                    win_ptr, bin_ptr, w_ptr,
                    B, B_CHUNK, H, W, TG, D, N_OUT, n_store, d0, d1, d2, d3,
                    s_b, s_c, s_t, s_h, s_w, s_ib, s_it,
                    C: tl.constexpr, P: tl.constexpr, PF: tl.constexpr, FRAME_STORE: tl.constexpr,
                    BM: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, CDT: tl.constexpr):
    K: tl.constexpr = C * P * P * PF
    pk = tl.program_id(0)
    sp = tl.program_id(1)
    n_split = tl.num_programs(1)
    s, _, d, gh, gw, n_tok, row0 = _scale(tl.program_id(2), H, W, TG, d0, d1, d2, d3, P, BM, False)
    kk = pk * BK + tl.arange(0, BK)
    km = kk < K
    cpx, cix, cw = _cols(kk, d, s_c, s_t, s_h, s_w, s_it, C, P, PF, FRAME_STORE)
    nn = tl.arange(0, BD)
    nm = nn < D
    acc_w = tl.zeros([BD, BK], dtype=tl.float32)  # G = dz^T @ xh over this program's rows
    acc_s = tl.zeros([BD], dtype=tl.float32)  # column sums of dz over them
    # rows: this program's batch slice x every token of the scale, token blocks outside, batch
    # inside, so the token geometry (integer divisions) is worked out once per block, not per row
    b_lo = sp * B_CHUNK
    b_hi = tl.minimum(b_lo + B_CHUNK, B)
    for t0 in range(0, n_tok, BM):
        tok = t0 + tl.arange(0, BM)
        rm = tok < n_tok
        zero = tl.zeros([BM], dtype=tl.int64)
        rpx0, rix0, rw = _rows(zero, tok, gh, gw, d, s_b, s_t, s_h, s_w, s_ib, s_it, P, PF, FRAME_STORE)
        r_tok = (row0 - 1 + tok).to(tl.int64)
        m = rm[:, None] & km[None, :]
        for b in range(b_lo, b_hi):
            bb = zero + b
            rpx = rpx0
            if not FRAME_STORE:
                rpx = rpx0 + bb * s_b
            x = _gather(src_ptr, idx_ptr, rpx, rix0 + bb * s_ib, rw, rm, cpx, cix, cw, m, pk * BK, n_store, W,
                        s_b, s_w, s_it, P, PF, FRAME_STORE, (P * P) % BK == 0)
            rr = bb * (N_OUT - 1) + r_tok
            mu = tl.load(mean_ptr + rr, mask=rm, other=0.0)
            rs = tl.load(rstd_ptr + rr, mask=rm, other=0.0)
            xh = tl.where(m, (x - mu[:, None]) * rs[:, None], 0.0)
            dzt = tl.load(dz_ptr + rr[None, :] * D + nn[:, None], mask=nm[:, None] & rm[None, :], other=0.0)
            if CDT == tl.float32:
                # 3xTF32 (near-fp32, tensor cores): the fp32 FMA dot here makes ptxas spill kilobytes
                acc_w = tl.dot(dzt, xh, acc_w, input_precision="tf32x3")  # [BD, BK]
            else:
                acc_w = tl.dot(dzt.to(CDT), xh.to(CDT), acc_w)
            acc_s += tl.sum(dzt.to(tl.float32), axis=1)
    # With xn = xh * gamma + beta and dy = dz @ W, every gradient here is linear in G and s, so
    # each program's partial is exact and the dz @ W GEMM is not needed:
    #   dW = G * gamma + s beta^T,  dgamma = colsum(W * G),  dbeta = colsum(W * s)
    g = tl.load(win_ptr + s * K + kk, mask=km, other=0.0).to(tl.float32)
    be = tl.load(bin_ptr + s * K + kk, mask=km, other=0.0).to(tl.float32)
    wc = tl.load(w_ptr + s * D * K + nn[:, None] * K + kk[None, :],
                 mask=nm[:, None] & km[None, :], other=0.0).to(tl.float32)  # W chunk [BD, BK]
    acc_g = tl.sum(wc * acc_w, axis=0)
    acc_b = tl.sum(wc * acc_s[:, None], axis=0)
    acc_w = acc_w * g[None, :] + acc_s[:, None] * be[None, :]
    pw = part_w_ptr + (s * n_split + sp).to(tl.int64) * D * K
    tl.store(pw + nn[:, None] * K + kk[None, :], acc_w, mask=nm[:, None] & km[None, :])
    # part_k: [2, S, n_split, K] -> norm_in weight, norm_in bias
    pk_base = part_k_ptr + (s * n_split + sp) * K + kk
    tl.store(pk_base, acc_g, mask=km)
    tl.store(pk_base + tl.num_programs(2) * n_split * K, acc_b, mask=km)


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_TL = {"float32": tl.float32, "float16": tl.float16, "bfloat16": tl.bfloat16}


@triton.jit
def _tokenize_prep(w_ptr, win_ptr, bin_ptr, order_ptr, wk_ptr, wgk_ptr, wink_ptr, bink_ptr, c1_ptr, c2_ptr,
                   S, D, K, BK: tl.constexpr):
    """The parameters in kernel column order, one launch, one program per row, the row walked in
    BK-column chunks. Rows [0, S*D) are rows of W [S, D, K]; each writes W (compute dtype) for the
    backward, W' = patch-LN weight * W (compute dtype) for the forward's single pass, and the two
    row sums the forward's single pass needs, c1 = sum_k W'[k] (of the rounded values it
    multiplies) and c2 = sum_k patch-LN bias[k] * W[k] (fp32). Then the S patch-LN weight rows and
    the S bias rows."""
    row = tl.program_id(0)
    if row < S * D:
        s = row // D
        a1 = tl.zeros([BK], dtype=tl.float32)
        a2 = tl.zeros([BK], dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + tl.arange(0, BK)
            km = kk < K
            src = tl.load(order_ptr + kk, mask=km, other=0)
            x = tl.load(w_ptr + row.to(tl.int64) * K + src, mask=km, other=0.0).to(tl.float32)
            g = tl.load(win_ptr + s * K + src, mask=km, other=0.0).to(tl.float32)
            be = tl.load(bin_ptr + s * K + src, mask=km, other=0.0).to(tl.float32)
            tl.store(wk_ptr + row.to(tl.int64) * K + kk, x.to(wk_ptr.dtype.element_ty), mask=km)
            wg = (x * g).to(wgk_ptr.dtype.element_ty)
            tl.store(wgk_ptr + row.to(tl.int64) * K + kk, wg, mask=km)
            a1 += wg.to(tl.float32)
            a2 += be * x
        tl.store(c1_ptr + row, tl.sum(a1, axis=0))
        tl.store(c2_ptr + row, tl.sum(a2, axis=0))
    else:
        r = row - S * D
        for k0 in range(0, K, BK):
            kk = k0 + tl.arange(0, BK)
            km = kk < K
            src = tl.load(order_ptr + kk, mask=km, other=0)
            if r < S:
                x = tl.load(win_ptr + r * K + src, mask=km, other=0.0)
                tl.store(wink_ptr + r * K + kk, x.to(wink_ptr.dtype.element_ty), mask=km)
            else:
                x = tl.load(bin_ptr + (r - S) * K + src, mask=km, other=0.0)
                tl.store(bink_ptr + (r - S) * K + kk, x.to(bink_ptr.dtype.element_ty), mask=km)


@triton.jit
def _split_sum_scatter(src, split_stride, n_split, kk, km, order_ptr, dst, BK: tl.constexpr):
    """dst[order[kk]] = sum over s < n_split of src[s * split_stride + kk] (fp32, in order)."""
    acc = tl.zeros([BK], dtype=tl.float32)
    for sp in range(n_split):
        acc += tl.load(src + sp * split_stride + kk, mask=km, other=0.0)
    col = tl.load(order_ptr + kk, mask=km, other=0)
    tl.store(dst + col, acc.to(dst.dtype.element_ty), mask=km)


@triton.jit
def _tokenize_bwd_sum(part_d_ptr, part_pos_ptr, part_k_ptr, part_w_ptr, order_ptr,
                      g_cls_ptr, g_pos_ptr, g_win_ptr, g_bin_ptr, g_w_ptr, g_bp_ptr, g_wout_ptr, g_bout_ptr,
                      S, D, K, N_OUT, N_BS, NBLK, N_SPLIT, e0, e1, e2, e3, e4,
                      BD: tl.constexpr, BK: tl.constexpr):
    """Every reduction after the backward kernels in one launch, each in a fixed order
    (deterministic). Programs, in ranges (NKC = cdiv(K, BK) column chunks): [0, S*D*NKC) a
    chunk of row (s, d) of dW, summed over batch slices and scattered back to reference column
    order; the next N_OUT, row r of dpos summed over batch slices (row 0 also dcls); the next
    2*S*NKC, a chunk of the patch-LN weight / bias of scale s over batch slices, scattered; the
    last 3*S, norm_out weight, norm_out bias, proj bias of scale s over batch slices and the
    scale's token blocks [e_s, e_{s+1})."""
    pid = tl.program_id(0)
    nn = tl.arange(0, BD)
    nm = nn < D
    nkc = tl.cdiv(K, BK)
    a1 = S * D * nkc
    a2 = a1 + N_OUT
    a3 = a2 + 2 * S * nkc
    if pid < a1:  # part_w [S, N_SPLIT, D, K]
        row = pid // nkc
        s = row // D
        kk = (pid % nkc) * BK + tl.arange(0, BK)
        _split_sum_scatter(part_w_ptr + (s * N_SPLIT * D + row % D).to(tl.int64) * K, D * K, N_SPLIT, kk, kk < K,
                           order_ptr, g_w_ptr + row.to(tl.int64) * K, BK)
    elif pid < a2:  # part_pos [N_BS, N_OUT, D]
        r = pid - a1
        acc_p = tl.zeros([BD], dtype=tl.float32)
        for b in range(N_BS):
            acc_p += tl.load(part_pos_ptr + (b * N_OUT + r).to(tl.int64) * D + nn, mask=nm, other=0.0)
        tl.store(g_pos_ptr + r * D + nn, acc_p.to(g_pos_ptr.dtype.element_ty), mask=nm)
        if r == 0:
            tl.store(g_cls_ptr + nn, acc_p.to(g_cls_ptr.dtype.element_ty), mask=nm)
    elif pid < a3:  # part_k [2, S, N_SPLIT, K]: j = 0 patch-LN weight, 1 its bias
        row = (pid - a2) // nkc
        j = row // S
        s = row % S
        kk = ((pid - a2) % nkc) * BK + tl.arange(0, BK)
        src = part_k_ptr + (j * S + s) * N_SPLIT * K
        if j == 0:
            _split_sum_scatter(src, K, N_SPLIT, kk, kk < K, order_ptr, g_win_ptr + s * K, BK)
        else:
            _split_sum_scatter(src, K, N_SPLIT, kk, kk < K, order_ptr, g_bin_ptr + s * K, BK)
    else:  # part_d [3, N_BS, NBLK, D]: j = 0 norm_out weight, 1 norm_out bias, 2 proj bias
        j = (pid - a3) // S
        s = (pid - a3) % S
        lo = tl.where(s == 0, e0, tl.where(s == 1, e1, tl.where(s == 2, e2, e3)))
        hi = tl.where(s == 0, e1, tl.where(s == 1, e2, tl.where(s == 2, e3, e4)))
        acc_d = tl.zeros([BD], dtype=tl.float32)
        for b in range(N_BS):
            for blk in range(lo, hi):
                acc_d += tl.load(part_d_ptr + ((j * N_BS + b) * NBLK + blk).to(tl.int64) * D + nn, mask=nm, other=0.0)
        if j == 0:
            tl.store(g_wout_ptr + s * D + nn, acc_d.to(g_wout_ptr.dtype.element_ty), mask=nm)
        elif j == 1:
            tl.store(g_bout_ptr + s * D + nn, acc_d.to(g_bout_ptr.dtype.element_ty), mask=nm)
        else:
            tl.store(g_bp_ptr + s * D + nn, acc_d.to(g_bp_ptr.dtype.element_ty), mask=nm)


def _gpu_sms(device: torch.device) -> Optional[int]:
    """SMs of the GPU the kernels compile for, None under the CPU interpreter: the one place host
    code asks which it is (tools/kernel_report.py swaps it to plan sm_90 launches on a CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return None


def _blocks(D: int, K: int, device: torch.device, backward: bool = False) -> tuple[int, int, int, int]:
    """(BM, BK, BD, num_warps): every tl.dot dim >= 16; tiles sized so the fp32 accumulators fit.
    D <= 128 (the model's 96), read off tools/kernel_report.py for sm_90: forward 64 tokens x 16
    patch columns on 4 warps (222 registers, no spills, 2 blocks/SM, wgmma: 64 rows is one
    warpgroup's wgmma; 8 warps took 233 registers, 1 block/SM); bwd_w 64 rows x 32 columns on 4
    warps (211 registers, 2 blocks/SM, both GEMMs wgmma; 16 rows ran dz @ W on mma.sync).
    Wider D keeps the earlier tiles.
    The CPU interpreter costs per op, not per element, so there the blocks are as large as
    sensible (the masks are the same code either way; the GPU blocks have their own test)."""
    BD = max(16, triton.next_power_of_2(D))
    if device.type != "cuda" and _gpu_sms(device) is None:
        return 64, max(16, min(128, triton.next_power_of_2(K))), BD, 4
    if BD <= 128:
        return (64, max(16, min(32, triton.next_power_of_2(K))), BD, 4) if backward else (64, 16, BD, 4)
    BK = max(16, min(64, triton.next_power_of_2(K), 8192 // BD))
    if backward:
        return (32 if BD <= 256 else 16), BK, BD, (8 if BD <= 256 else 16)
    return (32 if BD <= 256 else 16), BK, BD, 8


def _col_chunk(device: torch.device) -> int:
    """Column chunk of the weight-sized launches (the columns _tokenize_prep's row loop takes at a
    time, and _tokenize_bwd_sum's programs per row): 128 on the GPU; 64 in the interpreter, so the
    tests' small patch widths still cover several chunks and a ragged last one."""
    return 128 if _gpu_sms(device) else 64


_ORDERS: dict = {}


def _internal_order(C: int, P: int, PF: int, device: torch.device) -> torch.Tensor:
    """[K] int64: the reference patch index (p1, p2, f, c) of each internal column (c, f, p1, p2);
    ``param[..., order]`` puts a parameter in kernel order, ``grad_ref[..., order] = grad`` back."""
    key = (C, P, PF, str(device))
    if key not in _ORDERS:
        c, f, p1, p2 = torch.meshgrid(torch.arange(C), torch.arange(PF), torch.arange(P), torch.arange(P), indexing="ij")
        _ORDERS[key] = (((p1 * P + p2) * PF + f) * C + c).reshape(-1).to(device)
    return _ORDERS[key]


def _bwd_w_stages(BM: int, BK: int, BD: int, elem: int) -> int:
    """Software-pipelining depth of ``_tokenize_bwd_w`` that fits sm_90's 227 KB of shared memory:
    each stage buffers the dz^T tile [BD, BM] and the xh operand [BM, BK] (BK <= BD: counted as two
    dz-sized tiles, an upper bound), the W chunk once (an earlier design at fp32, D = 1024 asked
    for 395 KB with 3 stages and could not launch)."""
    per_stage = 2 * BM * BD * elem
    return max(1, min(3, (SMEM_BUDGET - BD * BK * elem) // per_stage))


def _geometry(T: int, H: int, W: int, p: int, pf: int, dilations: Sequence[int]) -> list[int]:
    """Tokens per scale; raises ValueError on shapes the tokenizer cannot cut."""
    if not 1 <= len(dilations) <= MAX_SCALES:
        raise ValueError(f"multiscale_tokenize: 1 to {MAX_SCALES} scales supported, got dilations {list(dilations)}")
    if T % pf:
        raise ValueError(f"multiscale_tokenize: clip length T={T} is not divisible by frame_patch_size={pf}")
    n = []
    for d in dilations:
        if not isinstance(d, int) or d < 1:
            raise ValueError(f"multiscale_tokenize: dilations must be positive ints, got {list(dilations)}")
        if H % d or W % d or (H // d) % p or (W // d) % p:
            raise ValueError(
                f"multiscale_tokenize: frame {H}x{W} at dilation {d} must give a {H}/{d} x {W}/{d} frame "
                f"of whole sizes divisible by patch_size={p}")
        n.append((T // pf) * (H // d // p) * (W // d // p))
    return n


def _src_args(video: torch.Tensor, frame_index: Optional[torch.Tensor]):
    """(B, C, T, H, W, n_store, strides s_b..s_it) of a clip or a frame store + index table."""
    if frame_index is None:
        B, C, T, H, W = video.shape
        sb, sc, st, sh, sw = video.stride()
        return B, C, T, H, W, 1, (sb, sc, st, sh, sw, 0, 0)
    N, C, H, W = video.shape
    B, T = frame_index.shape
    sb, sc, sh, sw = video.stride()
    return B, C, T, H, W, N, (sb, sc, 0, sh, sw, *frame_index.stride())


def _pad4(dilations: Sequence[int]) -> list[int]:
    return list(dilations) + [1] * (MAX_SCALES - len(dilations))


def _check_device(t: torch.Tensor) -> None:
    if t.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("multiscale_tokenize: the Triton path needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")


def _fwd_impl(video, frame_index, cls, pos, w_in, b_in, w, bp, w_out, b_out,
              patch_size, frame_patch_size, dilations, eps, compute_dtype, out_dtype, save=False):
    """-> (out [B, n_out, D], z [B * (n_out - 1), D], patch LN mean, rstd [B * (n_out - 1)], and W,
    the patch-LN weight and bias in kernel order ([S, D, K] in the compute dtype, [S, K], [S, K]));
    z and the stats are empty unless ``save``. All but ``out`` are the backward's inputs."""
    _check_device(video)
    p, pf = patch_size, frame_patch_size
    B, C, T, H, W, n_store, strides = _src_args(video, frame_index)
    n = _geometry(T, H, W, p, pf, dilations)
    D, K = w.shape[1], w.shape[2]
    BM, BK, BD, nw = _blocks(D, K, video.device)
    n_out = 1 + sum(n)
    order = _internal_order(C, p, pf, video.device)
    # once here, not per program: W (for the backward) and W' in the compute dtype and kernel
    # order (rows load contiguously, half the L2 traffic in 16-bit) and the single pass's row sums
    S = w.shape[0]
    w_k, wg_k = (torch.empty(w.shape, device=w.device, dtype=_DTYPES[compute_dtype]) for _ in range(2))
    w_in_k, b_in_k = torch.empty_like(w_in), torch.empty_like(b_in)
    c1, c2 = (torch.empty(S, D, device=w.device, dtype=torch.float32) for _ in range(2))
    _tokenize_prep[(S * D + 2 * S,)](
        w.contiguous(), w_in.contiguous(), b_in.contiguous(), order, w_k, wg_k, w_in_k, b_in_k, c1, c2, S, D, K,
        BK=_col_chunk(video.device), num_warps=4)
    out = torch.empty(B, n_out, D, device=video.device, dtype=_DTYPES[out_dtype])
    rows = B * (n_out - 1) if save else 0
    z = torch.empty(rows, D, device=video.device, dtype=_DTYPES[compute_dtype])
    mean = torch.empty(rows, device=video.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    nblk = sum(triton.cdiv(x, BM) for x in n)
    idx = frame_index if frame_index is not None else video
    _tokenize_fwd[(nblk, B)](
        video, idx, out, cls, pos, z, mean, rstd, wg_k, c1, c2, bp, w_out, b_out,
        H, W, T // pf, D, n_out, n_store, *_pad4(dilations), eps, *strides,
        C=C, P=p, PF=pf, FRAME_STORE=frame_index is not None,
        BM=BM, BK=BK, BD=BD, CDT=_TL[compute_dtype], SAVE=save, SPLIT_X=video.dtype != torch.uint8, num_warps=nw)
    return out, z, mean, rstd, w_k, w_in_k, b_in_k


def _bwd_impl(grad, video, frame_index, z, mean, rstd, w_c, w_in_k, b_in_k, cls, pos, w_in, b_in, w, bp, w_out,
              b_out, patch_size, frame_patch_size, dilations, eps, compute_dtype):
    """``w_c, w_in_k, b_in_k``: the forward's W and patch-LN parameters in kernel order (saved, not
    permuted again). -> the gradients of (cls, pos, w_in, b_in, w, bp, w_out, b_out)."""
    _check_device(video)
    p, pf = patch_size, frame_patch_size
    B, C, T, H, W, n_store, strides = _src_args(video, frame_index)
    n = _geometry(T, H, W, p, pf, dilations)
    S = len(dilations)
    D, K = w.shape[1], w.shape[2]
    BM, BK, BD, nw = _blocks(D, K, video.device, backward=True)
    if compute_dtype == "float32" and BD <= 128 and _gpu_sms(video.device):
        BM = 16  # 3xTF32 stages each operand split in two: 64 rows spilled 2 KB (report), 16 none
    n_out = 1 + sum(n)
    dev = video.device
    grad = grad.contiguous()
    sms = _gpu_sms(dev)
    # bwd_tok has no GEMM (it reads the saved z): its own token blocks, 32 rows on the GPU
    BT = 32 if sms else BM
    nblk_s = [triton.cdiv(x, BT) for x in n]
    nblk = sum(nblk_s)
    # batch slices per token block: at most one wave of 4 programs per SM (a second, partial wave
    # would double the time); 2 on CPU to test the split
    n_bs = min(B, max(1, 4 * sms // nblk)) if sms else min(B, 2)
    b_chunk = triton.cdiv(B, n_bs)
    n_bs = triton.cdiv(B, b_chunk)
    order = _internal_order(C, p, pf, dev)
    dz_dtype = _DTYPES[compute_dtype]
    dz = torch.empty(B * (n_out - 1), D, device=dev, dtype=dz_dtype)
    part_d = torch.empty(3, n_bs, nblk, D, device=dev, dtype=torch.float32)
    part_pos = torch.empty(n_bs, n_out, D, device=dev, dtype=torch.float32)
    idx = frame_index if frame_index is not None else video
    meta = dict(C=C, P=p, PF=pf, FRAME_STORE=frame_index is not None, BM=BM, BK=BK, BD=BD,
                CDT=_TL[compute_dtype], num_warps=nw)
    _tokenize_bwd_tok[(nblk, n_bs)](
        z, grad, dz, part_d, part_pos, w_out, B, b_chunk, nblk, H, W, T // pf, D, n_out, *_pad4(dilations), eps,
        P=p, BM=BT, BD=BD, num_warps=nw)
    # patch-dim chunks x batch slices x scales for the [D, K] weight gradient
    n_k = triton.cdiv(K, BK)
    # batch slices: one full wave, these tiles hold 3 blocks/SM (tools/kernel_report.py); a partial
    # second wave costs as much as the first
    n_split = min(B, max(1, 3 * sms // (n_k * S)) if sms else 2)
    w_chunk = triton.cdiv(B, n_split)
    n_split = triton.cdiv(B, w_chunk)
    part_w = torch.empty(S, n_split, D, K, device=dev, dtype=torch.float32)
    part_k = torch.empty(2, S, n_split, K, device=dev, dtype=torch.float32)
    _tokenize_bwd_w[(n_k, n_split, S)](
        video, idx, dz, mean, rstd, part_w, part_k, w_in_k, b_in_k, w_c,
        B, w_chunk, H, W, T // pf, D, n_out, n_store, *_pad4(dilations), *strides, **meta,
        num_stages=_bwd_w_stages(BM, BK, BD, dz.element_size()))
    # every reduction of the partials, the scatter back to reference order and the outputs: one
    # launch (it was ~17 small torch ops)
    outs = tuple(torch.empty_like(t) for t in (cls, pos, w_in, b_in, w, bp, w_out, b_out))
    starts = [0]
    for x in nblk_s:
        starts.append(starts[-1] + x)
    starts += [starts[-1]] * (MAX_SCALES + 1 - len(starts))
    BKS = _col_chunk(dev)
    nkc = triton.cdiv(K, BKS)
    _tokenize_bwd_sum[(S * D * nkc + n_out + 2 * S * nkc + 3 * S,)](
        part_d, part_pos, part_k, part_w, order, *outs, S, D, K, n_out, n_bs, nblk, n_split, *starts,
        BD=BD, BK=BKS, num_warps=4)
    return outs


# ----------------------------------------------------------------------------------------------
# custom ops: torch.compile and CUDA graphs see one node forward, one backward
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fmfast::multiscale_tokenize", mutates_args=())
def _tokenize_op(video: torch.Tensor, frame_index: Optional[torch.Tensor], cls: torch.Tensor,
                 pos: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor, w: torch.Tensor,
                 bp: torch.Tensor, w_out: torch.Tensor, b_out: torch.Tensor, patch_size: int,
                 frame_patch_size: int, dilations: List[int], eps: float, compute_dtype: str,
                 out_dtype: str, save: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                      torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fwd_impl(video, frame_index, cls, pos, w_in, b_in, w, bp, w_out, b_out,
                     patch_size, frame_patch_size, dilations, eps, compute_dtype, out_dtype, save)


@_tokenize_op.register_fake
def _(video, frame_index, cls, pos, w_in, b_in, w, bp, w_out, b_out,
      patch_size, frame_patch_size, dilations, eps, compute_dtype, out_dtype, save):
    B = video.shape[0] if frame_index is None else frame_index.shape[0]
    n_out, D = pos.shape[0], w.shape[1]
    rows = B * (n_out - 1) if save else 0
    return (video.new_empty(B, n_out, D, dtype=_DTYPES[out_dtype]), video.new_empty(rows, D, dtype=_DTYPES[compute_dtype]),
            video.new_empty(rows, dtype=torch.float32), video.new_empty(rows, dtype=torch.float32),
            w.new_empty(w.shape, dtype=_DTYPES[compute_dtype]), torch.empty_like(w_in), torch.empty_like(b_in))


@torch.library.custom_op("fmfast::multiscale_tokenize_backward", mutates_args=())
def _tokenize_bwd_op(grad: torch.Tensor, video: torch.Tensor, frame_index: Optional[torch.Tensor],
                     z: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, w_c: torch.Tensor,
                     w_in_k: torch.Tensor, b_in_k: torch.Tensor, cls: torch.Tensor, pos: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor,
                     w: torch.Tensor, bp: torch.Tensor, w_out: torch.Tensor, b_out: torch.Tensor,
                     patch_size: int, frame_patch_size: int, dilations: List[int], eps: float,
                     compute_dtype: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                  torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd_impl(grad, video, frame_index, z, mean, rstd, w_c, w_in_k, b_in_k, cls, pos, w_in, b_in, w, bp,
                     w_out, b_out, patch_size, frame_patch_size, dilations, eps, compute_dtype)


@_tokenize_bwd_op.register_fake
def _(grad, video, frame_index, z, mean, rstd, w_c, w_in_k, b_in_k, cls, pos, w_in, b_in, w, bp, w_out, b_out,
      patch_size, frame_patch_size, dilations, eps, compute_dtype):
    return tuple(torch.empty_like(t) for t in (cls, pos, w_in, b_in, w, bp, w_out, b_out))


def _setup_context(ctx, inputs, output):
    (video, frame_index, cls, pos, w_in, b_in, w, bp, w_out, b_out,
     patch_size, frame_patch_size, dilations, eps, compute_dtype, _, save) = inputs
    _, z, mean, rstd, w_c, w_in_k, b_in_k = output
    ctx.mark_non_differentiable(z, mean, rstd, w_c, w_in_k, b_in_k)
    ctx.save_for_backward(video, frame_index, z, mean, rstd, w_c, w_in_k, b_in_k, cls, pos, w_in, b_in, w, bp, w_out,
                          b_out)
    ctx.args = (patch_size, frame_patch_size, dilations, eps, compute_dtype)
    ctx.saved = save


def _backward(ctx, grad, *_):
    if not ctx.saved:
        raise RuntimeError("multiscale_tokenize: called without grad mode or parameters needing grad, "
                           "so the forward saved nothing for a backward")
    grads = _tokenize_bwd_op(grad, *ctx.saved_tensors, *ctx.args)
    return (None, None, *grads, None, None, None, None, None, None, None)


_tokenize_op.register_autograd(_backward, setup_context=_setup_context)


_PARAM_NAMES = ("norm_in_weight", "norm_in_bias", "proj_weight", "proj_bias", "norm_out_weight",
                "norm_out_bias", "pos_embedding")


def _check_inputs(video, frame_index, cls_token, scales, patch_size, frame_patch_size, dilations):
    """Validate shapes and devices; returns (B, tokens per scale, D, K)."""
    if len(scales) != len(dilations):
        raise ValueError(f"multiscale_tokenize: {len(dilations)} dilations but {len(scales)} sets of scale weights")
    if frame_index is None:
        if video.dim() != 5:
            raise ValueError(f"multiscale_tokenize: video must be [B, C, T, H, W], got shape {tuple(video.shape)}")
        B, C, T, H, W = video.shape
    else:
        if video.dim() != 4:
            raise ValueError(f"multiscale_tokenize: frame store must be [N, C, H, W], got shape {tuple(video.shape)}")
        if frame_index.dim() != 2 or frame_index.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"multiscale_tokenize: frame_index must be an int64/int32 [B, T] table, got "
                             f"{frame_index.dtype} {tuple(frame_index.shape)}")
        if video.shape[0] < 1:
            raise ValueError("multiscale_tokenize: frame store is empty")
        if frame_index.device != video.device:
            raise ValueError(f"multiscale_tokenize: frame_index on {frame_index.device}, frame store on {video.device}")
        (B, T), (_, C, H, W) = frame_index.shape, video.shape
    if video.dtype != torch.uint8 and not video.is_floating_point():
        raise ValueError(f"multiscale_tokenize: video must be uint8 or float, got {video.dtype}")
    if B < 1:
        raise ValueError("multiscale_tokenize: empty batch")
    n = _geometry(T, H, W, patch_size, frame_patch_size, dilations)
    K = C * patch_size * patch_size * frame_patch_size
    D = cls_token.numel()
    if D > MAX_DIM:
        raise ValueError(f"multiscale_tokenize: embedding width {D} > {MAX_DIM} not supported")
    for s, sp in enumerate(scales):
        if len(sp) != len(_PARAM_NAMES):
            raise ValueError(f"multiscale_tokenize: scale {s} needs the 7 tensors {_PARAM_NAMES}, got {len(sp)}")
        rows = n[s] + (1 if s == 0 else 0)
        for name, t, shape in zip(_PARAM_NAMES, sp, ((K,), (K,), (D, K), (D,), (D,), (D,), (1, rows, D))):
            if tuple(t.shape) != shape and not (name == "pos_embedding" and tuple(t.shape) == shape[1:]):
                raise ValueError(f"multiscale_tokenize: scale {s} {name} must be {shape} for patch_dim={K} "
                                 f"(C={C}, p={patch_size}, pf={frame_patch_size}), D={D} and {n[s]} tokens, "
                                 f"got {tuple(t.shape)}")
            if t.device != video.device:
                raise ValueError(f"multiscale_tokenize: scale {s} {name} on {t.device}, video on {video.device}")
    return B, n, D, K


def multiscale_tokenize(video: torch.Tensor, cls_token: torch.Tensor, scales: Sequence[Sequence[torch.Tensor]], *,
                        patch_size: int, frame_patch_size: int, dilations: Sequence[int],
                        frame_index: Optional[torch.Tensor] = None, eps: float = 1e-5,
                        out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Triton fused tokenizer: two kernel launches forward (weights into kernel order, then the
    fused tokenization), three backward.

    ``scales[i]`` = (norm_in_weight [K], norm_in_bias [K], proj_weight [D, K], proj_bias [D],
    norm_out_weight [D], norm_out_bias [D], pos_embedding [1, n_i, D]), scale 0's pos_embedding
    with 1 + n_0 rows (row 0 for cls). Differentiable with respect to all parameters, not to
    ``video``. Under ``torch.autocast`` the projection runs in the autocast dtype (fp32
    accumulation, LayerNorm stats in fp32). Output dtype: ``out_dtype`` or the parameters' dtype
    (as the reference, whose last op is a LayerNorm, which autocast keeps in fp32)."""
    dilations = [int(d) for d in dilations]
    scales = [tuple(sp) for sp in scales]
    if video.requires_grad and torch.is_grad_enabled():
        raise ValueError("multiscale_tokenize: the kernel computes no gradient for the video (it is data); "
                         "detach it, or use multiscale_tokenize_ref")
    _, _, D, _ = _check_inputs(video, frame_index, cls_token, scales, patch_size, frame_patch_size, dilations)
    dev = video.device.type
    pdt = cls_token.dtype
    cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else pdt
    odt = out_dtype or pdt
    for name, dt in (("compute", cdt), ("output", odt)):
        if dt not in _DTYPES.values():
            raise ValueError(f"multiscale_tokenize: {name} dtype {dt} not supported")
    inv = {v: k for k, v in _DTYPES.items()}
    w_in, b_in, w, bp, w_out, b_out, pos = zip(*scales)
    # one tensor per parameter kind, all scales stacked (pos: rows in output order)
    params = (cls_token.reshape(D), torch.cat([x.reshape(-1, D) for x in pos]), torch.stack(w_in), torch.stack(b_in),
              torch.stack(w), torch.stack(bp), torch.stack(w_out), torch.stack(b_out))
    # z and the LN stats are saved only when a backward can follow
    save = torch.is_grad_enabled() and any(t.requires_grad for t in params)
    return _tokenize_op(video, frame_index, *params, patch_size, frame_patch_size, dilations, eps, inv[cdt], inv[odt],
                        save)[0]


def multiscale_tokenize_ref(video: torch.Tensor, cls_token: torch.Tensor, scales: Sequence[Sequence[torch.Tensor]], *,
                            patch_size: int, frame_patch_size: int, dilations: Sequence[int],
                            frame_index: Optional[torch.Tensor] = None, eps: float = 1e-5,
                            out_dtype: Optional[torch.dtype] = None, for_compiler: bool = False,
                            patch_norm=None) -> torch.Tensor:
    """Plain-PyTorch twin of :func:`multiscale_tokenize` (same arguments, same result).

    ``patch_norm``: a function computing each scale's tubelet LayerNorm from the uint8 clip
    instead, ``patch_norm(video, dilation, patch_size, frame_patch_size, w_in, b_in, eps) ->
    [B, n, K]`` (``fmfast.kernels.cpu_patch_norm.patch_norm``); the rest is the same.

    ``for_compiler``: the patch LayerNorm is written out over the four patch dims of the
    ``[B, t, h, w, p1, p2, pf, c]`` view rather than as ``F.layer_norm`` on the flattened rows --
    the same math, its sums taken from each patch's first pixel (as exact as F.layer_norm on
    near-constant patches), for ``torch.compile``: inductor then loops over each dim
    instead of recomputing 8 divisions and remainders per pixel (FmFormer at B=32, both scales
    with their Linear, bf16: 17.9 -> 10.6 ms on 2 cores), while eager runs it 1.6x slower."""
    dilations = [int(d) for d in dilations]
    scales = [tuple(sp) for sp in scales]
    B, _, D, K = _check_inputs(video, frame_index, cls_token, scales, patch_size, frame_patch_size, dilations)
    if frame_index is not None:  # gather the clips: entry ~i is frame i mirrored; clamp to [0, N-1]
        fi = frame_index.long()
        flip = fi < 0
        clips = video[torch.where(flip, -1 - fi, fi).clamp(max=video.shape[0] - 1)]  # [B, T, C, H, W]
        video = torch.where(flip[:, :, None, None, None], clips.flip(-1), clips).permute(0, 2, 1, 3, 4)
    x = video.to(cls_token.dtype)
    p, pf = patch_size, frame_patch_size
    out = []
    for s, (d, (w_in, b_in, w, bp, w_out, b_out, pos)) in enumerate(zip(dilations, scales)):
        xs = x[..., ::d, ::d]  # = nearest-neighbour downsampling by d
        _, C, T, H, W = xs.shape
        xs = xs.reshape(B, C, T // pf, pf, H // p, p, W // p, p)
        xs = xs.permute(0, 2, 4, 6, 5, 7, 3, 1)  # b t h w p1 p2 pf c
        if patch_norm is not None:
            z = patch_norm(video, d, p, pf, w_in, b_in, eps)
        elif for_compiler:
            xc = xs - xs[..., :1, :1, :1, :1]  # shifted by each patch's first pixel: exact
            xc = xc - xc.mean((-4, -3, -2, -1), keepdim=True)  # sums of a near-constant patch
            var = xc.square().mean((-4, -3, -2, -1), keepdim=True)
            z = (xc * torch.rsqrt(var + eps)).reshape(B, -1, K) * w_in + b_in
        else:  # b (t h w) (p1 p2 pf c); (parameter shapes: constants to a tracer)
            z = F.layer_norm(xs.reshape(B, -1, K), w_in.shape, w_in, b_in, eps)
        z = F.linear(z, w, bp)
        z = F.layer_norm(z, w_out.shape, w_out, b_out, eps)
        pe = pos.reshape(-1, D)
        out.append(z + (pe[1:] if s == 0 else pe))
    cls = cls_token.reshape(1, 1, D) + scales[0][6].reshape(-1, D)[:1]
    y = torch.cat([cls.to(out[0].dtype).expand(B, 1, D)] + out, 1)
    return y.to(out_dtype) if out_dtype is not None else y

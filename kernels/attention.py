"""Block-sparse attention over a packed sequence of segments (Triton forward and backward).

``q, k, v: [B, H, N, Dh]`` share one block layout (see ``fmfast.kernels.layout.BlockLayout``): query
block m attends the key blocks ``kv_indices[m, :kv_num_blocks[m]]``; the backward walks the
transpose (``q_indices``/``q_num_blocks``) for dk/dv. Block i holds tokens
``[starts[i], starts[i+1])`` (``q_starts``/``k_starts``: every ``block_m`` tokens from 0, or
restarting at each segment), so every row and key mask is by its own block's end: a short
block's padding may hold the next block's tokens. Inside a block, elements are masked by
segment ids (query i sees key j iff bit ``k_seg[j]`` of ``q_bits[i]`` is set), an optional local
window over grid coordinates and an optional exact element bitmask, so segment lengths need not
be multiples of the block size.

Each block list starts with its *full* blocks (``kv_num_full``/``q_num_full``), which skip the
element mask. Flash-attention style: online softmax with fp32 accumulation, the forward saves the
logsumexp; in the backward one launch computes dq per query block (and ``delta = rowsum(dO * O)``),
then one dk/dv per key block (no atomics: at head dim 32 fp32 dq atomics would move more
bytes through L2 than the second exp per element costs the MUFU).

Empty rows (a query that sees no key) are defined as ``out = 0`` with ``lse = -inf``; their
gradients are exactly 0 and nothing is NaN. ``block_sparse_attention_ref`` does the same.

The layout argument is duck typed: ``key`` (an int unique per layout), ``seq_len``, ``block_m``,
``block_n``, ``radius`` (window half-extents or None) and ``device_tensors(device)`` returning
the kernel's int32 tensors.
"""
from typing import Optional

import torch
from torch import Tensor

from .triton_shim import tl, triton  # (a stand-in where Triton does not install)

_LOG2E = 1.4426950408889634
HEAD_DIMS = (16, 32, 64, 128)  # the head sizes the kernel runs
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---- Triton ------------------------------------------------------------------------------------
@triton.jit
def _visible(qbits, qc, offs_m, kseg, kc, offs_n, in_n, N, EBITS, ebits_stride, RT, RH, RW,
             HAS_WINDOW: tl.constexpr, HAS_EBITS: tl.constexpr):
    """Element mask for pre-broadcast 2D operands ([M,1] x [1,N] or the transpose); ``in_n``: the
    key lies in its block (a block's padding may hold the next block's tokens)."""
    vis = (((qbits >> kseg) & 1) != 0) & in_n
    if HAS_WINDOW:
        # coords pack t << 20 | y << 10 | x; -1 marks non-grid tokens (never windowed)
        near = (tl.abs((qc >> 20) - (kc >> 20)) <= RT) \
            & (tl.abs(((qc >> 10) & 1023) - ((kc >> 10) & 1023)) <= RH) \
            & (tl.abs((qc & 1023) - (kc & 1023)) <= RW)
        vis = vis & (near | (qc < 0) | (kc < 0))
    if HAS_EBITS:
        words = tl.load(EBITS + offs_m * ebits_stride + offs_n // 32, mask=(offs_m < N) & (offs_n < N), other=0)
        vis = vis & (((words >> (offs_n % 32)) & 1) != 0)
    return vis


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, qbits, qc, offs_m, K, V, skn, svn, KV_ROW, KS, j0, j1,
               KSEG, COORDS, EBITS, ebits_stride, N, qk_scale, RT, RH, RW,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
               HAS_WINDOW: tl.constexpr, HAS_EBITS: tl.constexpr, DOT_PREC: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for j in range(j0, j1):
        kb = tl.load(KV_ROW + j)
        offs_n = tl.load(KS + kb) + tl.arange(0, BLOCK_N)
        in_n = offs_n < tl.load(KS + kb + 1)
        kT = tl.load(K + offs_n[None, :] * skn + offs_d[:, None], mask=in_n[None, :], other=0.0)
        v = tl.load(V + offs_n[:, None] * svn + offs_d[None, :], mask=in_n[:, None], other=0.0)
        s = tl.dot(q, kT, input_precision=DOT_PREC) * qk_scale
        if MASKED:
            kseg = tl.load(KSEG + offs_n, mask=in_n, other=0)
            kc = kseg
            if HAS_WINDOW:
                kc = tl.load(COORDS + offs_n, mask=in_n, other=-1)
            vis = _visible(qbits[:, None], qc[:, None], offs_m[:, None], kseg[None, :], kc[None, :],
                           offs_n[None, :], in_n[None, :], N, EBITS, ebits_stride, RT, RH, RW, HAS_WINDOW,
                           HAS_EBITS)
            s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row with nothing visible yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE,
                sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                KV_NUM, KV_FULL, KV_IDX, kv_idx_stride, QBITS, KSEG, COORDS, EBITS, ebits_stride, QS, KS,
                N, H, NUM_QB, qk_scale, RT, RH, RW,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                HAS_WINDOW: tl.constexpr, HAS_EBITS: tl.constexpr, DOT_PREC: tl.constexpr):
    # one grid axis (2^31 programs): axis 1 stops at 65535, i.e. B*H >= 65536 would not launch
    n_qb = NUM_QB
    pid_m = tl.program_id(0) % n_qb
    bh = tl.program_id(0) // n_qb
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    Q += b * sqb + h * sqh
    K += b * skb + h * skh
    V += b * svb + h * svh
    O += b * sob + h * soh
    LSE += bh.to(tl.int64) * N

    offs_m = tl.load(QS + pid_m) + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    in_m = offs_m < tl.load(QS + pid_m + 1)
    q = tl.load(Q + offs_m[:, None] * sqn + offs_d[None, :], mask=in_m[:, None], other=0.0)
    qbits = tl.load(QBITS + offs_m, mask=in_m, other=0)  # padding rows see nothing
    qc = qbits
    if HAS_WINDOW:
        qc = tl.load(COORDS + offs_m, mask=in_m, other=-1)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    KV_ROW = KV_IDX + pid_m * kv_idx_stride
    n_full = tl.load(KV_FULL + pid_m)
    n_all = tl.load(KV_NUM + pid_m)
    # full blocks first (no element mask), then the partial ones
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, qbits, qc, offs_m, K, V, skn, svn, KV_ROW, KS, 0, n_full,
                               KSEG, COORDS, EBITS, ebits_stride, N, qk_scale, RT, RH, RW,
                               BLOCK_N, HEAD_DIM, False, HAS_WINDOW, HAS_EBITS, DOT_PREC)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, qbits, qc, offs_m, K, V, skn, svn, KV_ROW, KS, n_full, n_all,
                               KSEG, COORDS, EBITS, ebits_stride, N, qk_scale, RT, RH, RW,
                               BLOCK_N, HEAD_DIM, True, HAS_WINDOW, HAS_EBITS, DOT_PREC)

    has = l_i > 0.0
    l_safe = tl.where(has, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    tl.store(O + offs_m[:, None] * son + offs_d[None, :], out.to(O.dtype.element_ty), mask=in_m[:, None])
    tl.store(LSE + offs_m, lse, mask=in_m)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, kseg, kc, offs_n, in_n, Q, DO, LSE, DELTA, sqn, sdon, Q_ROW, QS, i0, i1,
                    QBITS, COORDS, EBITS, ebits_stride, N, qk_scale, RT, RH, RW,
                    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
                    HAS_WINDOW: tl.constexpr, HAS_EBITS: tl.constexpr, DOT_PREC: tl.constexpr):
    """dk, dv of one key block over the query blocks Q_ROW[i0:i1], in transposed tiles."""
    offs_d = tl.arange(0, HEAD_DIM)
    for i in range(i0, i1):
        qb = tl.load(Q_ROW + i)
        offs_m = tl.load(QS + qb) + tl.arange(0, BLOCK_M)
        in_m = offs_m < tl.load(QS + qb + 1)
        qT = tl.load(Q + offs_m[None, :] * sqn + offs_d[:, None], mask=in_m[None, :], other=0.0)
        do = tl.load(DO + offs_m[:, None] * sdon + offs_d[None, :], mask=in_m[:, None], other=0.0)
        # empty rows store lse = -inf: use +inf so every p of the row is exp2(-inf) = 0
        lse = tl.load(LSE + offs_m, mask=in_m, other=float("inf"))
        m2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        di = tl.load(DELTA + offs_m, mask=in_m, other=0.0)
        pT = tl.math.exp2(tl.dot(k, qT, input_precision=DOT_PREC) * qk_scale - m2[None, :])
        if MASKED:
            qbits = tl.load(QBITS + offs_m, mask=in_m, other=0)
            qc = qbits
            if HAS_WINDOW:
                qc = tl.load(COORDS + offs_m, mask=in_m, other=-1)
            vis = _visible(qbits[None, :], qc[None, :], offs_m[None, :], kseg[:, None], kc[:, None],
                           offs_n[:, None], in_n[:, None], N, EBITS, ebits_stride, RT, RH, RW, HAS_WINDOW,
                           HAS_EBITS)
            pT = tl.where(vis, pT, 0.0)
        dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dsT = pT * (dpT - di[None, :])
        dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _bwd_dq_inner(dq, q, do, m2, di, qbits, qc, offs_m, K, V, skn, svn, KV_ROW, KS, j0, j1,
                  KSEG, COORDS, EBITS, ebits_stride, N, qk_scale, RT, RH, RW,
                  BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
                  HAS_WINDOW: tl.constexpr, HAS_EBITS: tl.constexpr, DOT_PREC: tl.constexpr):
    """dq of one query block over the key blocks KV_ROW[j0:j1]."""
    offs_d = tl.arange(0, HEAD_DIM)
    for j in range(j0, j1):
        kb = tl.load(KV_ROW + j)
        offs_n = tl.load(KS + kb) + tl.arange(0, BLOCK_N)
        in_n = offs_n < tl.load(KS + kb + 1)
        kT = tl.load(K + offs_n[None, :] * skn + offs_d[:, None], mask=in_n[None, :], other=0.0)
        vT = tl.load(V + offs_n[None, :] * svn + offs_d[:, None], mask=in_n[None, :], other=0.0)
        p = tl.math.exp2(tl.dot(q, kT, input_precision=DOT_PREC) * qk_scale - m2[:, None])
        if MASKED:
            kseg = tl.load(KSEG + offs_n, mask=in_n, other=0)
            kc = kseg
            if HAS_WINDOW:
                kc = tl.load(COORDS + offs_n, mask=in_n, other=-1)
            vis = _visible(qbits[:, None], qc[:, None], offs_m[:, None], kseg[None, :], kc[None, :],
                           offs_n[None, :], in_n[None, :], N, EBITS, ebits_stride, RT, RH, RW, HAS_WINDOW,
                           HAS_EBITS)
            p = tl.where(vis, p, 0.0)
        dp = tl.dot(do, vT, input_precision=DOT_PREC)
        ds = p * (dp - di[:, None])
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=DOT_PREC)
    return dq


@triton.jit
def _bwd_kernel(Q, K, V, O, DO, DQ, DK, DV, LSE, DELTA,
                sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, sdob, sdoh, sdon,
                sdqb, sdqh, sdqn, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
                KV_NUM, KV_FULL, KV_IDX, kv_idx_stride, Q_NUM, Q_FULL, Q_IDX, q_idx_stride,
                QBITS, KSEG, COORDS, EBITS, ebits_stride, QS, KS,
                N, H, NUM_QB, NUM_KB, sm_scale, qk_scale, RT, RH, RW,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                HAS_WINDOW: tl.constexpr, HAS_EBITS: tl.constexpr, DOT_PREC: tl.constexpr,
                DKDV: tl.constexpr):
    """DKDV: each program computes dk, dv of one key block; else dq of one query block and, first,
    its rows' ``delta = rowsum(dO * O)`` (stored for the dk/dv launch, which runs second: no
    separate pass over O and dO). The two roles are two launches, so each is compiled with its own
    register budget (one kernel holding both took the dk/dv role's 175 registers: 2 blocks/SM)."""
    n_prog = NUM_KB if DKDV else NUM_QB  # per (batch, head): one grid axis, as in the forward
    pid = tl.program_id(0) % n_prog
    bh = tl.program_id(0) // n_prog
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    Q += b * sqb + h * sqh
    K += b * skb + h * skh
    V += b * svb + h * svh
    DO += b * sdob + h * sdoh
    LSE += bh.to(tl.int64) * N
    DELTA += bh.to(tl.int64) * N
    offs_d = tl.arange(0, HEAD_DIM)

    if DKDV:
        offs_n = tl.load(KS + pid) + tl.arange(0, BLOCK_N)
        in_n = offs_n < tl.load(KS + pid + 1)
        k = tl.load(K + offs_n[:, None] * skn + offs_d[None, :], mask=in_n[:, None], other=0.0)
        v = tl.load(V + offs_n[:, None] * svn + offs_d[None, :], mask=in_n[:, None], other=0.0)
        kseg = tl.load(KSEG + offs_n, mask=in_n, other=0)
        kc = kseg
        if HAS_WINDOW:
            kc = tl.load(COORDS + offs_n, mask=in_n, other=-1)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        Q_ROW = Q_IDX + pid * q_idx_stride
        n_full = tl.load(Q_FULL + pid)
        n_all = tl.load(Q_NUM + pid)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, kseg, kc, offs_n, in_n, Q, DO, LSE, DELTA, sqn, sdon, Q_ROW, QS, 0,
                                 n_full,
                                 QBITS, COORDS, EBITS, ebits_stride, N, qk_scale, RT, RH, RW,
                                 BLOCK_M, HEAD_DIM, False, HAS_WINDOW, HAS_EBITS, DOT_PREC)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, kseg, kc, offs_n, in_n, Q, DO, LSE, DELTA, sqn, sdon, Q_ROW, QS,
                                 n_full, n_all, QBITS, COORDS, EBITS, ebits_stride, N, qk_scale, RT, RH, RW,
                                 BLOCK_M, HEAD_DIM, True, HAS_WINDOW, HAS_EBITS, DOT_PREC)
        dk *= sm_scale
        DK += b * sdkb + h * sdkh
        DV += b * sdvb + h * sdvh
        tl.store(DK + offs_n[:, None] * sdkn + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=in_n[:, None])
        tl.store(DV + offs_n[:, None] * sdvn + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=in_n[:, None])
    else:
        pid_m = pid
        offs_m = tl.load(QS + pid_m) + tl.arange(0, BLOCK_M)
        in_m = offs_m < tl.load(QS + pid_m + 1)
        q = tl.load(Q + offs_m[:, None] * sqn + offs_d[None, :], mask=in_m[:, None], other=0.0)
        do = tl.load(DO + offs_m[:, None] * sdon + offs_d[None, :], mask=in_m[:, None], other=0.0)
        qbits = tl.load(QBITS + offs_m, mask=in_m, other=0)
        qc = qbits
        if HAS_WINDOW:
            qc = tl.load(COORDS + offs_m, mask=in_m, other=-1)
        lse = tl.load(LSE + offs_m, mask=in_m, other=float("inf"))
        m2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        o = tl.load(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :], mask=in_m[:, None], other=0.0)
        di = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + offs_m, di, mask=in_m)
        dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        KV_ROW = KV_IDX + pid_m * kv_idx_stride
        n_full = tl.load(KV_FULL + pid_m)
        n_all = tl.load(KV_NUM + pid_m)
        dq = _bwd_dq_inner(dq, q, do, m2, di, qbits, qc, offs_m, K, V, skn, svn, KV_ROW, KS, 0, n_full,
                           KSEG, COORDS, EBITS, ebits_stride, N, qk_scale, RT, RH, RW,
                           BLOCK_N, HEAD_DIM, False, HAS_WINDOW, HAS_EBITS, DOT_PREC)
        dq = _bwd_dq_inner(dq, q, do, m2, di, qbits, qc, offs_m, K, V, skn, svn, KV_ROW, KS, n_full, n_all,
                           KSEG, COORDS, EBITS, ebits_stride, N, qk_scale, RT, RH, RW,
                           BLOCK_N, HEAD_DIM, True, HAS_WINDOW, HAS_EBITS, DOT_PREC)
        dq *= sm_scale
        DQ += b * sdqb + h * sdqh
        tl.store(DQ + offs_m[:, None] * sdqn + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=in_m[:, None])


# ---- launch helpers ----------------------------------------------------------------------------
def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 follows PyTorch's matmul setting (TF32 off by default): 3xTF32 keeps fp32 parity tight
    # on the tensor cores ("ieee" is scalar FFMA: the d=32 backward spilled 8.8 KB per thread)
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "tf32x3"
    return "tf32"


def _warps(head_dim: int, block_m: int, block_n: int) -> int:
    return 8 if head_dim * max(block_m, block_n) >= 128 * 64 else 4


def _stages(dtype: torch.dtype, head_dim: int) -> int:
    """Pipelining depth that fits sm_90's 227 KB of shared memory: fp32's 3xTF32 dots stage each
    operand split in two, and at head dim 128 two stages took 262 KB (tools/kernel_report.py --sweep)."""
    return 1 if dtype == torch.float32 and head_dim >= 128 else 2


def _reg_cap(q: Tensor, dkdv: bool, head_dim: int) -> dict:
    """16-bit dq programs at head dim 32 took 130 registers, 2 over the 128 that fit 4 blocks of 4
    warps per SM: capped there (ptxas: no spills; tools/kernel_report.py). The dk/dv role's 188
    stay: capped at 168 (3 blocks/SM) it spilled 108 bytes."""
    if not dkdv and head_dim <= 32 and q.dtype != torch.float32:
        return {"maxnreg": 128}
    return {}


# Launch settings that replace the above for the dk/dv programs, for A/B runs only (the lead
# case of bench/test_bench_attention.py, tools/kernel_report.py --dkdv). The lead: bf16 at head
# dim 32 with {"num_stages": 1} compiles to 145 registers (3 blocks/SM, no spills) instead of
# 188 (2 blocks/SM); the cost model, which does not price the lost prefetch of the next q/dO
# tile, puts it at 182/161 us against 210/188 (self/cross phase, B=256). Measured on no GPU yet.
DKDV_OVERRIDES: dict = {}


def _like_bnhd(q: Tensor) -> Tensor:
    """An empty [B, H, N, D] tensor stored as [B, N, H, D], so 'b h n d -> b n (h d)' is free."""
    b, h, n, d = q.shape
    return torch.empty((b, n, h, d), dtype=q.dtype, device=q.device).transpose(1, 2)


def _dummy(t: Optional[Tensor], like: Tensor) -> Tensor:
    return like if t is None else t


def _fwd_impl(q, k, v, t, sm_scale, block_m, block_n, radius):
    bsz, heads, n, d = q.shape
    o = _like_bnhd(q)
    lse = torch.empty((bsz, heads, n), dtype=torch.float32, device=q.device)
    rt, rh, rw = radius
    elem_bits, coords = t.elem_bits, t.coords
    num_qb = t.q_starts.numel() - 1
    grid = (num_qb * bsz * heads,)
    _fwd_kernel[grid](
        q, k, v, o, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        t.kv_num_blocks, t.kv_num_full, t.kv_indices, t.kv_indices.stride(0), t.q_bits, t.k_seg,
        _dummy(coords, t.k_seg), _dummy(elem_bits, t.k_seg), 0 if elem_bits is None else elem_bits.stride(0),
        t.q_starts, t.k_starts, n, heads, num_qb, sm_scale * _LOG2E, rt, rh, rw,
        BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=d, HAS_WINDOW=coords is not None,
        HAS_EBITS=elem_bits is not None, DOT_PREC=_dot_precision(q.dtype),
        num_warps=_warps(d, block_m, block_n), num_stages=_stages(q.dtype, d))
    return o, lse


def _bwd_impl(do, q, k, v, o, lse, t, sm_scale, block_m, block_n, radius):
    bsz, heads, n, d = q.shape
    if do.stride(-1) != 1:
        do = do.contiguous()
    delta = torch.empty((bsz, heads, n), dtype=torch.float32, device=q.device)
    dq, dk, dv = _like_bnhd(q), _like_bnhd(k), _like_bnhd(v)
    rt, rh, rw = radius
    elem_bits, coords = t.elem_bits, t.coords
    num_qb, num_kb = t.q_starts.numel() - 1, t.k_starts.numel() - 1
    # dq first: its programs also write delta, which the dk/dv programs read
    for dkdv, grid in ((False, num_qb * bsz * heads), (True, num_kb * bsz * heads)):
        launch = dict(num_warps=_warps(d, block_m, block_n), num_stages=_stages(q.dtype, d), **_reg_cap(q, dkdv, d))
        if dkdv:
            launch.update(DKDV_OVERRIDES)
        _bwd_kernel[(grid,)](
            q, k, v, o, do, dq, dk, dv, lse, delta,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2), dk.stride(0), dk.stride(1), dk.stride(2),
            dv.stride(0), dv.stride(1), dv.stride(2),
            t.kv_num_blocks, t.kv_num_full, t.kv_indices, t.kv_indices.stride(0), t.q_num_blocks, t.q_num_full,
            t.q_indices, t.q_indices.stride(0), t.q_bits, t.k_seg, _dummy(coords, t.k_seg), _dummy(elem_bits, t.k_seg),
            0 if elem_bits is None else elem_bits.stride(0), t.q_starts, t.k_starts,
            n, heads, num_qb, num_kb, sm_scale, sm_scale * _LOG2E, rt, rh, rw,
            BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=d, HAS_WINDOW=coords is not None,
            HAS_EBITS=elem_bits is not None, DOT_PREC=_dot_precision(q.dtype), DKDV=dkdv, **launch)
    return dq, dk, dv


# ---- custom ops (one graph node each for torch.compile / CUDA graphs) -------------------------
# The ops carry an int key, not the layout: tracing never touches layout construction, and the
# layout's device tensors are fetched at run time (cached per device, so call once eagerly before
# a CUDA-graph capture).
_LAYOUTS: dict = {}


def register_layout(layout) -> int:
    """Keep ``layout`` alive under its ``key`` (an int unique per layout) and return the key."""
    key = layout.key
    if _LAYOUTS.get(key) is not layout:
        _LAYOUTS[key] = layout
    return key


def lookup_layout(key: int):
    try:
        return _LAYOUTS[key]
    except KeyError:
        raise KeyError(f"kernels/attention.py: no layout registered under key {key}; "
                       f"pass the layout object or call register_layout(layout) first") from None


def _kernel_args(q: Tensor, layout_key: int):
    layout = lookup_layout(layout_key)
    if q.shape[2] != layout.seq_len:
        raise ValueError(f"kernels/attention.py: block_sparse_attention: sequence length {q.shape[2]} "
                         f"!= layout.seq_len {layout.seq_len}")
    t = layout.device_tensors(q.device)
    radius = (0, 0, 0) if layout.radius is None else tuple(int(r) for r in layout.radius)
    return layout, t, radius


@torch.library.custom_op("fmfast::block_sparse_attn_fwd", mutates_args=())
def _attn_fwd_op(q: Tensor, k: Tensor, v: Tensor, layout_key: int, sm_scale: float) -> tuple[Tensor, Tensor]:
    layout, t, radius = _kernel_args(q, layout_key)
    return _fwd_impl(q, k, v, t, sm_scale, layout.block_m, layout.block_n, radius)


@_attn_fwd_op.register_fake
def _(q, k, v, layout_key, sm_scale):
    b, h, n, _ = q.shape
    return _like_bnhd(q), q.new_empty((b, h, n), dtype=torch.float32)


@torch.library.custom_op("fmfast::block_sparse_attn_bwd", mutates_args=())
def _attn_bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, layout_key: int,
                 sm_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    layout, t, radius = _kernel_args(q, layout_key)
    return _bwd_impl(do, q, k, v, o, lse, t, sm_scale, layout.block_m, layout.block_n, radius)


@_attn_bwd_op.register_fake
def _(do, q, k, v, o, lse, layout_key, sm_scale):
    return _like_bnhd(q), _like_bnhd(k), _like_bnhd(v)


def _setup_context(ctx, inputs, output):
    q, k, v, layout_key, sm_scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.args = (layout_key, sm_scale)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _attn_bwd_op(do, q, k, v, o, lse, *ctx.args)
    return dq, dk, dv, None, None


torch.library.register_autograd("fmfast::block_sparse_attn_fwd", _backward, setup_context=_setup_context)


# ---- public API --------------------------------------------------------------------------------
def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    where = "kernels/attention.py: block_sparse_attention"
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"{where}: q, k, v must share one [B, H, N, Dh] shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        raise ValueError(f"{where}: q, k, v must share a dtype in fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{where}: q, k, v on different devices {q.device}, {k.device}, {v.device}")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"{where}: head dim must be one of {HEAD_DIMS}, got {q.shape[-1]}")


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, layout, sm_scale: Optional[float] = None,
                           return_lse: bool = False):
    """Triton block-sparse attention, ``[B, H, N, Dh] -> [B, H, N, Dh]`` (stored as [B, N, H, Dh]).
    ``layout``: a layout or the int key ``register_layout`` returned (the form to use inside
    ``torch.compile``d code). Differentiable in q, k, v; ``lse`` ([B, H, N] fp32, natural log,
    -inf on empty rows) is not."""
    _check(q, k, v)
    if isinstance(layout, int):
        key = layout
    elif torch.compiler.is_compiling():
        # a traced registry write would only be replayed after the graph ran: rely on the layout
        # being registered already (fmfast.kernels.layout builders do it; else one eager call does)
        key = layout.key
    else:
        key = register_layout(layout)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    sm_scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
    o, lse = _attn_fwd_op(q, k, v, key, sm_scale)
    return (o, lse) if return_lse else o


def element_mask(layout, device=None) -> Tensor:
    """[N, N] bool mask the kernel applies, rebuilt from its own int32 inputs (query i sees key j)."""
    layout = lookup_layout(layout) if isinstance(layout, int) else layout
    t = layout.device_tensors(device or "cpu")
    n = layout.seq_len
    dev = t.k_seg.device
    qb, kb = t.kv_num_blocks.numel(), t.k_starts.numel() - 1
    blocks = torch.zeros(qb, kb + 1, dtype=torch.bool, device=dev)
    valid = torch.arange(t.kv_indices.shape[1], device=dev)[None, :] < t.kv_num_blocks[:, None]
    blocks.scatter_(1, torch.where(valid, t.kv_indices.long(), kb), True)
    full = torch.zeros_like(blocks)  # the first kv_num_full listed blocks skip element masking
    valid = torch.arange(t.kv_indices.shape[1], device=dev)[None, :] < t.kv_num_full[:, None]
    full.scatter_(1, torch.where(valid, t.kv_indices.long(), kb), True)
    i = torch.arange(n, device=dev)
    # each token's block, from the block starts (uniform or segment-aligned)
    qi = torch.searchsorted(t.q_starts[1:].long(), i, right=True)[:, None]
    ki = torch.searchsorted(t.k_starts[1:].long(), i, right=True)[None, :]
    listed, unmasked = blocks[qi, ki], full[qi, ki]
    vis = torch.ones(n, n, dtype=torch.bool, device=dev)
    vis &= ((t.q_bits[:, None] >> t.k_seg[None, :]) & 1) != 0
    if t.coords is not None:
        c = t.coords.long()
        tt, yy, xx = c >> 20, (c >> 10) & 1023, c & 1023
        rt, rh, rw = layout.radius
        near = ((tt[:, None] - tt[None, :]).abs() <= rt) & ((yy[:, None] - yy[None, :]).abs() <= rh) \
            & ((xx[:, None] - xx[None, :]).abs() <= rw)
        vis &= near | (c[:, None] < 0) | (c[None, :] < 0)
    if t.elem_bits is not None:
        vis &= ((t.elem_bits[:, i // 32] >> (i % 32)) & 1) != 0
    return listed & (unmasked | vis)


def block_sparse_attention_ref(q: Tensor, k: Tensor, v: Tensor, layout, sm_scale: Optional[float] = None,
                               mask: Optional[Tensor] = None) -> Tensor:
    """Dense masked SDPA twin (materialises the element mask; pass ``mask`` to reuse one).
    Empty rows give 0 with zero gradients, like the kernel."""
    _check(q, k, v)
    layout = lookup_layout(layout) if isinstance(layout, int) else layout
    if q.shape[2] != layout.seq_len:
        raise ValueError(f"kernels/attention.py: block_sparse_attention_ref: sequence length {q.shape[2]} "
                         f"!= layout.seq_len {layout.seq_len}")
    mask = element_mask(layout, q.device) if mask is None else mask
    has_key = mask.any(-1, keepdim=True)
    # empty rows attend everything, then are zeroed: finite values and exactly zero gradients
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~has_key, scale=sm_scale)
    return out * has_key.to(out.dtype)

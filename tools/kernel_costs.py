"""The work (tools/cost_model.Work) of each of fmfast's kernel launches, as the kernels are built,
and of the peers at the paper shape: the tokenizer, one encoder layer, the whole training step.

Issue slots (``ops``, lane-instructions) of our kernels are read off their SASS: each loop body's
instruction count (tools/sm90.loop_bodies) times its trips, which the launch's shape gives, plus
the rest of the code once per program. (Hand counts, about 8 lane-instructions per gathered pixel,
were 3-4x short of the SASS: the gathers' address arithmetic, layout conversions and row
reductions cost more than the arithmetic they feed.) The attention peers' per-element issue slots
are taken from our own kernels' loops (the same online-softmax code per element); their FLOPs,
bytes and exps are their own. Every formula names what it counts.
"""
from __future__ import annotations

import math

from tools import cost_model as cm
from tools.cost_model import Work

C, T, H, W, P, PF = 3, 10, 64, 64, 8, 2
K = C * P * P * PF  # patch dim 384
N_TOK = (320, 80)  # tokens per scale (dilations 1, 2)
N_OUT = 1 + sum(N_TOK)
DEPTH, MLP, CUR_LEN, CUR_CH = 6, 384, 240, 3


def _e(dtype: str) -> int:
    return 4 if dtype == "fp32" else 2


def _rate(dtype: str) -> float:
    return cm.MMA_TF32 / 3 if dtype == "fp32" else cm.MMA_BF16  # fp32 dots: 3xTF32 at best


def issue_ops(res: dict, trips: list, programs: int) -> float:
    """Lane-instructions of one launch: loop body ``i`` (in the order of tools/sm90.loop_bodies)
    runs ``trips[i]`` times in all, the rest of the code once per program; x warps x 32 lanes (an
    SM issues 128 a clock). Where the compiler made a different number of loops (a width of the
    sweep that it unrolled), every instruction is charged the most trips: an upper bound."""
    bodies = res["loops"]
    if len(bodies) != len(trips):
        return 32.0 * res["num_warps"] * res["instrs"] * max(max(trips), programs)
    warp_instrs = sum(b * t for b, t in zip(bodies, trips)) + (res["instrs"] - sum(bodies)) * programs
    return 32.0 * res["num_warps"] * warp_instrs


def our_work(row: dict, res: dict) -> Work:
    """Work of one captured launch (``row`` from tools/kernel_variants.py, ``res`` its
    tools/sm90.resources)."""
    k, dt, sh, grid = row["kernel"], row["dtype"], row["shape"], row["grid"]
    e, rate = _e(dt), _rate(dt)
    meta = row["launch"].meta
    programs = math.prod(grid)
    if k.startswith("tokenize"):
        b, d = sh["batch"], sh["dim"]
        m = b * sum(N_TOK)
        px = b * C * T * H * W + (b * T * 8 if sh["source"] == "store" else 0)
        if k == "tokenize_fwd":  # one gather pass (the first chunk peeled, so K/BK - 1 trips);
            # with a backward to follow it also writes z and the patch LN stats (counted: training)
            ops = issue_ops(res, [programs * (-(-K // meta["BK"]) - 1)], programs)
            return Work(2.0 * m * K * d, px + b * N_OUT * d * 4 + m * (d * e + 8), 0, ops, rate)
        if k == "tokenize_bwd_tok":  # reads the saved z and dL/dout, writes dz and per-slice
            # partials; one trip per (token block, batch row)
            ops = issue_ops(res, [grid[0] * b], programs)
            return Work(0.0, m * d * e + b * N_OUT * d * 4 + m * d * e + grid[1] * N_OUT * d * 4, 0, ops, rate)
        if k == "tokenize_bwd_w":  # G = dz^T @ xh: one gather pass per patch-column chunk; loops:
            # batch rows (inner) of each token block (outer) of a program's batch slice
            blocks = grid[0] * sum(-(-n // meta["BM"]) for n in N_TOK)  # per batch slice
            ops = issue_ops(res, [blocks * b, blocks * grid[1]], programs)
            return Work(2.0 * m * K * d, px + m * (d * e + 8) + programs * d * 32 * 4, 0, ops, rate)
        if k == "tokenize_prep":  # W, W' (compute dtype) and the patch-LN parameters, gathered, and
            # W's two row sums; every row also reads the int64 column order (hand-counted: tiny)
            S, rows = len(N_TOK), len(N_TOK) * (d + 2)
            return Work(0.0, S * d * K * (4 + 2 * e + 4) + 2 * S * K * 8 + 8 * K * rows, 0, 3 * K * rows, rate)
        if k == "tokenize_bwd_sum":  # reads every partial once (one add each), writes the 8 gradients
            S = len(N_TOK)
            partials = (S * sh["n_split"] * d * K + sh["n_bs"] * N_OUT * d + 2 * S * sh["n_split"] * K
                        + 3 * sh["n_bs"] * sh["nblk"] * d)
            outputs = S * d * K + N_OUT * d + d + 2 * S * K + 3 * S * d
            return Work(0.0, 4 * (partials + outputs), 0, partials, rate)
    if k.startswith("attn"):
        bh = sh["batch"] * sh["heads"]
        n, dh = sh["seq"], sh["head_dim"]
        el = sh["computed_blocks"] * sh["block_m"] * sh["block_n"] * bh
        io = bh * n * dh * e
        # each kernel walks its full blocks (no element mask), then its partial ones
        ops = issue_ops(res, [bh * sh["full_blocks"], bh * (sh["computed_blocks"] - sh["full_blocks"])], programs)
        if k == "attn_fwd":
            return Work(4.0 * dh * el, 3 * io + io + bh * n * 4, el, ops, rate)
        if k == "attn_bwd_dkdv":
            return Work(8.0 * dh * el, 5 * io + 2 * bh * n * 4, el, ops, rate)
        if k == "attn_bwd_dq":  # also reads O for delta = rowsum(dO * O) and writes delta
            return Work(6.0 * dh * el, 5 * io + 3 * bh * n * 4, el, ops, rate)
    raise KeyError(f"tools/kernel_costs.py: no cost model for kernel {k}")


def tokenizer_reference(b: int = 256, d: int = 96, dtype: str = "bf16") -> list[Work]:
    """multiscale_tokenize_ref under bf16 autocast (or fp32), forward and backward, op by op:
    video -> fp32, per scale a strided patch copy, LayerNorm, cast, GEMM, LayerNorm, + pos, cat."""
    e, rate = _e(dtype), (cm.FMA_FP32 if dtype == "fp32" else cm.MMA_BF16)
    px = b * C * T * H * W
    works = [cm.ew(px, 1, 4)]
    for n in N_TOK:
        m = b * n
        works += [cm.ew(m * K, 4, 4), cm.ew(m * K, 4, 4), cm.ew(m * K, 4, e), cm.gemm(m, d, K, e, rate),
                  cm.ew(m * d, e, 4), cm.ew(m * d, 4, 4)]
        # backward: pos-grad sum, LN(D) bwd, dW and dX GEMMs, cast bwd, LN(patch) bwd
        works += [cm.ew(m * d, 4, 0), cm.ew(m * d, 4 + e, e), cm.gemm(d, K, m, e, rate), cm.gemm(m, K, d, e, rate),
                  cm.ew(m * K, e, 4), cm.ew(m * K, 8, 0, kernels=2)]
    works += [cm.ew(b * N_OUT * d, 4, 4)]
    return works


def tokenizer_compiled(b: int = 256, d: int = 96) -> list[Work]:
    """The reference under torch.compile, bf16, at best: gather + LN(patch) fused into one pass
    writing bf16 patches, the GEMMs, LN(D) + pos fused; backward the same in reverse."""
    px, m = b * C * T * H * W, b * sum(N_TOK)
    fwd = [cm.ew(px, 1, 0) + cm.ew(m * K, 0, 2), cm.gemm(m, d, K, 2), cm.ew(m * d, 2, 4)]
    bwd = [cm.ew(m * d, 4 + 2, 2), cm.gemm(d, K, m, 2), cm.gemm(m, K, d, 2), cm.ew(m * K, 2 + 2, 0) + cm.ew(px, 1, 0)]
    return fwd + bwd


def issue_per_element(rows: list[dict]) -> dict:
    """Lane-instructions per attention element of our bf16 kernels' loops (measured rows of one
    layout), full and partial blocks: {"fwd": (full, partial), "dq": ..., "dkdv": ...}."""
    out = {}
    for r in rows:
        if r["kernel"].startswith("attn") and r["dtype"] == "bf16" and not r["shape"]["cross"]:
            per = 32.0 * r["num_warps"] / (r["shape"]["block_m"] * r["shape"]["block_n"])
            out[r["kernel"].removeprefix("attn_").removeprefix("bwd_")] = tuple(per * b for b in r["loops"])
    return out


def attention_layer_peers(ipe: dict, b: int = 256, heads: int = 3, dh: int = 32, segs=(401, 241)) -> dict:
    """Fwd+bwd time of one encoder layer's four attentions (self x2, cross x2) by each peer;
    ``ipe``: issue_per_element of our kernels, the peers' per-element issue slots (SDPA flash's
    single-pass backward counted as our dk/dv loop, its tiles as full blocks)."""
    bh, (n1, n2) = b * heads, segs
    pairs = [(n1, n1), (n2, n2), (n1, n2), (n2, n1)]
    sdpa = [w for q, k in pairs for w in cm.sdpa_flash(q, k, bh, dh, ipe=(ipe["fwd"][0], ipe["dkdv"][0]))]
    from fmfast.kernels.layout import cross_attention_layout, self_attention_layout
    fl = []
    bwd = tuple(a + b for a, b in zip(ipe["dq"], ipe["dkdv"]))
    for make in (self_attention_layout, cross_attention_layout):
        lay = make(segs, 128, 128, aligned=False)  # FlexAttention's blocks run from token 0
        masked = (lay.num_computed_blocks - lay.num_full_blocks) * 128 * 128
        fl += list(cm.flex(lay.num_computed_blocks * 128 * 128, lay.seq_len, bh, dh, masked, ipe=(ipe["fwd"], bwd)))
    eager = [w for q, k in pairs for w in cm.attention_eager(q, k, bh, dh, 2, cm.MMA_BF16)]
    eager32 = [w for q, k in pairs for w in cm.attention_eager(q, k, bh, dh, 4, cm.FMA_FP32)]
    return {"SDPA flash x4": cm.peer_us(sdpa), "FlexAttention x2": cm.peer_us(fl),
            "reference eager bf16": cm.peer_us(eager), "reference eager fp32": cm.peer_us(eager32)}


def layer_torch_ops(b: int = 256, d: int = 96, heads: int = 3, dh: int = 32, segs=(401, 241), dtype: str = "bf16",
                    fused: bool = False) -> list[Work]:
    """One encoder layer's ops other than attention, forward and backward (backward ~ 2x the
    forward's bytes and FLOPs): per phase LayerNorms, QKV projection, concat, output projection,
    residual; then the two feed-forwards. ``fused``: elementwise ops folded into neighbours (what
    torch.compile reaches at best: only GEMM operands and results touch DRAM)."""
    e, rate = _e(dtype), (cm.FMA_FP32 if dtype == "fp32" else cm.MMA_BF16)
    n = sum(segs)
    m = b * n
    fwd = []
    for _ in range(2):  # self phase, cross phase
        fwd += [cm.gemm(m, 3 * heads * dh, d, e, rate), cm.gemm(m, d, heads * dh, e, rate)]
        if not fused:
            fwd += [cm.ew(m * d, 4, 4), cm.ew(m * d, 4, e), cm.ew(m * 3 * heads * dh, e, e), cm.ew(m * d, 4 + e, 4)]
    fwd += [cm.gemm(m, MLP, d, e, rate), cm.gemm(m, d, MLP, e, rate)]
    if not fused:
        fwd += [cm.ew(m * d, 4, 4), cm.ew(m * d, 4, e), cm.ew(m * MLP, e, e), cm.ew(m * d, 4 + e, 4)]
    else:
        fwd += [cm.ew(m * d, 4, 4, kernels=3)]  # LN + residual passes that stay
    bwd = [Work(2 * w.flops, 2 * w.bytes, 0, 0, w.mma_rate, 2 * w.kernels) for w in fwd]
    return fwd + bwd


def step_rest(b: int = 256, d: int = 96, dtype: str = "bf16", fused: bool = False) -> list[Work]:
    """Outside the tokenizer and the encoder layers: the current embedding, heads + loss, the
    optimizer (AdamW over ~1.85 M parameters, fp32 states)."""
    params = 1.85e6
    works = [cm.gemm(b * CUR_LEN, d, CUR_CH, 4), cm.ew(b * (CUR_LEN + 1) * d, 4, 4, kernels=1 if fused else 4),
             cm.ew(b * d * 2, 4, 4, kernels=1 if fused else 10), cm.ew(params, 16, 12, kernels=1 if fused else 12)]
    return works

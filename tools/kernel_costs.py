"""The work (tools/cost_model.Work) of each of fmfast's kernel launches, as the kernels are built,
and of the peers at the paper shape: the tokenizer, one encoder layer, the whole training step.

Issue-slot counts per gathered pixel are this model's estimates from the kernels' code (int64
offset adds, mask, load, convert, LayerNorm arithmetic: about 8 lane-instructions per pixel per
pass from a clip; a frame-store gather adds the per-pixel index load, its flip/clamp and the
mirrored column, about 8 more, or about 4 where the chunk lies in one frame and the index is
decoded per row). Every formula names what it counts.
"""
from __future__ import annotations

from tools import cost_model as cm
from tools.cost_model import Work

C, T, H, W, P, PF = 3, 10, 64, 64, 8, 2
K = C * P * P * PF  # patch dim 384
N_TOK = (320, 80)  # tokens per scale (dilations 1, 2)
N_OUT = 1 + sum(N_TOK)
OPS_PIXEL = {"clip": 8.0, "store": 16.0, "store_row": 12.0}  # store_row: frame index decoded per row
DEPTH, MLP, CUR_LEN, CUR_CH = 6, 384, 240, 3


def _e(dtype: str) -> int:
    return 4 if dtype == "fp32" else 2


def _rate(dtype: str) -> float:
    return cm.MMA_TF32 / 3 if dtype == "fp32" else cm.MMA_BF16  # fp32 dots: 3xTF32 at best


def our_work(row: dict) -> Work:
    """Work of one captured launch (``row`` from tools/kernel_variants.py)."""
    k, dt, sh, grid = row["kernel"], row["dtype"], row["shape"], row["grid"]
    e, rate = _e(dt), _rate(dt)
    if k.startswith("tokenize"):
        b, d = sh["batch"], sh["dim"]
        m = b * sum(N_TOK)
        px = b * C * T * H * W + (b * T * 8 if sh["source"] == "store" else 0)
        ops = OPS_PIXEL[sh["source"]]
        if sh["source"] == "store" and (P * P) % row["launch"].meta.get("BK", K) == 0:
            ops = OPS_PIXEL["store_row"]  # ROW_FRAME: a 32-bit column mirror per pixel, the rest per row
        programs = grid[0] * (grid[1] if len(grid) > 1 else 1) * (grid[2] if len(grid) > 2 else 1)
        if k == "tokenize_fwd":  # 2 gather passes (stats, then normalise + dot); W^T streamed per program;
            # with a backward to follow it also writes z and the patch LN stats (counted: training)
            return Work(2.0 * m * K * d, px + b * N_OUT * d * 4 + m * (d * e + 8), 0,
                        2 * m * K * ops + 2 * programs * K * d, rate)
        if k == "tokenize_bwd_tok":  # reads the saved z and dL/dout, writes dz and per-slice partials;
            # about 20 lane-ops per (token, channel): LN(D) again, its backward, four partial sums
            return Work(0.0, m * d * e + b * N_OUT * d * 4 + m * d * e + grid[1] * N_OUT * d * 4, 0,
                        20.0 * m * d, rate)
        if k == "tokenize_bwd_w":  # one gather pass per patch-column chunk; dz read as dz and dz^T
            return Work(4.0 * m * K * d, px + m * (d * e + 8) + programs * d * 32 * 4, 0,
                        m * K * (ops + 3) + 2 * m * d * grid[0], rate)
        if k == "tokenize_prep":  # W (fp32 in, compute dtype out) and the patch-LN parameters, gathered;
            # every row also reads the int64 column order
            S, rows = len(N_TOK), len(N_TOK) * (d + 2)
            return Work(0.0, S * d * K * (4 + e) + 2 * S * K * 8 + 8 * K * rows, 0, K * rows, rate)
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
        if k == "attn_fwd":
            return Work(4.0 * dh * el, 3 * io + io + bh * n * 4, el, 4.0 * el, rate)
        if k == "attn_bwd_delta":
            return Work(0, 2 * io + bh * n * 4, 0, 2.0 * bh * n * dh)
        if k == "attn_bwd":  # dk/dv programs: 4 dots + 1 exp; dq programs: 3 dots + 1 exp
            return Work(14.0 * dh * el, 7 * io + 2 * bh * n * 4, 2 * el, 8.0 * el, rate)
        if k == "attn_bwd_dkdv":
            return Work(8.0 * dh * el, 5 * io + 2 * bh * n * 4, el, 4.0 * el, rate)
        if k == "attn_bwd_dq":  # also reads O for delta = rowsum(dO * O) and writes delta
            return Work(6.0 * dh * el, 5 * io + 3 * bh * n * 4, el, 4.0 * el, rate)
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


def attention_layer_peers(b: int = 256, heads: int = 3, dh: int = 32, segs=(401, 241)) -> dict:
    """Fwd+bwd time of one encoder layer's four attentions (self x2, cross x2) by each peer."""
    bh, (n1, n2) = b * heads, segs
    pairs = [(n1, n1), (n2, n2), (n1, n2), (n2, n1)]
    sdpa = [w for q, k in pairs for w in cm.sdpa_flash(q, k, bh, dh)]
    from fmfast.kernels.layout import cross_attention_layout, self_attention_layout
    fl = []
    for make in (self_attention_layout, cross_attention_layout):
        lay = make(segs, 128, 128, aligned=False)  # FlexAttention's blocks run from token 0
        fl += list(cm.flex(lay.num_computed_blocks * 128 * 128, lay.seq_len, bh, dh))
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

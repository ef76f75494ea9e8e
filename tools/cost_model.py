"""Paper cost model of one kernel launch on an H200 (sm_90, 132 SMs), for fmfast's kernels and
their peers: a ``Work`` (what a launch must do) priced against the unit ceilings.

    terms  = MMA FLOPs / MMA rate, DRAM bytes / copy bandwidth, exps / MUFU rate, ops / ALU rate
    floor  = max(terms)                              (every unit at its ceiling, perfect overlap)
    est    = (floor + (sum(terms) - floor) / min(blocks_per_sm, 4)) / wave_eff + gap

With one resident block per SM a kernel's phases (gather, MMA, exp, epilogue) serialise; with k
blocks per SM the other blocks hide all but 1/k of the non-dominant terms. ``gap``: a launch's
fixed cost (ramp-up, tail, and in eager mode the host's launch gap). Ceilings: measured on this
workplace's H200 (device/KINDS.md: bf16 matmul 790 TFLOP/s, copy 4.3 TB/s); unit rates from the
sm_90 datasheet at 1.98 GHz. Every number here is a model's estimate; tools/gpu_check.sh prints
it beside the measurement so that the model can be corrected.
"""
from __future__ import annotations

from dataclasses import dataclass

CLOCK = 1.98e9
SMS = 132
MMA_BF16 = 790e12  # HGMMA (wgmma), measured: 8192^3 bf16 matmul through PyTorch
MMA_TF32 = MMA_BF16 / 2  # tf32 wgmma; tf32x3 takes three of these
MMA_HMMA = 0.62 * MMA_BF16  # mma.sync on Hopper (FA2 reaches about 62% of FA3's rate: a lead)
FMA_FP32 = 2 * 128 * SMS * CLOCK  # 67 TFLOP/s, scalar FFMA (an "ieee" tl.dot)
SMALL_TILE_EFF = 0.6  # MMA tiles with N <= 128 (head dim 32, D = 96) stay below the big-GEMM rate
ALU = 128 * SMS * CLOCK  # fp32/int32 lane-ops per s (an FFMA counts one)
MUFU = 16 * SMS * CLOCK  # ex2 per s (4.2 T/s: the exp ceiling FlashAttention-3 names)
DRAM = 4.3e12  # B/s, measured device-to-device copy (read + write)
GAP_EAGER_US = 4.0  # per eager op: launch gap + ramp (eager PyTorch at B=256 is launch-paced)
GAP_GRAPH_US = 1.5  # per kernel inside a CUDA graph / torch.compile'd graph


@dataclass
class Work:
    """What one launch (or ``kernels`` launches) must do: MMA FLOPs at ``mma_rate``, the fewest
    DRAM bytes (inputs read once, outputs written once), exps, other lane-ops."""
    flops: float = 0.0
    bytes: float = 0.0
    exps: float = 0.0
    ops: float = 0.0
    mma_rate: float = MMA_BF16
    kernels: int = 1

    def __add__(self, o: "Work") -> "Work":  # two ops fused into one launch
        rate = self.mma_rate if self.flops >= o.flops else o.mma_rate
        return Work(self.flops + o.flops, self.bytes + o.bytes, self.exps + o.exps, self.ops + o.ops, rate,
                    max(self.kernels, o.kernels))

    def terms_us(self, mma_rate: float | None = None) -> dict:
        rate = (mma_rate or self.mma_rate) * (SMALL_TILE_EFF if (mma_rate or self.mma_rate) != FMA_FP32 else 1.0)
        return {"mma": self.flops / rate * 1e6, "dram": self.bytes / DRAM * 1e6, "mufu": self.exps / MUFU * 1e6,
                "alu": self.ops / ALU * 1e6}

    def floor_us(self, mma_rate: float | None = None) -> float:
        return max(self.terms_us(mma_rate).values())

    def bound(self, mma_rate: float | None = None) -> str:
        t = self.terms_us(mma_rate)
        return max(t, key=t.get)

    def est_us(self, blocks_per_sm: int = 2, wave_eff: float = 1.0, mma_rate: float | None = None,
               gap_us: float = GAP_GRAPH_US) -> float:
        t = self.terms_us(mma_rate)
        floor = max(t.values())
        k = max(1, min(int(blocks_per_sm), 4))
        return (floor + (sum(t.values()) - floor) / k) / max(wave_eff, 1e-3) + gap_us * self.kernels


def sass_rate(mma: list, work: Work) -> float:
    """The MMA rate a compiled kernel can reach, from the MMA kinds its SASS holds: HGMMA keeps the
    work's rate (bf16, or tf32/tf32x3 for fp32), HMMA only is mma.sync, both a blend, none is
    scalar FFMA."""
    if "HGMMA" in mma and "HMMA" in mma:  # some GEMMs on each: count half the FLOPs at each rate
        return 2.0 / (1.0 / work.mma_rate + 1.0 / min(work.mma_rate, MMA_HMMA))
    if "HGMMA" in mma:
        return work.mma_rate
    if "HMMA" in mma:
        return min(work.mma_rate, MMA_HMMA)
    return FMA_FP32


def ours_us(w: Work, res: dict, grid: dict) -> float:
    """Estimated time of one of our compiled launches (``res``: tools/sm90.resources, ``grid``:
    tools/sm90.grid_facts), at the MMA rate its SASS allows and its occupancy."""
    return w.est_us(res["blocks_per_sm"], grid["wave_eff"], sass_rate(res["mma"], w), GAP_GRAPH_US)


def peer_us(works, gap_us: float = GAP_EAGER_US, blocks_per_sm: int = 4) -> float:
    """Time of a peer's launches (library kernels: assumed well occupied, full waves)."""
    return sum(w.est_us(blocks_per_sm, 1.0, None, gap_us) for w in works)


def ew(n: float, in_bytes: float, out_bytes: float, kernels: int = 1, ops: float = 2.0) -> Work:
    """An elementwise/reduction pass over ``n`` elements: ``in_bytes`` read and ``out_bytes``
    written per element."""
    return Work(0.0, n * (in_bytes + out_bytes), 0.0, ops * n, MMA_BF16, kernels)


def gemm(m: float, n: float, k: float, e: int, rate: float = MMA_BF16) -> Work:
    """[m, k] @ [k, n] with ``e``-byte operands and result (cuBLAS)."""
    return Work(2.0 * m * n * k, (m * k + k * n + m * n) * e, 0.0, 0.0, rate, 1)


def _pad(n: int, blk: int) -> int:
    return -(-n // blk) * blk


def sdpa_flash(nq: int, nk: int, bh: int, dh: int, tile: int = 128, ipe=(5.0, 8.0)) -> list:
    """One SDPA flash call forward + backward (FlashAttention-2 on sm_90: mma.sync, 128 x 128
    tiles at head dim 32, one exp per element each way, dQ accumulated by fp32 atomics (counted
    as DRAM-class traffic), padded to whole tiles). ``ipe``: lane-instructions per element,
    forward and backward."""
    el = bh * _pad(nq, tile) * _pad(nk, tile)
    io = bh * (nq + 2 * nk) * dh * 2
    fwd = Work(4.0 * dh * el, io + bh * nq * (dh * 2 + 4), el, ipe[0] * el, MMA_HMMA, 1)
    bwd = Work(10.0 * dh * el, 2 * io + bh * nq * (dh * 6 + 8) + 4.0 * dh * el / tile, el, ipe[1] * el, MMA_HMMA, 3)
    return [fwd, bwd]


def flex(elements: int, seq_len: int, bh: int, dh: int, masked: int = 0, ipe=((5.0, 13.0), (12.0, 28.0))) -> tuple:
    """FlexAttention forward + backward over a packed sequence (Triton, wgmma): ``elements``
    computed per head (whole blocks), ``masked`` of them in partial blocks that run the mask_mod;
    the backward recomputes P in its dq and its dk/dv loops (two exps per element). ``ipe``:
    lane-instructions per element (full block, partial block), forward and backward."""
    el, em = bh * elements, bh * masked
    io = bh * seq_len * dh * 2 * 3
    (ff, fm), (bf, bm) = ipe
    fwd = Work(4.0 * dh * el, io + bh * seq_len * (dh * 2 + 4), el, ff * (el - em) + fm * em, MMA_BF16, 1)
    bwd = Work(14.0 * dh * el, 2 * io + bh * seq_len * (dh * 6 + 8), 2 * el, bf * (el - em) + bm * em, MMA_BF16, 2)
    return fwd, bwd


def attention_eager(nq: int, nk: int, bh: int, dh: int, e: int, rate: float) -> list:
    """``softmax(q k^T * scale) v`` as the reference runs it, forward + backward: every [nq, nk]
    intermediate through DRAM (under autocast the softmax and its grad are fp32)."""
    el = bh * nq * nk
    io = bh * (nq + 2 * nk) * dh * e
    mm = lambda extra: Work(2.0 * dh * el, io / 3 * 2 + extra, 0.0, 0.0, rate, 1)  # noqa: E731
    sm = 4  # softmax dtype bytes (fp32 under autocast and in fp32)
    fwd = [mm(e * el), ew(el, e, e), Work(0, el * (e + sm), el, 4.0 * el, rate, 1), ew(el, sm, e), mm(e * el)]
    bwd = [mm(e * el), mm(e * el), Work(0, el * (e + 2 * sm), 0, 4.0 * el, rate, 1), ew(el, sm, sm),
           ew(el, sm, e), mm(e * el), mm(e * el)]
    return fwd + bwd

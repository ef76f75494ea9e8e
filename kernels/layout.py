"""Block layouts for block-sparse attention over a packed sequence of segments.

A layout says, for one sequence length N split into query blocks of ``block_m`` and key blocks
of ``block_n`` tokens, which key blocks each query block attends (``kv_num_blocks``/``kv_indices``,
FlexAttention-BlockMask style) and the transpose for the dk/dv backward (``q_num_blocks``/
``q_indices``). Inside a computed block, elements are masked by rules that need no block
alignment:

- segments: token i has segment ``seg_ids[i]``; query i may see key j iff
  ``seg_allowed[seg_ids[i], seg_ids[j]]`` (self-attention = block diagonal, cross = off-diagonal);
- an optional local window over a ``t x h x w`` token grid stored contiguously from ``grid_start``:
  two grid tokens see each other only if ``|dt| <= wt//2``, ``|dy| <= wh//2``, ``|dx| <= ww//2``
  (pairs with a non-grid token are not windowed);
- an optional exact element bitmask ``elem_bits`` (``[N, ceil(N/32)]`` int32), the fallback for
  ``mask_mod`` s that are not segment structured (e.g. causal).

Blocks are ``block_m`` (``block_n``) consecutive tokens from token 0 -- or, in an *aligned*
layout, from the start of each segment (``q_starts``/``k_starts``: block i holds tokens
``[starts[i], starts[i+1])``, at most a block's size), so no block straddles two segments. At
FmFormer's 401 + 241 tokens in 64-blocks that computes 121 blocks per phase pair instead of 142:
the segment builders take whichever computes fewer (FlexAttention's ``BlockMask`` has uniform
blocks only; ``to_block_mask`` converts).

Query i sees key j iff j's block is listed for i's block and every rule above allows (i, j).
The block lists of the builders below hold exactly the blocks with at least one visible pair;
each list starts with its *full* blocks (``kv_num_full``/``q_num_full`` of them: every pair
visible, no padding), on which the kernel skips element masking, as FlexAttention does.
Layouts are shared by every batch element and head; the builders cache one layout per shape.
"""
from __future__ import annotations

import functools
import inspect
import itertools
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

MAX_SEGMENTS = 32  # a query's allowed key segments are one int32 bitmask in the kernel
_COORD_BITS = 10  # grid coords packed as t << 20 | y << 10 | x
_KEYS = itertools.count(1)


class LayoutTensors(NamedTuple):
    """Everything the kernel reads, on one device (int32 unless noted)."""

    kv_num_blocks: Tensor  # [Qb]
    kv_num_full: Tensor  # [Qb] the first kv_num_full entries of a row are full blocks
    kv_indices: Tensor  # [Qb, maxK]
    q_num_blocks: Tensor  # [Kb]
    q_num_full: Tensor  # [Kb]
    q_indices: Tensor  # [Kb, maxQ]
    q_bits: Tensor  # [N] bit s set iff the query may see key segment s
    k_seg: Tensor  # [N] segment id of each key
    coords: Tensor | None  # [N] packed (t, y, x) of grid tokens, -1 elsewhere
    elem_bits: Tensor | None  # [N, ceil(N/32)] exact element mask, bit j%32 of word j//32
    q_starts: Tensor  # [Qb + 1] query block i holds tokens [q_starts[i], q_starts[i+1])
    k_starts: Tensor  # [Kb + 1] the same for key blocks


@dataclass(frozen=True, eq=False)
class BlockLayout:
    seq_len: int
    block_m: int
    block_n: int
    kv_num_blocks: Tensor  # int32 [Qb]
    kv_indices: Tensor  # int32 [Qb, maxK]: full blocks, then partial ones, each ascending; 0-padded
    q_num_blocks: Tensor  # int32 [Kb]
    q_indices: Tensor  # int32 [Kb, maxQ], same order
    seg_ids: Tensor  # int32 [N]
    seg_allowed: Tensor  # bool [S, S]
    grid: tuple[int, int, int] | None = None
    grid_start: int = 0
    window: tuple[int, int, int] | None = None
    elem_bits: Tensor | None = None
    kv_num_full: Tensor | None = None  # int32 [Qb]; None: no block is marked full
    q_num_full: Tensor | None = None  # int32 [Kb]
    q_starts: Tensor | None = None  # int64 [Qb + 1] of an aligned layout; None: uniform blocks
    k_starts: Tensor | None = None  # int64 [Kb + 1]
    # unique per layout: what the kernel's custom op carries instead of the layout itself
    key: int = field(default_factory=lambda: next(_KEYS), repr=False)
    _device_cache: dict = field(default_factory=dict, repr=False)

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def num_q_blocks(self) -> int:
        return self.kv_num_blocks.numel()

    @property
    def num_kv_blocks(self) -> int:
        return self.q_num_blocks.numel()

    @property
    def radius(self) -> tuple[int, int, int] | None:
        return None if self.window is None else tuple(w // 2 for w in self.window)

    @property
    def aligned(self) -> bool:
        """Blocks start at segment starts (not every ``block_m`` tokens from 0)."""
        return self.q_starts is not None

    def starts(self) -> tuple[Tensor, Tensor]:
        """(q_starts [Qb+1], k_starts [Kb+1]) int64: block i holds tokens [starts[i], starts[i+1])."""
        return (_uniform_starts(self.seq_len, self.block_m) if self.q_starts is None else self.q_starts,
                _uniform_starts(self.seq_len, self.block_n) if self.k_starts is None else self.k_starts)

    @property
    def num_computed_blocks(self) -> int:
        return int(self.kv_num_blocks.sum())

    @property
    def num_full_blocks(self) -> int:
        """Computed blocks that skip the element mask."""
        return 0 if self.kv_num_full is None else int(self.kv_num_full.sum())

    @property
    def density(self) -> float:
        """Fraction of the (Qb x Kb) block grid that is computed."""
        return self.num_computed_blocks / (self.num_q_blocks * self.num_kv_blocks)

    def flops(self, batch: int, heads: int, head_dim: int, backward: bool = False) -> float:
        """FLOPs on the computed blocks (forward: 2 matmuls; backward: 5)."""
        per_block = 2 * self.block_m * self.block_n * head_dim
        return per_block * (5 if backward else 2) * self.num_computed_blocks * batch * heads

    # ---- dense views -------------------------------------------------------------------------
    def block_dense(self) -> Tensor:
        """[Qb, Kb] bool: the computed blocks."""
        return _lists_to_dense(self.kv_num_blocks, self.kv_indices, self.num_kv_blocks)

    def full_block_dense(self) -> Tensor:
        """[Qb, Kb] bool: the computed blocks that skip element masking."""
        if self.kv_num_full is None:
            return torch.zeros(self.num_q_blocks, self.num_kv_blocks, dtype=torch.bool)
        return _lists_to_dense(self.kv_num_full, self.kv_indices, self.num_kv_blocks)

    def element_rule(self, rows: Tensor | None = None) -> Tensor:
        """[len(rows), N] bool: segment, window and element-bit rules (no block structure)."""
        n = self.seq_len
        rows = torch.arange(n) if rows is None else rows
        cols = torch.arange(n)
        seg = self.seg_ids.long()
        if bool(self.seg_allowed.all()):
            vis = torch.ones(rows.numel(), n, dtype=torch.bool)
        else:
            vis = self.seg_allowed[seg[rows]][:, seg]  # two 1-D gathers: fast
        if self.window is not None:
            t, y, x, in_grid = _grid_coords(n, self.grid, self.grid_start)
            near = ~(in_grid[rows][:, None] & in_grid[None, :])  # pairs with a non-grid token
            inside = torch.ones_like(near)
            for c, r in zip((t, y, x), self.radius):
                c = c.to(torch.int16)  # grid coords < 2048: small temporaries
                inside &= (c[rows][:, None] - c[None, :]).abs_() <= r
            vis = vis & (near | inside)
        if self.elem_bits is not None:
            words = self.elem_bits[rows][:, cols // 32]
            vis = vis & (((words >> (cols % 32)) & 1) != 0)
        return vis

    def dense_mask(self) -> Tensor:
        """[N, N] bool element mask: query i sees key j."""
        n = self.seq_len
        qs, ks = self.starts()
        blocks = self.block_dense()[:, _token_blocks(ks)]  # [Qb, N]
        row_block = _token_blocks(qs)
        out = torch.empty(n, n, dtype=torch.bool)
        step = max(1, (1 << 24) // max(n, 1))  # row chunks keep the int64 temporaries small
        for r0 in range(0, n, step):
            rows = torch.arange(r0, min(r0 + step, n))
            out[rows] = blocks[row_block[rows]] & self.element_rule(rows)
        return out

    # ---- device tensors for the kernel -------------------------------------------------------
    def device_tensors(self, device: torch.device | str) -> LayoutTensors:
        """The kernel's inputs on ``device``, built once per device (call it before CUDA-graph
        capture: the first call copies from the host)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        hit = self._device_cache.get(device)
        if hit is not None:
            return hit
        seg = self.seg_ids.long()
        weights = torch.ones(1, dtype=torch.int64) << torch.arange(self.seg_allowed.shape[1])
        row_bits = (self.seg_allowed.long() * weights).sum(1)
        q_bits = _to_int32_bits(row_bits[seg])
        coords = None
        if self.window is not None:
            t, y, x, in_grid = _grid_coords(self.seq_len, self.grid, self.grid_start)
            packed = (t << (2 * _COORD_BITS)) | (y << _COORD_BITS) | x
            coords = torch.where(in_grid, packed, torch.full_like(packed, -1)).int()
        kv_full = torch.zeros_like(self.kv_num_blocks) if self.kv_num_full is None else self.kv_num_full
        q_full = torch.zeros_like(self.q_num_blocks) if self.q_num_full is None else self.q_num_full
        host = LayoutTensors(self.kv_num_blocks, kv_full, self.kv_indices, self.q_num_blocks, q_full,
                             self.q_indices, q_bits, self.seg_ids, coords, self.elem_bits, *self.starts())
        out = LayoutTensors(*(None if a is None else a.to(device=device, dtype=torch.int32).contiguous()
                              for a in host))
        self._device_cache[device] = out
        return out

    # ---- FlexAttention -----------------------------------------------------------------------
    @functools.cached_property
    def _uniform_twin(self) -> "BlockLayout":
        """The same element rules in uniform blocks from token 0 (built once per layout)."""
        return _finish(self.seq_len, self.block_m, self.block_n, self.seg_ids, self.seg_allowed, self.grid,
                       self.grid_start, self.window, self.elem_bits)

    def mask_mod(self, device: torch.device | str = "cpu") -> Callable:
        """A FlexAttention ``mask_mod`` of the element rules (block structure not included)."""
        n = self.seq_len
        seg = self.seg_ids.long().to(device)
        allowed = self.seg_allowed.to(device)
        win = None
        if self.window is not None:
            t, y, x, in_grid = (a.to(device) for a in _grid_coords(n, self.grid, self.grid_start))
            win = (t, y, x, in_grid, self.radius)
        bits = None if self.elem_bits is None else self.elem_bits.to(device)

        def mask_mod(b, h, q_idx, kv_idx):
            # FlexAttention may evaluate padded positions; clamp so indexing stays in bounds.
            qi, ki = q_idx.clamp(0, n - 1), kv_idx.clamp(0, n - 1)
            vis = allowed[seg[qi], seg[ki]]
            if win is not None:
                t, y, x, in_grid, (rt, rh, rw) = win
                near = ((t[qi] - t[ki]).abs() <= rt) & ((y[qi] - y[ki]).abs() <= rh) \
                    & ((x[qi] - x[ki]).abs() <= rw)
                vis = vis & (near | ~(in_grid[qi] & in_grid[ki]))
            if bits is not None:
                vis = vis & (((bits[qi, ki // 32] >> (ki % 32)) & 1) != 0)
            return vis

        return mask_mod

    def to_block_mask(self, device: torch.device | str = "cpu"):
        """The equivalent FlexAttention ``BlockMask`` (B = H = 1, broadcast over both)."""
        from torch.nn.attention.flex_attention import BlockMask, create_block_mask

        n = self.seq_len
        if self.aligned:  # FlexAttention's blocks are uniform: the same rules in uniform blocks
            return self._uniform_twin.to_block_mask(device)
        if "seq_lengths" not in inspect.signature(BlockMask.from_kv_blocks).parameters:
            # older torch: let FlexAttention derive the (identical, exact) block lists itself
            return create_block_mask(self.mask_mod(device), None, None, n, n, device=device,
                                     BLOCK_SIZE=(self.block_m, self.block_n))
        full = self.full_block_dense()
        part_num, part_idx, _ = _dense_to_lists(self.block_dense() & ~full, width=self.num_kv_blocks)
        full_num, full_idx, _ = _dense_to_lists(full, width=self.num_kv_blocks)
        dev = lambda t: t[None, None].to(device)
        return BlockMask.from_kv_blocks(
            dev(part_num), dev(part_idx), dev(full_num), dev(full_idx),
            BLOCK_SIZE=(self.block_m, self.block_n), mask_mod=self.mask_mod(device), seq_lengths=(n, n))


# ---- helpers -----------------------------------------------------------------------------------
def _to_int32_bits(x: Tensor) -> Tensor:
    """int64 holding 32 bits -> int32 with the same bit pattern."""
    x = x & 0xFFFFFFFF
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def _lists_to_dense(num: Tensor, idx: Tensor, ncols: int) -> Tensor:
    rows = num.numel()
    dense = torch.zeros(rows, ncols + 1, dtype=torch.bool)
    valid = torch.arange(idx.shape[1])[None, :] < num.long()[:, None]
    cols = torch.where(valid, idx.long(), torch.full_like(idx.long(), ncols))
    dense.scatter_(1, cols, True)
    return dense[:, :ncols]


def _dense_to_lists(dense: Tensor, full: Tensor | None = None, width: int | None = None):
    """[R, C] bool -> (num [R], indices [R, width] int32 0-padded, num_full [R]). Columns also in
    ``full`` come first, then the others, each ascending."""
    num = dense.sum(1)
    width = width or max(1, int(num.max()) if num.numel() else 1)
    full = torch.zeros_like(dense) if full is None else full & dense
    # a stable sort on the rank (0 full, 1 partial, 2 absent) keeps each group ascending
    rank = 2 - dense.to(torch.int8) - full.to(torch.int8)
    order = torch.sort(rank, dim=1, stable=True).indices[:, :width]
    valid = torch.arange(width)[None, :] < num[:, None]
    idx = torch.where(valid, order, torch.zeros_like(order)).to(torch.int32).contiguous()
    return num.to(torch.int32), idx, full.sum(1).to(torch.int32)


def _grid_coords(n: int, grid, start: int):
    i = torch.arange(n, dtype=torch.int64) - start
    t_, h_, w_ = grid
    in_grid = (i >= 0) & (i < t_ * h_ * w_)
    i = i.clamp(0, t_ * h_ * w_ - 1)
    return i // (h_ * w_), (i // w_) % h_, i % w_, in_grid


def _check_blocks(where: str, block_m: int, block_n: int):
    for name, b in (("block_m", block_m), ("block_n", block_n)):
        if not isinstance(b, int) or b < 16 or b & (b - 1):
            raise ValueError(f"{where}: {name} must be a power of two >= 16 (tl.dot tiles), got {b!r}")


def _uniform_starts(n: int, blk: int) -> Tensor:
    return torch.arange(0, -(-n // blk) * blk + 1, blk).clamp_(max=n)


def _token_blocks(starts: Tensor) -> Tensor:
    """[N] the block of each token, from block starts [nb + 1]."""
    return torch.repeat_interleave(torch.arange(starts.numel() - 1), starts.diff())


def _segment_starts(lengths: Sequence[int], blk: int) -> Tensor:
    """Block starts that restart at every segment: no block holds two segments' tokens."""
    starts, s0 = [], 0
    for n in lengths:
        starts += range(s0, s0 + n, blk)
        s0 += n
    return torch.tensor(starts + [s0], dtype=torch.int64)


def _finish(seq_len, block_m, block_n, seg_ids, seg_allowed, grid=None, grid_start=0, window=None,
            elem_bits=None, blocks: Tensor | None = None, q_starts: Tensor | None = None,
            k_starts: Tensor | None = None) -> BlockLayout:
    """Derive the block lists: exactly the blocks with a visible pair (unless ``blocks`` is given),
    full blocks (every pair visible, a whole ``block_n`` of keys) first. ``q_starts``/``k_starts``:
    an aligned layout's block starts (None: uniform blocks from token 0)."""
    qs = _uniform_starts(seq_len, block_m) if q_starts is None else q_starts
    ks = _uniform_starts(seq_len, block_n) if k_starts is None else k_starts
    qb, kb = qs.numel() - 1, ks.numel() - 1
    q_len, k_len = qs.diff(), ks.diff()
    proto = BlockLayout(seq_len, block_m, block_n, torch.zeros(qb, dtype=torch.int32),
                        torch.zeros(qb, 1, dtype=torch.int32), torch.zeros(kb, dtype=torch.int32),
                        torch.zeros(kb, 1, dtype=torch.int32), seg_ids, seg_allowed, grid, grid_start,
                        window, elem_bits)
    any_vis = torch.zeros(qb, kb, dtype=torch.bool)
    all_vis = torch.zeros(qb, kb, dtype=torch.bool)
    col_block = _token_blocks(ks)
    # a key block shorter than block_n is never full (the kernel's unmasked path reads block_n keys)
    whole = k_len == block_n
    step = max(1, (1 << 24) // (block_m * max(seq_len, 1)))  # ~16M elements per chunk
    for b0 in range(0, qb, step):
        b1 = min(qb, b0 + step)
        rows = torch.arange(int(qs[b0]), int(qs[b1]))
        vis = proto.element_rule(rows)
        # visible keys per (row, key block), then per (query block, key block)
        cnt = torch.zeros(rows.numel(), kb).index_add_(1, col_block, vis.float())
        row_block = _token_blocks(qs[b0:b1 + 1] - qs[b0])
        any_vis[b0:b1] = torch.zeros(b1 - b0, kb).index_add_(0, row_block, (cnt > 0).float()) > 0
        rows_full = torch.zeros(b1 - b0, kb).index_add_(0, row_block, (cnt == k_len[None, :]).float())
        all_vis[b0:b1] = (rows_full == q_len[b0:b1, None]) & whole[None, :]
    blocks = any_vis if blocks is None else blocks
    full = blocks & all_vis
    kv_num, kv_idx, kv_full = _dense_to_lists(blocks, full)
    q_num, q_idx, q_full = _dense_to_lists(blocks.t(), full.t())
    layout = BlockLayout(seq_len, block_m, block_n, kv_num, kv_idx, q_num, q_idx, seg_ids, seg_allowed,
                         grid, grid_start, window, elem_bits, kv_full, q_full, q_starts, k_starts)
    _register_with_kernel(layout)
    return layout


def _register_with_kernel(layout: BlockLayout) -> None:
    """Make the layout known to the Triton kernel by key, so compiled code can pass the key only."""
    try:
        from .attention import register_layout
    except ImportError:  # no Triton on this platform: only the PyTorch path exists
        return
    register_layout(layout)


# ---- builders ----------------------------------------------------------------------------------
def segment_layout(lengths: Sequence[int], allowed, block_m: int = 64, block_n: int = 64, *,
                   grid: tuple[int, int, int] | None = None, window: tuple[int, int, int] | None = None,
                   grid_segment: int | None = None, aligned: bool | None = None) -> BlockLayout:
    """Packed segments of ``lengths`` tokens; ``allowed[s][t]``: segment s's queries see segment
    t's keys. With ``window``, segment ``grid_segment`` is a ``t*h*w`` grid with a local window.
    ``aligned``: blocks restart at every segment (True), run from token 0 (False), or whichever
    computes fewer blocks (None, the default; uniform on a tie)."""
    lengths = tuple(int(x) for x in lengths)
    allowed_t = tuple(tuple(bool(a) for a in row) for row in
                      (allowed.tolist() if isinstance(allowed, Tensor) else allowed))
    return _segment_layout(lengths, allowed_t, block_m, block_n,
                           None if grid is None else tuple(int(g) for g in grid),
                           None if window is None else tuple(int(w) for w in window), grid_segment, aligned)


@functools.lru_cache(maxsize=64)
def _segment_layout(lengths, allowed, block_m, block_n, grid, window, grid_segment, aligned) -> BlockLayout:
    if aligned is None:
        a, u = (_segment_layout(lengths, allowed, block_m, block_n, grid, window, grid_segment, x) for x in (True, False))
        return a if a.num_computed_blocks < u.num_computed_blocks else u
    where = "segment_layout"
    _check_blocks(where, block_m, block_n)
    s = len(lengths)
    if s == 0 or any(n < 0 for n in lengths) or sum(lengths) == 0:
        raise ValueError(f"{where}: lengths must be >= 0 with a positive sum, got {lengths}")
    if s > MAX_SEGMENTS:
        raise ValueError(f"{where}: at most {MAX_SEGMENTS} segments, got {s}")
    if len(allowed) != s or any(len(r) != s for r in allowed):
        raise ValueError(f"{where}: allowed must be {s}x{s} (one row/column per segment)")
    seg_ids = torch.repeat_interleave(torch.arange(s, dtype=torch.int32), torch.tensor(lengths))
    start = 0
    if window is not None:
        if grid is None or grid_segment is None or not 0 <= grid_segment < s:
            raise ValueError(f"{where}: window needs grid=(t, h, w) and a valid grid_segment")
        if len(grid) != 3 or any(g < 1 for g in grid) or max(grid[1:]) >= 1 << _COORD_BITS \
                or grid[0] >= 1 << (31 - 2 * _COORD_BITS):
            raise ValueError(f"{where}: grid must be 3 positive ints (h, w < 1024, t < 2048), got {grid}")
        if grid[0] * grid[1] * grid[2] != lengths[grid_segment]:
            raise ValueError(f"{where}: grid {grid} has {grid[0] * grid[1] * grid[2]} tokens but "
                             f"segment {grid_segment} has {lengths[grid_segment]}")
        if len(window) != 3 or any(w < 1 or w % 2 == 0 for w in window):
            raise ValueError(f"{where}: window must be 3 odd positive sizes (wt, wh, ww), got {window}")
        start = sum(lengths[:grid_segment])
    starts = (_segment_starts(lengths, block_m), _segment_starts(lengths, block_n)) if aligned else (None, None)
    return _finish(sum(lengths), block_m, block_n, seg_ids, torch.tensor(allowed, dtype=torch.bool),
                   grid, start, window, q_starts=starts[0], k_starts=starts[1])


def self_attention_layout(lengths: Sequence[int], block_m: int = 64, block_n: int = 64,
                          aligned: bool | None = None) -> BlockLayout:
    """Each segment attends itself only (block diagonal). ``aligned``: see ``segment_layout``."""
    s = len(lengths)
    return segment_layout(lengths, [[i == j for j in range(s)] for i in range(s)], block_m, block_n,
                          aligned=aligned)


def cross_attention_layout(lengths: Sequence[int], block_m: int = 64, block_n: int = 64,
                           aligned: bool | None = None) -> BlockLayout:
    """Each segment attends every other segment (off-diagonal). ``aligned``: see ``segment_layout``."""
    s = len(lengths)
    return segment_layout(lengths, [[i != j for j in range(s)] for i in range(s)], block_m, block_n,
                          aligned=aligned)


def local_window_layout(grid: tuple[int, int, int], window: tuple[int, int, int], num_before: int = 1,
                        num_after: int = 0, block_m: int = 64, block_n: int = 64) -> BlockLayout:
    """``num_before`` global tokens (cls), a ``t*h*w`` video grid with a local (wt, wh, ww) window,
    ``num_after`` global tokens (e.g. the current stream): global tokens see and are seen by all."""
    t, h, w = grid
    lengths = (num_before, t * h * w, num_after)
    return segment_layout(lengths, [[True] * 3] * 3, block_m, block_n, grid=grid, window=window,
                          grid_segment=1)


def from_block_mask(block_mask: Tensor, seq_len: int, block_m: int = 64, block_n: int = 64) -> BlockLayout:
    """From a dense ``[Qb, Kb]`` boolean block mask: listed blocks are fully visible."""
    where = "from_block_mask"
    _check_blocks(where, block_m, block_n)
    qb, kb = -(-seq_len // block_m), -(-seq_len // block_n)
    if block_mask.dtype != torch.bool or tuple(block_mask.shape) != (qb, kb):
        raise ValueError(f"{where}: block_mask must be bool of shape ({qb}, {kb}) for seq_len {seq_len}, "
                         f"got {block_mask.dtype} {tuple(block_mask.shape)}")
    return _finish(seq_len, block_m, block_n, torch.zeros(seq_len, dtype=torch.int32),
                   torch.ones(1, 1, dtype=torch.bool), blocks=block_mask.cpu().clone())


def from_element_mask(mask: Tensor, block_m: int = 64, block_n: int = 64) -> BlockLayout:
    """From an ``[N, N]`` boolean element mask, exactly. Segment-structured masks (tokens with the
    same row and column pattern form a segment; at most 32 segments) use the cheap segment rule;
    others fall back to a packed element bitmask."""
    where = "from_element_mask"
    _check_blocks(where, block_m, block_n)
    if mask.dim() != 2 or mask.shape[0] != mask.shape[1] or mask.dtype != torch.bool:
        raise ValueError(f"{where}: mask must be a square bool [N, N] tensor, got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    mask = mask.cpu()
    n = mask.shape[0]
    signature = torch.cat([mask, mask.t()], 1)
    _, inverse = torch.unique(signature, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), n, dtype=torch.int64)
    first.scatter_reduce_(0, inverse, torch.arange(n), reduce="amin")
    if first.numel() <= MAX_SEGMENTS:
        order = torch.argsort(first)  # number segments by first appearance
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel())
        seg_ids = rank[inverse].to(torch.int32)
        reps = first[order]
        return _finish(n, block_m, block_n, seg_ids, mask[reps][:, reps].clone())
    padded = torch.nn.functional.pad(mask, (0, -n % 32)).view(n, -1, 32).long()
    words = _to_int32_bits((padded << torch.arange(32)).sum(-1))
    return _finish(n, block_m, block_n, torch.zeros(n, dtype=torch.int32), torch.ones(1, 1, dtype=torch.bool),
                   elem_bits=words.contiguous())


@functools.lru_cache(maxsize=32)
def from_mask_mod(mask_mod: Callable, seq_len: int, block_m: int = 64, block_n: int = 64) -> BlockLayout:
    """From a FlexAttention ``mask_mod(b, h, q_idx, kv_idx)``, evaluated on the element grid on
    the CPU (b = h = 0)."""
    from torch.nn.attention.flex_attention import create_mask

    mask = create_mask(mask_mod, 1, 1, seq_len, seq_len, device="cpu")[0, 0]
    return from_element_mask(mask, block_m, block_n)


def flex_element_mask(block_mask) -> Tensor:
    """[N, N] bool element mask of a FlexAttention ``BlockMask`` (batch 0, head 0)."""
    from torch.nn.attention.flex_attention import create_mask

    bq, bk = block_mask.BLOCK_SIZE
    qb, kb = block_mask.kv_num_blocks.shape[-1], block_mask.kv_indices.shape[-1]
    n_q, n_k = getattr(block_mask, "seq_lengths", None) or (qb * bq, kb * bk)

    def expand(num, idx):
        d = _lists_to_dense(num[0, 0].cpu(), idx[0, 0].cpu(), kb)
        return d.repeat_interleave(bq, 0)[:n_q].repeat_interleave(bk, 1)[:, :n_k]

    partial = expand(block_mask.kv_num_blocks, block_mask.kv_indices)
    elem = create_mask(block_mask.mask_mod, 1, 1, n_q, n_k, device="cpu")[0, 0]
    vis = partial & elem
    if block_mask.full_kv_num_blocks is not None:
        vis = vis | expand(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    return vis


def from_flex_block_mask(block_mask) -> BlockLayout:
    """From a FlexAttention ``BlockMask`` (self-attention shape, same mask for all batch/heads)."""
    where = "from_flex_block_mask"
    dense = block_mask.to_dense()
    if (dense != dense[:1, :1]).any():
        raise ValueError(f"{where}: the BlockMask differs across batch/heads; one layout serves all")
    vis = flex_element_mask(block_mask)
    if vis.shape[0] != vis.shape[1]:
        raise ValueError(f"{where}: query and key lengths differ {tuple(vis.shape)}; packed layouts are square")
    bq, bk = block_mask.BLOCK_SIZE
    return from_element_mask(vis, bq, bk)

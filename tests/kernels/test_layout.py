"""Block layouts: element masks against brute force, exact block lists, FlexAttention round trips."""
import itertools

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.nn.attention.flex_attention import create_block_mask, create_mask

from fmfast.kernels import layout as L


def brute_segments(lengths, allowed):
    seg = [s for s, n in enumerate(lengths) for _ in range(n)]
    n = len(seg)
    return torch.tensor([[bool(allowed[seg[i]][seg[j]]) for j in range(n)] for i in range(n)])


def brute_window(grid, window, before, after):
    t, h, w = grid
    pos = [None] * before + list(itertools.product(range(t), range(h), range(w))) + [None] * after
    n = len(pos)
    m = torch.ones(n, n, dtype=torch.bool)
    for i, j in itertools.product(range(n), range(n)):
        if pos[i] is not None and pos[j] is not None:
            m[i, j] = all(abs(a - b) <= r // 2 for a, b, r in zip(pos[i], pos[j], window))
    return m


def check_blocks_exact(lay: L.BlockLayout):
    """Listed blocks hold a visible pair, unlisted ones none; q lists are the transpose; full
    blocks have every pair visible and a whole block_n of keys. Blocks by their starts (uniform
    from token 0, or restarting at each segment in an aligned layout)."""
    qs, ks = lay.starts()
    rule = lay.element_rule()
    assert qs[0] == ks[0] == 0 and qs[-1] == ks[-1] == lay.seq_len
    assert (qs.diff() > 0).all() and (qs.diff() <= lay.block_m).all()
    assert (ks.diff() > 0).all() and (ks.diff() <= lay.block_n).all()
    tiles = [[rule[qs[i]:qs[i + 1], ks[j]:ks[j + 1]] for j in range(len(ks) - 1)] for i in range(len(qs) - 1)]
    any_vis = torch.tensor([[bool(t.any()) for t in row] for row in tiles])
    all_vis = torch.tensor([[bool(t.all()) and t.shape[1] == lay.block_n for t in row] for row in tiles])
    assert torch.equal(lay.block_dense(), any_vis)
    qt = L._lists_to_dense(lay.q_num_blocks, lay.q_indices, lay.num_q_blocks)
    assert torch.equal(qt, any_vis.t())
    assert torch.equal(lay.full_block_dense(), all_vis & any_vis)
    assert torch.equal(L._lists_to_dense(lay.q_num_full, lay.q_indices, lay.num_q_blocks), (all_vis & any_vis).t())
    for r in range(lay.num_q_blocks):  # full entries first, each group ascending
        nf, na = int(lay.kv_num_full[r]), int(lay.kv_num_blocks[r])
        for idx in (lay.kv_indices[r, :nf], lay.kv_indices[r, nf:na]):
            assert torch.all(idx[1:] > idx[:-1])
    if lay.aligned:  # no block holds two segments' tokens
        for st in (qs, ks):
            for a, b in zip(st[:-1], st[1:]):
                assert lay.seg_ids[a:b].unique().numel() == 1


def test_fmformer_self_and_cross_layouts():
    """The model's 401 video + 241 current tokens: blocks restart at the current segment (aligned),
    121 computed blocks for both phases instead of 142 from token 0."""
    lengths = (401, 241)
    sa = L.self_attention_layout(lengths)
    ca = L.cross_attention_layout(lengths)
    assert torch.equal(sa.dense_mask(), brute_segments(lengths, [[1, 0], [0, 1]]))
    assert torch.equal(ca.dense_mask(), brute_segments(lengths, [[0, 1], [1, 0]]))
    for lay in (sa, ca):
        check_blocks_exact(lay)
        assert lay.aligned
        assert lay.starts()[0].tolist() == [0, 64, 128, 192, 256, 320, 384, 401, 465, 529, 593, 642]
    # 7 video blocks (the last of 17 tokens) and 4 current ones (the last of 49)
    assert sa.kv_num_blocks.tolist() == [7] * 7 + [4] * 4
    assert ca.kv_num_blocks.tolist() == [4] * 7 + [7] * 4
    assert sa.num_computed_blocks + ca.num_computed_blocks == 121
    # full blocks skip masking: all but each segment's short last key block
    assert sa.kv_num_full.tolist() == [6] * 7 + [3] * 4
    assert ca.kv_num_full.tolist() == [3] * 7 + [6] * 4
    assert (sa.num_full_blocks, ca.num_full_blocks) == (6 * 7 + 3 * 4, 3 * 7 + 6 * 4)
    # from token 0 instead: the boundary 401 lies in block 6, which both segments touch
    su = L.self_attention_layout(lengths, aligned=False)
    cu = L.cross_attention_layout(lengths, aligned=False)
    for lay in (su, cu):
        check_blocks_exact(lay)
        assert not lay.aligned
        assert torch.equal(lay.dense_mask(), (sa if lay is su else ca).dense_mask())
    assert su.kv_num_blocks.tolist() == [7] * 6 + [11] + [5] * 4
    assert cu.kv_num_blocks.tolist() == [5] * 6 + [11] + [7] * 4
    assert su.kv_num_full.tolist() == [6] * 6 + [0] + [3] * 4
    assert cu.kv_num_full.tolist() == [3] * 6 + [0] + [6] * 4
    assert su.num_computed_blocks + cu.num_computed_blocks == 142


def test_auto_alignment_takes_the_layout_with_fewer_blocks():
    for lengths, blk in (((401, 241), 64), ((5, 30, 29), 16), ((37, 27), 16), ((64, 64), 64)):
        auto = L.self_attention_layout(lengths, blk, blk)
        a, u = (L.self_attention_layout(lengths, blk, blk, aligned=x) for x in (True, False))
        assert auto is (a if a.num_computed_blocks < u.num_computed_blocks else u)
        assert torch.equal(a.dense_mask(), u.dense_mask())
    # segments on block boundaries: the same blocks either way, uniform kept
    assert not L.self_attention_layout((64, 64), 64, 64).aligned


def test_layouts_are_cached_per_shape():
    assert L.self_attention_layout((401, 241)) is L.self_attention_layout([401, 241])
    assert L.self_attention_layout((401, 241), 32, 32) is not L.self_attention_layout((401, 241))


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(0, 40), min_size=1, max_size=4).filter(lambda x: sum(x) > 0),
       data=st.data(), bm=st.sampled_from([16, 32]), bn=st.sampled_from([16, 32]))
def test_segment_layout_matches_brute_force(lengths, data, bm, bn):
    s = len(lengths)
    allowed = data.draw(st.lists(st.lists(st.booleans(), min_size=s, max_size=s), min_size=s, max_size=s))
    lay = L.segment_layout(lengths, allowed, bm, bn, aligned=data.draw(st.sampled_from([None, True, False])))
    assert torch.equal(lay.dense_mask(), brute_segments(lengths, allowed))
    check_blocks_exact(lay)


@pytest.mark.parametrize("grid,window,before,after", [((3, 4, 5), (3, 3, 3), 1, 6), ((2, 5, 7), (1, 3, 5), 0, 3),
                                                      ((4, 3, 3), (3, 1, 1), 2, 0)])
def test_window_layout_matches_brute_force(grid, window, before, after):
    lay = L.local_window_layout(grid, window, before, after, 16, 16)
    assert torch.equal(lay.dense_mask(), brute_window(grid, window, before, after))
    check_blocks_exact(lay)


def test_window_layout_skips_far_blocks():
    lay = L.local_window_layout((8, 8, 8), (1, 3, 3), 1, 0, 16, 16)
    # one frame (64 tokens) sees only its own frame and the cls token: most blocks are skipped
    assert lay.density < 0.25
    check_blocks_exact(lay)


def test_from_block_mask():
    bmask = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 1]], dtype=torch.bool)
    lay = L.from_block_mask(bmask, 40, 16, 16)
    expect = bmask.repeat_interleave(16, 0)[:40].repeat_interleave(16, 1)[:, :40]
    assert torch.equal(lay.dense_mask(), expect)
    assert torch.equal(lay.block_dense(), bmask)


def test_from_element_mask_segment_path_and_bitmask_path():
    seg_mask = brute_segments((7, 20, 13), [[1, 1, 0], [0, 1, 1], [1, 0, 0]])
    lay = L.from_element_mask(seg_mask, 16, 16)
    assert lay.elem_bits is None and lay.seg_allowed.shape == (3, 3)
    assert torch.equal(lay.dense_mask(), seg_mask)
    g = torch.Generator().manual_seed(0)
    rnd = torch.rand(70, 70, generator=g) < 0.3
    lay = L.from_element_mask(rnd, 16, 32)
    assert lay.elem_bits is not None
    assert torch.equal(lay.dense_mask(), rnd)
    check_blocks_exact(lay)


def test_from_mask_mod_document_and_causal():
    doc = torch.tensor([0] * 10 + [1] * 23 + [2] * 17)

    def document(b, h, q, kv):
        return doc[q] == doc[kv]

    def causal(b, h, q, kv):
        return q >= kv

    lay = L.from_mask_mod(document, 50, 16, 16)
    assert lay.elem_bits is None
    assert torch.equal(lay.dense_mask(), doc[:, None] == doc[None, :])
    lay = L.from_mask_mod(causal, 50, 16, 16)
    assert lay.elem_bits is not None  # 50 distinct rows: not segment structured
    assert torch.equal(lay.dense_mask(), torch.ones(50, 50, dtype=torch.bool).tril())
    assert lay.kv_num_blocks.tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize("make", [
    lambda: L.self_attention_layout((37, 27), 16, 16),
    lambda: L.self_attention_layout((37, 27), 16, 16, aligned=True),
    lambda: L.cross_attention_layout((30, 21, 13), 16, 32),
    lambda: L.cross_attention_layout((401, 241)),  # aligned: FlexAttention gets uniform blocks
    lambda: L.local_window_layout((3, 4, 5), (3, 3, 1), 1, 6, 16, 16),
    lambda: L.from_mask_mod(lambda b, h, q, kv: (q >= kv) | (kv < 3), 45, 16, 16),
])
def test_to_flex_block_mask(make):
    lay = make()
    bm = lay.to_block_mask()
    n = lay.seq_len
    assert tuple(bm.BLOCK_SIZE) == (lay.block_m, lay.block_n)
    dense = bm.to_dense()[0, 0].cpu()
    if lay.aligned:  # FlexAttention's uniform blocks: exactly those with a visible pair
        vis = torch.nn.functional.pad(lay.dense_mask(), (0, -n % lay.block_n, 0, -n % lay.block_m))
        assert torch.equal(dense, vis.view(dense.shape[0], lay.block_m, dense.shape[1], lay.block_n).any(3).any(1))
    else:
        assert torch.equal(dense, lay.block_dense())
    # independent check: FlexAttention's own mask of (blocks x mask_mod)
    elem = create_mask(bm.mask_mod, 1, 1, n, n, device="cpu")[0, 0]
    blocks = dense.repeat_interleave(lay.block_m, 0)[:n].repeat_interleave(lay.block_n, 1)[:, :n]
    assert torch.equal(elem & blocks, lay.dense_mask())
    # and a round trip through FlexAttention gives the same layout mask
    assert torch.equal(L.from_flex_block_mask(bm).dense_mask(), lay.dense_mask())


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_block_mask_round_trip():
    doc = torch.tensor([0] * 19 + [1] * 30 + [2] * 15)

    def mask_mod(b, h, q, kv):
        return (doc[q] == doc[kv]) & (q >= kv)

    bm = create_block_mask(mask_mod, None, None, 64, 64, device="cpu", BLOCK_SIZE=16)
    lay = L.from_flex_block_mask(bm)
    want = create_mask(mask_mod, 1, 1, 64, 64, device="cpu")[0, 0]
    assert torch.equal(lay.dense_mask(), want)
    back = lay.to_block_mask()
    assert torch.equal(L.flex_element_mask(back), want)
    # FlexAttention itself (eager, CPU forward) agrees on both masks
    from torch.nn.attention.flex_attention import flex_attention
    q, k, v = torch.randn(3, 1, 2, 64, 32).unbind(0)
    a = flex_attention(q, k, v, block_mask=bm)
    b = flex_attention(q, k, v, block_mask=back)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("call,match", [
    (lambda: L.segment_layout((10, 10), [[1, 0]], 16, 16), "allowed must be 2x2"),
    (lambda: L.segment_layout((10, 10), [[1, 0], [0, 1]], 8, 16), "block_m must be a power of two >= 16"),
    (lambda: L.segment_layout((0, 0), [[1, 0], [0, 1]]), "positive sum"),
    (lambda: L.local_window_layout((2, 3, 3), (2, 3, 3)), "odd"),
    (lambda: L.segment_layout((1, 17), [[1, 1], [1, 1]], grid=(2, 3, 3), window=(1, 1, 1), grid_segment=1),
     "has 18 tokens but segment 1 has 17"),
    (lambda: L.from_block_mask(torch.ones(2, 2, dtype=torch.bool), 40, 16, 16), r"shape \(3, 3\)"),
])
def test_bad_input_raises_clear_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_device_tensors_bits():
    lay = L.segment_layout([3] * 32, [[j % 2 == 0 or j == 31 for j in range(32)]] * 32, 16, 16)
    t = lay.device_tensors("cpu")
    assert t.q_bits.dtype == torch.int32 and t.q_bits[0].item() == -0x80000000 + 0x55555555
    assert lay.device_tensors("cpu") is t

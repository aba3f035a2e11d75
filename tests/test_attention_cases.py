"""The attention ops' seeded cases (``dsv4.ops.attention_cases``): stale pool rows well formed in every
FP8 block, window blocks shuffled as an engine that recycles them hands them out, the compressor ring
holding each position the step reads, and CSA top-k lists of the rows each token sees, offset as
``topk_offset`` says. Both backends run the same case, so a case that drifts from these rules would
still pass the backend comparisons: each rule is checked here on the case itself."""

from __future__ import annotations

import pytest

import dsv4
from dsv4.harness.cases import make_case
from dsv4.model.attention_state import compressor_dims
from dsv4.model.config import COMPRESS_RATIO
from dsv4.model.fp8_row import SCALE_BIAS

CFG = dsv4.get_config("tiny")


def test_stale_rows_have_a_scale_byte_for_every_fp8_block() -> None:
    args = make_case(CFG, "sparse_attn", seed=3, batch=2, start_pos=[40, 77], kind="csa").args
    for pool in (args["window_pool"], args["compressed_pool"]):
        blocks = pool.nope.shape[-1] // 64
        assert blocks >= 1
        scale = pool.scale[..., :blocks]
        assert scale.ge(SCALE_BIAS - 4).all() and scale.lt(SCALE_BIAS + 4).all()
        assert not pool.scale[..., blocks:].any()


def test_window_blocks_are_handed_out_shuffled() -> None:
    starts = [70, 130, 200, 260]  # each slot's window crosses a block boundary: two blocks a slot
    pool = make_case(CFG, "sparse_attn", seed=3, batch=4, start_pos=starts, kind="swa").args["window_pool"]
    given = pool.block_table[pool.block_table >= 0].tolist()
    assert sorted(given) == list(range(pool.nope.shape[0])) == list(range(8))
    assert given != sorted(given)


@pytest.mark.parametrize("kind", ["csa", "hca"])
def test_the_ring_holds_each_position_the_step_reads(kind: str) -> None:
    ratio = CFG.kind_ratio(kind)
    _, slots = compressor_dims(ratio, CFG.head_dim)
    starts = [0, 3, 5, slots - 1, slots, 45]
    state = make_case(CFG, "kv_compressor", seed=5, batch=len(starts), start_pos=starts, kind=kind).args["state"]
    for b, p in enumerate(starts):
        held = {q % slots for q in range(max(0, p - slots), p)}  # the ring's last `slots` positions before p
        for slot in range(slots):
            kv, score = state.kv_state[b, slot], state.score_state[b, slot]
            if slot in held:
                assert kv.ne(0).all() and kv.isfinite().all() and score.isfinite().all(), (p, slot)
            else:
                assert not kv.any() and score.eq(float("-inf")).all(), (p, slot)


def test_csa_topk_lists_hold_the_rows_each_token_sees_offset_by_the_window() -> None:
    seq = 2
    starts = [6, 30, 200]  # the step's last token closes row 1 and row 7; 50 rows visible at 200
    args = make_case(CFG, "sparse_attn", seed=7, batch=len(starts), seq=seq, start_pos=starts, kind="csa").args
    offset, idx = args["topk_offset"], args["topk_idxs"].cpu()
    assert offset == CFG.sliding_window and idx.shape == (len(starts), seq, CFG.index_topk)
    for b, p in enumerate(starts):
        visible = (p + seq) // COMPRESS_RATIO  # rows closed by the end of the step
        for s in range(seq):
            row = idx[b, s]
            rows = (row[row >= 0] - offset).tolist()
            assert len(set(rows)) == len(rows) == min(visible, CFG.index_topk) and not row[len(rows) :].ge(0).any()
            assert all(0 <= r < visible for r in rows), (p, s)
            if visible <= CFG.index_topk:
                assert sorted(rows) == list(range(visible)), (p, s)

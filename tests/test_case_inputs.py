"""The seeded pieces of a case: a prefilled indexer state holds, for each row, the history its start
position says it has seen (the keys of its closed blocks, the compressor ring's values at the slots
of the positions the next step reads), and a case whose layer has no indexer says so."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import dsv4
from dsv4.harness.cases import make_case
from dsv4.model.config import COMPRESS_RATIO
from dsv4.model.rope import rope_table
from dsv4.model.weights import synthetic_activations, synthetic_weights
from dsv4.ops.case_inputs import CaseInputs, prefilled_state

CFG = dsv4.get_config("tiny")
STARTS = list(range(13))  # no history, the first block open, closed, and the ring's two halves each way


def test_a_prefilled_row_holds_the_history_of_its_start_position() -> None:
    state = prefilled_state(CFG, len(STARTS), 64, torch.tensor(STARTS), seed=4)
    assert state.block_table.shape == (len(STARTS), 1)  # 16 rows a slot: one block each
    for b, p in enumerate(STARTS):
        done = p // COMPRESS_RATIO
        rows = state.keys[int(state.block_table[b, 0])].float()
        assert rows[:done].abs().sum(-1).gt(0).all() and not rows[done:].any(), (p, "keys")
        readable = range(COMPRESS_RATIO * max(done - 1, 0), p)  # the last closed block and the open one
        for ring in (state.kv_state[b], state.score_state[b]):
            slots = ring[[q % 8 for q in readable]]
            assert slots.isfinite().all() and slots.ne(0).all(), (p, "ring")


def test_a_case_whose_layer_has_no_indexer_says_so() -> None:
    weights = synthetic_weights(CFG, seed=1)
    case = CaseInputs(
        cfg=CFG, mode="decode", seed=1, device=None, max_position=64, start=torch.tensor([3]),
        weights=dataclasses.replace(weights, indexer=None), rope=rope_table(CFG, "compressed", max_position=64),
        x=synthetic_activations((1, 1, CFG.hidden_size), seed=2), generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    with pytest.raises(ValueError, match="^weights: the case's layer holds no lightning indexer"):
        _ = case.indexer_weights
    assert case.positions().tolist() == [3]


def test_a_prefilled_state_is_on_the_device_asked_for() -> None:
    """Filled on the host, then moved: ``meta`` stands for any device the machine may lack."""
    state = prefilled_state(CFG, 2, 64, torch.tensor([5, 9]), seed=4, device="meta")
    assert {t.device.type for t in state.tensors().values()} == {"meta"}


def test_a_qkv_case_rotates_each_token_at_its_own_rows_position() -> None:
    """``x`` is ``[B, S, D]`` flattened row by row, so the positions are too: row 1's tokens at row 1's start."""
    case = make_case(CFG, "qkv_proj_rope", seed=2, batch=2, seq=3, start_pos=[8, 100])
    assert case.args["positions"].tolist() == [8, 9, 10, 100, 101, 102]
    assert case.args["x"].shape == (6, CFG.hidden_size)


def test_the_indexer_and_csa_cases_take_the_window_as_the_top_k_offset() -> None:
    """The indexer's indices are offset by the sliding window (the rows before them in the attention's
    key list) and a CSA step reads them back by the same offset; at ``demo`` the window (128) and the
    top-k (512) differ, where at ``tiny`` both are 16."""
    cfg = dsv4.get_config("demo")
    assert cfg.sliding_window != cfg.index_topk
    idx = make_case(cfg, "indexer", "decode", 0, batch=1, seq=1, start_pos=[9], max_position=256).args
    assert (idx["offset"], idx["topk"]) == (cfg.sliding_window, cfg.index_topk)
    csa = make_case(cfg, "sparse_attn", "decode", 0, batch=1, seq=1, start_pos=[9], kind="csa", max_position=256).args
    assert csa["topk_offset"] == cfg.sliding_window

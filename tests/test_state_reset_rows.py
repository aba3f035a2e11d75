"""``IndexerState.reset`` and ``CompressorState.reset`` empty exactly the slots named: their whole ring
(zeros / -inf) and nothing of any other slot. A reset that indexed the ring dimension instead of the
batch one (``score_state[:, idx]``) is caught here; the module tests check only the reset slot's
output, whose stale ring slots a short step never reads."""

from __future__ import annotations

import pytest
import torch

import dsv4
from conftest import DEVICE
from dsv4.model.attention_state import CompressorState

CFG = dsv4.get_config("tiny")


def _filled(state):
    g = torch.Generator().manual_seed(0)
    for t in (state.kv_state, state.score_state):
        t.copy_(torch.randn(t.shape, generator=g))
    return state


@pytest.mark.parametrize("ratio", [4, 8])
@pytest.mark.parametrize("rows", [[1], torch.tensor([1, 2])])
def test_reset_empties_exactly_the_named_slots(ratio: int, rows) -> None:
    states = {
        "indexer": _filled(dsv4.IndexerState.empty(CFG, 4, 64, DEVICE)),
        "compressor": _filled(CompressorState.dense(4, ratio, CFG.head_dim, CFG.qk_rope_head_dim, 64, DEVICE)),
    }
    named = [int(r) for r in rows]
    for name, state in states.items():
        kv, score = state.kv_state.clone(), state.score_state.clone()
        state.reset(rows)
        others = [b for b in range(4) if b not in named]
        assert torch.equal(state.kv_state[others], kv[others]), name
        assert torch.equal(state.score_state[others], score[others]), name
        assert bool((state.kv_state[named] == 0).all()), name
        assert bool((state.score_state[named] == float("-inf")).all()), name

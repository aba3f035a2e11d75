"""The first compressed block of an overlapping compressor (ratio 4) pools its previous-window
candidates as ``kv 0, score -inf`` *whatever the ring holds* (spec §4, attention spec §3): a ring
whose unwritten slots hold infinities or NaN gives the rows a fresh ring gives. With the score alone
at -inf a pool that took the ring's ``kv`` there still passed every test, whose rings hold finite
values (``0 * 1e30`` is 0, ``0 * inf`` is NaN)."""

from __future__ import annotations

import pytest
import torch

import dsv4
from conftest import DEVICE, backends_of
from dsv4.model.weights import synthetic_compressor

CFG = dsv4.get_config("tiny")
HD, R = CFG.head_dim, CFG.qk_rope_head_dim
X = dsv4.synthetic_activations((2, 4, CFG.hidden_size), seed=3)  # positions 0..3: block 0 closes at 3
ROPE = dsv4.rope_table(CFG, "compressed", max_position=64)
START = torch.tensor([0, 0])


def _stale(state: dsv4.CompressorState | dsv4.IndexerState) -> None:
    """Ring slots 4..7 (positions 4..7, the previous window of block 0, unwritten before position 4):
    kv inf and NaN (NaN in slot 4 of slot 0 and slot 5 of slot 1, inf elsewhere), scores 3."""
    state.kv_state[:, 4:] = float("inf")
    state.kv_state[0, 4], state.kv_state[1, 5] = float("nan"), float("nan")
    state.score_state[:, 4:] = 3.0


@pytest.mark.parametrize("backend", backends_of("kv_compressor"))
def test_kv_compressor_first_block(backend: str) -> None:
    w = synthetic_compressor(CFG, 4, seed=1)
    rows = {}
    for name in ("fresh", "stale"):
        state = dsv4.CompressorState.dense(2, 4, HD, R, 64, block_size=16)
        if name == "stale":
            _stale(state)
        state = state.to(DEVICE)
        dsv4.kv_compressor(X.to(DEVICE), w.to(DEVICE), state, START.to(DEVICE), ROPE.to(DEVICE), backend=backend)
        rows[name] = state.pool.read(torch.tensor([0, 1], device=DEVICE), torch.tensor([0, 0], device=DEVICE)).cpu()
    assert rows["fresh"].isfinite().all()
    assert torch.equal(rows["stale"], rows["fresh"])


@pytest.mark.parametrize("backend", backends_of("indexer_compressor"))
def test_indexer_compressor_first_block(backend: str) -> None:
    indexer = dsv4.synthetic_weights(CFG, seed=2).indexer
    assert indexer is not None  # the front end of a CSA layer
    w = indexer.compressor
    keys = {}
    for name in ("fresh", "stale"):
        state = dsv4.IndexerState.empty(CFG, 2, 64)
        if name == "stale":
            _stale(state)
        state = state.to(DEVICE)
        dsv4.indexer_compressor(X.to(DEVICE), w.to(DEVICE), state, START.to(DEVICE), ROPE.to(DEVICE), backend=backend)
        keys[name] = [t.cpu() for b in (0, 1) for t in state.dense_keys(b, 1)]
    assert all(torch.equal(a, b) for a, b in zip(keys["stale"], keys["fresh"], strict=True))
    assert keys["fresh"][0].any()  # a row was written

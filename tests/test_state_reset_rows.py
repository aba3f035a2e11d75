"""``IndexerState.reset`` and ``CompressorState.reset`` empty exactly the slots named: their whole ring
(zeros / -inf) and nothing of any other slot. A reset that indexed the ring dimension instead of the
batch one (``score_state[:, idx]``) is caught here; the module tests check only the reset slot's
output, whose stale ring slots a short step never reads. A module's ``reset`` naming a slot outside
the batch changes no slot, not even those named before it."""

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


@pytest.mark.parametrize(
    ("rows", "exc", "words"),
    [
        ([4], ValueError, r"rows: expected slots in \[0, 4\)"),  # one past the batch
        (torch.tensor([4]), ValueError, r"rows: expected slots in \[0, 4\)"),
        ([-1], ValueError, r"rows: expected slots in \[0, 4\)"),  # would wrap to the last slot
        (torch.tensor([0, -1]), ValueError, r"rows: expected slots in \[0, 4\)"),
        ([0, True], TypeError, "rows: expected ints"),  # would be slot 1
    ],
    ids=["4", "tensor-4", "-1", "tensor-0,-1", "bool"],
)
def test_a_reset_naming_a_slot_outside_changes_no_slot(rows, exc: type, words: str) -> None:
    """A reset of rows holding a slot outside ``[0, batch)``, negative ones included (they would wrap
    to the last slots), or a bool (which would be slot 1): refused naming ``rows``, every slot's ring
    as it was, the ones named before the bad one included."""
    states = {
        "indexer": _filled(dsv4.IndexerState.empty(CFG, 4, 64, DEVICE)),
        "compressor": _filled(CompressorState.dense(4, 4, CFG.head_dim, CFG.qk_rope_head_dim, 64, DEVICE)),
    }
    for name, state in states.items():
        kv, score = state.kv_state.clone(), state.score_state.clone()
        with pytest.raises(exc, match=words):
            state.reset(rows)
        assert torch.equal(state.kv_state, kv) and torch.equal(state.score_state, score), name


def _modules() -> dict[str, dsv4.DecodeAttention | dsv4.DecodeFrontEnd]:
    """A ``DecodeAttention`` (CSA: every pool and ring) and a ``DecodeFrontEnd`` of 2 slots, each after
    a step of 5 tokens (the slots stand at 5, hold blocks, their rings filled)."""
    w = dsv4.synthetic_weights(CFG, seed=0, device=DEVICE, layer=1)
    rope = dsv4.layer_rope_table(CFG, 1, 64, DEVICE)
    layer = dsv4.DecodeAttention(w, rope, CFG, batch=2, max_position=64, block_size=16, backend="reference")
    front = dsv4.DecodeFrontEnd(
        dsv4.synthetic_weights(CFG, seed=0, device=DEVICE), rope, batch=2, max_position=64, topk=CFG.index_topk,
        offset=CFG.sliding_window, eps=CFG.rms_norm_eps, block_size=16, backend="reference",
    )  # fmt: skip
    x = dsv4.synthetic_activations((2, 5, CFG.hidden_size), seed=1, device=DEVICE)
    layer(x)
    front(x)
    assert layer.next_pos == front.next_pos == [5, 5]
    return {"attention": layer, "frontend": front}


def _host(m: dsv4.DecodeAttention | dsv4.DecodeFrontEnd) -> object:
    """What the module keeps on the host: positions and the blocks each slot holds."""
    if isinstance(m, dsv4.DecodeAttention):
        pools = [(sorted(p.free), [dict(s) for s in p.slots], list(p.runs)) for p in m.paging.pools]
        return list(m.next_pos), list(m.last_start), pools
    return list(m.next_pos), sorted(m.free_blocks), [list(b) for b in m.slot_blocks]


@pytest.mark.parametrize("rows", [[0, 2], [1, -1]], ids=["past-the-batch", "negative"])
def test_a_module_reset_naming_a_slot_outside_changes_nothing(rows: list[int]) -> None:
    """``reset`` of a list holding a slot outside ``[0, batch)`` raises naming ``batch_rows`` and leaves
    every slot as it stood, the ones named before the bad one included: their positions, blocks, rings
    and pools (a reset that moved slot 0 back to 0 before it looked at slot 2 passed every test)."""
    for name, m in _modules().items():
        host, buffers = _host(m), {k: v.clone() for k, v in m.named_buffers()}
        with pytest.raises(ValueError, match="batch_rows"):
            m.reset(rows)
        assert _host(m) == host, name
        assert all(torch.equal(v, buffers[k]) for k, v in m.named_buffers()), name

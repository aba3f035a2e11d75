"""The bounds of spec §7 / attention spec §9 at their exact edge: the last position the rope table,
the cache or a pool's block table holds is accepted, one more is refused with a named error before
anything changes. The other bad-input tests step far past each bound (``+60``, ``+64``), where an
off-by-one in a bound goes unseen (docs/TESTING.md, "Bugs planted on purpose")."""

from __future__ import annotations

import pytest
import torch

import dsv4
from conftest import DEVICE
from dsv4.harness.cases import make_case, mutated_args, record_outputs
from dsv4.harness.golden import bit_identical

CFG = dsv4.get_config("tiny")


def _args(op: str, start: int, max_position: int = 64) -> dict:
    return dict(
        make_case(CFG, op, seed=0, device=DEVICE, max_position=max_position, batch=2, seq=2, start_pos=[6, 6]).args
        | {"start_pos": torch.tensor([start, 6], device=DEVICE)}
    )


def _refused_unchanged(op: str, args: dict, words: tuple[str, ...]) -> None:
    records = {name: args[name] for name in mutated_args(op)}
    before = {k: v.clone() for k, v in record_outputs(records).items()}
    with pytest.raises(ValueError) as info:
        getattr(dsv4, op)(**args, backend="reference")
    assert all(w in str(info.value) for w in words), f"{info.value!r} lacks {words}"
    after = record_outputs(records)
    assert all(bit_identical(after[k], t, k) for k, t in before.items())


def test_qkv_proj_rope_positions_up_to_the_last_rope_row() -> None:
    """``positions`` in ``[0, P)``: ``P - 1`` runs, ``P`` is refused (plant: ``hi > P``)."""
    args = dict(make_case(CFG, "qkv_proj_rope", seed=0, device=DEVICE, max_position=64).args)
    last = args["rope"].max_position - 1
    positions = args["positions"].clone()
    positions[-1] = last
    dsv4.qkv_proj_rope(**{**args, "positions": positions}, backend="reference")
    positions[-1] = last + 1
    with pytest.raises(ValueError, match="positions: expected values in"):
        dsv4.qkv_proj_rope(**{**args, "positions": positions}, backend="reference")
    positions = torch.zeros_like(args["positions"])
    positions[positions.numel() // 2] = last + 1  # neither the first nor the last: the range is every entry's
    with pytest.raises(ValueError, match="positions: expected values in"):
        dsv4.qkv_proj_rope(**{**args, "positions": positions}, backend="reference")


@pytest.mark.parametrize("op", ["indexer_compressor", "indexer"])
def test_indexer_ops_reach_the_last_rope_row_and_no_further(op: str) -> None:
    """``p + S <= P`` (rope table of 64 positions, S=2): start 62 runs, 63 is refused naming the rope
    table (plant: ``p + S - 1 > P``)."""
    dsv4.ops.call_op(op, backend="reference", **_args(op, 62))
    _refused_unchanged(op, _args(op, 63), ("start_pos", "rope table"))


@pytest.mark.parametrize("op", ["indexer_compressor", "indexer"])
def test_indexer_ops_fill_the_last_cache_row_and_no_further(op: str) -> None:
    """``(p + S) // 4 <= cache rows`` (64 rows: one block of 64; a rope table long enough not to be the
    bound): p + S = 259 runs, 260 (which closes block 64, a row the table does not address) is refused
    (plant: ``(p + S - 1) // 4 > rows``)."""
    rope = dsv4.rope_table(CFG, "compressed", 512, device=DEVICE)
    args = _args(op, 257)
    assert args["state"].cache_rows == 64
    dsv4.ops.call_op(op, backend="reference", **(args | {"rope": rope}))
    _refused_unchanged(op, _args(op, 258) | {"rope": rope}, ("start_pos", "cache rows"))


@pytest.mark.parametrize(
    ("op", "words"),
    [
        ("kv_compressor", ("start_pos", "rope table")),
        ("window_kv_write", ("start_pos", "pool.block_table addresses")),
        ("sparse_attn", ("start_pos", "rope table")),
        ("sparse_attn_write", ("start_pos", "rope table")),
    ],
)
def test_attention_ops_reach_the_last_position_and_no_further(op: str, words: tuple[str, ...]) -> None:
    """``(p + S) // ratio <= bound`` for each bound (rope table 64, window pool 64 rows): start 62 with
    S=2 runs, 63 is refused, naming the bound, with every pool and ring unchanged (plant in
    ``check_positions``: ``(p + S - 1) // ratio > bound``)."""
    getattr(dsv4, op)(**_args(op, 62), backend="reference")
    _refused_unchanged(op, _args(op, 63), words)


@pytest.mark.parametrize(
    ("op", "words"),
    [
        ("indexer_compressor", ("start_pos: row 1", "rope table")),
        ("indexer", ("start_pos: row 1", "rope table")),
        ("kv_compressor", ("start_pos: row 1", "rope table")),
        ("window_kv_write", ("start_pos: row 1", "pool.block_table addresses")),
        ("sparse_attn", ("start_pos: row 1", "rope table")),
        ("sparse_attn_write", ("start_pos: row 1", "rope table")),
    ],
)
def test_a_start_past_a_bound_in_a_later_row_is_refused(op: str, words: tuple[str, ...]) -> None:
    """Every row's start is held to the bounds, not the first row's alone: row 0 at 6, row 1 at 63."""
    args = _args(op, 6) | {"start_pos": torch.tensor([6, 63], device=DEVICE)}
    _refused_unchanged(op, args, words)


@pytest.mark.parametrize(
    ("op", "pool"),
    [("kv_compressor", "state.pool"), ("sparse_attn", "window_pool"), ("sparse_attn_write", "window_pool")],
)
def test_a_pool_shorter_than_the_rope_table_is_its_own_bound(op: str, pool: str) -> None:
    """With a rope table long enough not to bind, a pool's rows are the bound that refuses a start:
    ``(p + S) // ratio`` one past the rows its table addresses, named (every bound is checked, not
    only the first: the rope table's)."""
    args = _args(op, 6)
    rope = dsv4.layer_rope_table(CFG, 1, max_position=4096, device=DEVICE)
    target, ratio = (args["state"].pool, 4) if op == "kv_compressor" else (args[pool], 1)
    start = (target.rows + 1) * ratio - 2  # S = 2: (p + S) // ratio = rows + 1
    args |= {"rope": rope, "start_pos": torch.tensor([6, start], device=DEVICE)}
    _refused_unchanged(op, args, ("start_pos: row 1", f"= {target.rows + 1} <= {target.rows}", f"{pool}.block_table"))


@pytest.mark.parametrize("op", ["sparse_attn", "sparse_attn_write"])
def test_the_last_compressed_row_a_step_reads_must_be_allocated(op: str) -> None:
    """A step from 66 with S=2 reads compressed rows ``[0, 17)``: with blocks of 16, row 16 is the
    first of column 1, which slot 0's table leaves unallocated: refused naming the table (plant: the
    rows read checked only up to ``(p + S - 1) // ratio``)."""
    args = dict(make_case(CFG, op, seed=0, device=DEVICE, max_position=128, batch=2, seq=2, start_pos=[66, 66]).args)
    cp = args["compressed_pool"]
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    good = dsv4.KVPool.paged(4, 16, cp.head_dim, cp.rope_dim, table, DEVICE)
    getattr(dsv4, op)(**(args | {"compressed_pool": good}), backend="reference")
    table[0, 1] = -1
    bad = dsv4.KVPool.paged(4, 16, cp.head_dim, cp.rope_dim, table, DEVICE)
    _refused_unchanged(op, args | {"compressed_pool": bad}, ("compressed_pool.block_table", "slot 0 column 1"))

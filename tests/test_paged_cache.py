"""The INT8 key pool addressed by a block table (spec §4): every layout an engine may hand the ops.

Each case starts from a seeded decode case (its history written into the dense layout), moves the
slots' rows into a pool of shuffled blocks — non-monotonic physical blocks, spare blocks holding
garbage, ``-1`` past each slot's allocated rows, blocks shared by two slots for a common prefix —
and checks the Triton backend against the reference (spec §6: written rows within tolerance, every
other pool row bit-identical), and the reference against itself on the dense layout.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import dsv4
from conftest import DEVICE, FULL
from device_assert import assert_stops_on_device
from dsv4.harness.cases import Case, make_case, run_case
from dsv4.harness.golden import compare
from dsv4.model.attention_state import CompressorState
from dsv4.model.state import UNALLOCATED
from dsv4.model.structs import IndexerOut
from dsv4.ops import validate
from dsv4.ops.registry import get_op
from dsv4.ops.validate import (
    READ_AS_ANOTHER_ROW,
    TWO_WRITERS,
    _read_as_another_row,
    check_block_entries,
    one_writer_per_row,
    step_positions,
)
from op_cases import assert_matches_reference
from pools import relayout
from test_bad_op_arguments import HostReadWatch

TINY = dsv4.get_config("tiny")


def paged_case(op: str, batch: int, seq: int, start: list[int], block_size: int, seed: int) -> Case:
    case = make_case(TINY, op, seed=seed, device=DEVICE, batch=batch, seq=seq, start_pos=start, max_position=1024)
    rows = [(p + seq) // 4 for p in start]
    case.args["state"] = relayout(case.state(), block_size, rows, seed)
    return case


STEPS = {  # (batch, seq, per-row start): decode rows, a block-boundary straddle, a long prefill-like step
    "decode-B3-S2": (3, 2, [10, 63, 254]),
    "straddle-B2-S10": (2, 10, [59, 123]),  # rows 14..16 and 30..32: across pool blocks of 16
    "prefill-B1-S70": (1, 70, [0]),
}


# Blocks of 64 rows (flash's block size) on the decode step; the straddle and the prefill cross pool
# blocks only with blocks of 16, with 64 they repeat the decode's path (`-m full`).
SHUFFLED = [
    pytest.param(op, name, block_size, id=f"{op}-{name}-{block_size}",
                 marks=FULL if block_size == 64 and name != "decode-B3-S2" else ())
    for op in ("indexer_compressor", "indexer") for name in STEPS for block_size in (16, 64)
]  # fmt: skip


@pytest.mark.parametrize(("op", "name", "block_size"), SHUFFLED)
def test_shuffled_pool_matches_reference(op: str, name: str, block_size: int) -> None:
    batch, seq, start = STEPS[name]
    assert_matches_reference(paged_case(op, batch, seq, start, block_size, seed=block_size + len(name)))


@pytest.mark.parametrize("op", ["indexer_compressor", "indexer"])
def test_layout_does_not_change_the_numbers(op: str) -> None:
    """The reference on a shuffled pool gives the dense layout's outputs and keys exactly."""
    dense = make_case(TINY, op, seed=4, device=DEVICE, batch=3, seq=3, start_pos=[5, 40, 97], max_position=1024)
    paged = Case(op, dict(dense.args), dense.meta)
    paged.args["state"] = relayout(dense.state(), 16, [(p + 3) // 4 for p in (5, 40, 97)], seed=4)
    a, b = run_case(dense, "reference"), run_case(paged, "reference")
    for name in ("score", "topk_idxs") if op == "indexer" else ():
        assert torch.equal(a[name], b[name]), name
    for name in ("kv_state", "score_state"):
        assert torch.equal(a[name], b[name]), name
    dense_after, paged_after = (dsv4.IndexerState(**{k: o[k] for k in dense.state().tensors()}) for o in (a, b))
    for slot, p in enumerate((5, 40, 97)):
        rows = (p + 3) // 4
        for x, y in zip(dense_after.dense_keys(slot, rows), paged_after.dense_keys(slot, rows), strict=True):
            assert torch.equal(x, y), f"slot {slot}"


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_shared_prefix_blocks_are_read_only(backend: str) -> None:
    """Slots 0 and 1 share the blocks of a common 128-token prefix (32 rows, two blocks of 16) and
    then diverge into blocks of their own; a decode step writes only their own blocks, and both
    read the shared rows."""
    case = make_case(TINY, "indexer", seed=8, device=DEVICE, batch=2, seq=2, start_pos=[150, 150], max_position=1024)
    base = relayout(case.state(), 16, [38, 38], seed=8)
    table = base.block_table.clone()
    table[1, :2] = table[0, :2]  # the prefix: slot 1 reads slot 0's first two blocks
    k8, ks = base.dense_keys(0, 32)
    shared = dsv4.IndexerState(base.kv_state, base.score_state, base.keys, base.key_scale, table)
    case.args["state"] = shared
    shared_blocks = table[0, :2].long()
    before_keys, before_scale = base.keys[shared_blocks].clone(), base.key_scale[shared_blocks].clone()
    got = run_case(case, backend)
    assert torch.equal(got["keys"][shared_blocks], before_keys) and torch.equal(
        got["key_scale"][shared_blocks], before_scale
    )
    if backend == "triton":
        assert_matches_reference(case)
    after = dsv4.IndexerState(**{k: got[k] for k in shared.tensors()})
    for slot in (0, 1):
        got_k8, got_ks = after.dense_keys(slot, 32)
        assert torch.equal(got_k8, k8) and torch.equal(got_ks, ks), f"slot {slot} reads the shared prefix"


def _two_writers_case() -> Case:
    case = make_case(TINY, "indexer_compressor", seed=2, device=DEVICE, batch=2, seq=2, start_pos=[30, 30])
    case.state().block_table[1] = case.state().block_table[0]
    return case


def two_writers_call(backend: str) -> None:
    """The call of the test below (for a child process: see ``device_assert``)."""
    dsv4.indexer_compressor(**_two_writers_case().args, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_two_slots_writing_one_pool_row_is_refused(backend: str) -> None:
    """Slots sharing a block a step writes into would race: refused before anything changes
    (on a GPU by a device-side assert ahead of the op's kernels)."""
    if DEVICE.type == "cuda":
        assert_stops_on_device(f"import test_paged_cache as t\nt.two_writers_call({backend!r})", (TWO_WRITERS,))
        return
    case = _two_writers_case()
    state = case.state()
    before = state.clone()
    with pytest.raises(ValueError, match="state.block_table: two slots write the same pool row"):
        dsv4.indexer_compressor(**case.args, backend=backend)
    assert all(torch.equal(t, getattr(before, n)) for n, t in state.tensors().items())


@pytest.mark.parametrize(
    ("start", "seq", "share", "one_writer"),
    [
        ([30, 30], 2, True, False),  # both slots close row 7 of the same block
        ([28, 30], 2, True, True),  # slot 0 closes no row this step; slot 1 closes row 7
        ([30, 30], 2, False, True),
        ([0, 4], 8, True, False),  # rows 0-1 and 1-2 of one block: row 1 twice
        ([0, 8], 8, True, True),
    ],
)
def test_two_writers_check_gives_the_verdict_worked_by_hand(start, seq, share, one_writer) -> None:
    """The two-writers check (one tensor form: a device-side assert on a GPU, read back on the host)
    refuses exactly the steps in which two slots close the same pool row."""
    case = make_case(TINY, "indexer_compressor", seed=2, device="cpu", batch=2, seq=seq, start_pos=start)
    state = case.state()
    if share:
        state.block_table[1] = state.block_table[0]
    pos = step_positions(torch.tensor(start), 2, seq, torch.device("cpu"))
    first, end = pos.start // 4, (pos.start + seq) // 4
    assert bool(one_writer_per_row(state.block_table[:2], state.block_size, first, end, seq)) == one_writer
    if one_writer:
        check_block_entries(state, pos, reads=False)
    else:
        with pytest.raises(ValueError, match="two slots write the same pool row"):
            check_block_entries(state, pos, reads=False)


@pytest.mark.parametrize(
    ("op", "slot", "column", "entry", "need"),
    [
        ("indexer_compressor", 1, 1, 10**6, "a pool block in [0, {n}) or -1"),  # a row it writes
        ("indexer", 1, 0, UNALLOCATED, "a pool block in [0, {n})"),  # a row it reads
        ("indexer", 0, 1, -7, "a pool block in [0, {n})"),
    ],
)
def test_an_entry_outside_the_pool_is_named_by_slot_and_column(op, slot, column, entry, need) -> None:
    """A block-table entry the step uses that is no pool block: refused, naming the first such slot
    and column, the rows it covers and the entry, before anything changes."""
    case = make_case(TINY, op, seed=4, device=DEVICE, batch=2, seq=2, start_pos=[70, 78], max_position=1024)
    state = relayout(case.state(), 16, [18, 20], seed=4)
    state.block_table[slot, column] = entry
    state.block_table[1, 5] = -9  # past every row the step uses: not checked
    case.args["state"] = state
    before = state.clone()
    what = "writes" if op == "indexer_compressor" else "reads"
    rows = f"rows {16 * column}..{16 * column + 15}, which the step {what}"
    words = f"state.block_table: slot {slot} column {column} ({rows}) needs " + need
    with pytest.raises(ValueError, match=re.escape(f"{words.format(n=state.keys.shape[0])}, got {entry}")):
        getattr(dsv4, op)(**case.args, backend="reference")
    assert all(torch.equal(t, getattr(before, n)) for n, t in state.tensors().items())


@pytest.mark.parametrize("op", ["indexer_compressor", "indexer"])
def test_an_entry_one_past_the_last_block_is_refused(op: str) -> None:
    """An entry equal to the pool's block count ``NB`` (one past its last block) in a column the step
    writes (the compressor) or reads (the indexer): refused like any entry outside ``[0, NB)``."""
    case = make_case(TINY, op, seed=4, device=DEVICE, batch=2, seq=2, start_pos=[70, 78], max_position=1024)
    state = relayout(case.state(), 16, [18, 20], seed=4)
    n = state.keys.shape[0]
    state.block_table[1, 1] = n  # slot 1 at 78 writes its row 19 and reads rows 0..19: column 1 both
    case.args["state"] = state
    before = state.clone()
    with pytest.raises(ValueError, match=re.escape("slot 1 column 1 (rows 16..31, which the step")) as info:
        getattr(dsv4, op)(**case.args, backend="reference")
    assert f"needs a pool block in [0, {n})" in str(info.value) and str(info.value).endswith(f"got {n}")
    assert all(torch.equal(t, getattr(before, k)) for k, t in state.tensors().items())


def test_two_writers_of_unequal_row_counts_are_refused() -> None:
    """Slot 0 at 68 (S=5) writes one row (17: column 1, offset 1), slot 1 at 3 two (rows 0 and 1 of
    column 0), and slot 1's column 0 maps slot 0's column 1: slot 1's second row is slot 0's row 17.
    The check covers every row of the slot writing the most, not as many as the one writing the fewest."""
    case = make_case(TINY, "indexer_compressor", seed=2, device=DEVICE, batch=2, seq=5, start_pos=[68, 3])
    state = relayout(case.state(), 16, [18, 2], seed=2)
    state.block_table[1, 0] = state.block_table[0, 1]
    case.args["state"] = state
    before = state.clone()
    with pytest.raises(ValueError, match="two slots write the same pool row"):
        dsv4.indexer_compressor(**case.args, backend="reference")
    assert all(torch.equal(t, getattr(before, k)) for k, t in state.tensors().items())


# (starts, (slot, column) <- (slot, column) of the table, refused): pool blocks of 16 rows; a slot at 70
# (S=2) writes its row 17, column 1, offset 1, and reads rows 0..17
ALIASES = {
    "own-two-columns": ([70, 10], ((0, 1), (0, 0)), True),  # row 17 is row 1's pool row: read, then overwritten
    "own-two-columns-none-written": ([68, 10], ((0, 1), (0, 0)), False),  # reads rows 16, 17 twice: no write
    "other-slot-reads-it": ([70, 10], ((1, 0), (0, 1)), True),  # slot 1 reads offsets 0..2 of slot 0's block
    "other-slot-reads-below-it": ([70, 4], ((1, 0), (0, 1)), False),  # slot 1 reads offset 0 only, writes none
    # slot 1 at 8 reads offsets 0..1, as far as slot 0's entry reaches (a tie: neither covers more)
    "other-slot-reads-as-far": ([70, 8], ((1, 0), (0, 1)), True),
}


def _aliased_case(name: str) -> Case:
    start, (dst, src), _ = ALIASES[name]
    case = make_case(TINY, "indexer", seed=3, device=DEVICE, batch=2, seq=2, start_pos=start, max_position=1024)
    state = relayout(case.state(), 16, [(p + 2) // 4 for p in start], seed=3)
    state.block_table[dst] = state.block_table[src]
    case.args["state"] = state
    return case


def aliased_call(name: str, backend: str) -> None:
    """The call of the test below (for a child process: see ``device_assert``)."""
    dsv4.indexer(**_aliased_case(name).args, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("name", [n for n, (_, _, refused) in ALIASES.items() if refused])
def test_a_written_row_the_step_reads_as_another_row_is_refused(backend: str, name: str) -> None:
    """Two table entries mapping one block so that the step would overwrite a key it also scores as
    another row: refused before anything changes (on a GPU by a device-side assert)."""
    if DEVICE.type == "cuda":
        assert_stops_on_device(
            f"import test_paged_cache as t\nt.aliased_call({name!r}, {backend!r})", (READ_AS_ANOTHER_ROW,)
        )
        return
    case = _aliased_case(name)
    before = case.state().clone()
    with pytest.raises(ValueError, match=r"also read by the step as another row.*: slot \d writes its row 17"):
        dsv4.indexer(**case.args, backend=backend)
    assert all(torch.equal(t, getattr(before, n)) for n, t in case.state().tensors().items())


@pytest.mark.parametrize("name", ALIASES)
def test_read_as_another_row_on_the_device_agrees_with_the_host(name: str) -> None:
    """The device form of the check (computed here on the host's tensors) gives the host's verdict,
    offset by offset: aliased blocks whose written offsets no other entry reads are accepted."""
    start, _, refused = ALIASES[name]
    state = _aliased_case(name).state().to("cpu")
    pos = step_positions(torch.tensor(start), 2, 2, torch.device("cpu"))
    assert bool(_read_as_another_row(state.block_table, pos, 16, state.keys.shape[0]).any()) == refused
    if refused:
        with pytest.raises(ValueError, match="also read by the step as another row"):
            check_block_entries(state, pos, reads=True)
    else:
        check_block_entries(state, pos, reads=True)
    check_block_entries(state, pos, reads=False)  # the compressor alone reads no pool row


def test_unallocated_rows_are_skipped_by_the_compressor() -> None:
    """A block-table entry of -1 where the compressor writes: the write is skipped (both backends)."""
    case = make_case(TINY, "indexer_compressor", seed=6, device=DEVICE, batch=2, seq=8, start_pos=[0, 0])
    state = case.state()
    state.block_table[1] = UNALLOCATED
    before = state.clone()
    for backend in ("reference", "triton"):
        got = run_case(case, backend)
        assert torch.equal(got["keys"][1:], before.keys[1:]), backend  # only slot 0's block 0 was written
        assert got["keys"][0, :2].any(), backend
    report = compare("indexer_compressor", run_case(case, "triton"), run_case(case, "reference"), case.compare_inputs())
    assert report, str(report)


def _without_columns(case: Case) -> Case:
    """``case`` with its state's block table cut to no columns (an engine that gave the slots no block yet)."""
    state = case.state()
    no_blocks = dataclasses.replace(state, block_table=state.block_table[:, :0].contiguous())
    return Case(case.op, {**case.args, "state": no_blocks}, case.meta)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("op", ["indexer_compressor", "indexer"])
def test_a_table_of_no_columns_serves_only_a_step_that_closes_no_block(op: str, backend: str) -> None:
    """Slots at 0 and 1 with S=2 close no compressed block (the step writes and reads no pool row): a
    block table of no columns serves it, with what the full table gives. One token more closes slot 1's
    first block: refused, naming ``start_pos`` and the table, before anything changes."""
    case = make_case(TINY, op, seed=1, device=DEVICE, batch=2, seq=2, start_pos=[0, 1])
    got, want = run_case(_without_columns(case), backend), run_case(case, backend)
    assert got.pop("block_table").shape == (2, 0) and set(got) == set(want) - {"block_table"}
    assert all(torch.equal(t, want[k]) for k, t in got.items())
    if op == "indexer":
        assert got["score"].shape == (2, 2, 0) and bool((got["topk_idxs"] == -1).all())
    longer = _without_columns(make_case(TINY, op, seed=1, device=DEVICE, batch=2, seq=3, start_pos=[0, 1]))
    before = longer.state().clone()
    words = "start_pos: row 1 at 1 with S=3 needs 1 cache rows, state.block_table addresses 0 (0 blocks of 64)"
    with pytest.raises(ValueError, match=re.escape(words)):  # start_pos on the host: read there, also beside a GPU
        getattr(dsv4, op)(**{**longer.args, "start_pos": torch.tensor([0, 1])}, backend=backend)
    assert all(torch.equal(t, getattr(before, n)) for n, t in longer.state().tensors().items())


@pytest.mark.parametrize("op", ["indexer_compressor", "indexer"])
def test_the_device_checks_take_a_table_of_no_columns(op: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks' device branch (run on the CPU) on the step above: a table of no columns holds no row
    two slots could write or a written row could be read as, so only its entries' check is queued
    beside the positions' (and ``out.score``'s), and nothing is read back."""
    monkeypatch.setattr(validate, "HOST_DEVICE_TYPES", ())
    case = _without_columns(make_case(TINY, op, seed=1, device="cpu", batch=2, seq=2, start_pos=[0, 1]))
    out = None
    if op == "indexer":  # out= keeps start_pos on the device
        out = IndexerOut(torch.empty(2, 2, 0), torch.empty(2, 2, case.args["topk"], dtype=torch.int32))
    with HostReadWatch() as watch:
        get_op(op).backend_args(case.args, out)
    assert not watch.reads, watch.reads
    expected = ["start_pos", "state.block_table"] + (["out.score"] if op == "indexer" else [])
    assert [a.split(":")[0] for a in watch.asserts] == expected


@pytest.mark.parametrize(("block_size", "error"), [(48, ValueError), (8, ValueError), (16.0, ValueError)])
def test_block_size_must_be_a_power_of_two_of_at_least_16(block_size, error) -> None:
    with pytest.raises(error, match="block_size"):
        dsv4.IndexerState.empty(TINY, 2, 256, block_size=block_size)


@pytest.mark.parametrize(("b", "row"), [(-1, 0), (0, -1), (2, 0), (0, 16)])
def test_row_location_refuses_a_slot_or_row_outside_the_table(b: int, row: int) -> None:
    """A state of 2 slots and 16 rows a slot: a negative slot or row is no location (not the last one,
    as a tensor index would take it), nor one past the table; the last row of the last slot is."""
    state = dsv4.IndexerState.empty(TINY, 2, 64, block_size=16)
    with pytest.raises(IndexError, match=r"^b, row: expected a slot in \[0, 2\) and a row in \[0, 16\)"):
        state.row_location(b, row)
    assert state.row_location(1, 15) == (int(state.block_table[1, 0]), 15)


def test_an_indexer_state_for_fewer_positions_than_one_compressed_row_is_refused() -> None:
    """``max_position`` 3 holds no compressed row (``3 // 4 = 0``): refused naming it; 4 holds one."""
    with pytest.raises(ValueError, match="^max_position: expected >= 4, got 3$"):
        dsv4.IndexerState.empty(TINY, 2, 3)
    with pytest.raises(ValueError, match="^batch: expected >= 1, got 0$"):
        dsv4.IndexerState.empty(TINY, 0, 4)
    assert dsv4.IndexerState.empty(TINY, 2, 4).cache_rows >= 1


@pytest.mark.parametrize(
    ("batch", "max_position", "words"),
    [(0, 64, "batch: expected >= 1, got 0"), (2, 15, "max_position: expected >= 16, got 15")],
    ids=["no-slot", "below-the-ratio"],
)
def test_an_attention_state_of_no_slot_or_fewer_positions_than_its_ratio_is_refused(
    batch: int, max_position: int, words: str
) -> None:
    """An HCA layer's state (ratio 16) needs a slot and room for one compressed row: batch 0 or 15 positions
    are refused naming the argument at fault; 16 positions hold one row."""
    layer = TINY.first_layer("hca")
    assert TINY.layer_ratio(layer) == 16
    with pytest.raises(ValueError, match=f"^{words}$"):
        dsv4.AttentionState.empty(TINY, layer, batch, max_position)
    state = dsv4.AttentionState.empty(TINY, layer, 2, 16)
    assert state.compressor is not None and state.compressor.pool.block_table.shape == (2, 1)


@pytest.mark.parametrize("state", ["indexer", "attention"])
@pytest.mark.parametrize(
    ("batch", "max_position", "words"),
    [(2, 64.7, "max_position: expected an int, got 64.7"), (2.0, 64, "batch: expected an int, got 2.0")],
    ids=["max_position", "batch"],
)
def test_a_state_size_that_is_no_int_is_refused_not_truncated(
    state: str, batch: object, max_position: object, words: str
) -> None:
    """A float ``max_position`` or ``batch`` is refused naming it (``64.7`` is no size), where an int
    of any kind (NumPy, a 0-d tensor) is taken as its value."""
    layer = TINY.first_layer("csa")

    def make(b: Any, n: Any) -> dsv4.IndexerState | None:
        if state == "indexer":
            return dsv4.IndexerState.empty(TINY, b, n)
        return dsv4.AttentionState.empty(TINY, layer, b, n).indexer

    with pytest.raises(TypeError, match=f"^{words}$"):
        make(batch, max_position)
    indexer = make(np.int64(2), torch.tensor(64))
    assert indexer is not None and indexer.block_table.shape[0] == 2 and indexer.cache_rows >= 16


@pytest.mark.parametrize("ratio", [0, -4, 4.0, True], ids=repr)
def test_a_compressor_state_of_a_ratio_below_one_or_not_an_int_is_refused(ratio: object) -> None:
    """A compressor's ring is ``COFF * ratio`` positions: a ratio below 1, or not an int (a float or a bool),
    is refused naming ``ratio`` before any pool is made."""
    table = torch.zeros(2, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match=rf"^ratio: expected a compress ratio >= 1, got {ratio!r}$"):
        CompressorState.paged(2, ratio, 128, 64, 4, 16, table)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=rf"^ratio: expected a compress ratio >= 1, got {ratio!r}$"):
        CompressorState.dense(2, ratio, 128, 64, 64)  # type: ignore[arg-type]


PAGED: dict[str, Callable[[torch.Tensor], dsv4.IndexerState | dsv4.KVPool]] = {
    "IndexerState": lambda table: dsv4.IndexerState.paged(table.shape[0], 4, 16, 128, table),
    "KVPool": lambda table: dsv4.KVPool.paged(4, 16, 128, 64, table),
}


@pytest.mark.parametrize("cls", PAGED)
def test_a_paged_state_holds_a_copy_of_the_engine_table(cls: str) -> None:
    """The engine's own int32 table, already contiguous (which a cast would hand back as it is): the state
    holds a copy, so a later change to the engine's tensor does not reach it."""
    table = torch.tensor([[0, 1], [2, -1]], dtype=torch.int32)
    state = PAGED[cls](table)
    table[0, 0] = 3
    assert state.block_table.tolist() == [[0, 1], [2, -1]]
    assert state.block_table.dtype == torch.int32 and state.block_table.is_contiguous()


@pytest.mark.parametrize("cls", PAGED)
@pytest.mark.parametrize(
    ("table", "error", "words"),
    [
        (
            torch.tensor([[2**32 + 1, -1]]),
            ValueError,
            r"expected entries in \[0, 4\) or -1",
        ),  # checked before the int32 cast
        (torch.tensor([[-(2**32) + 1, 0]]), ValueError, r"expected entries in \[0, 4\) or -1"),
        (torch.tensor([[4, -1]]), ValueError, r"expected entries in \[0, 4\) or -1"),  # one past the pool
        (torch.tensor([[-2, 0]]), ValueError, r"expected entries in \[0, 4\) or -1"),  # one below UNALLOCATED
        (torch.tensor([[1.0, 2.0]]), TypeError, "expected an integer tensor, got float32"),
        (torch.tensor([[True, False]]), TypeError, "expected an integer tensor, got bool"),
        (torch.tensor([0, 1]), ValueError, "expected shape"),
    ],
)
def test_a_paged_table_of_other_values_is_refused(cls: str, table: torch.Tensor, error: type, words: str) -> None:
    with pytest.raises(error, match="block_table: " + words):
        PAGED[cls](table)


def test_kv_pool_read_of_a_row_in_no_block_is_refused() -> None:
    """``KVPool.read`` reads through the block table: a row whose block is -1 is refused naming the
    table, not read from the last block of the pool (where index -1 lands)."""
    pool = dsv4.KVPool.paged(2, 16, 128, 64, torch.tensor([[1, -1]]))
    assert pool.read(torch.tensor([0]), torch.tensor([15])).shape == (1, 128)  # row 15: in block 1
    with pytest.raises(ValueError, match="block_table: a row read is in an unallocated block"):
        pool.read(torch.tensor([0, 0]), torch.tensor([3, 16]))


@pytest.mark.parametrize("rows", [1, 3])
def test_a_paged_table_of_another_batch_is_refused(rows: int) -> None:
    """A block table with a row count other than the batch: refused naming the table, for the
    indexer's state and the main compressor's alike."""
    table = torch.zeros(rows, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match=rf"block_table: expected shape \[2, max_blocks\], got \[{rows}, 2\]"):
        dsv4.IndexerState.paged(2, 4, 16, 64, table)
    with pytest.raises(ValueError, match=rf"block_table: expected 2 rows \(one per slot\), got {rows}"):
        CompressorState.paged(2, 4, 128, 64, 4, 16, table)


def test_dense_keys_of_a_row_in_no_block_are_refused() -> None:
    """``dense_keys`` reads through the block table: a row whose block is -1 is refused naming the table,
    not read from the last block of the pool (where index -1 lands)."""
    state = dsv4.IndexerState.paged(1, 2, 16, 128, torch.tensor([[1, -1]]))
    assert state.dense_keys(0, 16)[0].shape == (16, 128)  # every row in block 1
    with pytest.raises(ValueError, match="block_table: slot 0 reads rows \\[0, 17\\)"):
        state.dense_keys(0, 17)


@pytest.mark.parametrize("block_size", [16, 64])
def test_fresh_states_take_the_block_size_given(block_size: int) -> None:
    """A CSA layer's dense state holds every pool in blocks of ``block_size``, its indexer's keys too;
    a slot's ``cache_rows`` keys that fill its blocks exactly take no block more (256 keys: 16 or 4)."""
    cfg = dsv4.get_config("tiny")
    layer = cfg.first_layer("csa")
    state = dsv4.AttentionState.empty(cfg, layer, batch=2, max_position=1024, device=DEVICE, block_size=block_size)
    assert state.indexer is not None and state.compressor is not None
    assert state.window.block_size == state.compressor.pool.block_size == block_size
    assert state.indexer.keys.shape[1] == block_size
    assert tuple(state.indexer.block_table.shape) == (2, 1024 // 4 // block_size)

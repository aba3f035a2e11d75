"""The host side of a layer's paged pools (``dsv4.engine.paging``): the block allocator's runs, its
order of giving blocks and its table writes (``staging.write_cells``). A step's plan is checked on
``DecodeAttention`` itself (``tests/test_decode_attention.py``)."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import DEVICE
from dsv4.engine.paging import Blocks, LayerPaging
from dsv4.engine.staging import staged, write_cells
from dsv4.model.state import UNALLOCATED


def test_block_allocator_runs_agree_with_looking_up_every_column() -> None:
    """The allocator looks up only columns past a slot's run of held columns: after random gives and
    take-backs (contiguous, as the module's, and scattered), every ``need`` equals the count of absent
    columns, ``give`` leaves every asked column held, and each run holds only held columns."""
    rng = random.Random(0)
    blocks = Blocks.new(400, batch=3)
    for _ in range(2000):
        b = rng.randrange(3)
        slot = blocks.slots[b]
        lo = rng.randrange(0, 40)
        cols = range(lo, lo + rng.randrange(0, 6))
        assert blocks.need(b, cols) == sum(c not in slot for c in cols)
        if rng.random() < 0.6:
            blocks.give(b, cols)
            assert all(c in slot for c in cols)
        elif slot:
            held = sorted(slot)
            back = held[: rng.randrange(1, len(held) + 1)] if rng.random() < 0.5 else rng.sample(held, 1)
            blocks.take_back(b, back)
        assert all(c in slot for c in blocks.runs[b]), (b, blocks.runs[b], sorted(slot))
    in_use = sum(len(slot) for slot in blocks.slots)
    assert len(blocks.free) == 400 - in_use and len(set(blocks.free)) == len(blocks.free)


def test_block_allocator_gives_the_lowest_free_block_and_flushes_the_last_change_of_a_cell() -> None:
    """The host allocator: blocks come lowest first, also after blocks are given back out of order; a
    cell given back and given again before a flush ends up holding its last block; other cells keep theirs."""
    blocks = Blocks.new(8, batch=2)
    blocks.give(0, range(0, 3))  # slot 0: columns 0..2 -> blocks 0, 1, 2
    blocks.give(1, range(0, 2))  # slot 1: blocks 3, 4
    blocks.take_back(0, [2, 0])  # blocks 2 and 0 free again
    blocks.give(1, range(2, 3))  # the lowest free block: 0
    blocks.give(0, range(0, 1))  # slot 0 column 0 again: block 2
    assert blocks.slots == [{1: 1, 0: 2}, {0: 3, 1: 4, 2: 0}]
    table = torch.full((2, 4), 99, dtype=torch.int32, device=DEVICE)
    blocks.flush(table)
    assert table.cpu().tolist() == [[2, 1, UNALLOCATED, 99], [3, 4, 0, 99]]
    assert blocks.table == []
    blocks.flush(table)  # nothing changed: nothing written
    assert table.cpu().tolist() == [[2, 1, UNALLOCATED, 99], [3, 4, 0, 99]]


def test_a_cell_outside_the_table_is_refused_not_written_into_another() -> None:
    """``write_cells`` writes through the table's flat view: a column past the width would land in the
    next row's first cells, so it is refused and nothing is written."""
    table = torch.full((2, 3), 7, dtype=torch.int32, device=DEVICE)
    for cell in ((0, 3, 1), (2, 0, 1), (0, -1, 1)):
        with pytest.raises(IndexError, match="outside the \\[2, 3\\] table"):
            write_cells(table, [(1, 1, 5), cell])
        assert table.cpu().tolist() == [[7, 7, 7], [7, 7, 7]]
    write_cells(table, [(1, 2, 5), (0, 0, 4), (1, 2, 6)])
    assert table.cpu().tolist() == [[4, 7, 7], [7, 7, 6]]


def test_staged_values_are_the_hosts_whatever_the_default_device() -> None:
    """The staging tensor is the host's under a default device of torch's (``torch.set_default_device``,
    or a ``torch.device`` context as engines build models in): made on that device, a GPU's would
    refuse ``pin_memory``. A meta default stands in for one here, and the writes still land."""
    table = torch.full((2, 4), UNALLOCATED, dtype=torch.int32, device=DEVICE)
    with torch.device("meta"):
        host = staged([3, 5], DEVICE)
        write_cells(table, [(1, 2, 7)])
    assert host.device.type == "cpu" and host.tolist() == [3, 5]
    assert table[1, 2] == 7 and int((table != UNALLOCATED).sum()) == 1


def test_begin_after_a_check_of_other_starts_plans_its_own() -> None:
    """``begin`` takes the plan ``check`` kept only for the same starts: after a check of slot 0 at 0,
    a step of slot 0 at 20 (window 16, blocks of 16: it sees rows 5..20, columns 0 and 1) gets both."""
    paging = LayerPaging([8], batch=2, block_size=16, window=16, ratios=[])
    paging.check([([0, 0], 1)])
    paging.begin([20, 0], 1)
    assert sorted(paging.pools[0].slots[0]) == [0, 1] and sorted(paging.pools[0].slots[1]) == [0]


def test_begin_after_a_reset_plans_again() -> None:
    """A plan ``check`` kept is stale once ``reset`` takes a slot's blocks back: the slot's next step
    gets its block again."""
    paging = LayerPaging([8], batch=2, block_size=16, window=16, ratios=[])
    paging.end(paging.begin([0, 0], 1))
    paging.check([([1, 1], 1)])  # both slots hold column 0: nothing to give
    paging.reset([0])
    paging.begin([1, 1], 1)
    assert sorted(paging.pools[0].slots[0]) == [0] and len(paging.pools[0].free) == 6

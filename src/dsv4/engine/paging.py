"""A layer's paged pools on the host: the blocks each slot holds (``Blocks``), and the plan of each step
(``LayerPaging``: the blocks it must hold and those it gives back), so that allocation never waits on
the device."""

from __future__ import annotations

import copy
import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from ..model.state import UNALLOCATED
from .staging import write_cells

Plan = list[tuple["Blocks", list[tuple[int, range]], list[tuple[int, list[int]]]]]
NEVER = (1, 0, 0)  # quiet bounds no start lies within
POOL_NAMES = ("window", "compressed", "indexer")


@dataclass
class Blocks:
    """A pool's blocks on the host: the free blocks (a min-heap: the lowest is given first) and each
    slot's ``column -> block``. A heap, not a sorted list: a decode step gives and takes back blocks
    of every slot, and re-sorting thousands of free blocks per slot cost milliseconds a step. Each
    slot's ``run`` is a range of columns it holds every one of (the columns a slot holds are
    contiguous: a window's last few, a compressed pool's ``[0, rows)``), so a step looks up only
    the columns past it, not every column a long context holds."""

    free: list[int]
    slots: list[dict[int, int]]
    runs: list[range]
    table: list[list[int]] = field(default_factory=list)  # the entries changed since the last flush

    @classmethod
    def new(cls, num_blocks: int, batch: int) -> Blocks:
        return cls(list(range(num_blocks)), [{} for _ in range(batch)], [range(0)] * batch)  # sorted: a heap

    def _unknown(self, b: int, columns: range) -> range:
        """The part of ``columns`` that slot ``b`` may lack: past its run where they start inside it."""
        run = self.runs[b]
        return range(max(columns.start, run.stop), columns.stop) if run.start <= columns.start <= run.stop else columns

    def need(self, b: int, columns: range) -> int:
        slot = self.slots[b]
        return sum(c not in slot for c in self._unknown(b, columns))

    def give(self, b: int, columns: range) -> list[int]:
        """Slot ``b`` holds every column of ``columns`` after the call; returns those it was given."""
        slot = self.slots[b]
        given = []
        for c in self._unknown(b, columns):
            if c not in slot:
                slot[c] = heapq.heappop(self.free)
                self.table.append([b, c, slot[c]])
                given.append(c)
        if not columns:
            return given
        run = self.runs[b]
        if run and run.start <= columns.stop and columns.start <= run.stop:  # touching: the union is held
            lo, hi = min(run.start, columns.start), max(run.stop, columns.stop)
        else:
            lo, hi = columns.start, columns.stop
        while hi in slot:
            hi += 1
        self.runs[b] = range(lo, hi)
        return given

    def take_back(self, b: int, columns: list[int]) -> None:
        slot = self.slots[b]
        for c in columns:
            heapq.heappush(self.free, slot.pop(c))
            self.table.append([b, c, UNALLOCATED])
        # the new run: the held columns around the old run's last, or around the highest held one
        top = self.runs[b].stop - 1 if self.runs[b].stop - 1 in slot else max(slot, default=None)
        if top is None:
            self.runs[b] = range(0)
            return
        lo, hi = top, top + 1
        while lo - 1 in slot:
            lo -= 1
        while hi in slot:
            hi += 1
        self.runs[b] = range(lo, hi)

    def flush(self, block_table: torch.Tensor) -> None:
        """Write the changed entries into the device table: one copy and one scatter, no host sync."""
        write_cells(block_table, self.table)
        self.table.clear()


class LayerPaging:
    """The pools of one attention layer for ``batch`` slots, on the host: ``pools[0]`` the window's,
    then one a compressor (``ratios``: the layer's own, then the CSA indexer's), blocks of
    ``block_size`` rows each.

    A step of ``s`` tokens from ``start`` needs the window columns covering ``[start - W + 1,
    start + s)`` and, after it, gives back those whose rows are all ``<= start - W`` (no later token
    sees them); each compressed pool holds every row up to the step's last close (given back on
    ``reset``). Each slot keeps its quiet bounds: the starts from which a step changes none of its
    blocks, so a decode step looks only at the slots outside them."""

    def __init__(self, num_blocks: list[int], batch: int, block_size: int, window: int, ratios: list[int]) -> None:
        self.pools = [Blocks.new(n, batch) for n in num_blocks]
        self.block_size, self.window, self.ratios = block_size, window, ratios
        self.quiet = [NEVER] * batch  # per slot, (lo, hi, end): see quiet_bounds
        self._checked: tuple[list[int], int, Plan] | None = None  # the last one-step check's plan, until pools change
        self._given: list[tuple[Blocks, int, list[int]]] = []  # the blocks the step begun last was given, until it ends

    def plan(self, starts: list[int], s: int, pools: list[Blocks] | None = None) -> Plan:
        """For each pool: ``(pool, [(slot, columns it must hold)], [(slot, columns to give back after
        the step)])`` for a step of ``s`` tokens from ``starts``, listing only the slots whose blocks
        change. On the layer's own pools (``pools`` None) only the slots outside their quiet bounds
        are looked at; on ``pools`` given (copies, for a call of several steps) every slot is."""
        if pools is None:
            pools = self.pools
            slots: Sequence[int] = [b for b, (p, (lo, hi, end)) in enumerate(zip(starts, self.quiet, strict=False))
                     if not (lo <= p < hi and p + s <= end)]  # fmt: skip
        else:
            slots = range(len(starts))
        bs, w = self.block_size, self.window
        window = pools[0]
        give: list[tuple[int, range]] = []
        free: list[tuple[int, list[int]]] = []
        for b in slots:
            p = starts[b]
            seen = max(0, p - w + 1) // bs  # the columns below it hold rows no later token sees
            cols, run, slot = range(seen, (p + s - 1) // bs + 1), window.runs[b], window.slots[b]
            if not run.start <= cols.start <= cols.stop <= run.stop:
                give.append((b, cols))
            if len(slot) == len(run):  # the run is every column the slot holds
                if run.start < seen:
                    free.append((b, list(range(run.start, min(run.stop, seen)))))
            elif old := [c for c in slot if c < seen]:
                free.append((b, old))
        plan: Plan = [(window, give, free)]
        for blocks, ratio in zip(pools[1:], self.ratios, strict=True):
            give = []
            for b in slots:
                n, run = -(-((starts[b] + s) // ratio) // bs), blocks.runs[b]
                if n > run.stop or (n and run.start):
                    give.append((b, range(0, n)))
            plan.append((blocks, give, []))
        return plan

    def quiet_bounds(self, b: int) -> tuple[int, int, int]:
        """``(lo, hi, end)``: a step of slot ``b`` from ``p`` with ``lo <= p < hi`` and ``p + s <= end``
        changes none of its blocks (``plan`` finds nothing for it); ``NEVER`` where the slot's blocks
        are not the runs a decode step keeps (a scattered window, a compressed run not from 0). Read
        off the runs: the window's first held column is the first one a step from ``p`` still sees,
        its last holds ``p + s - 1``; each compressed pool holds the rows up to ``p + s``."""
        bs, w, pools = self.block_size, self.window, self.pools
        run = pools[0].runs[b]
        if not run or len(pools[0].slots[b]) != len(run) or any(pool.runs[b].start for pool in pools[1:]):
            return NEVER
        lo = run.start * bs + w - 1 if run.start else 0
        ends = [(pool.runs[b].stop * bs + 1) * r - 1 for pool, r in zip(pools[1:], self.ratios, strict=True)]
        return (lo, (run.start + 1) * bs + w - 1, min([run.stop * bs, *ends]))

    def _requiet(self, slots: Iterable[int]) -> None:
        for b in slots:
            self.quiet[b] = self.quiet_bounds(b)

    def check(self, steps: list[tuple[list[int], int]]) -> None:
        """Raise, changing nothing, when the pools cannot hold the blocks ``steps`` (``(starts, s)``
        each) need. A call of several steps is simulated on copies of the pools; one step (every
        decode step) only reads them, and its plan is kept for ``begin``."""
        pools = [copy.deepcopy(blocks) for blocks in self.pools] if len(steps) > 1 else None
        for i, (starts, s) in enumerate(steps):
            plan = self.plan(starts, s, pools)
            for (pool, give, free), name in zip(plan, POOL_NAMES, strict=False):
                need = sum(pool.need(b, cols) for b, cols in give)
                if need > len(pool.free):
                    raise ValueError(
                        f"xn: the step needs {need} more {name} pool blocks, {len(pool.free)} are free; reset finished "
                        "slots or build the module with more num_blocks"
                    )
                if i + 1 < len(steps):  # the copies: only a later step reads what this one leaves
                    for b, cols in give:
                        pool.give(b, cols)
                    for b, columns in free:
                        pool.take_back(b, columns)
        if pools is None:
            self._checked = (steps[0][0], steps[0][1], plan)

    def begin(self, starts: list[int], s: int) -> Plan:
        """Give each slot the blocks a step of ``s`` tokens from ``starts`` reads and writes; the plan
        (the one ``check`` kept for these starts, if nothing changed since), for ``end``."""
        checked, self._checked = self._checked, None
        plan = checked[2] if checked is not None and checked[:2] == (starts, s) else self.plan(starts, s)
        self._given = [(blocks, b, blocks.give(b, cols)) for blocks, give, _ in plan for b, cols in give]
        self._requiet({b for _, give, _ in plan for b, _ in give})
        return plan

    def abort(self) -> None:
        """After a step that raised: take back the blocks ``begin`` gave it (the slots did not move, so
        a step from the same starts gets them again)."""
        for blocks, b, columns in self._given:
            if columns:
                blocks.take_back(b, columns)
        self._requiet({b for _, b, _ in self._given})
        self._given, self._checked = [], None

    def end(self, plan: Plan) -> None:
        """After the step: take back the window blocks no later token sees."""
        for blocks, _, free in plan:
            for b, cols in free:
                blocks.take_back(b, cols)
        self._requiet({b for _, _, free in plan for b, _ in free})
        self._given, self._checked = [], None  # a check made mid-step planned on the pools before these changes

    def reset(self, rows: list[int]) -> None:
        """Every block of the slots ``rows`` back to its pool."""
        for blocks in self.pools:
            for b in rows:
                blocks.take_back(b, sorted(blocks.slots[b]))
        self._requiet(rows)
        self._checked = None

    def flush(self, tables: list[torch.Tensor]) -> None:
        """Write each pool's changed entries into its device table (``tables`` in the pools' order)."""
        for blocks, table in zip(self.pools, tables, strict=True):
            blocks.flush(table)

"""``DecodeAttention``: one layer's whole attention step (attention spec §7), ``xn [B, S, D] -> y [B, S, D]``,
as a module that owns the layer's weights, RoPE table and state (its KV pools paged on the host)."""

from __future__ import annotations

import copy
import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .. import ops
from ..model.attention_state import CompressorState, KVPool, rerun_exact
from ..model.config import COMPRESS_RATIO, DeepSeekV4Config
from ..model.rope import RopeTable
from ..model.state import DEFAULT_BLOCK_SIZE, UNALLOCATED, IndexerState
from ..model.structs import IndexerOut
from ..model.weights import AttnWeights, CompressorWeights, IndexerWeights, LayerWeights, OProjWeights
from ..ops.backends import BACKENDS
from ..ops.registry import get_op
from ..ops.validate import check_eps, check_int
from .frontend import _host_ints
from .staging import staged, write_cells

if TYPE_CHECKING:
    from .attention_graph import AttentionGraph

_ATTN = ("wq_a", "gamma_cq", "wq_b", "wq_b_scale", "wkv", "gamma_ckv")
_INDEXER = ("wq_b", "wq_b_scale", "weights_proj")
_COMPRESSOR = ("wkv", "wgate", "ape", "norm_w")
_O_PROJ = ("wo_a", "wo_a_scale", "wo_b", "wo_b_scale")
_POOL = ("nope", "rope", "scale", "block_table")
_INDEXER_STATE = ("kv_state", "score_state", "keys", "key_scale", "block_table")
DEFAULT_PREFILL_CHUNK = 128  # tokens per step when a call brings more (one seeds' prefill chunk)
OPS = ("qkv_proj_rope", "kv_compressor", "indexer", "sparse_attn_write", "o_proj")


@dataclass
class _Blocks:
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
    def new(cls, num_blocks: int, batch: int) -> _Blocks:
        return cls(list(range(num_blocks)), [{} for _ in range(batch)], [range(0)] * batch)  # sorted: a heap

    def _unknown(self, b: int, columns: range) -> range:
        """The part of ``columns`` that slot ``b`` may lack: past its run where they start inside it."""
        run = self.runs[b]
        return range(max(columns.start, run.stop), columns.stop) if run.start <= columns.start <= run.stop else columns

    def need(self, b: int, columns: range) -> int:
        slot = self.slots[b]
        return sum(c not in slot for c in self._unknown(b, columns))

    def give(self, b: int, columns: range) -> None:
        slot = self.slots[b]
        for c in self._unknown(b, columns):
            if c not in slot:
                slot[c] = heapq.heappop(self.free)
                self.table.append([b, c, slot[c]])
        if not columns:
            return
        run = self.runs[b]
        if run and run.start <= columns.stop and columns.start <= run.stop:  # touching: the union is held
            lo, hi = min(run.start, columns.start), max(run.stop, columns.stop)
        else:
            lo, hi = columns.start, columns.stop
        while hi in slot:
            hi += 1
        self.runs[b] = range(lo, hi)

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


class DecodeAttention(torch.nn.Module):
    """One attention layer of any kind (SWA, CSA, HCA) for ``batch`` sequence slots, step after step.

    ``forward(xn)`` runs spec §7: ``qkv_proj_rope``; ``kv_compressor`` (CSA, HCA); ``indexer``
    (CSA, ``offset`` = the window); ``sparse_attn_write`` (``sparse_attn`` and ``window_kv_write`` in
    one op: one launch on Triton); ``o_proj``. Weights, the RoPE
    table and the ``AttentionState`` parts are buffers (``.to(device)`` moves them all). Each slot
    remembers where its sequence stands; ``reset(rows)`` hands slots to new sequences.

    The pools are paged on the host, so allocation never waits on the device: a slot gets window
    blocks as its sequence grows and gives back those whose positions no later token sees (all
    ``<= start - W`` of the step just run), and gets compressed and indexer blocks as rows close
    (kept until ``reset``). A call that needs more blocks than are free raises before anything
    runs. A call longer than ``prefill_chunk`` tokens runs as steps of that many.

    Re-running positions (a rejected draft token): a step may start anywhere from the previous
    step's start to where the slot stands; the ring of each compressor must still hold what the
    re-run reads (``start + k <= max(COFF*RC, RC*(start // RC) + RC)`` with ``k`` the positions run
    since ``start``; always true for one rejected draft token); anything else is refused.

    Args:
        weights: the layer's whole ``LayerWeights`` (``load_layer`` or ``synthetic_weights(cfg, layer=N)``).
        rope: the layer's ``RopeTable`` (``layer_rope_table``); it must cover ``max_position``.
        cfg: the model's config (window, top-k, eps).
        batch: sequence slots; max_position: longest sequence a slot holds.
        backend: ``"auto"``, ``"reference"`` or ``"triton"``; an op without the named backend's
            implementation runs on the reference (``op_backends`` says which runs where).
        block_size: rows per pool block; num_blocks: per pool (``"window"``, ``"compressed"``,
            ``"indexer"``), default enough for every slot to reach ``max_position``.
        prefill_chunk: the longest step a call is split into.
    """

    def __init__(
        self,
        weights: LayerWeights,
        rope: RopeTable,
        cfg: DeepSeekV4Config,
        *,
        batch: int,
        max_position: int,
        backend: str = "auto",
        block_size: int = DEFAULT_BLOCK_SIZE,
        num_blocks: dict[str, int] | None = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    ) -> None:
        super().__init__()
        if not isinstance(weights, LayerWeights):
            raise TypeError(f"weights: expected LayerWeights, got {type(weights).__name__}")
        if not weights.whole:
            raise ValueError("weights: the layer's attn_sink and o_proj are missing (only a front end is held)")
        if not isinstance(rope, RopeTable):
            raise TypeError(f"rope: expected RopeTable, got {type(rope).__name__}")
        if not isinstance(cfg, DeepSeekV4Config):
            raise TypeError(f"cfg: expected DeepSeekV4Config, got {type(cfg).__name__}")
        check_int("batch", batch, 1)
        self.ratio = weights.compress_ratio
        check_int("max_position", max_position, max(1, self.ratio))
        check_int("prefill_chunk", prefill_chunk, 1)
        check_int("block_size", block_size, 16)
        if block_size & (block_size - 1):
            raise ValueError(f"block_size: expected a power of two >= 16, got {block_size}")
        if rope.max_position < max_position:
            raise ValueError(f"rope: the table has {rope.max_position} positions, max_position is {max_position}")
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"backend: expected 'auto' or one of {', '.join(BACKENDS)}, got {backend!r}")
        check_eps(cfg.rms_norm_eps)
        self.kind, self.window, self.topk = weights.kind, cfg.sliding_window, cfg.index_topk
        self.eps, self.backend, self.prefill_chunk = cfg.rms_norm_eps, backend, prefill_chunk
        self._buffers_of("attn", weights.attn, _ATTN)
        self._buffers_of("o", weights.o_proj, _O_PROJ)
        self.register_buffer("attn_sink", weights.attn_sink)
        self.register_buffer("rope_cos", rope.cos)
        self.register_buffer("rope_sin", rope.sin)
        device = weights.attn.wq_a.device
        hd, r = weights.attn.wkv.shape[0], rope.rope_dim
        blocks = dict(num_blocks or {})
        unknown = set(blocks) - {"window", "compressed", "indexer"}
        if unknown:
            raise ValueError(f"num_blocks: expected keys among window, compressed, indexer, got {sorted(unknown)}")

        def pool_size(name: str, rows: int) -> tuple[int, int]:  # (table width, blocks)
            width = -(-rows // block_size)
            n = blocks.get(name, batch * width)
            check_int(f"num_blocks[{name!r}]", n, 1)
            return width, n

        width, n = pool_size("window", max_position)
        self._pool_buffers("win", KVPool.paged(n, block_size, hd, r, torch.full((batch, width), UNALLOCATED), device))
        self.win_blocks = _Blocks.new(n, batch)
        self.cmp_blocks = self.idx_blocks = None
        if self.ratio:
            self._buffers_of("cmp_w", weights.compressor, _COMPRESSOR)
            width, n = pool_size("compressed", max_position // self.ratio)
            table = torch.full((batch, width), UNALLOCATED)
            state = CompressorState.paged(batch, self.ratio, hd, r, n, block_size, table, device)
            self.register_buffer("cmp_kv_state", state.kv_state)
            self.register_buffer("cmp_score_state", state.score_state)
            self._pool_buffers("cmp", state.pool)
            self.cmp_blocks = _Blocks.new(n, batch)
        if self.kind == "csa":
            self._buffers_of("idx_w", weights.indexer, _INDEXER)
            self._buffers_of("idx_c", weights.indexer.compressor, _COMPRESSOR)
            hid = weights.indexer.compressor.norm_w.shape[0]
            width, n = pool_size("indexer", max_position // COMPRESS_RATIO)
            state = IndexerState.paged(batch, n, block_size, hid, torch.full((batch, width), UNALLOCATED), device)
            self._buffers_of("idx", state, _INDEXER_STATE)
            self.idx_blocks = _Blocks.new(n, batch)
        self.win_block_size = block_size  # rows per block, in every pool
        self._limit = min(rope.max_position, self.win_block_table.shape[1] * block_size)  # positions a slot may reach
        self._ratios = [r for r in (self.ratio, COMPRESS_RATIO if self.kind == "csa" else 0) if r]  # compressed pools'
        self.next_pos = [0] * batch  # where each slot's next token sits (host-side: no device sync)
        self.last_start = [0] * batch  # the start of each slot's last step (re-runs may go back to it)
        self._quiet = [(1, 0, 0)] * batch  # per slot, the steps that change none of its blocks (_quiet_bounds)
        self._checked: tuple[list[int], int, list] | None = None  # the last one-step check's plan, until pools change
        self.op_backends = {op: self._op_backend(op, device) for op in OPS}

    # --- buffers and the records built from them ----------------------------------------------

    def _buffers_of(self, prefix: str, record: object, names: tuple[str, ...]) -> None:
        for name in names:
            self.register_buffer(f"{prefix}_{name}", getattr(record, name))

    def _pool_buffers(self, prefix: str, pool: KVPool) -> None:
        self._buffers_of(prefix, pool, _POOL)

    def _get(self, prefix: str, names: tuple[str, ...]) -> list[torch.Tensor]:
        return [getattr(self, f"{prefix}_{n}") for n in names]

    @property
    def attn(self) -> AttnWeights:
        return AttnWeights(*self._get("attn", _ATTN))

    @property
    def o_weights(self) -> OProjWeights:
        return OProjWeights(*self._get("o", _O_PROJ))

    @property
    def compressor_weights(self) -> CompressorWeights | None:
        return CompressorWeights(*self._get("cmp_w", _COMPRESSOR)) if self.ratio else None

    @property
    def indexer_weights(self) -> IndexerWeights | None:
        if self.kind != "csa":
            return None
        return IndexerWeights(*self._get("idx_w", _INDEXER), CompressorWeights(*self._get("idx_c", _COMPRESSOR)))

    @property
    def rope(self) -> RopeTable:
        return RopeTable(self.rope_cos, self.rope_sin)

    @property
    def window_pool(self) -> KVPool:
        return KVPool(*self._get("win", _POOL))

    @property
    def compressor_state(self) -> CompressorState | None:
        if not self.ratio:
            return None
        return CompressorState(self.cmp_kv_state, self.cmp_score_state, KVPool(*self._get("cmp", _POOL)))

    @property
    def indexer_state(self) -> IndexerState | None:
        return IndexerState(*self._get("idx", _INDEXER_STATE)) if self.kind == "csa" else None

    @property
    def batch(self) -> int:
        return len(self.next_pos)

    def _op_backend(self, op: str, device: torch.device) -> str:
        name = self.backend
        if name == "auto":
            name = "triton" if device.type == "cuda" else "reference"
        return name if name in get_op(op).implementations else "reference"

    # --- slots and blocks -----------------------------------------------------------------------

    def reset(self, batch_rows: int | list[int] | torch.Tensor) -> None:
        """Empty the given slots: their blocks go back to the pools, their rings are cleared; their
        next token sits at position 0."""
        rows = _host_ints("batch_rows", batch_rows)
        for r in rows:
            if not 0 <= r < self.batch:
                raise ValueError(f"batch_rows: slot {r} outside [0, {self.batch})")
        for blocks, table in self._allocators():
            for r in rows:
                blocks.take_back(r, sorted(blocks.slots[r]))
            blocks.flush(table)
        self._requiet(rows)
        if self.ratio:
            self.compressor_state.reset(rows)
        if self.kind == "csa":
            self.indexer_state.reset(rows)
        for r in rows:
            self.next_pos[r] = self.last_start[r] = 0
        self._checked = None

    def _allocators(self) -> list[tuple[_Blocks, torch.Tensor]]:
        out = [(self.win_blocks, self.win_block_table)]
        if self.cmp_blocks is not None:
            out.append((self.cmp_blocks, self.cmp_block_table))
        if self.idx_blocks is not None:
            out.append((self.idx_blocks, self.idx_block_table))
        return out

    def _pools(self) -> list[_Blocks]:
        return [blocks for blocks in (self.win_blocks, self.cmp_blocks, self.idx_blocks) if blocks is not None]

    def _plan(self, starts: list[int], s: int, pools: list[_Blocks] | None = None) -> list[tuple[_Blocks, list, list]]:
        """For each pool (window, then compressed and indexer where the layer has them):
        ``(pool, [(slot, columns it must hold)], [(slot, columns to give back after the step)])`` for
        a step of ``s`` tokens from ``starts``. The window holds the rows the step reads and writes
        and gives back the blocks whose rows are all ``<= start - W`` (no later token sees them);
        the compressed and indexer pools hold every row up to the step's last close. On the module's
        own pools (``pools`` None) only the slots outside their quiet bounds are looked at; on
        ``pools`` given (copies, for a call of several steps) every slot is."""
        if pools is None:
            pools = self._pools()
            slots = [b for b, (p, (lo, hi, end)) in enumerate(zip(starts, self._quiet, strict=False))
                     if not (lo <= p < hi and p + s <= end)]  # fmt: skip
        else:
            slots = range(len(starts))
        bs, w = self.win_block_size, self.window
        window = pools[0]
        give, free = [], []  # only the slots whose blocks change: most steps of a slot change none
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
        plan = [(window, give, free)]
        for blocks, ratio in zip(pools[1:], self._ratios, strict=True):
            give = []
            for b in slots:
                n, run = -(-((starts[b] + s) // ratio) // bs), blocks.runs[b]
                if n > run.stop or (n and run.start):
                    give.append((b, range(0, n)))
            plan.append((blocks, give, []))
        return plan

    def _quiet_bounds(self, b: int) -> tuple[int, int, int]:
        """``(lo, hi, end)``: a step of slot ``b`` from ``p`` with ``lo <= p < hi`` and ``p + s <= end``
        changes none of its blocks (``_plan`` finds nothing for it); ``(1, 0, 0)``, never, where the
        slot's blocks are not the runs a decode step keeps (a scattered window, a compressed run not
        from 0). Read off the runs: the window's first held column is the first one a step from ``p``
        still sees, its last holds ``p + s - 1``; each compressed pool holds the rows up to ``p + s``."""
        bs, w = self.win_block_size, self.window
        pools = self._pools()
        run = pools[0].runs[b]
        if not run or len(pools[0].slots[b]) != len(run) or any(pool.runs[b].start for pool in pools[1:]):
            return (1, 0, 0)
        lo = run.start * bs + w - 1 if run.start else 0
        ends = [(pool.runs[b].stop * bs + 1) * r - 1 for pool, r in zip(pools[1:], self._ratios, strict=True)]
        return (lo, (run.start + 1) * bs + w - 1, min([run.stop * bs, *ends]))

    def _requiet(self, slots: Iterable[int]) -> None:
        for b in slots:
            self._quiet[b] = self._quiet_bounds(b)

    def _check_capacity(self, steps: list[tuple[list[int], int]]) -> None:
        """Raise, changing nothing, when the pools cannot hold the blocks ``steps`` need. A call of
        several steps is simulated on copies of the pools; one step (every decode step) only reads them,
        and its plan is kept for ``begin_step``."""
        names = ["window", "compressed", "indexer"]
        pools = [copy.deepcopy(blocks) for blocks in self._pools()] if len(steps) > 1 else None
        for i, (starts, s) in enumerate(steps):
            plan = self._plan(starts, s, pools)
            for (pool, give, free), name in zip(plan, names, strict=False):
                need = sum(pool.need(b, cols) for b, cols in give)
                if need > len(pool.free):
                    raise ValueError(
                        f"xn: the step needs {need} more {name} pool blocks, {len(pool.free)} are free; reset finished "
                        "slots or build the module with more num_blocks"
                    )
                if i + 1 < len(steps):  # the copies: only a later step reads what this one leaves
                    for b, cols in give:
                        pool.give(b, cols)
                    for b, cols in free:
                        pool.take_back(b, cols)
        if pools is None:
            self._checked = (steps[0][0], steps[0][1], plan)

    def _step_starts(self, b: int, s: int, start_pos: int | list[int] | torch.Tensor | None) -> list[int]:
        if start_pos is None:
            return self.next_pos[:b]
        start = [start_pos] * b if isinstance(start_pos, int) and not isinstance(start_pos, bool) else None
        start = start or _host_ints("start_pos", start_pos)
        if len(start) != b:
            raise ValueError(f"start_pos: expected {b} positions (one per slot of xn), got {len(start)}")
        for i, p in enumerate(start):
            if p > self.next_pos[i]:
                raise ValueError(
                    f"start_pos: slot {i} stands at {self.next_pos[i]}; a step cannot start at {p} (later)"
                )
            if p < self.next_pos[i]:
                self._check_rerun(i, p)
        return list(start)

    def _check_rerun(self, i: int, p: int) -> None:
        """A step going back to ``p`` in slot ``i`` re-runs positions: refused unless exact (see the class)."""
        if p < self.last_start[i]:
            raise ValueError(
                f"start_pos: slot {i} can go back to {self.last_start[i]} (its last step's start) at the earliest, "
                f"got {p}"
            )
        high = self.next_pos[i]
        for ratio in self._ratios:
            if not rerun_exact(p, high, ratio):
                raise ValueError(
                    f"start_pos: slot {i} ran to {high - 1}; re-running from {p} would read compressor ring slots "
                    f"(ratio {ratio}) that later positions overwrote"
                )

    def capture(self, seq: int = 2) -> AttentionGraph:
        """The whole attention step of every slot, ``seq`` tokens each, as one CUDA graph on a GPU
        (no host sync, no allocation; replay equal to ``forward`` bit for bit); on a CPU the same
        static launches run eagerly. See ``AttentionGraph``."""
        from .attention_graph import AttentionGraph

        return AttentionGraph(self, seq)

    # --- the step ---------------------------------------------------------------------------------

    def forward(self, xn: torch.Tensor, start_pos: int | list[int] | torch.Tensor | None = None) -> torch.Tensor:
        """One call of ``S`` tokens for slots ``0..B-1``: ``xn [B, S, D] bf16`` (after ``attn_norm``) ->
        ``y [B, S, D] bf16`` (to ``hc_post``). ``start_pos``: by default where each slot stands; an
        earlier position re-runs (see the class). Split into steps of at most ``prefill_chunk`` tokens."""
        if not isinstance(xn, torch.Tensor) or xn.dim() != 3:
            raise ValueError(f"xn: expected a [B, S, D] tensor, got {getattr(xn, 'shape', type(xn).__name__)}")
        b, s, d = xn.shape
        if xn.dtype != torch.bfloat16:
            raise TypeError(f"xn: expected dtype bfloat16, got {str(xn.dtype).removeprefix('torch.')}")
        if b < 1 or s < 1 or b > self.batch or d != self.attn_wq_a.shape[1]:
            raise ValueError(
                f"xn: expected [B <= {self.batch}, S >= 1, {self.attn_wq_a.shape[1]}], got {list(xn.shape)}"
            )
        if xn.device != self.attn_wq_a.device:
            raise ValueError(f"xn: expected device {self.attn_wq_a.device}, got {xn.device}")
        starts = self.step_starts(b, s, start_pos, self.prefill_chunk)
        chunks = [(c, min(self.prefill_chunk, s - c)) for c in range(0, s, self.prefill_chunk)]
        return torch.cat([self._step(xn[:, c : c + n], [p + c for p in starts]) for c, n in chunks], dim=1)

    def step_starts(self, b: int, s: int, start_pos: int | list[int] | torch.Tensor | None, chunk: int) -> list[int]:
        """The host start positions of a call of ``s`` tokens for slots ``0..b-1`` run in steps of at
        most ``chunk``, checked (re-runs, ``max_position``, free pool blocks); changes nothing."""
        starts = self._step_starts(b, s, start_pos)
        if max(starts) + s > self._limit:
            raise ValueError(
                f"start_pos: a slot would pass position {self._limit - 1} (max_position), S={s}, starts {starts}"
            )
        chunks = [(c, min(chunk, s - c)) for c in range(0, s, chunk)]
        self._check_capacity([([p + c for p in starts], n) for c, n in chunks])
        return starts

    def begin_step(self, starts: list[int], s: int) -> list[tuple[_Blocks, list, list]]:
        """Host side of a step about to run ``s`` tokens per slot from ``starts``: give each slot the
        blocks it will read and write, and write the changed table entries (device fills, no sync).
        Returns the plan ``end_step`` takes."""
        checked, self._checked = self._checked, None
        plan = checked[2] if checked is not None and checked[:2] == (starts, s) else self._plan(starts, s)
        for blocks, give, _ in plan:
            for i, cols in give:
                blocks.give(i, cols)
        self._requiet({i for _, give, _ in plan for i, _ in give})
        if any(blocks.table for blocks in self._pools()):
            for blocks, table in self._allocators():
                blocks.flush(table)
        return plan

    def end_step(self, plan: list[tuple[_Blocks, list, list]], starts: list[int], s: int) -> None:
        """Host side of a step that ran: take back the window blocks no later token sees, and move
        each slot to ``start + s``."""
        for blocks, _, free in plan:
            for i, cols in free:
                blocks.take_back(i, cols)
        self._requiet({i for _, _, free in plan for i, _ in free})
        if self._checked is not None:  # a check made mid-step planned on the pools before these changes
            self._checked = None
        self.win_blocks.flush(self.win_block_table)
        n = len(starts)
        self.last_start[:n], self.next_pos[:n] = starts, [p + s for p in starts]

    def _step(self, xn: torch.Tensor, starts: list[int]) -> torch.Tensor:
        b, s, d = xn.shape
        plan = self.begin_step(starts, s)
        start = staged(starts, xn.device).to(xn.device, non_blocking=True)
        positions = (start[:, None] + torch.arange(s, device=xn.device)).reshape(-1)
        be, rope, eps = self.op_backends, self.rope, self.eps
        xn = xn.contiguous()
        qkv = ops.qkv_proj_rope(xn.reshape(b * s, d), self.attn, positions, rope, eps=eps, backend=be["qkv_proj_rope"])
        q, kv = qkv.q.view(b, s, *qkv.q.shape[1:]), qkv.kv.view(b, s, -1)
        if self.ratio:
            ops.kv_compressor(
                xn, self.compressor_weights, self.compressor_state, start, rope, eps=eps, backend=be["kv_compressor"]
            )
        topk = None
        if self.kind == "csa":
            width = max((p + s) // COMPRESS_RATIO for p in starts)
            out = IndexerOut(
                torch.empty(b, s, width, dtype=torch.float32, device=xn.device),
                torch.empty(b, s, self.topk, dtype=torch.int32, device=xn.device),
            )
            topk = ops.indexer(
                xn, qkv.qr, qkv.qr_scale, self.indexer_weights, self.indexer_state, start, self.window, rope,
                topk=self.topk, eps=eps, backend=be["indexer"], out=out,
            ).topk_idxs  # fmt: skip
        o = ops.sparse_attn_write(
            q, kv, start, self.window_pool, self.attn_sink, rope, kind=self.kind, window=self.window,
            compress_ratio=self.ratio, compressed_pool=self.compressor_state.pool if self.ratio else None,
            topk_idxs=topk, topk_offset=self.window if topk is not None else 0, backend=be["sparse_attn_write"],
        ).o  # fmt: skip
        y = ops.o_proj(o.view(b * s, *o.shape[2:]), self.o_weights, backend=be["o_proj"]).y
        self.end_step(plan, starts, s)
        return y.view(b, s, d)

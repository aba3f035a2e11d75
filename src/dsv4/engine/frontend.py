"""``DecodeFrontEnd``: one layer's attention front end as a module that owns its indexer state."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..model.attention_state import rerun_exact, restore_rings, save_rings
from ..model.config import COMPRESS_RATIO
from ..model.rope import RopeTable
from ..model.state import DEFAULT_BLOCK_SIZE, UNALLOCATED, IndexerState
from ..model.structs import IndexerOut, StepPositions
from ..model.weights import AttnWeights, CompressorWeights, IndexerWeights, LayerWeights
from ..ops.backends import BACKENDS, resolve
from ..ops.device import on_device, spec_numerics
from ..ops.validate import check_eps, check_int, check_offset, check_tensor, check_topk
from .decode_graph import DecodeGraph, StaticDecodeStep
from .op_checks import CheckedBuffers, check_front_end_ops, not_compiled, refuse_capture
from .staging import host_ints, staged, write_cells

_ATTN = ("wq_a", "gamma_cq", "wq_b", "wq_b_scale", "wkv", "gamma_ckv")
_INDEXER = ("wq_b", "wq_b_scale", "weights_proj")
_COMPRESSOR = ("wkv", "wgate", "ape", "norm_w")
ROLLBACK_RULE = "r + k <= max(8, 4*(r//4) + 4), spec §4 'Re-running positions'"


def rollback_exact(r: int, current: int) -> bool:
    """Whether a slot at ``current`` that starts a step again at ``r < current`` (re-running
    ``k = current - r`` positions, e.g. rejected draft tokens) gets exactly a fresh run's results
    (spec §4): ``r + k <= max(8, 4*(r//4) + 4)``, i.e. no position run since ``r`` has overwritten
    a ring slot the re-run still reads."""
    return rerun_exact(r, current, COMPRESS_RATIO)


class DecodeFrontEnd(CheckedBuffers):
    """Runs ``qkv_proj_rope`` then ``indexer`` for ``batch`` sequence slots, step after step.

    Weights, the RoPE table and the ``IndexerState`` are buffers of the module (``.to(device)``
    moves them all); ``state_dict`` holds the weights and the RoPE table only (the state and its
    block table belong to the slots' sequences, which the host's allocator tracks). Both ops' checks
    (spec §7) run on the buffers when the module is built, and again on the first call after they
    change (``.to()``, a cast, a buffer replaced; the state and its block table must then keep their
    shapes, the RoPE table cover ``max_position``); each step launches the ops without them. An op
    on Triton (``"triton"``, or ``"auto"`` on CUDA) also has its kernels' dims checked then: a hidden
    size D not a multiple of 16, say, is a ``ValueError`` naming the op and the weight at build, not
    on the first call; ``backend="reference"`` runs such a layer. Each
    slot remembers where its sequence stands, so ``forward(x)`` continues every sequence;
    ``reset(rows)`` hands slots to new sequences (continuous batching).

    The key pool is paged: a slot is given pool blocks (``block_size`` compressed rows each) as its
    sequence grows, and gives them back on ``reset``; a step that needs more blocks than are free
    raises before anything runs. The allocator lives on the host, so it never waits on the device.
    A call that raises changes nothing a later call sees: positions, block table and free list stay as
    they were, and so do the ring rows a step from the same positions reads (an op that fails partway,
    out of memory, after the indexer's compressor wrote its ring: the rows it overwrote are put back);
    key rows past where a slot stands may hold the failed step's writes, which a step writes again
    before it reads them, so the step run again equals a fresh run.

    A step may start a slot again at an earlier position ``r`` (speculative decoding: rejected draft
    tokens) when that re-run equals a fresh run (spec §4, ``rollback_exact``); a deeper rollback is
    refused. The slot keeps the pool blocks it holds past ``r`` (its table is unchanged; the re-run
    rewrites those rows and ``reset`` frees them). A start later than where the slot stands is refused:
    the positions skipped never ran, and the blocks it would be given may hold another sequence's keys.

    Args:
        weights: the layer's ``LayerWeights``.
        rope: the layer's ``RopeTable``; it must cover ``max_position``.
        batch: sequence slots.
        max_position: longest sequence a slot holds (up to ``max_position // 4`` compressed rows).
        topk: indices selected per token (``index_topk``, 1..``MAX_TOPK``); offset: added to them (the
            window size), ``>= 0``.
        backend: ``"auto"``, ``"reference"`` or ``"triton"`` (``op_backends`` says which runs where).
        block_size: compressed rows per pool block (a power of two >= 16).
        num_blocks: blocks in the pool (default: enough for every slot to reach ``max_position``).

    Raises ``TypeError``/``ValueError`` naming the argument for anything else (``batch >= 1``,
    ``max_position >= 4``, a rope table of at least ``max_position`` rows, ``num_blocks >= 1``;
    every size a Python int).
    """

    def __init__(
        self,
        weights: LayerWeights,
        rope: RopeTable,
        *,
        batch: int,
        max_position: int,
        topk: int,
        offset: int,
        eps: float = 1e-6,
        backend: str = "auto",
        block_size: int = DEFAULT_BLOCK_SIZE,
        num_blocks: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(weights, LayerWeights):
            raise TypeError(f"weights: expected LayerWeights, got {type(weights).__name__}")
        if weights.indexer is None:
            raise ValueError(
                f"weights: a {weights.kind} layer has no lightning indexer (the front end needs a CSA layer)"
            )
        if not isinstance(rope, RopeTable):
            raise TypeError(f"rope: expected RopeTable, got {type(rope).__name__}")
        check_int("batch", batch, 1)
        check_int("max_position", max_position, COMPRESS_RATIO)
        check_int("block_size", block_size, 16)
        if block_size & (block_size - 1):
            raise ValueError(f"block_size: expected a power of two >= 16, got {block_size}")
        if num_blocks is not None:
            check_int("num_blocks", num_blocks, 1)
        if rope.max_position < max_position:
            raise ValueError(f"rope: the table has {rope.max_position} positions, max_position is {max_position}")
        check_topk(topk)
        check_offset(offset, max_position // COMPRESS_RATIO)
        check_eps(eps)
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"backend: expected 'auto' or one of {', '.join(BACKENDS)}, got {backend!r}")
        for name in _ATTN:
            self.register_buffer(f"attn_{name}", getattr(weights.attn, name))
        for name in _INDEXER:
            self.register_buffer(f"indexer_{name}", getattr(weights.indexer, name))
        for name in _COMPRESSOR:
            self.register_buffer(f"compressor_{name}", getattr(weights.indexer.compressor, name))
        self.register_buffer("rope_cos", rope.cos)
        self.register_buffer("rope_sin", rope.sin)
        hid = weights.indexer.compressor.norm_w.shape[0]
        device = weights.attn.wq_a.device
        per_slot = -(-(max_position // COMPRESS_RATIO) // block_size)  # table width
        num_blocks = batch * per_slot if num_blocks is None else num_blocks
        table = torch.full((batch, per_slot), UNALLOCATED, dtype=torch.int32)
        state = IndexerState.paged(batch, num_blocks, block_size, hid, table, device)
        for name, t in state.tensors().items():
            self.register_buffer(name, t, persistent=False)  # the sequences' state: not in state_dict
        self.topk, self.offset, self.eps, self.backend = topk, offset, eps, backend
        self.max_position = max_position
        self.next_pos = [0] * batch  # where each slot's next token sits (host-side: no device sync)
        self.slot_blocks: list[list[int]] = [[] for _ in range(batch)]  # each slot's pool blocks, in row order
        self.free_blocks = list(range(num_blocks))  # handed out lowest first
        self.last_score: torch.Tensor | None = None
        self._keep_sizes(max_position)
        self.recheck()  # each op's backend and checks on these buffers (again after they change: CheckedBuffers)

    def _check_ops(self) -> None:
        """The buffers' sizes against the host's bookkeeping (``_check_sizes``: the state and its block
        table as built, a RoPE table covering ``max_position``), each op's backend on the buffers' device
        (``op_backends``), then both ops' checks on the module's buffers (``check_front_end_ops``; on
        Triton also the kernels' dims): at build, and after the buffers change (``recheck``)."""
        self._check_sizes()
        self._resolve_backends(("qkv_proj_rope", "indexer"), self.attn_wq_a.device)
        check_front_end_ops(
            self.attn, self.indexer_weights, self.rope, self.state, self.topk, self.offset, self.eps, self.op_backends
        )

    @property
    def attn(self) -> AttnWeights:
        return AttnWeights(*(getattr(self, f"attn_{n}") for n in _ATTN))

    @property
    def indexer_weights(self) -> IndexerWeights:
        comp = CompressorWeights(*(getattr(self, f"compressor_{n}") for n in _COMPRESSOR))
        wq_b, wq_b_scale, weights_proj = (getattr(self, f"indexer_{n}") for n in _INDEXER)
        return IndexerWeights(wq_b, wq_b_scale, weights_proj, comp)

    @property
    def rope(self) -> RopeTable:
        return RopeTable(self.rope_cos, self.rope_sin)

    @property
    def state(self) -> IndexerState:
        return IndexerState(self.kv_state, self.score_state, self.keys, self.key_scale, self.block_table)

    @property
    def batch(self) -> int:
        return len(self.next_pos)

    def reset(self, batch_rows: int | list[int] | torch.Tensor) -> None:
        """Empty the given slots; their next token sits at position 0."""
        refuse_capture(self.attn_wq_a.device, "DecodeFrontEnd.reset", "DecodeFrontEnd.capture(seq)")
        rows = host_ints("batch_rows", batch_rows)
        for r in rows:
            if not 0 <= r < self.batch:
                raise ValueError(f"batch_rows: slot {r} outside [0, {self.batch})")
        with self.writing():
            self.state.reset(rows)
            for r in rows:
                self.block_table[r] = UNALLOCATED
        for r in rows:
            self.next_pos[r] = 0
            self.free_blocks = sorted(self.free_blocks + self.slot_blocks[r])
            self.slot_blocks[r] = []

    def check_starts(self, b: int, s: int, start_pos: int | list[int] | torch.Tensor | None) -> list[int]:
        """Each slot's first position for a step of ``b`` x ``s`` tokens, checked on the host (a device
        ``start_pos`` tensor is read there: the module keeps positions on the host): inside
        ``max_position``, the rope table and the block table, no later than where the slot stands, and
        no rollback deeper than spec §4 allows (``rollback_exact``). Changes nothing."""
        if b > self.batch:
            raise ValueError(f"b: batch {b} exceeds the module's {self.batch} slots")
        if start_pos is None:
            start = self.next_pos[:b]
        elif isinstance(start_pos, int) and not isinstance(start_pos, bool):
            start = [start_pos] * b
        else:
            start = host_ints("start_pos", start_pos)
        limit = self.max_position  # the table's rows and the rope cover every position below it
        if len(start) != b or (start and (min(start) < 0 or max(start) + s > limit)):
            raise ValueError(
                f"start_pos: expected {b} positions in [0, {limit - s}] (S={s}, max_position={self.max_position}), "
                f"got {start!r:.120}"
            )
        slots = [] if start_pos is None else range(b)  # by default each slot starts where it stands
        for slot, r, current in [(i, start[i], self.next_pos[i]) for i in slots if start[i] > self.next_pos[i]]:
            raise ValueError(
                f"start_pos: slot {slot} stands at position {current}; a step cannot start at {r} (later): "
                f"positions {current}..{r - 1} never ran, so the compressor and the key cache hold none of them"
            )
        for slot, r, current in [(i, start[i], self.next_pos[i]) for i in slots if start[i] < self.next_pos[i]]:
            if not rollback_exact(r, current):
                raise ValueError(
                    f"start_pos: slot {slot} is at position {current}; starting it again at r={r} re-runs "
                    f"k={current - r} positions, deeper than a re-run equals a fresh run ({ROLLBACK_RULE}); "
                    "reset the slot and run its sequence again instead"
                )
        return list(start)

    def step_starts(self, b: int, s: int, start_pos: int | list[int] | torch.Tensor | None) -> list[int]:
        """``check_starts``, then the pool blocks the step needs are reserved (``reserve``)."""
        start = self.check_starts(b, s, start_pos)
        self.reserve(start, s)
        return start

    def reserve(self, start: list[int], s: int) -> list[tuple[int, int]]:
        """Give each slot ``b`` the pool blocks its rows up to ``(start[b] + s) // 4`` need; raises,
        changing nothing, when the pool has too few free blocks. Returns the ``(slot, block)`` pairs
        given, in order (``release`` takes them back)."""
        block_size = self.keys.shape[1]
        rows = [(p + s) // COMPRESS_RATIO for p in start]  # the rows each slot holds after the step
        held = self.slot_blocks
        need = {b: -(-n // block_size) - len(held[b]) for b, n in enumerate(rows) if n > len(held[b]) * block_size}
        if sum(need.values()) > len(self.free_blocks):
            raise ValueError(
                f"start_pos: the step needs {sum(need.values())} more pool blocks, {len(self.free_blocks)} are free "
                f"(num_blocks={self.keys.shape[0]}); reset finished slots or build the module with more blocks"
            )
        given, cells = [], []
        for b, n in need.items():
            for _ in range(n):
                block = self.free_blocks.pop(0)
                cells.append((b, len(self.slot_blocks[b]), block))
                self.slot_blocks[b].append(block)
                given.append((b, block))
        write_cells(self.block_table, cells)  # one copy and one scatter: no host sync
        return given

    def release(self, given: list[tuple[int, int]]) -> None:
        """Undo ``reserve``: the blocks it gave (``(slot, block)`` pairs, in order) go back to the free list."""
        cells = []
        for b, block in reversed(given):
            assert self.slot_blocks[b][-1] == block, "release: blocks must come back in reverse order"
            self.slot_blocks[b].pop()
            cells.append((b, len(self.slot_blocks[b]), UNALLOCATED))
        write_cells(self.block_table, cells)
        self.free_blocks = sorted(self.free_blocks + [block for _, block in given])

    @contextmanager
    def reserved(self, start: list[int], s: int, rings: bool = True) -> Iterator[None]:
        """``reserve`` for a step, released again if the step raises: a refused call leaves the allocator
        as it was. With ``rings``, the ring rows the step overwrites that a step from the same starts
        reads again (``model.attention_state.save_rings``: none for a step of one token) are copied
        first and put back if the step raises, so the step run again equals a fresh run."""
        saved = save_rings([(COMPRESS_RATIO, (self.kv_state, self.score_state))], start, s) if rings else []
        given = self.reserve(start, s)
        try:
            yield
        except BaseException:
            restore_rings(saved)
            self.release(given)
            raise

    def check_x(self, x: object) -> tuple[int, int, int]:
        """``x [B, S, D] bf16`` on the module's device, contiguous, ``1 <= B <= batch``, ``S >= 1``, ``D``
        the hidden size; returns ``(B, S, D)``."""
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise ValueError(f"x: expected a [B, S, D] tensor, got {getattr(x, 'shape', type(x).__name__)}")
        d = self.attn_wq_a.shape[1]
        check_tensor("x", x, torch.bfloat16, (None, None, d), self.attn_wq_a.device)
        b, s, _ = x.shape
        if not (1 <= b <= self.batch and s >= 1):
            raise ValueError(f"x: expected 1 <= B <= {self.batch} and S >= 1, got shape {list(x.shape)}")
        return b, s, d

    def advance(self, start: list[int], s: int) -> None:
        self.next_pos[: len(start)] = [p + s for p in start]

    @not_compiled
    def forward(
        self, x: torch.Tensor, start_pos: int | list[int] | torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One step of ``S`` tokens for slots ``0..B-1``.

        Args:
            x: ``[B, S, D] bf16``, ``B <= batch``.
            start_pos: position of each slot's first token (int, list or ``[B]`` int tensor); by
                default where each slot's sequence stands.

        Returns:
            ``q [B, S, H, HD] bf16``, ``kv [B, S, HD] bf16``, ``topk_idxs [B, S, topk] int32``.
            ``last_score`` keeps this step's ``[B, S, max cache_len]`` scores.

        A call that raises changes nothing a later call sees (``x`` and ``start_pos`` are checked before
        any block is reserved; a step that then raises gives its blocks back and puts back the ring rows
        it overwrote that a step from the same starts reads).
        """
        refuse_capture(self.attn_wq_a.device, "DecodeFrontEnd", "DecodeFrontEnd.capture(seq)")
        self.recheck()
        b, s, d = self.check_x(x)
        start = self.check_starts(b, s, start_pos)
        with self.writing(), self.reserved(start, s):
            return self._step(x, start, b, s, d)

    def _step(
        self, x: torch.Tensor, start: list[int], b: int, s: int, d: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dev = x.device
        start_t = staged(start, dev).to(dev, non_blocking=True)
        pos = StepPositions.from_host(start_t, tuple(start), s)  # the host positions go with the step
        positions = (start_t[:, None] + torch.arange(s, device=dev)).reshape(-1)
        out = IndexerOut(
            torch.empty(b, s, pos.max_cache_len, dtype=torch.float32, device=dev),
            torch.empty(b, s, self.topk, dtype=torch.int32, device=dev),
        )
        qkv_args = dict(x=x.reshape(b * s, d), w=self.attn, positions=positions, rope=self.rope, eps=self.eps)
        with on_device(dev), spec_numerics(dev):
            qkv = self._launch("qkv_proj_rope", **qkv_args)
            index_args = dict(
                x=x, qr=qkv.qr, qr_scale=qkv.qr_scale, w=self.indexer_weights, state=self.state, start_pos=pos,
                offset=self.offset, rope=self.rope, topk=self.topk, eps=self.eps,
            )  # fmt: skip
            out = self._launch("indexer", out, **index_args)
        self.advance(start, s)
        self.last_score = out.score
        return qkv.q.view(b, s, *qkv.q.shape[1:]), qkv.kv.view(b, s, -1), out.topk_idxs

    def static_step(self, batch: int | None = None, seq: int = 2, max_cache_len: int | None = None) -> StaticDecodeStep:
        """The decode step of ``batch`` (default: all slots) x ``seq`` tokens with static buffers, on
        this module's weights and state (Triton backend; see ``StaticDecodeStep``)."""
        return StaticDecodeStep(
            self.attn, self.indexer_weights, self.rope, self.state, batch=batch or self.batch, seq=seq,
            topk=self.topk, offset=self.offset, eps=self.eps, max_cache_len=max_cache_len,
        )  # fmt: skip

    def capture(self, batch: int | None = None, seq: int = 2, max_cache_len: int | None = None) -> CapturedDecodeStep:
        """Capture one decode step of ``batch`` (default: all slots) x ``seq`` tokens as a CUDA graph.

        Needs a CUDA device and the Triton backend. The step runs from static buffers with no host
        sync and no allocation; calling the returned ``CapturedDecodeStep`` with ``x [batch, seq, D]``
        replays it and advances the slots like ``forward``. ``max_cache_len`` (default: the whole
        cache) bounds the cache rows the replayed steps reach and sizes the score buffer.
        """
        dev = self.attn_wq_a.device
        if dev.type != "cuda":
            raise ValueError(f"capture: CUDA graphs need the module on a CUDA device, it is on {dev}")
        if resolve(self.backend, dev) != "triton":
            raise ValueError(f"capture: needs the Triton backend (the module's backend is {self.backend!r})")
        return CapturedDecodeStep(self, DecodeGraph(self.static_step(batch, seq, max_cache_len)))


class CapturedDecodeStep:
    """A ``DecodeFrontEnd`` decode step replayed from a CUDA graph (made by ``DecodeFrontEnd.capture``).

    The returned tensors are the graph's static outputs: they hold this step's results until the
    next call.
    """

    def __init__(self, frontend: DecodeFrontEnd, graph: DecodeGraph) -> None:
        self.frontend, self.graph, self.generation = frontend, graph, frontend.generation

    @not_compiled
    def __call__(
        self, x: torch.Tensor, start_pos: int | list[int] | torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One step for slots ``0..batch-1``; ``x [batch, seq, D] bf16`` (the captured shape)."""
        fe, step = self.frontend, self.graph.step
        refuse_capture(step.x.device, "CapturedDecodeStep", "DecodeFrontEnd.capture(seq)")
        fe.check_captured(self.generation, "frontend")
        start = fe.check_starts(step.batch, step.seq, start_pos)
        step.check_inputs(x, start)  # before any block is reserved: a refused call changes nothing
        # a replay is one launch, which runs whole or not at all: no ring rows to save for it
        with fe.captured_writing(step.x), fe.reserved(start, step.seq, rings=False):
            results = self.graph.replay(x, start)
        fe.advance(start, step.seq)
        fe.last_score = step.out.score
        return results

"""``DecodeAttention``: one layer's whole attention step (attention spec §7), ``xn [B, S, D] -> y [B, S, D]``,
as a module that owns the layer's weights, RoPE table and state (its KV pools paged on the host)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from ..model.attention_state import CompressorState, KVPool, RingRows, rerun_exact, restore_rings, save_rings
from ..model.config import COMPRESS_RATIO, DeepSeekV4Config
from ..model.rope import RopeTable
from ..model.state import DEFAULT_BLOCK_SIZE, UNALLOCATED, IndexerState
from ..model.structs import IndexerOut, StepPositions
from ..model.weights import AttnWeights, CompressorWeights, IndexerWeights, LayerWeights, OProjWeights
from ..ops.backends import BACKENDS
from ..ops.device import on_device, spec_numerics
from ..ops.validate import check_eps, check_int
from .op_checks import CheckedBuffers, check_front_end_ops, check_op, not_compiled, refuse_capture
from .paging import LayerPaging, Plan
from .staging import host_ints, staged

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


class PartialCallError(RuntimeError):
    """A ``DecodeAttention`` call of several steps (longer than ``prefill_chunk``) whose step after the
    first raised (out of memory): the steps before it ran and stay, so the call's first ``ran`` tokens
    are in every slot's sequence (``next_pos``: where slots ``0..B-1`` stand now); the step that raised
    changed nothing a later call sees. The error it raised is ``__cause__``. Go on with ``xn[:, ran:]``
    (or ``reset`` the slots); the same call again would append its first ``ran`` tokens twice. The
    state before the call cannot come back: the steps that ran gave back window blocks whose rows the
    later steps may have overwritten."""

    def __init__(self, ran: int, next_pos: list[int], cause: Exception) -> None:
        self.ran, self.next_pos = ran, next_pos
        super().__init__(
            f"DecodeAttention: the call's step from token {ran} raised ({type(cause).__name__}: {cause}); its first "
            f"{ran} tokens ran and stay, slots 0..{len(next_pos) - 1} now stand at {next_pos}: go on with "
            f"xn[:, {ran}:] or reset the slots (the same call again would append those tokens twice)"
        )


class DecodeAttention(CheckedBuffers):
    """One attention layer of any kind (SWA, CSA, HCA) for ``batch`` sequence slots, step after step.

    ``forward(xn)`` runs spec §7: ``qkv_proj_rope``; ``kv_compressor`` (CSA, HCA); ``indexer``
    (CSA, ``offset`` = the window); ``sparse_attn_write`` (``sparse_attn`` and ``window_kv_write`` in
    one op: one launch on Triton); ``o_proj``. Weights, the RoPE
    table and the ``AttentionState`` parts are buffers (``.to(device)`` moves them all); only the
    weights and the RoPE table are in ``state_dict`` (the pools, rings and block tables belong to the
    slots' sequences, which the host's paging tracks: ``load_state_dict`` swaps weights under running
    sequences and leaves them alone). Each slot remembers where its sequence stands; ``reset(rows)``
    hands slots to new sequences.

    The pools are paged on the host, so allocation never waits on the device: a slot gets window
    blocks as its sequence grows and gives back those whose positions no later token sees (all
    ``<= start - W`` of the step just run), and gets compressed and indexer blocks as rows close
    (kept until ``reset``). A call that needs more blocks than are free raises before anything
    runs. A step whose op raises all the same (out of memory) gives its blocks back, leaves the slots
    where they stood and puts back the compressor ring rows it overwrote that a step from the same
    starts reads (pool rows past where a slot stands may hold its writes: a step writes them again
    before it reads them), so the step run again equals a fresh run. A call longer than
    ``prefill_chunk`` tokens runs as steps of that many; where one after the first raises, the
    steps before it stay and the call raises ``PartialCallError``, which says how far they got.

    Every op's checks (spec §7) run when the module is built, on its weights, pools and rings, and
    again on the first call after its buffers change (``.to()``, a cast, a buffer replaced), with what
    the host sized at build: a replaced pool, ring or block table must keep its shape, a RoPE table
    cover ``max_position``; a call checks ``xn`` and the positions, and its steps launch the ops
    without checking them again. An op that runs on Triton (``"triton"``, or ``"auto"`` on CUDA)
    also has its kernels' dims checked then: a layer whose dims they cannot take (a hidden size D
    not a multiple of 16, an o LoRA rank OL not a multiple of 16, ...) is a ``ValueError`` naming the
    op and the weight at build, not on the first call; ``backend="reference"`` runs such a layer.

    Re-running positions (a rejected draft token): a step may start anywhere from the previous
    step's start to where the slot stands; the ring of each compressor must still hold what the
    re-run reads (``start + k <= max(COFF*RC, RC*(start // RC) + RC)`` with ``k`` the positions run
    since ``start``; always true for one rejected draft token); anything else is refused.

    Args:
        weights: the layer's whole ``LayerWeights`` (``load_layer`` or ``synthetic_weights(cfg, layer=N)``);
            the indexer with a compressor of ratio 4 (CSA) and only there.
        rope: the layer's ``RopeTable`` (``layer_rope_table``); it must cover ``max_position``.
        cfg: the model's config (window, top-k, eps).
        batch: sequence slots; max_position: longest sequence a slot holds.
        backend: ``"auto"``, ``"reference"`` or ``"triton"``; an op without the named backend's
            implementation runs on the reference (``op_backends`` says which runs where, for each
            op the layer runs: ``ops``); dims the Triton kernels cannot take are refused, not run
            on the reference.
        block_size: rows per pool block; num_blocks: a dict of blocks per pool the layer has
            (``"window"``; ``"compressed"`` on CSA and HCA; ``"indexer"`` on CSA), default enough for
            every slot to reach ``max_position``.
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
        csa = self.ratio == COMPRESS_RATIO
        if (weights.indexer is not None) != csa:
            raise ValueError(
                f"weights: a layer of compress ratio {self.ratio} {'needs an' if csa else 'takes no'} indexer, got "
                f"{'one' if weights.indexer is not None else 'none'} (CSA: ratio {COMPRESS_RATIO} and the indexer; "
                "HCA: another ratio; SWA: no compressor)"
            )
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
        if num_blocks is not None and not isinstance(num_blocks, dict):
            raise TypeError(
                f"num_blocks: expected a dict of blocks per pool ({{'window': n, ...}}) or None, got "
                f"{type(num_blocks).__name__}"
            )
        blocks = dict(num_blocks or {})
        names = ["window", "compressed", "indexer"][: 1 + bool(self.ratio) + (self.kind == "csa")]
        unknown = [str(k) for k in blocks if k not in names]
        if unknown:
            raise ValueError(
                f"num_blocks: a {self.kind} layer has the pools {', '.join(names)}, got {', '.join(sorted(unknown))}"
            )

        def pool_size(name: str, rows: int) -> tuple[int, int]:  # (table width, blocks)
            width = -(-rows // block_size)
            n = blocks.get(name, batch * width)
            check_int(f"num_blocks[{name!r}]", n, 1)
            return width, n

        width, n = pool_size("window", max_position)
        self._pool_buffers("win", KVPool.paged(n, block_size, hd, r, torch.full((batch, width), UNALLOCATED), device))
        pools = [n]
        if self.ratio:
            self._buffers_of("cmp_w", weights.compressor, _COMPRESSOR)
            width, n = pool_size("compressed", max_position // self.ratio)
            table = torch.full((batch, width), UNALLOCATED)
            state = CompressorState.paged(batch, self.ratio, hd, r, n, block_size, table, device)
            self.register_buffer("cmp_kv_state", state.kv_state, persistent=False)
            self.register_buffer("cmp_score_state", state.score_state, persistent=False)
            self._pool_buffers("cmp", state.pool)
            pools.append(n)
        if self.kind == "csa" and weights.indexer is not None:  # "csa": the layer holds an indexer
            self._buffers_of("idx_w", weights.indexer, _INDEXER)
            self._buffers_of("idx_c", weights.indexer.compressor, _COMPRESSOR)
            hid = weights.indexer.compressor.norm_w.shape[0]
            width, n = pool_size("indexer", max_position // COMPRESS_RATIO)
            table = torch.full((batch, width), UNALLOCATED)
            self._buffers_of("idx", IndexerState.paged(batch, n, block_size, hid, table, device), _INDEXER_STATE, False)
            pools.append(n)
        self._limit = max_position  # positions a slot may reach: every table is sized for them, the rope covers them
        # the compressors' ratios: the layer's, then its indexer's
        self._ratios = [r for r in (self.ratio, COMPRESS_RATIO if self.kind == "csa" else 0) if r]
        self.paging = LayerPaging(pools, batch, block_size, self.window, self._ratios)
        self.next_pos = [0] * batch  # where each slot's next token sits (host-side: no device sync)
        self.last_start = [0] * batch  # the start of each slot's last step (re-runs may go back to it)
        self._keep_sizes(max_position)
        self.recheck()

    def _check_ops(self) -> None:
        """The buffers' sizes against the host's bookkeeping (``_check_sizes``: the pools, rings and
        tables as built, a RoPE table covering ``max_position``), the backend of each op on the buffers'
        device (``op_backends``), then every op's checks (spec §7; on Triton also its kernels' dims,
        ``check_op``) on the layer's weights, pools and rings: a step of one token of slot 0 at
        position 0, which reads no pool row and needs no block, so only the buffers' shapes, dtypes and
        devices are judged. A step's own values are the host's (``step_starts``, the paging); the
        captured step (``capture``) runs no op checks of its own. Run by ``recheck``: at build, and after
        the buffers change."""
        self._check_sizes()
        rope, eps, dev = self.rope, self.eps, self.attn_wq_a.device
        self._resolve_backends(self.ops, dev)
        backends = self.op_backends
        check_front_end_ops(
            self.attn, self.indexer_weights, rope, self.indexer_state, self.topk, self.window, eps, backends
        )
        x = torch.zeros(1, 1, self.attn_wq_a.shape[1], dtype=torch.bfloat16, device=dev)
        if self.ratio:
            w, state = self.compressor_weights, self.compressor_state
            args: dict[str, object] = dict(x=x, w=w, state=state, start_pos=0, rope=rope, eps=eps)
            check_op("kv_compressor", backends["kv_compressor"], args)
        hd = self.attn_wkv.shape[0]
        heads = self.attn_wq_b.shape[0] // hd
        topk = torch.zeros(1, 1, self.topk, dtype=torch.int32, device=dev) if self.kind == "csa" else None
        bf16 = dict(dtype=torch.bfloat16, device=dev)
        compressed = self.compressed_pool
        if compressed is not None and self.ratio == 1:  # position 0 reads its own row 0: give it a block here
            table = compressed.block_table.clone()
            table[0, 0] = 0
            compressed = dataclasses.replace(compressed, block_table=table)
        args = dict(
            q=torch.zeros(1, 1, heads, hd, **bf16), kv=torch.zeros(1, 1, hd, **bf16), start_pos=0,
            window_pool=self.window_pool, attn_sink=self.attn_sink, rope=rope, kind=self.kind,
            window=self.window, compress_ratio=self.ratio,
            compressed_pool=compressed, topk_idxs=topk,
            topk_offset=self.window if topk is not None else 0,
        )  # fmt: skip
        check_op("sparse_attn_write", backends["sparse_attn_write"], args)
        o = torch.zeros(1, heads, hd, **bf16)
        check_op("o_proj", backends["o_proj"], dict(o=o, w=self.o_weights))

    # --- buffers and the records built from them ----------------------------------------------

    def _buffers_of(self, prefix: str, record: object, names: tuple[str, ...], persistent: bool = True) -> None:
        for name in names:
            self.register_buffer(f"{prefix}_{name}", getattr(record, name), persistent=persistent)

    def _pool_buffers(self, prefix: str, pool: KVPool) -> None:
        self._buffers_of(prefix, pool, _POOL, persistent=False)

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
        wq_b, wq_b_scale, weights_proj = self._get("idx_w", _INDEXER)
        return IndexerWeights(wq_b, wq_b_scale, weights_proj, CompressorWeights(*self._get("idx_c", _COMPRESSOR)))

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
    def compressed_pool(self) -> KVPool | None:
        """The compressed rows' pool (CSA, HCA); None on a sliding-window layer."""
        state = self.compressor_state
        return None if state is None else state.pool

    @property
    def indexer_state(self) -> IndexerState | None:
        return IndexerState(*self._get("idx", _INDEXER_STATE)) if self.kind == "csa" else None

    @property
    def batch(self) -> int:
        return len(self.next_pos)

    @property
    def ops(self) -> tuple[str, ...]:
        """The ops a step of this layer runs, in order: ``kv_compressor`` on CSA and HCA, ``indexer`` on
        CSA; ``op_backends`` names the backend of each."""
        skip = ({"kv_compressor"} if not self.ratio else set()) | ({"indexer"} if self.kind != "csa" else set())
        return tuple(op for op in OPS if op not in skip)

    # --- slots and blocks -----------------------------------------------------------------------

    def reset(self, batch_rows: int | list[int] | torch.Tensor) -> None:
        """Empty the given slots: their blocks go back to the pools, their rings are cleared; their
        next token sits at position 0."""
        refuse_capture(self.attn_wq_a.device, "DecodeAttention.reset", "DecodeAttention.capture(seq)")
        rows = host_ints("batch_rows", batch_rows)
        for r in rows:
            if not 0 <= r < self.batch:
                raise ValueError(f"batch_rows: slot {r} outside [0, {self.batch})")
        with self.writing():
            self.paging.reset(rows)
            self.paging.flush(self._tables())
            for state in (self.compressor_state, self.indexer_state):
                if state is not None:
                    state.reset(rows)
        for r in rows:
            self.next_pos[r] = self.last_start[r] = 0

    def _tables(self) -> list[torch.Tensor]:
        """The device block tables, in ``paging.pools``' order."""
        names = ["win", "cmp", "idx"][: len(self.paging.pools)]
        return [getattr(self, f"{name}_block_table") for name in names]

    def _step_starts(self, b: int, s: int, start_pos: int | list[int] | torch.Tensor | None) -> list[int]:
        if start_pos is None:
            return self.next_pos[:b]
        start = [start_pos] * b if isinstance(start_pos, int) and not isinstance(start_pos, bool) else None
        start = start or host_ints("start_pos", start_pos)
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

    @not_compiled
    def forward(self, xn: torch.Tensor, start_pos: int | list[int] | torch.Tensor | None = None) -> torch.Tensor:
        """One call of ``S`` tokens for slots ``0..B-1``: ``xn [B, S, D] bf16`` (after ``attn_norm``) ->
        ``y [B, S, D] bf16`` (to ``hc_post``). ``start_pos``: by default where each slot stands; an
        earlier position re-runs (see the class). Split into steps of at most ``prefill_chunk`` tokens:
        where a step after the first raises, the steps before it stay and ``PartialCallError`` (the step's
        error its cause) says how many tokens ran."""
        refuse_capture(self.attn_wq_a.device, "DecodeAttention", "DecodeAttention.capture(seq)")
        self.recheck()
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
        ys: list[torch.Tensor] = []
        with self.writing():
            for c, n in chunks:
                try:
                    ys.append(self._step(xn[:, c : c + n], [p + c for p in starts]))
                except Exception as e:
                    if not ys:  # the first step: the call changed nothing a later call sees
                        raise
                    raise PartialCallError(c, self.next_pos[:b], e) from e
        return torch.cat(ys, dim=1)

    def step_starts(self, b: int, s: int, start_pos: int | list[int] | torch.Tensor | None, chunk: int) -> list[int]:
        """The host start positions of a call of ``s`` tokens for slots ``0..b-1`` run in steps of at
        most ``chunk``, checked (re-runs, ``max_position``, free pool blocks); changes nothing."""
        starts = self._step_starts(b, s, start_pos)
        if starts and max(starts) + s > self._limit:
            raise ValueError(
                f"start_pos: a slot would pass position {self._limit - 1} (max_position), S={s}, starts {starts}"
            )
        chunks = [(c, min(chunk, s - c)) for c in range(0, s, chunk)]
        self.paging.check([([p + c for p in starts], n) for c, n in chunks])
        return starts

    def begin_step(self, starts: list[int], s: int) -> Plan:
        """Host side of a step about to run ``s`` tokens per slot from ``starts``: give each slot the
        blocks it will read and write, and write the changed table entries (device fills, no sync).
        Returns the plan ``end_step`` takes."""
        plan = self.paging.begin(starts, s)
        if any(blocks.table for blocks in self.paging.pools):
            self.paging.flush(self._tables())
        return plan

    def save_rings(self, starts: list[int], s: int) -> RingRows:
        """Before a step of ``s`` tokens from ``starts``: the ring rows (the compressor's, the indexer's)
        it overwrites that a step from the same starts reads again, copied for ``abort_step``
        (``save_rings`` of ``model.attention_state``: none for a step of one token)."""
        rings = [(self.ratio, (self.cmp_kv_state, self.cmp_score_state))] if self.ratio else []
        if self.kind == "csa":
            rings.append((COMPRESS_RATIO, (self.idx_kv_state, self.idx_score_state)))
        return save_rings(rings, starts, s)

    def abort_step(self, saved: RingRows) -> None:
        """Host side of a step that raised after ``begin_step``: the ring rows ``saved`` go back (so a
        step from the same starts reads what it read before), the blocks it was given go back to their
        pools and out of the tables; the slots stay where they stood."""
        restore_rings(saved)
        self.paging.abort()
        self.paging.flush(self._tables())

    def end_step(self, plan: Plan, starts: list[int], s: int) -> None:
        """Host side of a step that ran: take back the window blocks no later token sees, and move
        each slot to ``start + s``."""
        self.paging.end(plan)
        self.paging.pools[0].flush(self.win_block_table)
        n = len(starts)
        self.last_start[:n], self.next_pos[:n] = starts, [p + s for p in starts]

    def _step(self, xn: torch.Tensor, starts: list[int]) -> torch.Tensor:
        b, s, d = xn.shape
        saved = self.save_rings(starts, s)
        plan = self.begin_step(starts, s)
        try:
            y = self._ops(xn, starts)
        except BaseException:
            self.abort_step(saved)
            raise
        self.end_step(plan, starts, s)
        return y.view(b, s, d)

    def _ops(self, xn: torch.Tensor, starts: list[int]) -> torch.Tensor:
        """The step's ops, eagerly, on blocks the slots already hold -> ``y [B*S, D]``."""
        b, s, d = xn.shape
        dev = xn.device
        start = staged(starts, dev).to(dev, non_blocking=True)
        pos = StepPositions.from_host(start, tuple(starts), s)
        positions = (start[:, None] + torch.arange(s, device=dev)).reshape(-1)
        rope, eps = self.rope, self.eps
        xn = xn.contiguous()
        with on_device(dev), spec_numerics(dev):
            qkv = self._launch(
                "qkv_proj_rope", x=xn.view(b * s, d), w=self.attn, positions=positions, rope=rope, eps=eps
            )
            q, kv = qkv.q.view(b, s, *qkv.q.shape[1:]), qkv.kv.view(b, s, -1)
            if self.ratio:
                state = self.compressor_state
                self._launch(
                    "kv_compressor", x=xn, w=self.compressor_weights, state=state, start_pos=pos, rope=rope, eps=eps
                )
            topk = None
            if self.kind == "csa":
                out = IndexerOut(
                    torch.empty(b, s, pos.max_cache_len, dtype=torch.float32, device=dev),
                    torch.empty(b, s, self.topk, dtype=torch.int32, device=dev),
                )
                topk = self._launch(
                    "indexer", out, x=xn, qr=qkv.qr, qr_scale=qkv.qr_scale, w=self.indexer_weights,
                    state=self.indexer_state, start_pos=pos, offset=self.window, rope=rope, topk=self.topk, eps=eps,
                ).topk_idxs  # fmt: skip
            o = self._launch(
                "sparse_attn_write", q=q, kv=kv, start_pos=pos, window_pool=self.window_pool, attn_sink=self.attn_sink,
                rope=rope, kind=self.kind, window=self.window, compress_ratio=self.ratio,
                compressed_pool=self.compressed_pool, topk_idxs=topk,
                topk_offset=self.window if topk is not None else 0,
            ).o  # fmt: skip
            return self._launch("o_proj", o=o.view(b * s, *o.shape[2:]), w=self.o_weights).y

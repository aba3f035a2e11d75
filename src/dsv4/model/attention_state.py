"""Caller-owned state of one attention layer (attention spec §2-§4): the FP8 KV pools, the main
compressor's ring, and (CSA layers) the indexer's state.

A **KV pool** (the window cache and the compressed cache alike) holds FP8 KV rows (``fp8_row``) in
fixed-size blocks shared by all sequence slots, addressed through a block table: row ``r`` of slot
``b`` is at block ``block_table[b, r // bs]``, offset ``r % bs``; ``-1`` = not allocated (a write
there is skipped, a read never happens). Window pool: ``r`` = the token's position; compressed
pool: ``r = j``, the compressed block (positions ``[RC*j, RC*j + RC)``).

The compressor's ring (``CompressorState``) holds each position's projections in slot
``p % (COFF*RC)``: nothing shifts, so a rejected draft token re-run at its position simply
overwrites its slot.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import Field, dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, Self

import torch

from .config import COMPRESS_RATIO, DeepSeekV4Config
from .fp8_row import check_row_dims, dequantize_fp8_rows, fp8_rows
from .pool_format import FP8_KV, PoolFormat
from .state import DEFAULT_BLOCK_SIZE, IndexerState, _check_block_size, engine_table, size_arg, slot_rows


class _Record:
    """``tensors``/``to``/``clone`` of a dataclass whose fields are tensors or records (or None)."""

    if TYPE_CHECKING:  # every subclass is a dataclass
        __dataclass_fields__: ClassVar[dict[str, Field[Any]]]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor by its dotted field path (nested records flattened)."""
        out: dict[str, torch.Tensor] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                out[f.name] = v
            elif v is not None:  # a record (IndexerState included)
                out.update({f"{f.name}.{k}": t for k, t in v.tensors().items()})
        return out

    def _map(self, fn: Callable[[Any], Any]) -> Self:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return type(self)(**{k: None if v is None else fn(v) for k, v in values.items()})

    def to(self, device: torch.device | str) -> Self:
        """A copy with every tensor on ``device``."""
        return self._map(lambda v: v.to(device))

    def clone(self) -> Self:
        """A copy of every tensor."""
        return self._map(lambda v: v.clone())


def kv_row_tables(batch: int, rows: int, block_size: int) -> tuple[int, torch.Tensor]:
    """The dense layout: ``(num_blocks, block_table [batch, ceil(rows / bs)])``, slot ``b`` owning
    blocks ``b*n .. b*n + n - 1``."""
    per_slot = max(1, -(-rows // _check_block_size(block_size)))
    return batch * per_slot, torch.arange(batch * per_slot, dtype=torch.int32).view(batch, per_slot)


@dataclass
class KVPool(_Record):
    """FP8 KV rows in blocks (attention spec §2).

    ``nope [NB, bs, NOPE] float8_e4m3fn``, ``rope [NB, bs, R] bf16``, ``scale [NB, bs, 8] uint8``
    (byte ``i < NOPE/64``: block ``i``'s ``e + 127``; the rest 0), ``block_table [B, max_blocks]
    int32`` (entries in ``[0, NB)`` or ``-1``). The ops never change the table.
    """

    nope: torch.Tensor
    rope: torch.Tensor
    scale: torch.Tensor
    block_table: torch.Tensor
    row_format: ClassVar[PoolFormat] = FP8_KV  # the rows' numerics (not a field: the ops' tensors are)

    @classmethod
    def paged(
        cls,
        num_blocks: int,
        block_size: int,
        head_dim: int,
        rope_dim: int,
        block_table: torch.Tensor,
        device: torch.device | str | None = None,
    ) -> KVPool:
        """An empty pool (every row decodes to 0) of ``num_blocks`` blocks of ``block_size`` rows of
        ``head_dim`` (``rope_dim`` of them bf16), addressed by ``block_table [B, max_blocks]`` (copied)."""
        _check_block_size(block_size)
        check_row_dims(head_dim, rope_dim)
        table = engine_table(block_table, num_blocks, device)
        codes, scales = cls.row_format.empty(num_blocks, block_size, head_dim - rope_dim, device)
        return cls(
            nope=codes,
            rope=torch.zeros(num_blocks, block_size, rope_dim, dtype=cls.row_format.tail_dtype, device=device),
            scale=scales,
            block_table=table,
        )

    @classmethod
    def dense(
        cls,
        batch: int,
        rows: int,
        head_dim: int,
        rope_dim: int,
        device: torch.device | str | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ) -> KVPool:
        """An empty pool with room for ``rows`` rows per slot, each slot owning its own blocks."""
        num_blocks, table = kv_row_tables(batch, rows, block_size)
        return cls.paged(num_blocks, block_size, head_dim, rope_dim, table, device)

    @property
    def batch(self) -> int:
        return self.block_table.shape[0]

    @property
    def block_size(self) -> int:
        return self.nope.shape[1]

    @property
    def rows(self) -> int:
        """Rows each slot's block table can address."""
        return self.block_table.shape[1] * self.block_size

    @property
    def head_dim(self) -> int:
        return self.nope.shape[2] + self.rope.shape[2]

    @property
    def rope_dim(self) -> int:
        return self.rope.shape[2]

    @property
    def row_bytes(self) -> int:
        return self.row_format.row_bytes(self.head_dim - self.rope_dim, tail=self.rope_dim)

    def locate(self, slots: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(block, offset)`` int64 of row ``rows[i]`` of slot ``slots[i]``; block -1 where none is allocated."""
        rows = rows.long()
        return self.block_table[slots.long(), rows // self.block_size].long(), rows % self.block_size

    def write(self, slots: torch.Tensor, rows: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``fp8_row(v[i])`` (``v [N, HD] bf16``) at row ``rows[i]`` of slot ``slots[i]``; rows in
        unallocated blocks are skipped."""
        block, offset = self.locate(slots, rows)
        held = block >= 0
        q = fp8_rows(v, self.rope_dim)
        self.nope[block[held], offset[held]] = q.nope[held]
        self.scale[block[held], offset[held]] = q.scale[held]
        self.rope[block[held], offset[held]] = q.rope[held]

    def read(self, slots: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``deq`` of row ``rows[i]`` of slot ``slots[i]`` -> ``[N, HD] bf16`` (each in an allocated block)."""
        block, offset = self.locate(slots, rows)
        if bool((block < 0).any()):
            raise ValueError("block_table: a row read is in an unallocated block")
        return dequantize_fp8_rows(self.nope[block, offset], self.scale[block, offset], self.rope[block, offset])


def compressor_dims(ratio: int, head_dim: int) -> tuple[int, int]:
    """``(COFF, ring slots)`` of a compressor of ``ratio``: overlapping windows (COFF 2) at ratio 4,
    disjoint ones (COFF 1) otherwise; the ring holds ``COFF * ratio`` positions of ``COFF * HD`` values."""
    if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 1:
        raise ValueError(f"ratio: expected a compress ratio >= 1, got {ratio!r}")
    coff = 2 if ratio == COMPRESS_RATIO else 1
    return coff, coff * ratio


def rerun_exact(r: int, current: int, ratio: int) -> bool:
    """Whether a slot at ``current`` that starts a step again at ``r < current`` (re-running
    ``k = current - r`` positions, e.g. a rejected draft token) gets exactly a fresh run's results from
    a position-addressed ring of a compressor of ``ratio``: no position run since ``r`` overwrote a
    slot the re-run reads (``r + k <= max(COFF*RC, RC*(r // RC) + RC)``; spec §4, attention spec A3)."""
    _, slots = compressor_dims(ratio, 1)
    return current <= max(slots, ratio * (r // ratio + 1))


RingRows = list[tuple[torch.Tensor, torch.Tensor]]  # (the ring rows of a step's slots, a copy of them)


def save_rings(rings: Sequence[tuple[int, Sequence[torch.Tensor]]], starts: Sequence[int], s: int) -> RingRows:
    """Before a step of ``s`` tokens from ``starts`` (slots ``0..len(starts)-1``) on the rings of the
    compressors ``rings`` (``(ratio, [kv_state, score_state])`` each): a copy of the slots' ring rows of
    each compressor whose step overwrites ring slots a step from the same starts reads again (``rerun_exact
    (start, start + s, ratio)`` false for a slot), for ``restore_rings`` should the step raise partway.
    Empty where every slot's step is an exact re-run of itself (every step of one token): a step from the
    same starts then overwrites whatever the failed one wrote before reading it, as a re-run does."""
    saved: RingRows = []
    b = len(starts)
    for ratio, tensors in rings:
        slots = compressor_dims(ratio, 1)[1]
        last = ratio - s  # p + s > ratio * (p // ratio + 1) where p % ratio > ratio - s
        if s > 1 and any(p % ratio > last and p + s > slots for p in starts):
            saved += [(t[:b], t[:b].clone()) for t in tensors]
    return saved


def restore_rings(saved: RingRows) -> None:
    """Put back the ring rows ``save_rings`` copied (after a step that raised)."""
    for rows, copy in saved:
        rows.copy_(copy)


@dataclass
class CompressorState(_Record):
    """The main compressor's state (attention spec §3), updated in place by ``kv_compressor``.

    ``kv_state``, ``score_state [B, COFF*RC, COFF*HD] fp32``: the ring of projected rows and gate
    scores, position ``p`` in slot ``p % (COFF*RC)`` (CSA ``[B, 8, 2*HD]``, HCA ``[B, RC, HD]``;
    empty: zeros / -inf). ``pool``: the compressed ``KVPool`` (row ``j`` = compressed block ``j``).
    """

    kv_state: torch.Tensor
    score_state: torch.Tensor
    pool: KVPool

    @classmethod
    def paged(
        cls,
        batch: int,
        ratio: int,
        head_dim: int,
        rope_dim: int,
        num_blocks: int,
        block_size: int,
        block_table: torch.Tensor,
        device: torch.device | str | None = None,
    ) -> CompressorState:
        """An empty ring for ``batch`` slots and an empty compressed pool addressed by ``block_table``."""
        coff, slots = compressor_dims(ratio, head_dim)
        shape = (batch, slots, coff * head_dim)
        pool = KVPool.paged(num_blocks, block_size, head_dim, rope_dim, block_table, device)
        if pool.batch != batch:
            raise ValueError(f"block_table: expected {batch} rows (one per slot), got {pool.batch}")
        return cls(
            kv_state=torch.zeros(shape, dtype=torch.float32, device=device),
            score_state=torch.full(shape, float("-inf"), dtype=torch.float32, device=device),
            pool=pool,
        )

    @classmethod
    def dense(
        cls,
        batch: int,
        ratio: int,
        head_dim: int,
        rope_dim: int,
        max_position: int,
        device: torch.device | str | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ) -> CompressorState:
        """``paged`` with room for ``max_position // ratio`` compressed rows per slot, each slot owning its blocks."""
        compressor_dims(ratio, head_dim)  # a ratio below 1 is refused by name before it divides
        num_blocks, table = kv_row_tables(batch, max_position // ratio, block_size)
        return cls.paged(batch, ratio, head_dim, rope_dim, num_blocks, block_size, table, device)

    @property
    def batch(self) -> int:
        return self.kv_state.shape[0]

    @property
    def coff(self) -> int:
        return self.kv_state.shape[2] // self.pool.head_dim

    @property
    def ratio(self) -> int:
        return self.kv_state.shape[1] // self.coff

    def reset(self, rows: torch.Tensor | list[int] | int) -> None:
        """Return slots ``rows`` to the empty ring (pool rows past a sequence's length are never read).

        ``rows``: an int, a list of ints or an integer tensor, each in ``[0, batch)``; anything else
        raises before any change (``IndexerState.reset``'s rule)."""
        idx = slot_rows(rows, self.batch, self.kv_state.device)
        self.kv_state[idx] = 0.0
        self.score_state[idx] = float("-inf")


@dataclass
class AttentionState(_Record):
    """Everything one attention layer keeps between steps: the window ``KVPool`` (row = position),
    the main compressor (CSA/HCA: its ring and the compressed ``KVPool``) and the indexer's
    ``IndexerState`` (CSA). ``kind`` follows from which parts are present."""

    window: KVPool
    compressor: CompressorState | None = None
    indexer: IndexerState | None = None

    @property
    def kind(self) -> str:
        if self.compressor is None:
            return "swa"
        return "csa" if self.indexer is not None else "hca"

    @classmethod
    def empty(
        cls,
        cfg: DeepSeekV4Config,
        layer: int,
        batch: int,
        max_position: int | None = None,
        device: torch.device | str | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ) -> AttentionState:
        """Fresh state of ``layer`` (its kind from ``cfg.compress_ratios``) in the dense layout: room
        for ``max_position`` (default ``cfg.max_position_embeddings``) window rows,
        ``max_position // RC`` compressed rows and (CSA) ``max_position // 4`` indexer keys per slot."""
        n = cfg.max_position_embeddings if max_position is None else size_arg("max_position", max_position)
        batch = size_arg("batch", batch)
        ratio = cfg.layer_ratio(layer)
        if batch < 1:
            raise ValueError(f"batch: expected >= 1, got {batch}")
        if n < max(1, ratio):
            raise ValueError(f"max_position: expected >= {max(1, ratio)}, got {n}")
        hd, r = cfg.head_dim, cfg.qk_rope_head_dim
        window = KVPool.dense(batch, n, hd, r, device, block_size)
        compressor = CompressorState.dense(batch, ratio, hd, r, n, device, block_size) if ratio else None
        kind = cfg.layer_kind(layer)
        indexer = IndexerState.empty(cfg, batch, n, device, block_size) if kind == "csa" else None
        return cls(window, compressor, indexer)

    @classmethod
    def paged(
        cls,
        cfg: DeepSeekV4Config,
        layer: int,
        batch: int,
        *,
        window: tuple[int, torch.Tensor],
        compressed: tuple[int, torch.Tensor] | None = None,
        indexer: tuple[int, torch.Tensor] | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        device: torch.device | str | None = None,
    ) -> AttentionState:
        """Fresh state of ``layer`` over pools of the given ``(num_blocks, block_table [batch, width])``:
        ``window`` always, ``compressed`` for CSA/HCA layers, ``indexer`` (the indexer's key pool) for CSA.
        A refusal of a pool's arguments names its part first (``compressed: block_table: ...``)."""
        ratio, kind = cfg.layer_ratio(layer), cfg.layer_kind(layer)
        hd, r = cfg.head_dim, cfg.qk_rope_head_dim
        for name, given, needed in (("compressed", compressed, ratio > 0), ("indexer", indexer, kind == "csa")):
            if (given is not None) != needed:
                raise ValueError(f"{name}: a {kind} layer {'needs' if needed else 'takes no'} {name} pool")
        with _part("window"):
            win = KVPool.paged(window[0], block_size, hd, r, window[1], device)
            if win.batch != batch:
                raise ValueError(f"expected a block table of {batch} rows, got {win.batch}")
        comp = None
        if compressed is not None:
            with _part("compressed"):
                comp = CompressorState.paged(batch, ratio, hd, r, compressed[0], block_size, compressed[1], device)
        idx = None
        if indexer is not None:
            with _part("indexer"):
                idx = IndexerState.paged(batch, indexer[0], block_size, cfg.index_head_dim, indexer[1], device)
        return cls(win, comp, idx)


@contextlib.contextmanager
def _part(name: str) -> Iterator[None]:
    """Refusals of one ``(num_blocks, block_table)`` argument of ``AttentionState.paged`` name it first:
    the three parts' tables share their inner names."""
    try:
        yield
    except (TypeError, ValueError) as e:
        raise type(e)(f"{name}: {e}") from None

"""Caller-owned state of the indexer compressor and its compressed-key cache (spec §4).

The key cache is a pool of fixed-size blocks shared by every sequence slot, addressed through a
block table (the paged layout a serving engine manages): compressed row ``j`` of slot ``b`` lives at
block ``block_table[b, j // block_size]``, offset ``j % block_size``, as a row of the pool's format
(``IndexerState.key_format``: INT8 codes with an fp32 scale, quantized when it is written).
``IndexerState.empty`` builds the dense special case, in which slot ``b`` owns blocks ``b*n .. b*n + n - 1``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import ClassVar

import torch

from .config import COMPRESS_RATIO, DeepSeekV4Config
from .pool_format import INT8_KEYS, PoolFormat

STATE_SLOTS = 2 * COMPRESS_RATIO  # the compressor ring: position p in slot p % 8 (two blocks of 4)
DEFAULT_BLOCK_SIZE = 64  # compressed rows per pool block (256 tokens): 8 KiB of INT8 keys at HID=128
UNALLOCATED = -1  # a block-table entry with no block: writes there are skipped, reads never happen


@dataclass
class IndexerState:
    """Per-sequence state, updated in place by ``indexer_compressor`` / ``indexer``.

    ``kv_state [B, 8, 2*HID] fp32`` and ``score_state [B, 8, 2*HID] fp32``: the compressor's ring
    of projected rows and gate scores, addressed by position (position ``p`` in slot ``p % 8``; spec §4
    v3): it holds the last closed block and the open one.
    ``keys [num_blocks, block_size, HID] int8`` and ``key_scale [num_blocks, block_size] fp32``: the
    pool of compressed keys, one row per closed block of 4 tokens in the ``key_format`` (``INT8_KEYS``:
    dequant ``keys * key_scale``).
    ``block_table [B, max_blocks] int32``: the pool block holding each slot's rows
    ``[i*block_size, (i+1)*block_size)``, or ``-1`` where none is allocated. The ops never change it.
    """

    key_format: ClassVar[PoolFormat] = INT8_KEYS  # the pool's row format (not a field: the ops' tensors are)

    kv_state: torch.Tensor
    score_state: torch.Tensor
    keys: torch.Tensor
    key_scale: torch.Tensor
    block_table: torch.Tensor

    @classmethod
    def empty(
        cls,
        cfg: DeepSeekV4Config,
        batch: int,
        max_position: int | None = None,
        device: torch.device | str | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ) -> IndexerState:
        """Fresh state in the dense layout: ``kv_state`` zeros, ``score_state`` -inf, an empty pool
        with ``ceil(max_position // 4 / block_size)`` blocks per slot.

        ``max_position`` (default ``cfg.max_position_embeddings``) sets the rows per slot to
        ``max_position // 4``.
        """
        n = cfg.max_position_embeddings if max_position is None else size_arg("max_position", max_position)
        batch = size_arg("batch", batch)
        if batch < 1:
            raise ValueError(f"batch: expected >= 1, got {batch}")
        if n < COMPRESS_RATIO:
            raise ValueError(f"max_position: expected >= {COMPRESS_RATIO}, got {n}")
        return cls.fresh(batch, n // COMPRESS_RATIO, cfg.index_head_dim, device, block_size)

    @classmethod
    def fresh(
        cls,
        batch: int,
        cache_rows: int,
        head_dim: int,
        device: torch.device | str | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ) -> IndexerState:
        """``empty`` by sizes: room for ``cache_rows`` compressed keys of ``head_dim`` (``index_head_dim``)
        per slot, each slot owning its own consecutive blocks."""
        per_slot = -(-cache_rows // _check_block_size(block_size))
        table = torch.arange(batch * per_slot, dtype=torch.int32).view(batch, per_slot)
        return cls.paged(batch, batch * per_slot, block_size, head_dim, table, device)

    @classmethod
    def paged(
        cls,
        batch: int,
        num_blocks: int,
        block_size: int,
        head_dim: int,
        block_table: torch.Tensor,
        device: torch.device | str | None = None,
    ) -> IndexerState:
        """Fresh state over a pool of ``num_blocks`` empty blocks of ``block_size`` rows, addressed by
        ``block_table [batch, max_blocks] int`` (entries in ``[0, num_blocks)`` or ``-1``; copied)."""
        _check_block_size(block_size)
        table = engine_table(block_table, num_blocks, device, batch)
        width = 2 * head_dim
        keys, key_scale = cls.key_format.empty(num_blocks, block_size, head_dim, device)
        return cls(
            kv_state=torch.zeros(batch, STATE_SLOTS, width, dtype=torch.float32, device=device),
            score_state=torch.full((batch, STATE_SLOTS, width), float("-inf"), dtype=torch.float32, device=device),
            keys=keys,
            key_scale=key_scale,
            block_table=table,
        )

    @property
    def batch(self) -> int:
        return self.kv_state.shape[0]

    @property
    def block_size(self) -> int:
        return self.keys.shape[1]

    @property
    def cache_rows(self) -> int:
        """Compressed rows each slot's block table can address."""
        return self.block_table.shape[1] * self.block_size

    def tensors(self) -> dict[str, torch.Tensor]:
        """The state tensors by field name."""
        return {
            "kv_state": self.kv_state,
            "score_state": self.score_state,
            "keys": self.keys,
            "key_scale": self.key_scale,
            "block_table": self.block_table,
        }

    def to(self, device: torch.device | str) -> IndexerState:
        return IndexerState(**{k: v.to(device) for k, v in self.tensors().items()})

    def clone(self) -> IndexerState:
        return IndexerState(**{k: v.clone() for k, v in self.tensors().items()})

    def row_location(self, b: int, row: int) -> tuple[int, int] | None:
        """``(block, offset)`` of compressed row ``row`` of slot ``b``, or None when no block holds it;
        ``IndexError`` for a slot or row outside the table (a negative one included)."""
        if not (0 <= b < self.block_table.shape[0] and 0 <= row < self.cache_rows):
            raise IndexError(
                f"b, row: expected a slot in [0, {self.block_table.shape[0]}) and a row in [0, {self.cache_rows}), "
                f"got {b}, {row}"
            )
        block = int(self.block_table[b, row // self.block_size])
        return None if block == UNALLOCATED else (block, row % self.block_size)

    def dense_keys(self, b: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot ``b``'s first ``rows`` compressed keys gathered through the block table:
        ``(k8 [rows, HID] int8, ks [rows] fp32)``. Every block they need must be allocated."""
        j = torch.arange(rows, device=self.keys.device)
        blocks = self.block_table[b, j // self.block_size].long()
        if rows and bool((blocks < 0).any()):
            raise ValueError(f"block_table: slot {b} reads rows [0, {rows}) but a block they need is not allocated")
        return self.keys[blocks, j % self.block_size], self.key_scale[blocks, j % self.block_size]

    def write_keys(self, slots: torch.Tensor, rows: torch.Tensor, keys: torch.Tensor) -> None:
        """Quantize ``keys [N, HID]`` (bf16 values) in the pool's ``key_format`` (spec §2) into the pool at
        compressed row ``rows[i]`` of slot ``slots[i]``; rows whose block is not allocated (``-1``) are skipped."""
        k8, ks = self.key_format.quantize(keys)
        blocks = self.block_table[slots, rows // self.block_size].long()
        held = blocks >= 0
        offsets = rows % self.block_size
        self.keys[blocks[held], offsets[held]] = k8[held]
        self.key_scale[blocks[held], offsets[held]] = ks[held]

    def reset(self, rows: torch.Tensor | list[int] | int) -> None:
        """Return batch ``rows`` to the empty state (a new sequence takes those slots): their ring is
        cleared; their cache rows need no clearing, since rows past a sequence's length are never read.

        ``rows``: an int, a list of ints or an integer tensor, each in ``[0, batch)``; anything else
        (a float that would be truncated, a negative index that would wrap) raises before any change.
        A tensor on a GPU is range-checked there (a device-side assert, no host read)."""
        idx = slot_rows(rows, self.batch, self.kv_state.device)
        self.kv_state[idx] = 0.0
        self.score_state[idx] = float("-inf")


def slot_rows(rows: torch.Tensor | list[int] | int, batch: int, device: torch.device) -> torch.Tensor:
    """``rows`` (an int, a list of ints or an integer tensor, each in ``[0, batch)``) as a long tensor on
    ``device``; anything else (a float that would be truncated, a negative index that would wrap) raises,
    naming ``rows``. A tensor on a GPU is range-checked there (a device-side assert, no host read)."""
    if isinstance(rows, torch.Tensor):
        if rows.is_floating_point() or rows.is_complex() or rows.dtype == torch.bool:
            raise TypeError(f"rows: expected an integer tensor, got {rows.dtype}")
        idx = rows.to(device=device, dtype=torch.long).reshape(-1)
        ok = ((idx >= 0) & (idx < batch)).all()
        message = f"rows: expected slots in [0, {batch})"
        if idx.device.type != "cpu":
            torch._assert_async(ok, message)
        elif not ok:
            raise ValueError(f"{message}, got {idx.tolist()}")
    else:
        items = list(rows) if isinstance(rows, list | tuple) else [rows]
        if any(isinstance(r, bool) or not isinstance(r, int) for r in items):
            raise TypeError(f"rows: expected ints, got {items!r:.80}")
        if any(not 0 <= r < batch for r in items):
            raise ValueError(f"rows: expected slots in [0, {batch}), got {items}")
        idx = torch.tensor(items, dtype=torch.long, device=device)
    return idx


def engine_table(
    block_table: torch.Tensor, num_blocks: int, device: torch.device | str | None, batch: int | None = None
) -> torch.Tensor:
    """A copy of the engine's ``block_table [batch, max_blocks]`` (integers; entries in ``[0, num_blocks)``
    or -1, checked before the cast) as contiguous int32 on ``device``: later changes to the caller's
    tensor do not reach the state."""
    table = torch.as_tensor(block_table)
    if table.is_floating_point() or table.is_complex() or table.dtype == torch.bool:
        raise TypeError(f"block_table: expected an integer tensor, got {str(table.dtype).removeprefix('torch.')}")
    if table.dim() != 2 or table.shape[0] < 1 or (batch is not None and table.shape[0] != batch):
        rows = "batch" if batch is None else str(batch)
        raise ValueError(f"block_table: expected shape [{rows}, max_blocks], got {list(table.shape)}")
    if table.numel() and (int(table.min()) < UNALLOCATED or int(table.max()) >= num_blocks):
        raise ValueError(f"block_table: expected entries in [0, {num_blocks}) or -1")
    return table.to(device=device, dtype=torch.int32, memory_format=torch.contiguous_format, copy=True)


def size_arg(name: str, value: object) -> int:
    """``value`` as an int (a Python, NumPy or 0-d tensor integer); ``TypeError`` naming ``name`` for
    anything else, a float included, rather than truncating it."""
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected an int, got {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name}: expected an int, got {value!r:.60}") from None


def _check_block_size(block_size: int) -> int:
    is_int = isinstance(block_size, int) and not isinstance(block_size, bool)
    if not is_int or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size: expected a power of two >= 16, got {block_size!r}")
    return block_size

"""Op arguments whose paged pools put every block in use past 4 GiB from the pool's start.

A serving engine's pools are large (a CSA layer's compressed KV rows at 1M tokens for 64 sequences are
16M rows of 584 B, 9.8 GB), so a kernel that computes a row's address as an int32 product of a block id
and the row bytes wraps past 2 GiB and reads or writes another row. ``far(record)`` copies a state
record (``IndexerState``, ``KVPool``, ``CompressorState``, ``AttentionState``) with each pool re-based:
``extra`` empty blocks in front, the blocks in use copied behind them, the block table shifted, so that
every block in use lies past ``BEYOND`` bytes in each pool tensor whose blocks are at least its row
width. The empty blocks are never written: on Linux the pages of a large ``torch.empty`` are taken
only where touched, so a 4 GiB pool costs what its blocks in use cost. ``near(record)`` is the inverse
view (the blocks in use, the table shifted back), to compare with a run on the original record.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

BEYOND = 1 << 32  # bytes: past both int32's and uint32's range
POOL_FIELDS = (
    "keys",
    "key_scale",
    "nope",
    "rope",
    "scale",
)  # the fields of a record with a block table indexed by block


def _is_pool(record: Any) -> bool:
    return dataclasses.is_dataclass(record) and hasattr(record, "block_table")


def pools(value: Any) -> list[Any]:
    """The pool records (those with a block table) in ``value``, nested ones included."""
    if not dataclasses.is_dataclass(value):
        return []
    own = [value] if _is_pool(value) else []
    return own + [p for f in dataclasses.fields(value) for p in pools(getattr(value, f.name))]


def _pool_fields(record: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(record) if f.name in POOL_FIELDS]


def extra_blocks(record: Any) -> int:
    """Empty blocks ``far`` puts in front of ``record``'s pool: enough that its widest tensor's blocks in
    use start past ``BEYOND`` bytes."""
    widest = max(getattr(record, f)[0].numel() * getattr(record, f).element_size() for f in _pool_fields(record))
    return -(-BEYOND // widest)


def far(record: Any) -> Any:
    """``record`` with every tensor copied and every pool re-based past ``BEYOND`` bytes (``extra_blocks``)."""
    if isinstance(record, torch.Tensor):
        return record.clone()
    if not dataclasses.is_dataclass(record) or isinstance(record, type):
        return record
    changes = {f.name: far(getattr(record, f.name)) for f in dataclasses.fields(record)}
    if _is_pool(record):
        extra = extra_blocks(record)
        for name in _pool_fields(record):
            t = getattr(record, name)
            moved = torch.empty((extra + t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
            moved[extra:] = t
            changes[name] = moved
        table = changes["block_table"]  # the record's table (copied by far)
        changes["block_table"] = torch.where(table >= 0, table + extra, table)
    return dataclasses.replace(record, **changes)


def near(record: Any) -> Any:
    """The blocks in use of a record made by ``far`` (and changed by an op since), as views, with the
    block table shifted back: comparable field by field with the record ``far`` copied."""
    if not dataclasses.is_dataclass(record) or isinstance(record, type):
        return record
    changes = {f.name: near(getattr(record, f.name)) for f in dataclasses.fields(record)}
    if _is_pool(record):
        extra = extra_blocks(record)  # the same as the copied record's: the blocks are the same size
        for name in _pool_fields(record):
            changes[name] = getattr(record, name)[extra:]
        table = changes["block_table"]  # the record's table (copied by far)
        changes["block_table"] = torch.where(table >= 0, table - extra, table)
    return dataclasses.replace(record, **changes)

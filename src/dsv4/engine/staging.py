"""Host ints on their way to the device without a sync."""

from __future__ import annotations

import torch


def staged(values: list[int], device: torch.device) -> torch.Tensor:
    """``values`` as an int64 host tensor to copy to ``device`` with ``non_blocking=True``: pinned when
    ``device`` is CUDA, so the copy needs no sync (and the caching host allocator does not reuse the
    block before the copy lands)."""
    host = torch.tensor(values, dtype=torch.int64)
    return host.pin_memory() if device.type == "cuda" else host


def write_cells(table: torch.Tensor, cells: list[tuple[int, int, int]]) -> None:
    """``table[row, col] = value`` for each ``(row, col, value)`` of ``cells`` (a later cell wins) as one
    host-to-device copy and one scatter: no host sync, two device operations however many cells."""
    if not cells:
        return
    last = {(r, c): v for r, c, v in cells}
    entries = staged([[r * table.shape[1] + c, v] for (r, c), v in last.items()], table.device)
    cell, value = entries.to(table.device, non_blocking=True).unbind(1)
    table.view(-1).index_copy_(0, cell, value.to(table.dtype))

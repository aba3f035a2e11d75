"""Host values on their way to the device without a sync, and host ints read from what a caller passes."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def staged(values: Sequence[int] | Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """``values`` as an int64 host tensor to copy to ``device`` with ``non_blocking=True``: pinned when
    ``device`` is CUDA, so the copy needs no sync (and the caching host allocator does not reuse the
    block before the copy lands)."""
    host = torch.tensor(values, dtype=torch.int64, device="cpu")  # the host's, whatever torch's default device
    return host.pin_memory() if device.type == "cuda" else host


def write_cells(table: torch.Tensor, cells: Sequence[Sequence[int]]) -> None:
    """``table[row, col] = value`` for each ``(row, col, value)`` of ``cells`` (a later cell wins) as one
    host-to-device copy and one scatter: no host sync, two device operations however many cells."""
    if not cells:
        return
    rows, width = table.shape
    if any(not (0 <= r < rows and 0 <= c < width) for r, c, _ in cells):  # a flat index would land in another cell
        raise IndexError(f"write_cells: a cell outside the [{rows}, {width}] table: {cells}")
    last = {(r, c): v for r, c, v in cells}
    entries = staged([[r * table.shape[1] + c, v] for (r, c), v in last.items()], table.device)
    cell, value = entries.to(table.device, non_blocking=True).unbind(1)
    table.view(-1).index_copy_(0, cell, value.to(table.dtype))


def host_ints(name: str, value: object) -> list[int]:
    """``value`` (an int, a list/tuple of ints, or an integer tensor of at most one dimension) as a list of
    Python ints; floats and bools are refused rather than truncated."""
    if isinstance(value, torch.Tensor):
        if value.device.type == "meta":
            raise ValueError(f"{name}: a meta tensor holds no values; pass ints or a tensor on a real device")
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool or value.dim() > 1:
            raise TypeError(f"{name}: expected an integer tensor of at most one dimension, got {value.dtype} "
                            f"{list(value.shape)}")  # fmt: skip
        return [int(v) for v in value.reshape(-1).tolist()]
    items = list(value) if isinstance(value, list | tuple) else [value]
    ints = [v for v in items if isinstance(v, int) and not isinstance(v, bool)]
    if len(ints) < len(items):
        bad = next(v for v in items if isinstance(v, bool) or not isinstance(v, int))
        raise TypeError(f"{name}: expected ints, got {bad!r} ({type(bad).__name__})")
    return ints

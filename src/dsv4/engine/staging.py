"""Host ints on their way to the device without a sync."""

from __future__ import annotations

import torch


def staged(values: list[int], device: torch.device) -> torch.Tensor:
    """``values`` as an int64 host tensor to copy to ``device`` with ``non_blocking=True``: pinned when
    ``device`` is CUDA, so the copy needs no sync (and the caching host allocator does not reuse the
    block before the copy lands)."""
    host = torch.tensor(values, dtype=torch.int64)
    return host.pin_memory() if device.type == "cuda" else host

"""The one reading of a device named by a caller: the Python API, the ``dsv4`` command and the
benchmarks all take ``cpu`` or a ``cuda[:N]`` this machine has, and refuse anything else the same way,
naming the argument, before anything is read or allocated."""

from __future__ import annotations

import torch

WANT = "cpu or cuda[:N]"


def check_device(device: object) -> torch.device:
    """``device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device`` of those) parsed; a CUDA device
    only where this machine has it. Anything else: a ``ValueError`` naming ``device``."""
    if not isinstance(device, str | torch.device):
        raise ValueError(f"device: expected {WANT}, got {type(device).__name__} {device!r:.60}")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"device: expected {WANT}, got {device!r:.60} ({e})") from None
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected {WANT}, got {device!r:.60}")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device!r:.60}, but CUDA is not available (a CPU-only torch, or no GPU found)")
        count = torch.cuda.device_count()
        if (parsed.index or 0) >= count:
            raise ValueError(f"device: {device!r:.60}, but there are {count} CUDA device(s)")
    return parsed

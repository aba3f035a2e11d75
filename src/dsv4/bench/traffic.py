"""Bytes a backend moves for one call, counted on the CPU: the Triton kernels' loads and stores
under the interpreter, plus an estimate for any PyTorch op the backend runs between kernels."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .calls import BoundCall
from .interp_traffic import TrafficLog, count_traffic

_LAUNCH_BYTES = ("load_bytes", "store_bytes", "sector_bytes", "unique_bytes")
_FREE_OPS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "lift_fresh"}


class _TorchOpBytes(TorchDispatchMode):
    """Counts the PyTorch ops run outside kernel launches and their bytes, estimated as every tensor
    argument read once and every result written once (views and allocations cost nothing)."""

    def __init__(self, log: TrafficLog) -> None:
        super().__init__()
        self.log = log
        self.ops: Counter[str] = Counter()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not self.log.in_launch and not func.is_view and name not in _FREE_OPS:
            self.ops[name] += 1
            tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
            self.bytes += sum(t.numel() * t.element_size() for t in tensors)
        return out


@dataclass
class Traffic:
    """What one call moved: its kernel launches and the PyTorch ops between them."""

    launches: int
    kernels: dict[str, int]  # launches per kernel name
    load_bytes: int
    store_bytes: int
    sector_bytes: int
    unique_bytes: int
    torch_ops: dict[str, int] = field(default_factory=dict)
    torch_op_bytes: int = 0
    per_launch: list[dict[str, Any]] = field(default_factory=list)  # kernel, grid and bytes of each launch

    @property
    def requested_bytes(self) -> int:
        """Kernel loads + stores, plus the PyTorch ops' estimate."""
        return self.load_bytes + self.store_bytes + self.torch_op_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "launches": self.launches,
            "kernels": self.kernels,
            "load_bytes": self.load_bytes,
            "store_bytes": self.store_bytes,
            "sector_bytes": self.sector_bytes,
            "unique_bytes": self.unique_bytes,
            "torch_ops": self.torch_ops,
            "torch_op_bytes": self.torch_op_bytes,
            "requested_bytes": self.requested_bytes,
            "per_launch": self.per_launch,
        }


def measure_traffic(call: BoundCall) -> tuple[Traffic, Any]:
    """Run ``call`` once under the counters; returns its traffic and its result."""
    with count_traffic() as log, _TorchOpBytes(log) as torch_ops:
        result = call()
    kernels = Counter(launch.kernel for launch in log.launches)
    traffic = Traffic(
        launches=len(log.launches),
        kernels=dict(kernels),
        load_bytes=log.total("load_bytes"),
        store_bytes=log.total("store_bytes"),
        sector_bytes=log.total("sector_bytes") + torch_ops.bytes,
        unique_bytes=log.total("unique_bytes") + torch_ops.bytes,
        torch_ops=dict(torch_ops.ops),
        torch_op_bytes=torch_ops.bytes,
        per_launch=[
            {"kernel": launch.kernel, "grid": list(launch.grid), **{k: getattr(launch, k) for k in _LAUNCH_BYTES}}
            for launch in log.launches
        ],
    )
    return traffic, result

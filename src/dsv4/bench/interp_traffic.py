"""Memory traffic of Triton kernels as Triton's CPU interpreter runs them.

Every reliance on the interpreter's internals lives in this file, and ``tests/test_interp_traffic.py``
fails loudly if Triton changes underneath it. Two hook points, the same in Triton 3.6 through 3.9:

- ``triton.runtime.interpreter._interpreter``: the C extension whose ``load``, ``store``,
  ``atomic_rmw`` and ``atomic_cas`` every ``tl.load``/``tl.store``/atomic (plain, masked,
  block-pointer and descriptor forms alike) ends in. We swap the module global for a proxy that
  counts, then forwards.
- ``GridExecutor.__call__``: one call per kernel launch; the grid and the kernel's name are read there.

Counted per launch, with masked-off lanes excluded:

- ``load_bytes`` / ``store_bytes``: bytes the program instances request (element size x active lanes;
  an atomic read-modify-write counts as a load and a store);
- ``sector_bytes``: 32 B sectors touched by each access, x 32 — the memory system moves whole
  sectors, so a strided or partial-line access pays more than it requests;
- ``unique_bytes``: distinct 32 B sectors read plus distinct 32 B sectors written over the whole
  launch, x 32 — what DRAM would move if every re-read hit in cache.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SECTOR = 32  # bytes: the unit in which NVIDIA GPUs move data between L2 and DRAM
_MERGE_EVERY = 1 << 22  # sector ids buffered before deduplicating: bounds memory on large launches


@dataclass
class Launch:
    """Traffic of one kernel launch."""

    kernel: str
    grid: tuple[int, int, int]
    load_bytes: int = 0
    store_bytes: int = 0
    sector_bytes: int = 0
    unique_bytes: int = 0
    accesses: int = 0  # tl.load / tl.store / atomic calls across all program instances
    _sectors: list[np.ndarray] = field(default_factory=list, repr=False)
    _buffered: int = field(default=0, repr=False)
    _merge_at: int = field(default=_MERGE_EVERY, repr=False)

    @property
    def requested_bytes(self) -> int:
        return self.load_bytes + self.store_bytes

    def _touch(self, addrs: np.ndarray, itemsize: int, loads: int, stores: int) -> None:
        n = int(addrs.size)
        self.accesses += 1
        if n == 0:
            return
        self.load_bytes += loads * n * itemsize
        self.store_bytes += stores * n * itemsize
        first, last = addrs // SECTOR, (addrs + np.uint64(itemsize - 1)) // SECTOR
        sectors = np.unique(np.concatenate((first, last)))
        self.sector_bytes += (loads + stores) * int(sectors.size) * SECTOR
        tagged = sectors << np.uint64(1)  # lowest bit: 0 read, 1 written (a sector read and written moves twice)
        for kind in [np.uint64(0)] * loads + [np.uint64(1)] * stores:
            self._sectors.append(tagged | kind)
            self._buffered += int(sectors.size)
        if self._buffered > self._merge_at:
            self._merge()
            self._merge_at = max(_MERGE_EVERY, 2 * self._buffered)  # amortized: merges stay linear overall

    def _merge(self) -> None:
        if self._sectors:
            merged = np.unique(np.concatenate(self._sectors))
            self._sectors = [merged]
            self._buffered = int(merged.size)

    def _finish(self) -> None:
        self._merge()
        self.unique_bytes = self._buffered * SECTOR
        self._sectors, self._buffered = [], 0


@dataclass
class TrafficLog:
    """Launches recorded inside ``count_traffic()``, in order."""

    launches: list[Launch] = field(default_factory=list)
    current: Launch | None = None

    @property
    def in_launch(self) -> bool:
        return self.current is not None

    def total(self, attr: str) -> int:
        return sum(getattr(launch, attr) for launch in self.launches)


class _CountingExtension:
    """Stands in for the interpreter's C extension: counts each memory access, then forwards it."""

    def __init__(self, real: Any, log: TrafficLog) -> None:
        self._real, self._log = real, log

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def _count(self, ptrs: np.ndarray, mask: np.ndarray | None, itemsize: int, loads: int, stores: int) -> None:
        launch = self._log.current
        if launch is None:
            return
        ptrs = np.asarray(ptrs, dtype=np.uint64)
        if mask is not None:
            ptrs = ptrs[np.broadcast_to(np.asarray(mask, dtype=bool), ptrs.shape)]
        launch._touch(ptrs.reshape(-1), itemsize, loads, stores)

    def load(self, ptrs, mask, other, dtype, *rest):
        self._count(ptrs, mask, np.dtype(dtype).itemsize, 1, 0)
        return self._real.load(ptrs, mask, other, dtype, *rest)

    def store(self, ptrs, values, mask, *rest):
        self._count(ptrs, mask, np.asarray(values).dtype.itemsize, 0, 1)
        return self._real.store(ptrs, values, mask, *rest)

    def atomic_rmw(self, op, ptrs, values, mask, *rest):
        self._count(ptrs, mask, np.asarray(values).dtype.itemsize, 1, 1)
        return self._real.atomic_rmw(op, ptrs, values, mask, *rest)

    def atomic_cas(self, ptrs, expected, values, *rest):
        self._count(ptrs, None, np.asarray(values).dtype.itemsize, 1, 1)
        return self._real.atomic_cas(ptrs, expected, values, *rest)


_LOCK = threading.Lock()  # the hooks are process-wide: one counter at a time


def _interpreter_module() -> Any:
    """``triton.runtime.interpreter``, checked to still have the hook points this file relies on."""
    import triton
    import triton.runtime.interpreter as interp

    missing = [
        name
        for name, ok in (
            ("_interpreter", hasattr(interp, "_interpreter")),
            ("GridExecutor.__call__", "__call__" in vars(getattr(interp, "GridExecutor", object))),
            ("interpreter_builder.set_grid_dim", hasattr(getattr(interp, "interpreter_builder", None), "set_grid_dim")),
        )
        if not ok
    ]
    real = getattr(interp, "_interpreter", None)
    missing += [f"_interpreter.{f}" for f in ("load", "store", "atomic_rmw", "atomic_cas") if not hasattr(real, f)]
    if missing:
        raise RuntimeError(
            f"Triton {triton.__version__} changed its interpreter: {', '.join(missing)} not found; "
            "dsv4.bench.interp_traffic needs updating"
        )
    return interp


@contextlib.contextmanager
def count_traffic() -> Iterator[TrafficLog]:
    """Record every interpreted kernel launch made inside the ``with`` block.

    Kernels must be interpreted (``TRITON_INTERPRET=1`` when they were defined); compiled launches
    are not seen. Not thread-safe across concurrent launches; nested use raises.
    """
    interp = _interpreter_module()
    if not _LOCK.acquire(blocking=False):
        raise RuntimeError("count_traffic() is already active")
    log = TrafficLog()
    real_ext, real_call = interp._interpreter, interp.GridExecutor.__call__

    def counted_call(executor: Any, *args: Any, **kwargs: Any) -> Any:
        grid_dim: list[tuple[int, int, int]] = []
        builder = interp.interpreter_builder
        real_set = builder.set_grid_dim

        def set_grid_dim(nx: int, ny: int, nz: int) -> None:
            grid_dim.append((int(nx), int(ny), int(nz)))
            real_set(nx, ny, nz)

        launch = Launch(kernel=getattr(executor.fn, "__name__", "?"), grid=(0, 0, 0))
        log.current = launch
        builder.set_grid_dim = set_grid_dim
        try:
            return real_call(executor, *args, **kwargs)
        finally:
            del builder.set_grid_dim  # the instance attribute shadowed the class method
            log.current = None
            launch.grid = grid_dim[-1] if grid_dim else (0, 0, 0)
            launch._finish()
            log.launches.append(launch)

    interp._interpreter = _CountingExtension(real_ext, log)
    interp.GridExecutor.__call__ = counted_call
    try:
        yield log
    finally:
        interp._interpreter = real_ext
        interp.GridExecutor.__call__ = real_call
        _LOCK.release()

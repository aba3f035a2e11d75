"""Memory traffic of Triton kernels as Triton's CPU interpreter runs them.

Every reliance on the interpreter's internals lives in this file, and ``tests/test_interp_traffic.py``
fails loudly if Triton changes underneath it. The hook points, the same in Triton 3.6 through 3.9:

- ``triton.runtime.interpreter._interpreter``: the C extension whose ``load``, ``store``,
  ``atomic_rmw`` and ``atomic_cas`` every ``tl.load``/``tl.store``/atomic (plain, masked,
  block-pointer and descriptor forms alike) ends in. We swap the module global for a proxy that
  counts, then forwards.
- ``GridExecutor.__call__``: one call per kernel launch; the grid, the kernel's name and its
  ``launch_pdl`` option are read there.
- ``interpreter_builder.set_grid_idx``, ``create_barrier``, ``create_atomic_rmw`` and ``create_atomic_cas``
  (``count_traffic(addresses=True)`` only): the start of each program instance, its block barriers
  (``tl.debug_barrier``) and the memory semantics and scope of its atomics.

Counted per launch, with masked-off lanes excluded:

- ``load_bytes`` / ``store_bytes``: bytes the program instances request (element size x active lanes;
  an atomic read-modify-write counts as a load and a store);
- ``sector_bytes``: 32 B sectors touched by each access, x 32 — the memory system moves whole
  sectors, so a strided or partial-line access pays more than it requests;
- ``unique_bytes``: distinct 32 B sectors read plus distinct 32 B sectors written over the whole
  launch, x 32 — what DRAM would move if every re-read hit in cache.

With ``addresses=True`` each launch also keeps the bytes it read and wrote, split at the point where
each program waits for its predecessor (``mark_wait``, what ``gdc_wait`` stands for), and notes
whether its programs let the next launch start (``mark_launch_dependents``) before that wait: what a
check of programmatic dependent launch needs (``Launch.regions``); the bytes one of its programs
stores that another of its programs touches (``Launch.shared``); which of those hand-offs no
release and acquire order on a GPU (``Launch.unordered``); and where a program reads back or overwrites
bytes it stored with no block barrier between (``Launch.unfenced``).

``bounds_checked()`` uses the same two hook points to refuse any access outside the tensors a launch
was given (``OutOfBounds``), and ``dots_checked()`` the builder's ``create_dot`` to refuse a ``tl.dot``
whose fp32 operands a GPU would round to tf32 (``InexactDot``); the test suite runs every interpreted
launch under both.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .hand_offs import Call, shared_bytes, unfenced, unordered

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
    pdl: bool = False  # launched with ``launch_pdl=True``: may start before its predecessor completes
    waits: bool = False  # some program called ``mark_wait``
    triggers_before_wait: bool = False  # some program called ``mark_launch_dependents`` before its wait
    regions: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # addresses=True: see ``region``
    _bytes: dict[tuple[str, str], list[np.ndarray]] = field(default_factory=dict, repr=False)
    shared: dict[str, int] = field(default_factory=dict)  # addresses=True: see ``hand_offs.shared_bytes``
    unordered: list[str] = field(default_factory=list)  # addresses=True: see ``hand_offs.unordered``
    unfenced: list[str] = field(default_factory=list)  # addresses=True: see ``hand_offs.unfenced``
    _waited: bool = field(default=False, repr=False)  # the running program has passed its wait
    _program: int = field(default=-1, repr=False)  # the running program, counted from 0 in run order
    _event: int = field(default=0, repr=False)  # the running program's accesses and barriers so far
    _sem: tuple[str, str] = field(default=("", ""), repr=False)  # the atomic being run: semantics, scope
    _calls: list[Call] = field(default_factory=list, repr=False)
    _barriers: dict[int, list[int]] = field(default_factory=dict, repr=False)  # program -> its barriers' events
    _grid_idx: dict[int, tuple[int, ...]] = field(default_factory=dict, repr=False)  # program -> grid index
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

    def _keep(self, addrs: np.ndarray, itemsize: int, loads: int, stores: int) -> None:
        """Remember the bytes of one access, in the running program's region (before or after its wait),
        and which program made it, when (its place among the program's accesses and barriers) and, for
        an atomic (one that both loads and stores), with which semantics and scope."""
        if addrs.size == 0:
            return
        where = "after_wait" if self._waited else "before_wait"
        spans = (addrs[:, None] + np.arange(itemsize, dtype=np.uint64)[None, :]).reshape(-1)
        for kind in ["read"] * loads + ["write"] * stores:
            self._bytes.setdefault((where, kind), []).append(spans)
        kind = "atomic" if loads and stores else "read" if loads else "write"
        sem, scope = self._sem if kind == "atomic" else ("", "")
        self._calls.append(Call(kind, spans, self._program, self._event, sem, scope))
        self._event += 1

    def _barrier(self) -> None:
        """The running program's threads meet here (``tl.debug_barrier``)."""
        self._barriers.setdefault(self._program, []).append(self._event)
        self._event += 1

    def region(self, where: str, kind: str) -> np.ndarray:
        """The distinct byte addresses (uint64, sorted) the launch's programs ``kind`` (``"read"`` or
        ``"write"``; an atomic does both) ``where`` (``"before_wait"``, ``"after_wait"``, ``"all"``);
        kept with ``count_traffic(addresses=True)`` only."""
        if where == "all":
            return np.union1d(self.region("before_wait", kind), self.region("after_wait", kind))
        return self.regions.get(where, {}).get(kind, np.empty(0, np.uint64))

    def _merge(self) -> None:
        if self._sectors:
            merged = np.unique(np.concatenate(self._sectors))
            self._sectors = [merged]
            self._buffered = int(merged.size)

    def _finish(self) -> None:
        self._merge()
        self.unique_bytes = self._buffered * SECTOR
        self._sectors, self._buffered = [], 0
        for (where, kind), spans in self._bytes.items():
            self.regions.setdefault(where, {})[kind] = np.unique(np.concatenate(spans))
        if self._calls:
            self.shared = shared_bytes(self._calls)
            self.unordered = unordered(self._calls, self._barriers, self._grid_idx)
            self.unfenced = unfenced(self._calls, self._barriers, self._grid_idx)
        self._bytes, self._calls, self._barriers, self._grid_idx = {}, [], {}, {}


@dataclass
class TrafficLog:
    """Launches recorded inside ``count_traffic()``, in order."""

    launches: list[Launch] = field(default_factory=list)
    current: Launch | None = None
    addresses: bool = False  # keep each launch's bytes (``Launch.region``)

    @property
    def in_launch(self) -> bool:
        return self.current is not None

    def total(self, attr: str) -> int:
        return sum(getattr(launch, attr) for launch in self.launches)


_Access = Callable[[str, np.ndarray, int, int, int], None]  # (what, active lanes' addresses, itemsize, loads, stores)


class _Extension:
    """Stands in for the interpreter's C extension: hands each memory access's active lanes to
    ``on_access(what, ptrs, itemsize, loads, stores)`` (``what``: load, store or atomic; an atomic
    both loads and stores), then forwards the call."""

    def __init__(self, real: Any, on_access: _Access) -> None:
        self._real, self._on_access = real, on_access

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def _lanes(self, what: str, ptrs: Any, mask: Any, itemsize: int, loads: int, stores: int) -> None:
        ptrs = np.asarray(ptrs, dtype=np.uint64)
        if mask is not None:
            ptrs = ptrs[np.broadcast_to(np.asarray(mask, dtype=bool), ptrs.shape)]
        self._on_access(what, ptrs.reshape(-1), itemsize, loads, stores)

    def load(self, ptrs, mask, other, dtype, *rest):
        self._lanes("load", ptrs, mask, np.dtype(dtype).itemsize, 1, 0)
        return self._real.load(ptrs, mask, other, dtype, *rest)

    def store(self, ptrs, values, mask, *rest):
        self._lanes("store", ptrs, mask, np.asarray(values).dtype.itemsize, 0, 1)
        return self._real.store(ptrs, values, mask, *rest)

    def atomic_rmw(self, op, ptrs, values, mask, *rest):
        self._lanes("atomic", ptrs, mask, np.asarray(values).dtype.itemsize, 1, 1)
        return self._real.atomic_rmw(op, ptrs, values, mask, *rest)

    def atomic_cas(self, ptrs, expected, values, *rest):
        self._lanes("atomic", ptrs, None, np.asarray(values).dtype.itemsize, 1, 1)
        return self._real.atomic_cas(ptrs, expected, values, *rest)


def _counter(log: TrafficLog) -> _Access:
    """Counts each access in ``log``'s running launch (and keeps its bytes with ``log.addresses``)."""

    def count(what: str, ptrs: np.ndarray, itemsize: int, loads: int, stores: int) -> None:
        launch = log.current
        if launch is None:
            return
        launch._touch(ptrs, itemsize, loads, stores)
        if log.addresses:
            launch._keep(ptrs, itemsize, loads, stores)

    return count


class OutOfBounds(RuntimeError):
    """An interpreted kernel touched memory outside every tensor its launch was given."""


def _tensor_spans(args: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, ends)`` (uint64, sorted, disjoint) of the bytes the tensors among a launch's arguments
    (in tuples too) cover, each from its lowest to its highest element as its shape and strides place
    them: the only memory its programs may touch. Overlapping views merge."""
    spans = []
    stack = list(args)
    while stack:
        a = stack.pop()
        if isinstance(a, (tuple, list)):
            stack.extend(a)
        elif isinstance(a, torch.Tensor) and a.numel():
            low = sum(st * (n - 1) for n, st in zip(a.shape, a.stride(), strict=True) if st < 0)
            high = sum(st * (n - 1) for n, st in zip(a.shape, a.stride(), strict=True) if st > 0)
            base, size = a.data_ptr(), a.element_size()
            spans.append((base + low * size, base + (high + 1) * size))
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return np.array([a for a, _ in merged], np.uint64), np.array([b for _, b in merged], np.uint64)


def _guard(launches: list[tuple[str, tuple[np.ndarray, np.ndarray]]]) -> _Access:
    """Refuses an access outside the running launch's tensors (``launches[-1]``: its kernel's name and
    its tensors' spans)."""

    def check(what: str, ptrs: np.ndarray, itemsize: int, loads: int, stores: int) -> None:
        if not launches:
            return
        kernel, (starts, ends) = launches[-1]
        if starts.size:
            at = np.maximum(np.searchsorted(starts, ptrs, side="right") - 1, 0)
            outside = (ptrs < starts[at]) | (ptrs + np.uint64(itemsize) > ends[at])
        else:
            outside = np.ones(ptrs.shape, bool)
        if outside.any():
            raise OutOfBounds(
                f"{kernel}: a {what} of {int(outside.sum())} x {itemsize} B outside every tensor it was given "
                f"(first at {int(ptrs[outside][0]):#x}; its tensors' bytes: "
                + ", ".join(f"[{int(a):#x}, {int(b):#x})" for a, b in zip(starts, ends, strict=True))
                + ")"
            )

    return check


@contextlib.contextmanager
def bounds_checked() -> Iterator[None]:
    """Inside the block, an interpreted load, store or atomic (its active lanes) that touches a byte outside
    the tensors its launch was given (each from its first to its last element, as its shape and strides
    place them) raises ``OutOfBounds``, naming the kernel.

    The interpreter reads and writes raw memory, so an access that a mask should have stopped goes
    unnoticed there (it reads a neighbour's bytes, or writes them), where a GPU may fault or read
    garbage, or, inside a larger buffer, another view's bytes (another slot's rows). ``count_traffic``
    may run inside the block."""
    interp = _interpreter_module()
    real_ext = interp._interpreter

    def entry(name: str, args: tuple, kwargs: dict) -> tuple[str, tuple[np.ndarray, np.ndarray]]:
        return name, _tensor_spans([*args, *kwargs.values()])

    with _running_launches(interp, entry) as launches:
        interp._interpreter = _Extension(real_ext, _guard(launches))
        try:
            yield
        finally:
            interp._interpreter = real_ext


@contextlib.contextmanager
def _running_launches(interp: Any, entry: Callable[[str, tuple, dict], Any]) -> Iterator[list[Any]]:
    """A stack of ``entry(kernel name, args, kwargs)`` for the interpreted launches running inside the
    block (the last is the running one), kept through ``GridExecutor.__call__``."""
    running: list[Any] = []
    real_call = interp.GridExecutor.__call__

    def call(executor: Any, *args: Any, **kwargs: Any) -> Any:
        running.append(entry(getattr(executor.fn, "__name__", "?"), args, kwargs))
        try:
            return real_call(executor, *args, **kwargs)
        finally:
            running.pop()

    interp.GridExecutor.__call__ = call
    try:
        yield running
    finally:
        interp.GridExecutor.__call__ = real_call


class InexactDot(RuntimeError):
    """An interpreted ``tl.dot`` whose fp32 operands a GPU would round to tf32, which the interpreter does not."""


_TF32_DROPPED = np.uint32((1 << 13) - 1)  # the fp32 mantissa bits tf32 does not keep


@contextlib.contextmanager
def dots_checked() -> Iterator[None]:
    """Inside the block, an interpreted ``tl.dot`` with an fp32 operand that tf32 cannot hold exactly raises
    ``InexactDot``, naming the kernel, unless the dot asks for ``input_precision="ieee"`` (NaNs, whose
    payload bits tf32 drops, stay NaNs: they pass).

    Compiled for an NVIDIA GPU, a ``tl.dot`` of fp32 operands runs on the tensor cores in tf32 (10
    mantissa bits) unless it asks for ``ieee``; the interpreter multiplies the fp32 values as they are.
    The two agree only where every operand is tf32-exact (a bf16 value held as fp32 is), which is how
    the kernels use fp32 dots: otherwise a kernel would pass every CPU test and give other numbers on a
    GPU."""
    interp = _interpreter_module()
    builder = interp.interpreter_builder
    real_dot = builder.create_dot
    shadowed = vars(builder).get("create_dot")  # an enclosing dots_checked's
    with _running_launches(interp, lambda name, args, kwargs: name) as kernels:

        def checked_dot(a: Any, b: Any, d: Any, input_precision: Any, *rest: Any) -> Any:
            if getattr(input_precision, "name", None) != "IEEE":
                for name, x in (("first", a), ("second", b)):
                    data = np.asarray(x.data)  # a NaN stays a NaN in tf32, whatever its payload bits
                    if data.dtype == np.float32 and (data[~np.isnan(data)].view(np.uint32) & _TF32_DROPPED).any():
                        raise InexactDot(
                            f"{kernels[-1] if kernels else '?'}: a tl.dot's {name} operand holds fp32 values that "
                            f"tf32 rounds (input precision {getattr(input_precision, 'name', input_precision)}): "
                            "a GPU would multiply other numbers than the interpreter; make them bf16-exact or ask "
                            "for ieee"
                        )
            return real_dot(a, b, d, input_precision, *rest)

        builder.create_dot = checked_dot
        try:
            yield
        finally:
            if shadowed is None:
                del builder.create_dot  # the instance attribute shadowed the method
            else:
                builder.create_dot = shadowed


_LOCK = threading.Lock()  # the hooks are process-wide: one counter at a time
_ACTIVE: list[TrafficLog] = []  # the log of the active ``count_traffic``, for the markers


def mark_wait() -> None:
    """The running program waits here for its predecessor launch to complete (``gdc_wait``): its
    accesses from here on are kept as ``after_wait``. Outside ``count_traffic``, nothing."""
    launch = _ACTIVE[0].current if _ACTIVE else None
    if launch is not None:
        launch._waited = launch.waits = True


def mark_launch_dependents() -> None:
    """The running program lets the next launch start (``gdc_launch_dependents``); noted when it has
    not waited yet. Outside ``count_traffic``, nothing."""
    launch = _ACTIVE[0].current if _ACTIVE else None
    if launch is not None:
        launch.triggers_before_wait |= not launch._waited


def _interpreter_module() -> Any:
    """``triton.runtime.interpreter``, checked to still have the hook points this file relies on."""
    from ..kernels import interpreter  # noqa: F401  (first: without CUDA it chooses the interpreter before Triton loads)

    # isort: split
    import triton
    import triton.runtime.interpreter as interp

    missing = [
        name
        for name, ok in (
            ("_interpreter", hasattr(interp, "_interpreter")),
            ("GridExecutor.__call__", "__call__" in vars(getattr(interp, "GridExecutor", object))),
            *(
                (f"interpreter_builder.{name}", hasattr(getattr(interp, "interpreter_builder", None), name))
                for name in (
                    "set_grid_dim",
                    "set_grid_idx",
                    "create_barrier",
                    "create_atomic_rmw",
                    "create_atomic_cas",
                    "create_dot",
                )
            ),
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
def count_traffic(addresses: bool = False) -> Iterator[TrafficLog]:
    """Record every interpreted kernel launch made inside the ``with`` block; ``addresses``: keep the
    bytes each launch reads and writes, before and after its programs' waits (``Launch.region``).

    Kernels must be interpreted (``TRITON_INTERPRET=1`` when they were defined); compiled launches
    are not seen. Not thread-safe across concurrent launches; nested use raises.
    """
    interp = _interpreter_module()
    if not _LOCK.acquire(blocking=False):
        raise RuntimeError("count_traffic() is already active")
    log = TrafficLog(addresses=addresses)
    real_ext, real_call = interp._interpreter, interp.GridExecutor.__call__

    def counted_call(executor: Any, *args: Any, **kwargs: Any) -> Any:
        grid_dim: list[tuple[int, int, int]] = []
        builder = interp.interpreter_builder
        real_set = builder.set_grid_dim

        def set_grid_dim(nx: int, ny: int, nz: int) -> None:
            grid_dim.append((int(nx), int(ny), int(nz)))
            real_set(nx, ny, nz)

        launch = Launch(kernel=getattr(executor.fn, "__name__", "?"), grid=(0, 0, 0))
        launch.pdl = bool(kwargs.get("launch_pdl", False))
        log.current = launch
        builder.set_grid_dim = set_grid_dim
        shadowed = vars(builder).get("set_grid_idx")  # another hook's, e.g. a test's program order
        real_idx = builder.set_grid_idx

        def set_grid_idx(x: int, y: int, z: int) -> None:
            launch._waited = False  # a program starts
            launch._program += 1
            launch._event = 0
            real_idx(x, y, z)
            launch._grid_idx[launch._program] = tuple(int(v) for v in builder.grid_idx)

        def atomic(real: Callable[..., Any]) -> Callable[..., Any]:
            def noted(*args: Any) -> Any:  # (..., sem, scope): the last two arguments in Triton 3.6 to 3.9
                launch._sem = (args[-2].name, args[-1].name)
                try:
                    return real(*args)
                finally:
                    launch._sem = ("", "")

            return noted

        if log.addresses:
            builder.set_grid_idx = set_grid_idx
            builder.create_barrier = launch._barrier
            builder.create_atomic_rmw = atomic(builder.create_atomic_rmw)
            builder.create_atomic_cas = atomic(builder.create_atomic_cas)
        try:
            return real_call(executor, *args, **kwargs)
        finally:
            del builder.set_grid_dim  # the instance attribute shadowed the class method
            if shadowed is not None:
                builder.set_grid_idx = shadowed
            elif log.addresses:
                del builder.set_grid_idx
            if log.addresses:
                del builder.create_barrier, builder.create_atomic_rmw, builder.create_atomic_cas
            log.current = None
            launch.grid = grid_dim[-1] if grid_dim else (0, 0, 0)
            launch._finish()
            log.launches.append(launch)

    interp._interpreter = _Extension(real_ext, _counter(log))
    interp.GridExecutor.__call__ = counted_call
    _ACTIVE.append(log)
    try:
        yield log
    finally:
        _ACTIVE.clear()
        interp._interpreter = real_ext
        interp.GridExecutor.__call__ = real_call
        _LOCK.release()

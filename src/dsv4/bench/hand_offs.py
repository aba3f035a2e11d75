"""What the programs of one kernel launch hand each other through memory, and whether a GPU would order it.

Pure functions over the accesses ``interp_traffic.count_traffic(addresses=True)`` records as the
interpreter runs a launch (``Call``: which program, when among its accesses and barriers, which bytes,
an atomic's semantics and scope): the bytes one program stores that another touches (``shared_bytes``),
the hand-offs that no barrier, release and acquire order between programs (``unordered``), and the
stores a program reads back with no barrier between its threads (``unfenced``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Call:
    """One load, store or atomic of one program (``count_traffic(addresses=True)``)."""

    kind: str  # "read", "write" (a plain store) or "atomic"
    spans: np.ndarray  # the bytes of its active lanes (uint64, unsorted, repeats kept)
    program: int  # the program that made it, counted from 0 in run order
    event: int  # its place among the program's accesses and barriers
    sem: str = ""  # an atomic's memory semantics: RELAXED, ACQUIRE, RELEASE or ACQUIRE_RELEASE
    scope: str = ""  # an atomic's scope: CTA, GPU or SYSTEM


def _stored(calls: list[Call]) -> tuple[np.ndarray, np.ndarray]:
    """The bytes the launch's programs store plainly (sorted, distinct) and the program that stores each
    (-1: two or more do)."""
    stores = [c for c in calls if c.kind == "write"]
    if not stores:
        return np.empty(0, np.uint64), np.empty(0, np.int64)
    byte = np.concatenate([c.spans for c in stores])
    prog = np.concatenate([np.full(c.spans.size, c.program, np.int64) for c in stores])
    order = np.lexsort((prog, byte))
    byte, prog = byte[order], prog[order]
    keep = np.ones(byte.size, bool)
    keep[1:] = (byte[1:] != byte[:-1]) | (prog[1:] != prog[:-1])  # one (byte, program) pair each
    written, first, writers = np.unique(byte[keep], return_index=True, return_counts=True)
    return written, np.where(writers > 1, -1, prog[keep][first])


def _by_another(call: Call, written: np.ndarray, writer: np.ndarray) -> np.ndarray:
    """The bytes of ``call`` that another program stores (plainly)."""
    if not written.size:
        return call.spans[:0]
    at = np.minimum(np.searchsorted(written, call.spans), written.size - 1)
    return call.spans[(written[at] == call.spans) & (writer[at] != call.program)]


def shared_bytes(calls: list[Call]) -> dict[str, int]:
    """Bytes that one program of a launch stores (plainly) and another program of it touches, by how
    the other touches them: ``{"write": bytes stored by two or more programs, "read": ... loaded by
    another, "atomic": ... hit by another's atomic}``. Programs that meet only through atomics share
    none; a plain store another program reads is a hand-off that needs a protocol on a GPU."""
    written, writer = _stored(calls)
    shared = {"write": int((writer < 0).sum())}
    for kind in ("read", "atomic"):
        hits = [_by_another(c, written, writer) for c in calls if c.kind == kind]
        shared[kind] = int(np.unique(np.concatenate(hits)).size) if hits else 0
    return shared


_RELEASES = ("RELEASE", "ACQUIRE_RELEASE")
_ACQUIRES = ("ACQUIRE", "ACQUIRE_RELEASE")
_GPU_WIDE = ("GPU", "SYSTEM")  # scopes whose order other programs (other SMs) observe
_A = {"read": "a read", "write": "a write", "atomic": "an atomic"}
_VERB = {"read": "reads", "write": "stores", "atomic": "updates"}


def unordered(calls: list[Call], barriers: dict[int, list[int]], grid_idx: dict[int, tuple[int, ...]]) -> list[str]:
    """The hand-offs between programs of a launch that nothing orders on a GPU, as readable lines.

    A hand-off is a pair of accesses to one byte by two programs, at least one of them a plain store.
    The interpreter runs the programs one after another; a GPU runs them side by side, where the later
    access sees the earlier one's effect (or, for a store after a read, leaves the read alone) only when
    the earlier program, after its access, meets its threads at a block barrier (``tl.debug_barrier``)
    and then releases (an atomic with ``release`` or ``acq_rel`` semantics at ``gpu`` scope; or the
    access is that atomic itself), and the later program acquires (``acquire`` or ``acq_rel``, ``gpu``
    scope) a word that release wrote, before its access. Each pair needs both, earlier and later as the
    interpreter ran them. An order made through a third program (a chain of releases and acquires) is
    not followed, so it counts as none."""
    written, writer = _stored(calls)
    if not written.size:
        return []
    contested = np.unique(np.concatenate([_by_another(c, written, writer) for c in calls]))
    if not contested.size:
        return []
    releases: dict[int, list[Call]] = {}
    acquires: dict[int, list[Call]] = {}
    for c in calls:
        if c.kind == "atomic" and c.scope in _GPU_WIDE:
            if c.sem in _RELEASES:
                releases.setdefault(c.program, []).append(c)
            if c.sem in _ACQUIRES:
                acquires.setdefault(c.program, []).append(c)
    hits = []
    for c in calls:
        at = np.minimum(np.searchsorted(contested, c.spans), contested.size - 1)
        mine = np.unique(c.spans[contested[at] == c.spans])
        if mine.size:
            hits.append((c, mine))
    found: dict[tuple[int, int, int, int], str] = {}
    for i, (a, bytes_a) in enumerate(hits):
        for b, bytes_b in hits[i + 1 :]:
            if a.program == b.program or "write" not in (a.kind, b.kind):
                continue
            if bytes_a[0] > bytes_b[-1] or bytes_b[0] > bytes_a[-1] or not _meet(bytes_a, bytes_b):
                continue
            early, late = (a, b) if a.program < b.program else (b, a)
            key = (early.program, early.event, late.program, late.event)
            if key in found or _ordered(early, late, releases, acquires, barriers):
                continue
            why = (
                "no acquire before the second"
                if _released(early, releases, barriers)
                else "no barrier and release after the first"
            )
            found[key] = (
                f"{_A[early.kind]} by program {grid_idx.get(early.program, early.program)}, then {_A[late.kind]} of "
                f"the same bytes by program {grid_idx.get(late.program, late.program)}: {why}"
            )
    return list(found.values())


def unfenced(calls: list[Call], barriers: dict[int, list[int]], grid_idx: dict[int, tuple[int, ...]]) -> list[str]:
    """Each place where a program stores bytes and later reads, stores or updates the same bytes with no
    block barrier (``tl.debug_barrier``) between, as readable lines.

    A program's threads each hold part of a tile, and a load may be laid out over them otherwise than
    the store before it: a thread may read a byte another thread of the same program has not stored
    yet, unless the program's threads meet between the two (the interpreter runs a program as one).
    A load before a store of the same bytes is left alone: the reductions and scans that usually sit
    between them make the compiled threads meet, which the interpreter does not show."""
    found = []
    by_program: dict[int, list[Call]] = {}
    for c in calls:
        by_program.setdefault(c.program, []).append(c)
    for program, mine in by_program.items():
        fences = barriers.get(program, [])
        stores = [c for c in mine if c.kind == "write"]
        for store in stores:
            stored = np.unique(store.spans)
            for later in mine:
                if later.event <= store.event or any(store.event < f < later.event for f in fences):
                    continue
                if _meet(later.spans, stored):
                    found.append(
                        f"program {grid_idx.get(program, program)} stores bytes and then {_VERB[later.kind]} "
                        f"them with no barrier between (its accesses {store.event} and {later.event})"
                    )
                    break
    return found


def _meet(few: np.ndarray, many: np.ndarray) -> bool:
    """Whether ``few`` (bytes) and ``many`` (sorted, distinct bytes) share one."""
    at = np.minimum(np.searchsorted(many, few), many.size - 1)
    return bool((many[at] == few).any())


def _released(early: Call, releases: dict[int, list[Call]], barriers: dict[int, list[int]]) -> list[Call]:
    """The releases of ``early``'s program that order ``early`` for other programs: the access itself when
    it is one, and those after a barrier that follows it."""
    fences = barriers.get(early.program, [])
    return [
        r
        for r in releases.get(early.program, [])
        if r.event == early.event or (r.event > early.event and any(early.event < f < r.event for f in fences))
    ]


def _ordered(
    early: Call,
    late: Call,
    releases: dict[int, list[Call]],
    acquires: dict[int, list[Call]],
    barriers: dict[int, list[int]],
) -> bool:
    """Whether ``late``'s program acquires, at or before ``late``, a word that ``early``'s program released
    after ``early`` (``_released``)."""
    words = [np.unique(r.spans) for r in _released(early, releases, barriers)]
    return any(
        a.event <= late.event and any(_meet(np.unique(a.spans), w) for w in words)
        for a in acquires.get(late.program, [])
    )

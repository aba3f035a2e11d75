"""Programmatic dependent launch (PDL) checked under the interpreter: what each launch touches before its
wait must not race with the launches that may still be running.

On sm_90 the Triton kernels launch with ``launch_pdl``: a launch may start once every program of its
predecessor has called ``gdc_launch_dependents`` (or exited), and waits at ``gdc_wait`` until the
predecessor has completed and its writes are visible. What a program does before that wait (its
weights' loads, an L2 prefetch) runs beside the predecessor, and beside the predecessor's own
predecessor when that one let its dependents start before its own wait. A kernel that reads there
what a running launch writes, or writes what it reads or writes, races: a wrong answer that only a
GPU's timing shows. The interpreter runs the launches one after another, so the race cannot happen
here, but it can be seen: ``pdl_interpreted()`` runs the kernels' sm_90 code paths (``PDL`` on) with
the waits and triggers marked and every launch's bytes kept (``dsv4.bench.interp_traffic``), and
``hazards`` lists each byte that a launch touches before its wait and a launch that may still be
running writes (or reads, where the first writes).

A launch that never calls ``gdc_launch_dependents`` lets the next start when its programs exit, which
is taken here as "may still be running" too: only a wait makes its writes visible. Torch's own kernels
between two Triton launches are not seen, so their launches count as neighbours (a check that can only
find more). The L2 prefetch, a hint that reads no value, is left out.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
from collections.abc import Iterator
from typing import Any

import numpy as np

import dsv4.kernels
from dsv4.bench.interp_traffic import Launch, TrafficLog, count_traffic, mark_launch_dependents, mark_wait


def _no_prefetch(*args: Any) -> None:
    """``prefetch_l2`` under the interpreter: a hint that reads no value (it cannot run there)."""


_STAND_INS = {
    "pdl_supported": lambda device: True,
    "gdc_wait": mark_wait,
    "gdc_launch_dependents": mark_launch_dependents,
    "prefetch_l2": _no_prefetch,
    "prefetch_l2_share": _no_prefetch,
}


@contextlib.contextmanager
def pdl_interpreted() -> Iterator[TrafficLog]:
    """Run the Triton kernels as a sm_90 GPU launches them (``pdl_supported`` true), under the interpreter,
    their waits and triggers marked; yields the ``TrafficLog`` of every launch, bytes kept."""
    saved: list[tuple[Any, str, Any]] = []
    for info in pkgutil.iter_modules(dsv4.kernels.__path__):
        module = importlib.import_module(f"dsv4.kernels.{info.name}")
        for name, stand_in in _STAND_INS.items():
            if name in vars(module):
                saved.append((module, name, vars(module)[name]))
                setattr(module, name, stand_in)
    try:
        with count_traffic(addresses=True) as log:
            yield log
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def running_beside(launches: list[Launch], j: int) -> list[int]:
    """Indices of the launches that may still be running (or whose writes may not be visible yet) when
    launch ``j`` starts: none unless ``j`` is a PDL launch; then its predecessor, and that one's
    predecessor while each PDL launch lets its dependents start before its own wait."""
    beside = []
    k = j
    while k > 0 and launches[k].pdl:
        beside.append(k - 1)
        if not launches[k - 1].triggers_before_wait:
            break
        k -= 1
    return beside


def hazards(launches: list[Launch]) -> list[str]:
    """Each pair (launch, a launch that may still be running beside it) where a byte the first touches
    before its wait is one the other touches, one of the two writing it; as readable lines."""
    whole: dict[tuple[int, str], np.ndarray] = {}  # (launch, kind) -> every byte it reads or writes
    found = []
    for j, launch in enumerate(launches):
        for i in running_beside(launches, j):
            other = launches[i]
            for mine, theirs in (("read", "write"), ("write", "read"), ("write", "write")):
                if (i, theirs) not in whole:
                    whole[i, theirs] = other.region("all", theirs)
                both = _common(launch.region("before_wait", mine), whole[i, theirs])
                if both.size:
                    found.append(
                        f"launch {j} ({launch.kernel}) {mine}s {both.size} B before its wait that launch {i} "
                        f"({other.kernel}), which may still be running, {theirs}s (first at {int(both[0]):#x})"
                    )
    return found


def _common(few: np.ndarray, many: np.ndarray) -> np.ndarray:
    """The values of ``few`` that are in ``many`` (both sorted, distinct): a binary search each."""
    if few.size == 0 or many.size == 0:
        return few[:0]
    at = np.minimum(np.searchsorted(many, few), many.size - 1)
    return few[many[at] == few]

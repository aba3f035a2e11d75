"""Every hand-off between the programs of a launch is ordered as a GPU needs it: released by the program that
made it, acquired by the program that takes it (``Launch.unordered``, ``dsv4.bench.interp_traffic``).

Where one program stores bytes that another of the same launch reads or overwrites (``o_proj``'s split
partials, the chunked selection's candidate lists, the q heads' parked halves), a GPU shows the second
program the first one's bytes only if the first meets its threads at a block barrier after the store
and then releases them (an atomic with ``release`` or ``acq_rel`` semantics, ``gpu`` scope), and the
second acquires the same word before it reads. The interpreter runs the programs one after another, so
a kernel with a relaxed counter, a ``cta`` scope or no barrier passes every other test and reads stale
bytes on a GPU. The checker itself is tested first, on a kernel made wrong in each of those ways.

Within one program the same holds for its threads: a program that stores bytes to global memory and
reads them back (a scratch row, a parked tile) must meet its threads at a barrier in between, since the
load may be laid out over them otherwise than the store (``Launch.unfenced``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from conftest import DEVICE, INTERPRETER_TRAFFIC
from dsv4.bench.hand_offs import Call, shared_bytes, unfenced, unordered
from dsv4.bench.interp_traffic import count_traffic
from op_cases import hand_off_cases, split_o_proj
from program_order import in_order, program_orders

pytestmark = INTERPRETER_TRAFFIC

N = 64  # values handed over


def span(lo: int, hi: int) -> np.ndarray:
    """Bytes ``[lo, hi)`` as a recorded access holds them."""
    return np.arange(lo, hi, dtype=np.uint64)


@triton.jit
def _hand_over(buf, counter, out, PUT: tl.constexpr, TAKE: tl.constexpr, SCOPE: tl.constexpr,
               BARRIER: tl.constexpr, N: tl.constexpr):  # fmt: skip
    """Program 0 stores ``buf`` and counts itself in with ``PUT`` semantics; program 1 reads the counter with
    ``TAKE`` semantics and, when program 0 has counted, copies ``buf`` to ``out``."""
    offs = tl.arange(0, N)
    if tl.program_id(0) == 0:
        tl.store(buf + offs, offs.to(tl.float32))
        if BARRIER:
            tl.debug_barrier()
        tl.atomic_add(counter, 1, sem=PUT, scope=SCOPE)
    else:
        if tl.atomic_add(counter, 0, sem=TAKE, scope=SCOPE) == 1:
            tl.store(out + offs, tl.load(buf + offs))


def _unordered(put: str, take: str, scope: str = "gpu", barrier: bool = True) -> list[str]:
    buf, out = torch.zeros(N, device=DEVICE), torch.zeros(N, device=DEVICE)
    counter = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    with count_traffic(addresses=True) as log:
        _hand_over[(2,)](buf, counter, out, PUT=put, TAKE=take, SCOPE=scope, BARRIER=barrier, N=N)
    assert torch.equal(out, torch.arange(N, dtype=torch.float32, device=DEVICE))  # the interpreter hands over
    (launch,) = log.launches
    assert launch.shared["read"] == 4 * N
    return launch.unordered


@pytest.mark.parametrize(
    ("put", "take", "scope", "barrier", "why"),
    [
        ("acq_rel", "acq_rel", "gpu", True, None),
        ("release", "acquire", "gpu", True, None),
        ("release", "acquire", "sys", True, None),
        ("relaxed", "acq_rel", "gpu", True, "no barrier and release after the first"),
        ("acquire", "acq_rel", "gpu", True, "no barrier and release after the first"),
        ("acq_rel", "acq_rel", "gpu", False, "no barrier and release after the first"),
        ("acq_rel", "acq_rel", "cta", True, "no barrier and release after the first"),
        ("acq_rel", "relaxed", "gpu", True, "no acquire before the second"),
        ("acq_rel", "release", "gpu", True, "no acquire before the second"),
    ],
)
def test_the_checker_finds_a_hand_off_without_release_or_acquire(
    put: str, take: str, scope: str, barrier: bool, why: str | None
) -> None:
    found = _unordered(put, take, scope, barrier)
    if why is None:
        assert found == []
    else:
        assert found == [f"a write by program (0, 0, 0), then a read of the same bytes by program (1, 0, 0): {why}"]


def test_shared_writes_are_the_bytes_two_programs_store() -> None:
    """``shared_bytes``' ``write``: the bytes stored by two or more programs; a program that stores its own
    bytes twice shares none of them."""
    calls = [Call("write", span(0, 8), 0, 0), Call("write", span(0, 8), 0, 1), Call("write", span(4, 12), 1, 0)]
    assert shared_bytes(calls) == {"write": 4, "read": 0, "atomic": 0}  # bytes 4..7: programs 0 and 1


def test_shared_reads_and_atomics_count_each_byte_once() -> None:
    """``shared_bytes``' ``read`` and ``atomic``: the distinct bytes another program touches, however often."""
    calls = [Call("write", span(0, 8), 0, 0), *(Call("read", span(0, 8), 1, e) for e in (0, 1))]
    calls += [Call("atomic", span(4, 8), 2, e, "ACQUIRE_RELEASE", "GPU") for e in (0, 1)]
    assert shared_bytes(calls) == {"write": 0, "read": 8, "atomic": 4}


@pytest.mark.parametrize("acquire_first", [True, False])
def test_an_acquire_orders_only_the_accesses_after_it(acquire_first: bool) -> None:
    """Program 1 reads what program 0 stored and released; its acquire of the released word orders the
    read only when it comes before the read (an acquire after it orders nothing)."""
    word = span(100, 104)
    acquire, read = (0, 1) if acquire_first else (1, 0)  # program 1's events
    calls = [
        Call("write", span(0, 8), 0, 0),
        Call("atomic", word, 0, 2, "RELEASE", "GPU"),  # after program 0's barrier (event 1)
        Call("atomic", word, 1, acquire, "ACQUIRE", "GPU"),
        Call("read", span(0, 8), 1, read),
    ]
    found = unordered(calls, {0: [1]}, {0: (0, 0, 0), 1: (1, 0, 0)})
    why = "a write by program (0, 0, 0), then a read of the same bytes by program (1, 0, 0): "
    why += "no acquire before the second"
    assert found == ([] if acquire_first else [why])


@triton.jit
def _two_counters(buf, counters, out, N: tl.constexpr):
    """Program 0 stores ``buf`` and releases one counter; program 1 acquires the other, then reads ``buf``."""
    offs = tl.arange(0, N)
    if tl.program_id(0) == 0:
        tl.store(buf + offs, offs.to(tl.float32))
        tl.debug_barrier()
        tl.atomic_add(counters, 1, sem="acq_rel")
    else:
        tl.atomic_add(counters + 1, 1, sem="acq_rel")
        tl.store(out + offs, tl.load(buf + offs))


def test_the_release_and_the_acquire_must_meet_on_one_word() -> None:
    buf, out = torch.zeros(N, device=DEVICE), torch.zeros(N, device=DEVICE)
    counters = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    with count_traffic(addresses=True) as log:
        _two_counters[(2,)](buf, counters, out, N=N)
    assert log.launches[0].unordered == [
        "a write by program (0, 0, 0), then a read of the same bytes by program (1, 0, 0): no acquire before the second"
    ]


@triton.jit
def _read_back(scratch, out, BARRIER: tl.constexpr, N: tl.constexpr):
    """Stores ``N`` values to ``scratch`` and reads them back reversed (another thread's), with a barrier
    between (``BARRIER`` 1), only after both (2) or none (0)."""
    offs = tl.arange(0, N)
    tl.store(scratch + offs, offs.to(tl.float32))
    if BARRIER == 1:
        tl.debug_barrier()
    tl.store(out + offs, tl.load(scratch + N - 1 - offs))
    if BARRIER == 2:
        tl.debug_barrier()


@pytest.mark.parametrize("barrier", ["between", "after", "none"])
def test_the_checker_finds_a_read_back_without_a_barrier(barrier: str) -> None:
    """Only a barrier between the store and the read orders them (one after both does not)."""
    scratch, out = torch.zeros(N, device=DEVICE), torch.zeros(N, device=DEVICE)
    with count_traffic(addresses=True) as log:
        _read_back[(1,)](scratch, out, BARRIER=("none", "between", "after").index(barrier), N=N)
    assert torch.equal(out, torch.arange(N - 1, -1, -1, dtype=torch.float32, device=DEVICE))
    want = (
        []
        if barrier == "between"
        else ["program (0, 0, 0) stores bytes and then reads them with no barrier between (its accesses 0 and 1)"]
    )
    assert log.launches[0].unfenced == want


def test_a_read_back_is_found_once_per_store_where_it_overlaps_the_store_at_all() -> None:
    """A read of the stored bytes and more (a wider tile), with no barrier between: one line per store,
    at the first access that meets it."""
    calls = [Call("write", span(0, 8), 0, 0), Call("read", span(4, 12), 0, 1), Call("read", span(0, 8), 0, 2)]
    assert unfenced(calls, {}, {0: (0, 0, 0)}) == [
        "program (0, 0, 0) stores bytes and then reads them with no barrier between (its accesses 0 and 1)"
    ]


# The kernels whose programs hand bytes to each other (one stores them, another of the same launch loads,
# stores or updates them), each with its protocol. Every other launch's programs share no byte but through
# atomics, so no order or concurrency of them can change a result.
HAND_OFFS = {
    "_wo_b_kernel": "K-slice partials, added by the tile's last slice to count (acq_rel counter, .cg loads)",
    "_select_chunks_kernel": "a row's candidate list, appended by its chunks, compacted and cleared by the "
    "last to take a ticket (acq_rel ticket, .cg loads)",
    "_q_heads_kernel": "a pair's parked half, finished by its partner (acq_rel arrival word)",
}


@pytest.mark.parametrize("order", program_orders())
def test_every_hand_off_in_the_ops_is_released_and_acquired(order: int | None) -> None:
    """Every op (``tiny``, decode and prefill), a long indexer row, split ``o_proj`` GEMMs and paired q heads,
    their programs in grid order and in random orders: only the kernels of ``HAND_OFFS`` hand bytes between
    programs (each of them somewhere), no hand-off goes unordered, and no program reads back what it
    stored without a barrier."""
    seen = set()
    with split_o_proj():
        for name, run in hand_off_cases():
            with in_order(order), count_traffic(addresses=True) as log:
                run()
            for launch in log.launches:
                assert launch.unordered == [], (name, launch.kernel, launch.unordered[:4])
                assert launch.unfenced == [], (name, launch.kernel, launch.unfenced[:4])
                if any(launch.shared.values()):
                    assert launch.kernel in HAND_OFFS, (name, launch.kernel, launch.shared)
                    seen.add(launch.kernel)
    assert seen == set(HAND_OFFS)

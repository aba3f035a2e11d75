"""``dsv4 tune --probe``: where the machine's limits are, for whoever writes the next kernel.

Each experiment is a row (or a few) of the JSON:

- ``zero_point``: CUDA events around the replay of an empty graph, of a graph of one tiny kernel,
  and around one plain launch of it: what any timed figure costs before its work.
- ``copy``: a 1 GiB device-to-device copy (bytes read + written), the bench's measured bandwidth.
- ``stream``: a read-only stream of ``STREAM_MIB`` at a grid of (programs per SM, bytes in flight per
  program): the bytes-in-flight against GB/s curve (Little's law: HBM bandwidth x latency of bytes in
  flight per SM keep the memory busy). "In flight" is what a program issues before it uses any of
  it; ptxas decides how much of that stays outstanding (the sm_90 build of 8 and 16 loads a thread
  holds 36 and 54 registers, fewer than all of them would need), so the curve is against requests.
- ``l2``: the same stream over buffers of 4 to 128 MiB, read ``L2_PASSES`` times over by one launch
  (bypassing L1) without a flush: GB/s against size, whose knee is the usable L2 and whose plateau
  its bandwidth.
- ``l2_prefetch``: a kernel reads a buffer that fits in L2, the next kernel reads it again: does the
  second kernel hit (time against the same read after a flush)?
- ``launch_gap``: a chain of dependent one-program kernels in a graph, without and with programmatic
  dependent launch (PDL: ``launch_pdl`` with ``gdc_wait`` / ``gdc_launch_dependents``), and as plain
  launches: the time each launch adds.
- ``flush_method``: a 32 MiB read after the bench's read-only L2 flush, after a ``zero_()`` flush (L2
  full of dirty lines) and warm: whether a writing flush puts its write-back into the next timing.

``--dry-run`` runs the experiments' kernels under the CPU interpreter at small sizes and checks what
they compute (a stream's checksum, a chain's count); ``--list`` prints the experiments.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from ..kernels.interpreter import interpreted  # first: chooses the interpreter before Triton defines anything

# isort: split
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .timing import (
    L2_FLUSH_BYTES,
    L2Flush,
    _event_times,
    copy_bandwidth,
    describe_error,
    nothing_ahead,
    zero_point,
)

STREAM_MIB = 512  # far beyond L2 (H100 50 MiB, H200 60 MiB): DRAM speed
STREAM_BLOCK = 1024  # int32 per load step of a program: 4 KiB, 8 a thread at 4 warps (two 16-B loads)
STREAM_WARPS = 4
UNROLLS = (1, 2, 4, 8, 16)  # load steps issued before their values are used: 4 to 64 KiB in flight a program
PROGRAMS_PER_SM = (1, 2, 4, 8)
L2_SIZES_MIB = (4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 128)
# passes over an L2 probe's buffer in one launch: one read of 4 MiB from L2 takes well under a µs, less
# than a launch adds even inside a graph (0.7 µs), so the reads share one launch
L2_PASSES = 16
PREFETCH_MIB = 16  # fits any Hopper L2
FLUSH_TEST_MIB = 32
CHAIN = 32  # dependent launches in the gap experiment
REPS = 20
EXPERIMENTS = {
    "zero_point": "events around an empty graph's replay, a one-kernel graph's, and one plain launch",
    "copy": "1 GiB device-to-device copy (bytes read + written)",
    "stream": f"read-only stream of {STREAM_MIB} MiB: GB/s per (programs per SM {PROGRAMS_PER_SM}, "
    f"bytes in flight per program {[u * STREAM_BLOCK * 4 for u in UNROLLS]})",
    "l2": f"warm re-reads of {L2_SIZES_MIB[0]}..{L2_SIZES_MIB[-1]} MiB, {L2_PASSES} in a launch: GB/s against size "
    "(L2 size and bandwidth)",
    "l2_prefetch": f"a {PREFETCH_MIB} MiB read, then the same read in the next kernel (hit?), against a flushed read",
    "launch_gap": f"{CHAIN} dependent one-program launches: graph, graph with PDL, plain launches",
    "flush_method": f"a {FLUSH_TEST_MIB} MiB read after a read-only flush, after a zero_() flush, and warm",
}


@triton.jit
def _stream_kernel(
    src_ptr, out_ptr, n, BLOCK: tl.constexpr, UNROLL: tl.constexpr, EVICT: tl.constexpr,
    PASSES: tl.constexpr, CACHE: tl.constexpr,
):  # fmt: skip
    """Programs take groups of ``UNROLL`` blocks of ``BLOCK`` int32 (of ``n``), a grid-stride apart; a
    group's loads are all issued before their values are combined; the whole buffer ``PASSES`` times.
    Each program stores the xor of what it read (so no load can be dropped)."""
    pid = tl.program_id(0)
    step = tl.num_programs(0) * UNROLL
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for _ in range(PASSES):
        for group in range(pid * UNROLL, tl.cdiv(n, BLOCK), step):
            for u in tl.static_range(UNROLL):
                index = (group + u) * BLOCK + offs  # int32: a stream of at most 2^31 values
                acc ^= tl.load(src_ptr + index, mask=index < n, other=0, cache_modifier=CACHE, eviction_policy=EVICT)
    tl.store(out_ptr + pid, tl.xor_sum(acc, axis=0))


@triton.jit
def _chain_kernel(buf_ptr, i, PDL: tl.constexpr):
    """``buf[i + 1] = buf[i] + 1``: each launch depends on the one before."""
    if PDL:
        gdc_wait()  # the previous launch's store is visible
    v = tl.load(buf_ptr + i)
    if PDL:
        gdc_launch_dependents()
    tl.store(buf_ptr + i + 1, v + 1)


def _stream(src: torch.Tensor, out: torch.Tensor, programs: int, unroll: int, evict: str = "", passes: int = 1) -> None:
    """``passes`` reads of ``src``; more than one bypass L1 (``.cg``), so that each comes from L2 or DRAM."""
    cache = ".cg" if passes > 1 else ""
    _stream_kernel[(programs,)](src, out, src.numel(), BLOCK=STREAM_BLOCK, UNROLL=unroll, EVICT=evict,
                                PASSES=passes, CACHE=cache,
                                num_warps=STREAM_WARPS, enable_fp_fusion=False)  # fmt: skip


def _xor_checksum(src: torch.Tensor, programs: int, unroll: int, passes: int = 1) -> int:
    """What ``_stream`` leaves in its output, xor-ed over programs: the xor of every value read."""
    out = torch.zeros(programs, dtype=torch.int32, device=src.device)
    _stream(src, out, programs, unroll, passes=passes)
    return int(_xor_all(out.cpu()))


def _xor_all(t: torch.Tensor) -> int:
    v = 0
    for x in t.reshape(-1).tolist():
        v ^= x
    return v


def _median_us(run: Callable[[], Any], before: Callable[[], Any] | None = None, reps: int = REPS) -> float:
    run()
    torch.cuda.synchronize()
    return statistics.median(_event_times(run, reps, before))


def _graph(body: Callable[[], Any]) -> torch.cuda.CUDAGraph:
    body()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph


def _buffer(mib: int, device: torch.device | str) -> torch.Tensor:
    return torch.randint(-(2**31), 2**31 - 1, (mib << 18,), dtype=torch.int32, device=device)


# -- experiments (GPU) ----------------------------------------------------------------------


def probe_zero_point() -> list[dict[str, Any]]:
    row = {"name": "zero_point", **zero_point()}
    tiny = torch.zeros(1, device="cuda")
    row["plain_launch_us"] = _median_us(lambda: tiny.fill_(1.0), nothing_ahead, reps=200)
    return [row]


def probe_copy() -> list[dict[str, Any]]:
    return [{"name": "copy", "bytes": 2 << 30, "gb_per_s": copy_bandwidth() / 1e9}]


def probe_stream(sms: int) -> list[dict[str, Any]]:
    src = _buffer(STREAM_MIB, "cuda")
    rows: list[dict[str, Any]] = []
    for unroll in UNROLLS:
        for per_sm in PROGRAMS_PER_SM:
            programs = per_sm * sms
            out = torch.empty(programs, dtype=torch.int32, device="cuda")
            us = _median_us(functools.partial(_stream, src, out, programs, unroll))
            in_flight = unroll * STREAM_BLOCK * 4
            rows.append({
                "name": "stream", "programs": programs, "programs_per_sm": per_sm,
                "bytes_in_flight_per_program": in_flight, "bytes_in_flight_per_sm": in_flight * per_sm,
                "us": us, "gb_per_s": src.numel() * 4 / us / 1e3,
            })  # fmt: skip
    best = max(rows, key=lambda r: r["gb_per_s"])
    near_best = [r for r in rows if r["gb_per_s"] >= 0.9 * best["gb_per_s"]]
    enough = min(near_best, key=lambda r: r["bytes_in_flight_per_sm"])
    rows.append({
        "name": "stream_summary", "best_gb_per_s": best["gb_per_s"], "best_programs_per_sm": best["programs_per_sm"],
        "best_bytes_in_flight_per_program": best["bytes_in_flight_per_program"],
        "bytes_in_flight_per_sm_for_90pct": enough["bytes_in_flight_per_sm"],
    })  # fmt: skip
    return rows


def probe_l2(sms: int, programs_per_sm: int, unroll: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    programs = programs_per_sm * sms
    out = torch.empty(programs, dtype=torch.int32, device="cuda")

    for mib in L2_SIZES_MIB:
        src = _buffer(mib, "cuda")
        # warm: each pass finds what the one before it left in L2
        us = _median_us(functools.partial(_stream, src, out, programs, unroll, passes=L2_PASSES)) / L2_PASSES
        rows.append({"name": "l2", "mib": mib, "us": us, "gb_per_s": src.numel() * 4 / us / 1e3})
    dram = rows[-1]["gb_per_s"]
    fits = [r for r in rows if r["gb_per_s"] >= 1.5 * dram]
    rows.append({
        "name": "l2_summary", "l2_bytes_reported": torch.cuda.get_device_properties(0).L2_cache_size,
        "largest_mib_read_from_l2": max((r["mib"] for r in fits), default=None),
        "l2_gb_per_s": statistics.median(r["gb_per_s"] for r in rows if r["mib"] <= 16), "dram_gb_per_s": dram,
    })  # fmt: skip
    return rows


def probe_prefetch(sms: int, programs_per_sm: int, unroll: int) -> list[dict[str, Any]]:
    flush = L2Flush()
    x = _buffer(PREFETCH_MIB, "cuda")
    programs = programs_per_sm * sms
    out = torch.empty(programs, dtype=torch.int32, device="cuda")
    read = lambda: _stream(x, out, programs, unroll)  # noqa: E731
    cold = _median_us(read, flush)
    row: dict[str, Any] = {"name": "l2_prefetch", "mib": PREFETCH_MIB, "cold_us": cold}
    for evict in ("", "evict_last"):

        def prefetch_then(evict: str = evict) -> None:
            flush()
            _stream(x, out, programs, unroll, evict)

        key = f"after_prefetch{'_' + evict if evict else ''}_us"
        try:
            row[key] = _median_us(read, prefetch_then)
        except Exception as e:  # an eviction hint this Triton does not take: the plain prefetch still counts
            torch.cuda.synchronize()
            row[key], row[key.replace("_us", "_error")] = None, describe_error(e)
    row["speedup"] = cold / row["after_prefetch_us"] if row["after_prefetch_us"] else None
    return [row]


def probe_launch_gap() -> list[dict[str, Any]]:
    rows = []
    buf = torch.zeros(CHAIN + 1, dtype=torch.int32, device="cuda")
    pdl_ok = torch.cuda.get_device_capability()[0] >= 9
    for pdl in (False, True) if pdl_ok else (False,):

        def chain(n: int, pdl: bool = pdl) -> None:
            for i in range(n):
                _chain_kernel[(1,)](buf, i, PDL=pdl, launch_pdl=pdl, enable_fp_fusion=False)

        times = {}
        for n in (1, CHAIN):
            graph = _graph(functools.partial(chain, n))
            buf.zero_()
            graph.replay()
            torch.cuda.synchronize()
            ok = buf[n].item() == n  # every launch saw its predecessor's store
            times[n] = _median_us(graph.replay, reps=50)
        rows.append({
            "name": "launch_gap", "mode": "graph + PDL" if pdl else "graph", "launches": CHAIN,
            "us_per_launch": (times[CHAIN] - times[1]) / (CHAIN - 1), "one_launch_us": times[1], "chain_ok": ok,
        })  # fmt: skip
    plain = _median_us(
        lambda: [_chain_kernel[(1,)](buf, i, PDL=False, enable_fp_fusion=False) for i in range(CHAIN)],
        nothing_ahead,  # the host's launches are what this row measures
        reps=20,
    )
    rows.append({"name": "launch_gap", "mode": "plain launches", "launches": CHAIN, "us_per_launch": plain / CHAIN})
    return rows


def probe_flush_method(sms: int, programs_per_sm: int, unroll: int) -> list[dict[str, Any]]:
    reader = L2Flush()
    writer = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    x = _buffer(FLUSH_TEST_MIB, "cuda")
    programs = programs_per_sm * sms
    out = torch.empty(programs, dtype=torch.int32, device="cuda")
    read = lambda: _stream(x, out, programs, unroll)  # noqa: E731
    row: dict[str, Any] = {
        "name": "flush_method", "mib": FLUSH_TEST_MIB,
        "after_read_flush_us": _median_us(read, reader),
        "after_zero_flush_us": _median_us(read, writer.zero_),
        "warm_us": _median_us(read),
    }  # fmt: skip
    row["zero_flush_penalty_pct"] = 100.0 * (row["after_zero_flush_us"] / row["after_read_flush_us"] - 1.0)
    return [row]


def run_probe(log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every experiment on the current GPU; a failing experiment is a row with its error."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows: list[dict[str, Any]] = []
    best = {"programs_per_sm": 4, "unroll": 4}  # until the stream grid says otherwise

    def run(name: str, fn: Callable[[], list[dict[str, Any]]]) -> None:
        t0 = time.perf_counter()
        try:
            got = fn()
        except Exception as e:
            got = [{"name": name, "error": describe_error(e)}]
            try:
                torch.cuda.synchronize()  # the failed experiment's launches end before the next one's
            except Exception as lost:  # a sticky error: later experiments fail too; the rows so far are kept
                got[0]["sync_error"] = describe_error(lost)
        for r in got:
            r.setdefault("seconds", round(time.perf_counter() - t0, 2))
        rows.extend(got)
        log(f"{name}: {len(got)} row(s) in {time.perf_counter() - t0:.1f} s")

    run("zero_point", probe_zero_point)
    run("copy", probe_copy)
    run("stream", lambda: probe_stream(sms))
    summary = next((r for r in rows if r["name"] == "stream_summary"), None)
    if summary:
        best = {
            "programs_per_sm": summary["best_programs_per_sm"],
            "unroll": summary["best_bytes_in_flight_per_program"] // (STREAM_BLOCK * 4),
        }
    run("l2", lambda: probe_l2(sms, **best))
    run("l2_prefetch", lambda: probe_prefetch(sms, **best))
    run("launch_gap", probe_launch_gap)
    run("flush_method", lambda: probe_flush_method(sms, **best))
    return {"sms": sms, "stream_config": best, "rows": rows}


# -- the dry run (CPU interpreter) ----------------------------------------------------------


def dry_run_probe(log: Callable[[str], None] = print) -> dict[str, Any]:
    """The experiments' kernels under the interpreter at small sizes, checked: the stream's xor over
    every program equals the xor of the buffer for each unroll; the chain counts its launches."""
    if not interpreted():
        raise ValueError("--dry-run: the probe's dry run is for the CPU interpreter (TRITON_INTERPRET=1)")
    g = torch.Generator().manual_seed(0)
    src = torch.randint(-(2**31), 2**31 - 1, (STREAM_BLOCK * 37 + 5,), dtype=torch.int32, generator=g)
    want = _xor_all(src)
    rows: list[dict[str, Any]] = []
    for unroll in UNROLLS[:3]:
        for programs in (1, 3):
            got = _xor_checksum(src, programs, unroll)
            rows.append({"name": "stream", "programs": programs, "unroll": unroll, "check": "ok" if got == want else
                         f"MISMATCH xor {got} != {want}"})  # fmt: skip
    got = _xor_checksum(src, 3, 2, passes=3)  # an odd number of passes leaves the xor of one
    rows.append(
        {"name": "l2", "programs": 3, "unroll": 2, "check": "ok" if got == want else f"MISMATCH xor {got} != {want}"}
    )
    buf = torch.zeros(9, dtype=torch.int32)
    for i in range(8):
        _chain_kernel[(1,)](buf, i, PDL=False, enable_fp_fusion=False)
    rows.append({"name": "launch_gap", "check": "ok" if int(buf[8]) == 8 else f"MISMATCH chain {int(buf[8])} != 8"})
    for r in rows:
        log(f"{r['name']} {r.get('programs', '')} {r.get('unroll', '')}: {r['check']}")
    return {"dry_run": True, "rows": rows}


def describe_experiments() -> str:
    return "\n".join(f"{name}: {text}" for name, text in EXPERIMENTS.items())


def render(result: dict[str, Any]) -> str:
    """The probe as short tables for the terminal."""
    lines = []
    for r in result["rows"]:
        fields = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items() if k not in ("name", "seconds")
        )
        lines.append(f"{r['name']}: {fields}")
    return "\n".join(lines)

"""``dsv4 tune --probe``'s figures from its measurements, on a CPU: the GPU's times are faked (a read
stream whose speed depends on the bytes in flight per SM, an L2 of 48 MiB, a prefetch that halves a
read), and each experiment's rows must say what those times say. The bytes in flight are checked
against what the stream kernel itself requests under the interpreter. The events' order around the
timed call is checked with fake CUDA events."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch

from conftest import INTERPRETER_TRAFFIC
from dsv4.bench import probe, timing
from dsv4.bench.interp_traffic import count_traffic

DRAM_GB_PER_S = 3000.0
L2_GB_PER_S = 9000.0
L2_MIB = 48  # the fake L2: buffers up to this size are re-read from it
SATURATING_BYTES_PER_SM = 64 << 10  # the fake stream reaches DRAM speed at 64 KiB in flight per SM
SMS = 4
STREAM = probe._stream  # the kernel's launcher, which the fake GPU replaces


def _stream_gb_per_s(bytes_in_flight_per_sm: int) -> float:
    """Little's law in the fake: speed grows with the bytes in flight per SM up to DRAM's."""
    return DRAM_GB_PER_S * min(1.0, bytes_in_flight_per_sm / SATURATING_BYTES_PER_SM)


@pytest.fixture
def fake_gpu(monkeypatch) -> None:
    """Buffers on the meta device, no kernel launched, and ``_median_us`` answering from the fake's
    speeds: a stream's bytes in flight per SM from its grid and unroll (``STREAM_BLOCK`` int32 a load
    step), an L2 re-read by its size, a read after a prefetch at half a flushed read's time."""
    real_empty = torch.empty

    def empty(*args: Any, device: Any = None, **kwargs: Any) -> torch.Tensor:
        return real_empty(*args, device="meta" if device == "cuda" else device, **kwargs)

    class Flush:
        def __call__(self) -> None:
            pass

    def median_us(run: Any, before: Any = None, reps: int = probe.REPS) -> float:
        if isinstance(run, functools.partial):  # stream and l2: _stream(src, out, programs, unroll, ...)
            src, _, programs, unroll = run.args
            nbytes = src.numel() * 4
            if run.keywords.get("passes", 1) > 1:
                speed = L2_GB_PER_S if nbytes <= L2_MIB << 20 else DRAM_GB_PER_S
                return nbytes * run.keywords["passes"] / speed / 1e3
            per_sm = unroll * probe.STREAM_BLOCK * 4 * programs // SMS
            return nbytes / _stream_gb_per_s(per_sm) / 1e3
        return 10.0 if isinstance(before, Flush) else 5.0  # the prefetch's read: flushed, or after a prefetch

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(probe, "_buffer", lambda mib, device: real_empty(mib << 18, dtype=torch.int32, device="meta"))
    monkeypatch.setattr(probe, "_median_us", median_us)
    monkeypatch.setattr(probe, "L2Flush", Flush)
    monkeypatch.setattr(probe, "_stream", lambda *args, **kwargs: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)


def _requested_bytes_of_one_group(unroll: int) -> int:
    """The bytes one program of the stream kernel loads over a buffer of exactly one group of loads,
    counted under the interpreter: what it has issued before it uses any of it."""
    src = torch.arange(unroll * probe.STREAM_BLOCK, dtype=torch.int32)
    out = torch.zeros(1, dtype=torch.int32)
    with count_traffic() as log:
        STREAM(src, out, 1, unroll)
    return log.total("load_bytes")


def test_stream_rows_count_the_bytes_the_kernel_has_in_flight(fake_gpu) -> None:
    rows = probe.probe_stream(SMS)
    grid = [r for r in rows if r["name"] == "stream"]
    assert len(grid) == len(probe.UNROLLS) * len(probe.PROGRAMS_PER_SM)
    for r in grid:
        assert r["bytes_in_flight_per_sm"] == r["bytes_in_flight_per_program"] * r["programs_per_sm"]
        assert r["gb_per_s"] == pytest.approx(_stream_gb_per_s(r["bytes_in_flight_per_sm"]))
    (summary,) = [r for r in rows if r["name"] == "stream_summary"]
    assert summary["best_gb_per_s"] == pytest.approx(DRAM_GB_PER_S)
    # 90% of DRAM speed needs 0.9 x 64 KiB per SM: the least grid point at or above it is 64 KiB
    assert summary["bytes_in_flight_per_sm_for_90pct"] == SATURATING_BYTES_PER_SM


@INTERPRETER_TRAFFIC
@pytest.mark.parametrize("unroll", [1, 4])
def test_a_load_step_of_the_stream_is_4_kib(unroll: int) -> None:
    """Every lane of every load step of a group is requested: 4 KiB a step, as the probe's list says."""
    assert _requested_bytes_of_one_group(unroll) == unroll * 4096


@INTERPRETER_TRAFFIC
def test_stream_rows_name_the_requests_of_their_unroll(fake_gpu, monkeypatch) -> None:
    """The bytes in flight a stream row gives for an unroll are those its kernel issues in one group."""
    requested = {u: _requested_bytes_of_one_group(u) for u in (1, 2)}
    monkeypatch.setattr(probe, "UNROLLS", (1, 2))
    rows = [r for r in probe.probe_stream(SMS) if r["name"] == "stream"]
    per_program = {r["bytes_in_flight_per_program"] for r in rows}
    assert per_program == set(requested.values())


def test_the_l2_rows_find_the_fake_l2_and_dram_speed(fake_gpu, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: type("P", (), {"L2_cache_size": 50 << 20}))
    rows = probe.probe_l2(SMS, 2, 4)
    (summary,) = [r for r in rows if r["name"] == "l2_summary"]
    assert summary["largest_mib_read_from_l2"] == L2_MIB
    assert summary["dram_gb_per_s"] == pytest.approx(DRAM_GB_PER_S)  # the largest buffer's: past any L2
    assert summary["l2_gb_per_s"] == pytest.approx(L2_GB_PER_S)
    assert summary["l2_bytes_reported"] == 50 << 20


def test_a_prefetch_that_halves_the_read_is_a_speedup_of_two(fake_gpu) -> None:
    (row,) = probe.probe_prefetch(SMS, 2, 4)
    assert (row["cold_us"], row["after_prefetch_us"]) == (10.0, 5.0)
    assert row["speedup"] == pytest.approx(2.0)


def test_the_step_ahead_of_a_timed_call_runs_outside_its_events(monkeypatch) -> None:
    """``_event_times``: each call's ``before`` (an L2 flush, a spin) runs, then the start event, the
    call and the end event; the figures are the events' differences in microseconds."""
    seen: list[str] = []

    class Event:
        def __init__(self, enable_timing: bool = False) -> None:
            self.at = 0.0

        def record(self) -> None:
            self.at = len(seen) * 0.5  # ms: each thing before it takes half a millisecond
            seen.append("event")

        def elapsed_time(self, end: Event) -> float:
            return end.at - self.at

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    times = timing._event_times(lambda: seen.append("run"), 2, lambda: seen.append("before"))
    assert seen == ["before", "event", "run", "event"] * 2
    assert times == [1000.0, 1000.0]  # the call alone: 1 ms between its events

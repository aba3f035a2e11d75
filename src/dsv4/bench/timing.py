"""Timing one call: CUDA events over many repetitions (CUDA graph when it captures), host clock on the CPU.

Method (GPU): warm up (compilation, autotuning, allocator), try to capture one call in a CUDA
graph and time its replays — that removes launch gaps, which dominate small decode kernels; an op
that cannot be captured (a host sync, data-dependent shapes) is timed as plain launches and says
so. Each repetition is bracketed by its own pair of events; with ``flush_l2`` a 256 MiB buffer is
overwritten before each one (outside the events), so weights come from DRAM as they do in a model
whose other layers evicted them. The report gives the median and the 10th/90th percentiles.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

L2_FLUSH_BYTES = 256 << 20  # larger than any current GPU's L2 (H100: 50 MiB, H200: 60 MiB)
COPY_BYTES = 1 << 30  # per copy direction: far larger than L2, so the copy runs at DRAM speed


@dataclass(frozen=True)
class DeviceSpec:
    """Datasheet figures of a GPU: DRAM bandwidth and dense tensor-core peaks (no sparsity)."""

    name: str
    bandwidth: float  # bytes/s
    peak_flops: dict[str, float]  # per operand kind of ``dsv4.ops.costs.OpCost.flops``


_HOPPER_PEAKS = {"bf16": 989e12, "int8": 1979e12, "fp8": 1979e12, "fp32": 495e12}  # fp32 matmuls as TF32
DEVICE_TABLE: tuple[tuple[tuple[str, ...], DeviceSpec], ...] = (
    (("H200",), DeviceSpec("H200", 4.8e12, _HOPPER_PEAKS)),
    (("H100", "NVL"), DeviceSpec("H100 NVL", 3.9e12, {k: v * 835 / 989 for k, v in _HOPPER_PEAKS.items()})),
    (("H100", "PCIE"), DeviceSpec("H100 PCIe", 2.0e12, {k: v * 756 / 989 for k, v in _HOPPER_PEAKS.items()})),
    (("H100",), DeviceSpec("H100 SXM", 3.35e12, _HOPPER_PEAKS)),  # "H100 80GB HBM3" is the SXM part
)


def device_spec(device_name: str) -> DeviceSpec | None:
    """The table entry whose keywords all appear in ``device_name`` (first match), or None."""
    upper = device_name.upper()
    for keys, spec in DEVICE_TABLE:
        if all(k in upper for k in keys):
            return spec
    return None


@dataclass
class Timing:
    """Time of one call over ``reps`` repetitions, in microseconds."""

    median_us: float
    p10_us: float
    p90_us: float
    reps: int
    launch: str  # "cuda graph", "plain launches" or "host clock"
    l2: str  # "flushed", "warm" or "n/a"
    note: str = ""


def _quantiles(samples_us: list[float]) -> tuple[float, float, float]:
    if len(samples_us) == 1:
        return samples_us[0], samples_us[0], samples_us[0]
    deciles = statistics.quantiles(samples_us, n=10, method="inclusive")
    return statistics.median(samples_us), deciles[0], deciles[-1]


def _reps_for(estimate_s: float, reps: int, budget_s: float, min_reps: int) -> int:
    """At most ``reps``, fewer when they would not fit ``budget_s`` seconds, never fewer than ``min_reps``."""
    return max(min_reps, min(reps, int(budget_s / max(estimate_s, 1e-9))))


def time_cpu(fn: Callable[[], Any], reps: int = 20, budget_s: float = 2.0, min_reps: int = 3) -> Timing:
    """Host-clock time of ``fn()`` on the CPU, after one warm-up call."""
    t0 = time.perf_counter()
    fn()
    n = _reps_for(time.perf_counter() - t0, reps, budget_s, min_reps)
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    return Timing(*_quantiles(samples), reps=n, launch="host clock", l2="n/a")


def _host_sync(fn: Callable[[], Any]) -> str | None:
    """Why ``fn`` cannot be captured because it waits on the device (``.item()``, boolean masks,
    copies to the host), or None. Checked before capturing: a capture that hits a sync fails."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except RuntimeError as e:
        return f"host sync: {str(e).splitlines()[0][:120] if str(e) else type(e).__name__}"
    finally:
        torch.cuda.set_sync_debug_mode(previous)
        torch.cuda.synchronize()
    return None


def _capture(fn: Callable[[], Any]) -> torch.cuda.CUDAGraph:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as graph capture requires
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def time_cuda(
    fn: Callable[[], Any],
    reps: int = 100,
    budget_s: float = 2.0,
    min_reps: int = 5,
    warmup: int = 3,
    flush_l2: bool = True,
    use_graph: bool = True,
) -> Timing:
    """CUDA-event time of ``fn()`` on the current device (see the module docstring for the method)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    run, launch, note = fn, "plain launches", ""
    if use_graph:
        reason = _host_sync(fn)
        if reason is None:
            try:
                graph = _capture(fn)
                torch.cuda.synchronize()
                run, launch = graph.replay, "cuda graph"
            except Exception as e:  # e.g. an unsupported call during capture
                torch.cuda.synchronize()
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        if reason is not None:
            note = f"not capturable ({reason})"
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda") if flush_l2 else None
    t0 = time.perf_counter()
    run()
    torch.cuda.synchronize()
    n = _reps_for(time.perf_counter() - t0, reps, budget_s, min_reps)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for start, end in zip(starts, ends, strict=True):
        if flush is not None:
            flush.zero_()
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    samples = [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends, strict=True)]
    return Timing(*_quantiles(samples), reps=n, launch=launch, l2="flushed" if flush_l2 else "warm", note=note)


def copy_bandwidth(nbytes: int = COPY_BYTES, reps: int = 20) -> float:
    """Achieved device-to-device copy bandwidth in bytes/s (bytes read + bytes written), median of ``reps``."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    timing = time_cuda(lambda: dst.copy_(src), reps=reps, budget_s=10.0, flush_l2=False, use_graph=False)
    return 2 * nbytes / (timing.median_us * 1e-6)

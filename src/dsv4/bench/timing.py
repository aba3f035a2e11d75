"""Timing one call: CUDA events over many repetitions (CUDA graph when it captures), host clock on the CPU.

Method (GPU): warm up (compilation, autotuning, allocator), try to capture one call in a CUDA
graph and time its replays — that removes launch gaps, which dominate small decode kernels; an op
that cannot be captured (a host sync, data-dependent shapes) is timed as plain launches and says
so. Each repetition is bracketed by its own pair of events; with ``flush_l2`` a 256 MiB buffer is
*read* before each one (outside the events), so weights come from DRAM as they do in a model whose
other layers evicted them. The flush only reads: overwriting a buffer instead (``zero_()``) would
leave L2 full of dirty lines whose write-back lands inside the next timed region (``dsv4 tune
--probe`` measures the difference). Without a flush (``--warm-l2``, the zero point) a spin kernel
runs ahead of each start event instead: on an idle GPU the start event fires as soon as the host
records it, and the time would include the host's submission of the call. The report gives the
median and the 10th/90th percentiles.

Beside each figure: the graph-launch zero point (``zero_point``: the same events around the replay
of an empty graph, what a timed replay costs before its first kernel does any work) and, on
request, each kernel's own duration inside the replays (``kernel_times``, from the profiler's
CUPTI records), so an op's time splits by kernel without ncu.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

L2_FLUSH_BYTES = 256 << 20  # larger than any current GPU's L2 (H100: 50 MiB, H200: 60 MiB)
COPY_BYTES = 1 << 30  # per copy direction: far larger than L2, so the copy runs at DRAM speed
# a spin ahead of a timed call with nothing else ahead of it: 50-70 µs at Hopper's 1.4-2 GHz, longer than
# the host takes to submit a graph replay (~15 µs), so the call is queued before the start event fires
BUSY_LEAD_CYCLES = 100_000
# the fewest repetitions a timing runs, whatever its reps and budget: a median and p10-p90 of fewer samples
# say little (each Timing's reps is the number that ran)
MIN_REPS_CPU, MIN_REPS_GPU = 3, 5


@dataclass(frozen=True)
class DeviceSpec:
    """Datasheet figures of a GPU: DRAM bandwidth and dense tensor-core peaks (no sparsity)."""

    name: str
    bandwidth: float  # bytes/s
    peak_flops: dict[str, float]  # per operand kind of ``dsv4.ops.costs.OpCost.flops``


_HOPPER_PEAKS = {"bf16": 989e12, "int8": 1979e12, "fp8": 1979e12, "fp32": 495e12}  # fp32 matmuls as TF32
_NVL_PEAKS = {k: v * 835 / 989 for k, v in _HOPPER_PEAKS.items()}  # the 350-400 W PCIe cards
DEVICE_TABLE: tuple[tuple[tuple[str, ...], DeviceSpec], ...] = (  # first match wins: "GH200" holds "H200"
    (("GH200", "144G"), DeviceSpec("GH200 144GB HBM3e", 4.9e12, _HOPPER_PEAKS)),
    (("GH200",), DeviceSpec("GH200 96GB HBM3", 4.0e12, _HOPPER_PEAKS)),  # "NVIDIA GH200 480GB"
    (("H200", "NVL"), DeviceSpec("H200 NVL", 4.8e12, _NVL_PEAKS)),
    (("H200",), DeviceSpec("H200", 4.8e12, _HOPPER_PEAKS)),
    (("H100", "NVL"), DeviceSpec("H100 NVL", 3.9e12, _NVL_PEAKS)),
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
    kernels: list[dict[str, Any]] = field(default_factory=list)  # kernel_times of the timed call, when asked


def _quantiles(samples_us: list[float]) -> tuple[float, float, float]:
    if len(samples_us) == 1:
        return samples_us[0], samples_us[0], samples_us[0]
    deciles = statistics.quantiles(samples_us, n=10, method="inclusive")
    return statistics.median(samples_us), deciles[0], deciles[-1]


def describe_error(e: BaseException) -> str:
    """``Type: first line of the message`` (at most 120 characters of it)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:120] if text else ''}"


def _reps_for(estimate_s: float, reps: int, budget_s: float, min_reps: int) -> int:
    """At most ``reps``, fewer when they would not fit ``budget_s`` seconds, never fewer than ``min_reps``."""
    return max(min_reps, min(reps, int(budget_s / max(estimate_s, 1e-9))))


def time_cpu(fn: Callable[[], Any], reps: int = 20, budget_s: float = 2.0, min_reps: int = MIN_REPS_CPU) -> Timing:
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


class L2Flush:
    """Evicts L2 by reading a buffer far larger than it, leaving only clean lines behind.

    A read-only pass cannot leave a dirty line; the lines the timed call wrote are written back while
    the flush runs, before the next pair of events. The buffer is filled once and read once at
    construction, so its own fill is written back before any timing.
    """

    def __init__(self, nbytes: int = L2_FLUSH_BYTES, device: torch.device | str = "cuda") -> None:
        self.buf = torch.ones(nbytes // 8, dtype=torch.int64, device=device)
        self.out = torch.empty((), dtype=torch.int64, device=device)
        self()
        torch.cuda.synchronize(device)

    def __call__(self) -> None:
        torch.sum(self.buf, dim=0, out=self.out)


def keep_busy() -> None:
    """A spin kernel of ``BUSY_LEAD_CYCLES``: keeps the GPU busy while the host submits what follows."""
    torch.cuda._sleep(BUSY_LEAD_CYCLES)


def nothing_ahead() -> None:
    """Leaves the GPU idle ahead of a start event: the event time then includes the host's submission
    of the call (what a plain launch costs its caller)."""


def _event_times(run: Callable[[], Any], n: int, before: Callable[[], Any] | None) -> list[float]:
    """``n`` event-timed calls of ``run`` (microseconds), ``before`` run ahead of each outside the events
    (None: ``keep_busy``, so the GPU times the call rather than the host's submission of it)."""
    before = keep_busy if before is None else before
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for start, end in zip(starts, ends, strict=True):
        before()
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends, strict=True)]


def zero_point(reps: int = 200) -> dict[str, Any]:
    """The graph-launch zero point: median event time of replaying an empty CUDA graph (what any timed
    replay costs before its work), and of a graph of one 1-element fill (a graph's smallest kernel),
    each queued behind a spin so that the host's submission is not in the figure."""
    result: dict[str, Any] = {}
    tiny = torch.zeros(1, device="cuda")
    for name, body in (("empty_graph_us", lambda: None), ("one_kernel_graph_us", lambda: tiny.fill_(1.0))):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch warns that an empty graph is empty
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    body()
            graph.replay()
            torch.cuda.synchronize()
            result[name] = statistics.median(_event_times(graph.replay, reps, None))
        except Exception as e:  # an empty graph some versions refuse: the one-kernel figure still stands
            torch.cuda.synchronize()
            result[name] = None
            result[name.replace("_us", "_error")] = describe_error(e)
    result["us"] = result["empty_graph_us"] if result["empty_graph_us"] is not None else result["one_kernel_graph_us"]
    return result


def _kernel_events(prof: Any) -> list[tuple[str, float, float]]:
    """``(name, start µs, end µs)`` of every device kernel the profiler recorded, in start order."""
    out = []
    for e in prof.events():
        if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA:
            out.append((e.name, float(e.time_range.start), float(e.time_range.end)))
    return sorted(out, key=lambda e: e[1])


def after_previous(events: list[tuple[str, float, float]]) -> list[float]:
    """Per event (``(name, start, end)`` in start order, one stream): how long after every earlier event
    ended it ended, i.e. its share of the chain's span. A kernel launched early under programmatic
    dependent launch spends its first part waiting for its predecessor: its duration counts the wait,
    this does not (the shares of a chain add up to its span, gaps and waits between launches aside)."""
    shares, last_end = [], float("-inf")
    for _, start, end in events:
        shares.append(max(0.0, end - max(start, last_end)))
        last_end = max(last_end, end)
    return shares


KERNEL_TIMES_TOP = 12  # kernels listed per call (the longest); the rest are summed as "(other kernels)"


def kernel_times(run: Callable[[], Any], flush: L2Flush | None, reps: int = 10) -> list[dict[str, Any]]:
    """Each kernel's own duration inside ``reps`` calls of ``run`` (a graph replay or plain launches),
    L2 flushed before each as in the timing: per kernel name, per call, its summed duration
    (``us_per_call``: from its start, so under PDL with the wait for its predecessor), how long after
    the kernels before it it ended (``us_after_previous_per_call``, ``after_previous``: its share of
    the call's span), and its launches; largest share first. The flush's own kernel is left out (learnt by
    profiling a flush alone); ``[]`` when the profiler recorded no kernel."""
    from torch.profiler import ProfilerActivity, profile

    flush_names: set[str] = set()
    if flush is not None:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            flush()
            torch.cuda.synchronize()
        flush_names = {name for name, _, _ in _kernel_events(prof)}
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            if flush is not None:
                flush()
            run()
        torch.cuda.synchronize()
    events = _kernel_events(prof)
    totals: dict[str, list[tuple[float, float]]] = {}
    for (name, start, end), share in zip(events, after_previous(events), strict=True):
        if name not in flush_names:
            totals.setdefault(name, []).append((end - start, share))
    rows: list[dict[str, Any]] = [
        {
            "kernel": name, "us_per_call": sum(d for d, _ in us) / reps,
            "us_after_previous_per_call": sum(a for _, a in us) / reps, "launches_per_call": len(us) / reps,
        }
        for name, us in totals.items()
    ]  # fmt: skip
    rows.sort(key=lambda r: -r["us_after_previous_per_call"])
    if len(rows) > KERNEL_TIMES_TOP:
        rest = rows[KERNEL_TIMES_TOP:]
        rows = rows[:KERNEL_TIMES_TOP] + [{
            "kernel": f"(other kernels: {len(rest)})",
            **{k: sum(r[k] for r in rest) for k in ("us_per_call", "us_after_previous_per_call", "launches_per_call")},
        }]  # fmt: skip
    return rows


def time_cuda(
    fn: Callable[[], Any],
    reps: int = 100,
    budget_s: float = 2.0,
    min_reps: int = MIN_REPS_GPU,
    warmup: int = 3,
    flush_l2: bool = True,
    use_graph: bool = True,
    per_kernel: bool = False,
    flush: L2Flush | None = None,
) -> Timing:
    """CUDA-event time of ``fn()`` on the current device (see the module docstring for the method).

    ``per_kernel``: also each kernel's duration inside the timed call (``kernel_times``); ``flush``:
    an ``L2Flush`` to reuse (one is made when ``flush_l2`` and none is given)."""
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
                reason = describe_error(e)
        if reason is not None:
            note = f"not capturable ({reason})"
    if not flush_l2:
        flush = None
    elif flush is None:
        flush = L2Flush()
    t0 = time.perf_counter()
    run()
    torch.cuda.synchronize()
    n = _reps_for(time.perf_counter() - t0, reps, budget_s, min_reps)
    samples = _event_times(run, n, flush)
    timing = Timing(*_quantiles(samples), reps=n, launch=launch, l2="flushed" if flush_l2 else "warm", note=note)
    if per_kernel:
        try:
            timing.kernels = kernel_times(run, flush)
        except Exception as e:  # the profiler is a diagnostic: its failure leaves the timing standing
            torch.cuda.synchronize()
            timing.note = (timing.note + "; " if timing.note else "") + f"no kernel split ({describe_error(e)})"
    return timing


def copy_bandwidth(nbytes: int = COPY_BYTES, reps: int = 20) -> float:
    """Achieved device-to-device copy bandwidth in bytes/s (bytes read + bytes written), median of ``reps``."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    timing = time_cuda(lambda: dst.copy_(src), reps=reps, budget_s=10.0, flush_l2=False, use_graph=False)
    return 2 * nbytes / (timing.median_us * 1e-6)

"""``dsv4 bench``: the shape grid, and for each shape the bytes model, a check against the
reference, the timing of every backend and (on the CPU) the Triton kernels' traffic."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from ..harness.cases import Case, make_case
from ..harness.golden import compare
from ..model.config import COMPRESS_RATIO, DeepSeekV4Config, mode_shape
from ..ops.costs import OpCost
from ..ops.registry import get_op, op_names
from ..reference.indexer import indexer_scores as reference_indexer_scores
from .calls import COMPILED, GPU_BACKENDS, LIBRARY, BoundCall, backend_reason, bind
from .timing import (
    DEVICE_TABLE,
    MIN_REPS_CPU,
    MIN_REPS_GPU,
    DeviceSpec,
    L2Flush,
    Timing,
    copy_bandwidth,
    device_spec,
    time_cpu,
    time_cuda,
    zero_point,
)
from .traffic import measure_traffic

MODES = ("decode", "prefill")
# Indexer cache lengths (compressed rows) timed in decode: the deployment batch at the first,
# one sequence at the long-context ones. ``tiny`` keeps the interpreter quick.
DECODE_CACHE_LENS = {"tiny": (16, 512)}
DEFAULT_DECODE_CACHE_LENS = (2048, 65536, 262144)
PREFILL_TOKENS = {"tiny": (17, 64)}  # 17: one past a 16-token tile
DEFAULT_PREFILL_TOKENS = (128, 1024, 8192)
BASELINES = ("reference", COMPILED, LIBRARY)  # what speedups are quoted against
REFERENCE_SPECS = ("H100 SXM", "H200")  # floors printed with the bytes model on any machine
_SPECS = {spec.name: spec for _, spec in DEVICE_TABLE}


@dataclass(frozen=True)
class BenchShape:
    """One op at one shape: ``batch`` rows of ``seq`` tokens from ``start_pos`` (None: random per row),
    in a layer of ``kind`` (None: the op's default kind, for an op that has kinds)."""

    op: str
    mode: str
    batch: int
    seq: int
    start_pos: int | None = None
    kind: str | None = None

    @property
    def label(self) -> str:
        if self.mode == "prefill":
            text = f"prefill T={self.batch * self.seq}" + (f" B={self.batch}" if self.batch > 1 else "")
        else:
            text = f"decode B={self.batch} S={self.seq}"
            if self.start_pos is not None:
                text += f" cache={(self.start_pos + self.seq) // COMPRESS_RATIO}"
        return text if self.kind is None else f"{text} kind={self.kind}"

    @property
    def max_position(self) -> int | None:
        if self.start_pos is None:
            return None  # make_case's default span
        end = max(self.start_pos + self.seq, self.seq + COMPRESS_RATIO)  # make_case wants room for S + 4
        return -(-end // COMPRESS_RATIO) * COMPRESS_RATIO


def shape_grid(cfg: DeepSeekV4Config, modes: Iterable[str], ops: Sequence[str] | None = None) -> list[BenchShape]:
    """Every (op, shape) of the benchmark for ``cfg`` in ``modes`` (``ops``: default every registered op)."""
    ops = op_names() if ops is None else ops
    shapes: list[BenchShape] = []
    for mode in modes:
        dec = mode_shape(cfg, mode)
        if mode == "decode":
            mine: list[BenchShape] = []
            for op in ops:
                if not get_op(op).cache_bound:
                    mine.append(BenchShape(op, mode, dec.batch, dec.seq))
                    continue
                for i, rows in enumerate(DECODE_CACHE_LENS.get(cfg.preset, DEFAULT_DECODE_CACHE_LENS)):
                    start = rows * COMPRESS_RATIO - dec.seq
                    if start + dec.seq <= cfg.max_position_embeddings:
                        mine.append(BenchShape(op, mode, dec.batch if i == 0 else 1, dec.seq, start))
            # then the ops' other layer kinds at the same shapes, kind by kind, after every op's default kind
            other = [dataclasses.replace(x, kind=k) for x in mine for k in get_op(x.op).kinds[1:]]
            # a window layer reads its last W rows whatever the cache holds: its longest B=1 row is its long context
            other = [x for i, x in enumerate(other) if x.kind != "swa" or not any(
                (y.op, y.kind, y.batch) == (x.op, x.kind, x.batch) for y in other[i + 1 :])]  # fmt: skip
            shapes += mine + sorted(other, key=lambda x: get_op(x.op).kinds.index(x.kind))  # a stable sort
        else:
            for op in ops:
                for t in PREFILL_TOKENS.get(cfg.preset, DEFAULT_PREFILL_TOKENS):
                    if t + COMPRESS_RATIO <= cfg.max_position_embeddings:
                        shapes.append(BenchShape(op, mode, 1, t, 0))
    return shapes


def make_bench_case(cfg: DeepSeekV4Config, shape: BenchShape, seed: int, device: torch.device | str) -> Case:
    """The seeded case of ``shape`` (``make_case``'s arguments from it)."""
    return make_case(
        cfg, shape.op, shape.mode, seed, device=device, max_position=shape.max_position, batch=shape.batch,
        seq=shape.seq, start_pos=shape.start_pos, kind=shape.kind,
    )  # fmt: skip


def bench_cost(cfg: DeepSeekV4Config, shape: BenchShape, start_pos: Sequence[int]) -> OpCost:
    """The op's minimal bytes and FLOPs at ``shape`` for rows starting at ``start_pos``."""
    desc = get_op(shape.op)
    return desc.cost(cfg, start_pos, shape.seq, **desc.kind_args(shape.kind))


def _error(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160] if text else ''}"


def floors_us(cost: OpCost, bandwidth: float | None, spec: DeviceSpec | None) -> dict[str, float | None]:
    """The memory floor (bytes / bandwidth), the compute floor (FLOPs / datasheet peaks) and the
    larger of the two, in microseconds; None where a figure is unknown."""
    memory = cost.bytes / bandwidth * 1e6 if bandwidth else None
    compute = sum(n / spec.peak_flops[k] for k, n in cost.flops.items()) * 1e6 if spec else None
    known = [f for f in (memory, compute) if f is not None]
    return {"memory": memory, "compute": compute, "floor": max(known) if known else None}


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # the bench extra is not installed: run without a bar
        return None
    return tqdm(total=total, desc="dsv4 bench", unit="run", leave=False, disable=None if enabled else True)


def _missing(op: str, backend: str) -> str | None:
    """Why ``op`` is not timed on ``backend``: it has no implementation there; ``compile`` and
    ``library`` (the compiled reference and the library composition, baselines of the fused kernels)
    are timed for ops that have a fused kernel."""
    have = get_op(op).implementations
    if backend not in (COMPILED, LIBRARY):
        return None if backend in have else f"no {backend} implementation of {op} yet (reference only)"
    if "triton" not in have:
        return f"no triton implementation of {op} yet: no fused kernel to compare with"
    from . import baseline

    if backend == LIBRARY and not hasattr(baseline, op):
        return f"no library composition of {op} (dsv4.bench.baseline)"
    return None


def _check(op: str, call: BoundCall, expected: dict[str, torch.Tensor], case: Case) -> str:
    """The verdict of ``call``'s first call against the reference's outputs (spec §6). The indexer's
    scores and top-k are compared with the reference's on the key pool this call wrote (the keys
    themselves with the reference's by the key cache rule): "from the same inputs", as ``dsv4 run``
    and the indexer tests compare them."""
    got = call.outputs(call())
    if op == "indexer":
        expected = {**expected, **reference_indexer_scores(*call.args[:9])._asdict()}
    return compare(op, got, expected, case.compare_inputs()).verdict()


def _time_backend(
    case: Case,
    shape: BenchShape,
    backend: str,
    call: BoundCall | None,
    expected: dict[str, torch.Tensor],
    cost: OpCost,
    floors: tuple[dict[str, float | None], dict[str, float | None]],
    timer: Callable[[BoundCall], Timing],
    zero_us: float | None = None,
) -> dict[str, Any]:
    """One timing row: check ``backend`` against the reference outputs, time it, relate it to the floors
    (``zero_us``: the graph-launch zero point, reported beside the time)."""
    row: dict[str, Any] = {"op": shape.op, "shape": shape.label, "backend": backend}
    missing = _missing(shape.op, backend)
    if missing:
        return {**row, "status": "skipped", "error": missing}
    try:
        if call is None:
            call = bind(case, backend)
            row["check"] = _check(shape.op, call, expected, case)
        else:
            row["check"] = "is the reference"
        timing = timer(call)
    except Exception as e:  # a backend that cannot run this op is reported, not fatal
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return {**row, "status": "error", "error": _error(e)}
    row.update(status="ok", **dataclasses.asdict(timing))
    row["zero_point_us"] = zero_us
    row["gb_per_s"] = cost.bytes / (timing.median_us * 1e-6) / 1e9
    for key, floor in zip(("device_table", "measured_copy"), floors, strict=True):
        row[f"pct_of_floor_{key}"] = 100.0 * floor["floor"] / timing.median_us if floor["floor"] else None
    return row


def _count_traffic(case: Case, shape: BenchShape, expected: dict[str, torch.Tensor], cost: OpCost) -> dict[str, Any]:
    """One traffic row: check the Triton backend (its first call; autotuning stays out of the
    count), then count the bytes of its second call."""
    row: dict[str, Any] = {"op": shape.op, "shape": shape.label, "backend": "triton", "minimal_bytes": cost.bytes}
    missing = _missing(shape.op, "triton")
    if missing:
        return {**row, "status": "skipped", "error": missing}
    try:
        call = bind(case, "triton")
        row["check"] = _check(shape.op, call, expected, case)
        counted, _ = measure_traffic(call)
    except Exception as e:
        return {**row, "status": "error", "error": _error(e)}
    row.update(status="ok", **counted.to_dict())
    for name in ("requested", "sector", "unique"):
        row[f"{name}_over_minimal"] = row[f"{name}_bytes"] / cost.bytes
    return row


def run_bench(
    cfg: DeepSeekV4Config,
    *,
    modes: Sequence[str] = ("decode",),
    device: torch.device | str = "cpu",
    ops: Sequence[str] | None = None,
    backends: Sequence[str] | None = None,
    traffic: bool | None = None,
    reps: int = 100,
    budget_s: float = 2.0,
    flush_l2: bool = True,
    use_graph: bool = True,
    kernel_split: bool = True,
    seed: int = 0,
    progress: bool = True,
    on_shape: Callable[[dict[str, Any]], None] | None = None,
    shapes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run the benchmark; returns every figure (see ``report`` for how it is shown).

    ``backends`` to time: by default every backend available on ``device`` plus ``compile`` and
    ``library`` on a GPU, the reference alone on the CPU. ``traffic`` (default: on the CPU) counts
    the Triton kernels' bytes under the interpreter. ``kernel_split`` (GPU): each timing also gives
    every kernel's own time inside the timed call. ``on_shape`` is given the figures so far after
    each shape (``dsv4 bench --json`` rewrites its file then, so a run stopped early keeps what it
    measured). ``shapes``: keep only the shapes whose op and label (``"sparse_attn decode B=64 S=2
    cache=2048 kind=hca"``) hold one of these strings; a ``ValueError`` naming ``shapes`` when that
    leaves none.
    """
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    if backends is None:
        backends = list(GPU_BACKENDS) if on_gpu else ["reference"]
    traffic = (not on_gpu) if traffic is None else traffic
    skipped = {b: backend_reason(b, device) for b in backends}
    timed = [b for b in backends if skipped[b] is None]
    traffic_reason = backend_reason("triton", device) if traffic else "not requested"
    if traffic and on_gpu:
        traffic_reason = "traffic is counted under Triton's CPU interpreter; run with --cpu"
    count_traffic = traffic_reason is None

    grid = shape_grid(cfg, modes, ops)
    if shapes is not None:  # before anything is measured
        kept = [x for x in grid if any(text in f"{x.op} {x.label}" for text in shapes)]
        if not kept:
            labels = ", ".join(dict.fromkeys(x.label for x in grid))
            raise ValueError(f"shapes: none of {', '.join(shapes)} is in an op or shape of {cfg.name} ({labels})")
        grid = kept
    spec = device_spec(torch.cuda.get_device_name(device)) if on_gpu else None
    copy_bw = copy_bandwidth() if on_gpu else None
    zero = zero_point() if on_gpu and timed else None
    result: dict[str, Any] = {
        "bandwidth": {
            "device_table": {"name": spec.name, "bytes_per_s": spec.bandwidth} if spec else None,
            "measured_copy_bytes_per_s": copy_bw,
        },
        "zero_point": zero,
        "settings": {
            "preset": cfg.name,
            "modes": list(modes),
            "device": str(device),
            "backends": list(backends),
            "skipped_backends": {b: r for b, r in skipped.items() if r is not None},
            "traffic": count_traffic,
            "traffic_skipped": None if count_traffic else traffic_reason,
            "reps": reps,
            "min_reps": MIN_REPS_GPU if on_gpu else MIN_REPS_CPU,  # run even where reps is fewer
            "budget_s_per_timing": budget_s,
            "l2": ("flushed (read-only pass)" if flush_l2 else "warm") if on_gpu else "n/a",
            "cuda_graph": use_graph and on_gpu,
            "kernel_split": kernel_split and on_gpu,
            "seed": seed,
            "shapes": None if shapes is None else list(shapes),
        },
        "shapes": [],
        "timings": [],
        "traffic": [],
    }
    if on_gpu:
        flush = L2Flush(device=device) if flush_l2 and timed else None
        timer = partial(
            time_cuda, reps=reps, budget_s=budget_s, flush_l2=flush_l2, use_graph=use_graph, per_kernel=kernel_split,
            flush=flush,
        )  # fmt: skip
    else:
        timer = partial(time_cpu, reps=reps, budget_s=budget_s)
    bar = _progress(len(grid) * (len(timed) + count_traffic), progress)
    for shape in grid:
        if bar is not None:
            bar.set_postfix_str(f"{shape.op} {shape.label}")
        case = make_bench_case(cfg, shape, seed, device)
        start_host = case.meta["start_pos"]
        cost = bench_cost(cfg, shape, start_host)
        table_floor = floors_us(cost, spec.bandwidth if spec else None, spec)
        copy_floor = floors_us(cost, copy_bw, spec)
        result["shapes"].append({
            "op": shape.op, "shape": shape.label, "batch": shape.batch, "seq": shape.seq, "kind": case.meta.get("kind"),
            "start_pos": start_host if len(set(start_host)) > 1 else start_host[0],
            "model": cost.to_dict(), "floor_us_device_table": table_floor, "floor_us_measured_copy": copy_floor,
            "floor_us_reference_devices": {n: floors_us(cost, _SPECS[n].bandwidth, _SPECS[n]) for n in REFERENCE_SPECS},
        })  # fmt: skip

        reference, expected = None, {}
        if timed or count_traffic:
            reference = bind(case, "reference")
            expected = {k: v.clone() for k, v in reference.outputs(reference()).items()}  # timing mutates the state
        rows = []
        for backend in timed:
            call = reference if backend == "reference" else None
            floors = (table_floor, copy_floor)
            zero_us = None if zero is None else zero["us"]
            rows.append(_time_backend(case, shape, backend, call, expected, cost, floors, timer, zero_us))
            if bar is not None:
                bar.update()
        medians = {r["backend"]: r["median_us"] for r in rows if r["status"] == "ok"}
        for row in rows:
            if row["status"] == "ok":
                row["speedup_vs"] = {
                    b: medians[b] / row["median_us"] for b in BASELINES if b in medians and b != row["backend"]
                }
        result["timings"].extend(rows)
        if count_traffic:
            result["traffic"].append(_count_traffic(case, shape, expected, cost))
            if bar is not None:
                bar.update()
        if on_shape is not None:
            on_shape(result)
    if bar is not None:
        bar.close()
    return result


PASSING_CHECKS = ("ok", "is the reference")  # a row's ``check``: compared and matched, or the reference itself


def failed_rows(result: dict[str, Any]) -> list[str]:
    """The timing and traffic rows of ``result`` (``run_bench``'s) whose check against the reference is
    not ok (a ``MISMATCH``) or that raised (``status == "error"``), each as "op shape backend: why";
    a skipped row (no implementation of the op on that backend) is not a failure."""
    failed = []
    for row in [*result.get("timings", ()), *result.get("traffic", ())]:
        if row["status"] == "skipped":
            continue
        why = row["error"] if row["status"] == "error" else row.get("check", "not checked")
        if row["status"] == "error" or why not in PASSING_CHECKS:
            failed.append(f"{row['op']} {row['shape']} {row['backend']}: {why}")
    return failed

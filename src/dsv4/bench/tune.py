"""``dsv4 tune``: each Triton kernel's declared launch candidates, measured on the GPU at hand.

For every kernel and shape bucket the flash and pro presets reach (decode B = 64, 1, 8 with S = 2,
the indexer at caches of 2048 / 65536 / 262144 keys, the attention ops of B = 64 and the long
contexts in each layer kind they serve; prefill T = 1024), each candidate of
``kernels.tuning`` runs inside the whole op with every other kernel at its default. Its outputs
are checked: bit-identical to the default configuration's when only parameters that keep the bits
changed (``Param.exact``), else within the spec §6 rules of the reference's outputs (computed once
per shape). A candidate that passes is timed as
``dsv4 bench`` times (CUDA graph, L2 flushed by a read, median of the repetitions). The fastest
that beats the default by ``MIN_GAIN`` is written to the device's config file
(``kernels/configs/<device>.json`` unless ``--config`` says where); every variant's µs and GB/s go
to the JSON. Both files are rewritten after each bucket, no candidate starts once the budget is
spent, and ``--kernels`` / ``--ops`` / ``--shapes`` limit the run. The deployment shapes come first,
so a run cut short has tuned what matters most.

``--dry-run``: the same on the CPU interpreter with the ``tiny`` preset and one shape bucket per
kernel and layer kind. Every candidate that the interpreter executes differently from the default
runs and is checked; candidates that differ only in compiled-only options (warps, stages, PDL) are
the same program there and share the verdict of that run (``same_run_as``). Nothing a CPU times is a GPU
figure, so the dry run writes its config file to a temporary folder unless told where.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..harness.golden import compare
from ..kernels import tuning  # the package registers every kernel's launch parameters
from ..kernels.interpreter import interpreted
from ..model.config import COMPRESS_RATIO, get_config
from ..model.structs import StepPositions
from ..ops.registry import get_op, op_names
from . import report
from .calls import bind
from .runner import BenchShape, bench_cost, make_bench_case
from .timing import L2Flush, describe_error, time_cuda, zero_point

PRESETS = ("flash", "pro")
DECODE_SEQ = 2
CACHE_LENS = (2048, 65536, 262144)
PREFILL_TOKENS = 1024
MIN_GAIN = 0.02  # a candidate replaces the default only when its median is at least 2% lower (run-to-run noise)
REPS = 30  # timed repetitions per candidate (fewer when over the per-timing budget)
TIMING_S = 0.25  # seconds per candidate timing at most
MIN_WORKLOAD_S = 5.0  # no new shape is started with less of the budget left (building its case takes seconds)
DRY_PRESET = "tiny"
DRY_START = 62  # a tiny decode row whose step closes a block (positions 62, 63)


@dataclass
class Workload:
    """One op call (or, in the dry run, one selection call) whose kernels are tuned; ``make`` returns a
    fresh call (its own state) and the function that names its outputs."""

    label: str
    op: str | None
    make: Callable[[], tuple[Callable[[], Any], Callable[[Any], dict[str, torch.Tensor]]]]
    compare_inputs: dict[str, Any] = field(default_factory=dict)
    minimal_bytes: int | None = None
    kind: str | None = None  # the layer kind of an op that has kinds (None: its default)
    reference: Callable[[], dict[str, torch.Tensor]] | None = None  # the reference backend's outputs


def _op_shapes(op: str, mode: str, batch: int, caches: Sequence[int | None]) -> list[BenchShape]:
    if mode == "prefill":
        return [BenchShape(op, "prefill", 1, PREFILL_TOKENS, 0)]
    if not get_op(op).cache_bound:
        return [BenchShape(op, "decode", batch, DECODE_SEQ)] if None in caches else []
    return [BenchShape(op, "decode", batch, DECODE_SEQ, c * COMPRESS_RATIO - DECODE_SEQ) for c in caches if c]


def plan(presets: Sequence[str], modes: Sequence[str], ops: Sequence[str]) -> list[tuple[str, BenchShape]]:
    """``(preset, shape)`` in the order they are tuned: per preset the deployment batch (B=64) first,
    then the long-context rows (B=1), each followed by the same shapes in the ops' other layer kinds,
    then the other batches, the rest of the caches and prefill."""
    order: list[tuple[str, int, tuple[int | None, ...]]] = [
        ("decode", 64, (None, CACHE_LENS[0])),
        ("decode", 1, CACHE_LENS[1:]),
        ("decode", 1, (None, CACHE_LENS[0])),
        ("decode", 8, (None, *CACHE_LENS)),
        ("decode", 64, CACHE_LENS[1:]),
        ("prefill", 1, (0,)),
    ]
    out = []
    for preset in presets:
        cfg = get_config(preset)
        for i, (mode, batch, caches) in enumerate(order):
            if mode not in modes:
                continue
            mine = [shape for op in ops for shape in _op_shapes(op, mode, batch, caches)]
            if i < 2:  # the deployment and long-context shapes in the other layer kinds too
                mine += [dataclasses.replace(x, kind=k) for x in mine for k in get_op(x.op).kinds[1:]]
            out += [(preset, x) for x in mine if (x.start_pos or 0) + x.seq <= cfg.max_position_embeddings]
    return out


def _op_workload(preset: str, shape: BenchShape, device: torch.device, seed: int) -> Workload:
    cfg = get_config(preset)
    case = make_bench_case(cfg, shape, seed, device)

    def make():
        call = bind(case, "triton")
        return call, call.outputs

    def reference() -> dict[str, torch.Tensor]:
        call = bind(case, "reference")
        return call.outputs(call())

    cost = bench_cost(cfg, shape, case.meta["start_pos"])
    label = f"{preset} {shape.op} {shape.label}"
    return Workload(label, shape.op, make, case.compare_inputs(), cost.bytes, shape.kind, reference)


def _selection_workload(device: torch.device, seed: int) -> Workload:
    """The chunked top-k (rows longer than ``ROW_IN_REGISTERS`` keys) alone: no ``tiny`` cache is that long."""
    from ..kernels.topk import ROW_IN_REGISTERS, select_topk

    n = ROW_IN_REGISTERS + 2
    start = n * COMPRESS_RATIO - DECODE_SEQ
    g = torch.Generator().manual_seed(seed)
    score = torch.randn(1, DECODE_SEQ, n, generator=g, dtype=torch.float32).to(device)
    pos = StepPositions.from_host(torch.tensor([start], device=device), (start,), DECODE_SEQ)
    topk = get_config(DRY_PRESET).index_topk

    def make():
        return (lambda: select_topk(score, pos, topk, 0)), (lambda idx: {"topk_idxs": idx})

    return Workload(f"{DRY_PRESET} select_topk B=1 S={DECODE_SEQ} keys={n}", None, make)


def _given(load: Workload) -> Workload:
    return load


def dry_workloads(ops: Sequence[str], device: torch.device, seed: int) -> list[Workload]:
    """The dry run's calls: one ``tiny`` decode row per op (reaching every kernel but the chunked
    selection), then the same row in the ops' other layer kinds, then a selection over a row of more
    than 4096 keys."""
    shapes = [BenchShape(op, "decode", 1, DECODE_SEQ, None if op == "qkv_proj_rope" else DRY_START) for op in ops]
    shapes += [dataclasses.replace(x, kind=k) for x in shapes for k in get_op(x.op).kinds[1:]]
    loads = [_op_workload(DRY_PRESET, s, device, seed) for s in shapes]
    return loads + [_selection_workload(device, seed)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.uint8)


def _verdict(
    load: Workload, base: dict[str, torch.Tensor], got: dict[str, torch.Tensor], exact: bool,
    expected: dict[str, torch.Tensor] | None,
) -> str:  # fmt: skip
    """``bit-identical`` (to the default's outputs ``base``), ``within tolerance`` (spec §6, against the
    reference's ``expected``; the default's where the workload has no reference) or ``MISMATCH ...``."""
    same = all(
        got[k].shape == v.shape and got[k].dtype == v.dtype and torch.equal(_bits(got[k]), _bits(v))
        for k, v in base.items()
    )
    if same:
        return "bit-identical"
    if exact or load.op is None:
        return "MISMATCH not bit-identical, though only parameters that keep the bits changed"
    result = compare(load.op, got, base if expected is None else expected, load.compare_inputs)
    return "within tolerance" if result else result.verdict()


def passed(check: str) -> bool:
    return check in ("bit-identical", "within tolerance")


class Tuner:
    """One ``dsv4 tune`` run: ``run()`` tunes ``workloads`` in order, rewriting ``json_path`` and the
    config file after each bucket; ``result`` holds every figure."""

    def __init__(
        self,
        device: torch.device,
        config_path: Path,
        json_path: Path | None,
        command: str,
        *,
        kernels_wanted: Sequence[str] | None = None,
        budget_s: float = 600.0,
        reps: int = REPS,
        timing_s: float = TIMING_S,
        dry_run: bool = False,
        resume: bool = False,
        log: Callable[[str], None] = print,
    ) -> None:
        self.device, self.config_path, self.json_path = device, config_path, json_path
        self.kernels_wanted = set(kernels_wanted or tuning.TUNABLES)
        self.reps, self.timing_s, self.dry_run, self.log = reps, timing_s, dry_run, log
        self.deadline = time.monotonic() + budget_s
        self.start = time.monotonic()
        self.key = tuning.device_key(device)
        _check_writable(config_path)
        self.entries: dict[str, dict[str, dict[str, Any]]] = {}
        self.changed = False  # whether a bucket's entry changed: the config file is written only then
        # tune on from an earlier run's file, else from the package's for this device (checked: a bad one
        # stops the run here, before any GPU time is spent)
        shipped = tuning.CONFIG_DIR / f"{self.key}.json"
        start_from = config_path if config_path.is_file() else shipped if shipped.is_file() else None
        if start_from is not None:
            table = tuning.load_config(start_from, self.key)
            self.entries = {k: {b: dict(c) for b, c in buckets.items()} for k, buckets in table.entries.items()}
        # resume: the buckets the starting file holds are done (the dry run tunes a kernel once per layer
        # kind: by kernel and kind, the held ones in the default kind)
        self.done: set[Any] = set()
        if resume:
            held = [(k, b) for k, buckets in self.entries.items() for b in buckets]
            self.done = {(k, None) for k, _ in held} if dry_run else set(held)
        self.on_gpu = device.type == "cuda"
        self.flush = L2Flush(device=device) if self.on_gpu else None
        self.meta = report.provenance(command, device)
        self.result: dict[str, Any] = {
            "meta": self.meta,
            "device_key": self.key,
            "config_file": str(config_path),
            "settings": {
                "dry_run": dry_run,
                "kernels": sorted(self.kernels_wanted),
                "budget_s": budget_s,
                "reps": reps,
                "timing_s": timing_s,
                "min_gain": MIN_GAIN,
                "l2": "flushed (read-only pass)" if self.on_gpu else "n/a",
                "timing": "CUDA graph replays, CUDA events" if self.on_gpu else "host clock of one interpreted call",
            },  # fmt: skip
            "zero_point": zero_point() if self.on_gpu else None,
            "workloads": [],
            "buckets": [],
            "elapsed_s": 0.0,
            "stopped": None,
        }

    # -- files -------------------------------------------------------------------------------
    def save(self) -> None:
        self.result["elapsed_s"] = round(time.monotonic() - self.start, 1)
        if self.json_path is not None:
            report.write_json(self.result, self.json_path)
        if not self.changed:  # the file, and the run that made its entries, stay as they are
            return
        name = torch.cuda.get_device_name(self.device) if self.on_gpu else "CPU (Triton interpreter)"
        meta = {
            "device_name": name,
            "sms": torch.cuda.get_device_properties(self.device).multi_processor_count if self.on_gpu else None,
            "made_by": self.meta["command"], "date": self.meta["date"], "commit": self.meta["commit"],
            "versions": self.meta["versions"],
        }  # fmt: skip
        tuning.write_config(self.config_path, self.key, {k: v for k, v in self.entries.items() if v}, meta)

    # -- one candidate -----------------------------------------------------------------------
    def _run(
        self, load: Workload, kernel: str, cfg: tuning.Config, base: dict, expected: dict | None, exact: bool
    ) -> dict[str, Any]:
        row: dict[str, Any] = {}
        with tuning.defaults_only(), tuning.forced(kernel, cfg):
            call, outputs = load.make()
            t0 = time.perf_counter()
            result = call()
            if self.on_gpu:
                torch.cuda.synchronize(self.device)
            host_us = (time.perf_counter() - t0) * 1e6
            row["check"] = _verdict(load, base, outputs(result), exact, expected)
            if not passed(row["check"]):
                return row
            if self.on_gpu:
                t = time_cuda(call, reps=self.reps, budget_s=self.timing_s, flush=self.flush)
                row.update(median_us=t.median_us, p10_us=t.p10_us, p90_us=t.p90_us, reps=t.reps, launch=t.launch)
                if t.note:
                    row["note"] = t.note
            else:
                row.update(median_us=host_us, p10_us=host_us, p90_us=host_us, reps=1, launch="host clock")
        if load.minimal_bytes:
            row["gb_per_s"] = load.minimal_bytes / (row["median_us"] * 1e-6) / 1e9
        return row

    # -- one bucket --------------------------------------------------------------------------
    def _bucket(
        self, load: Workload, kernel: str, bucket: str, base: dict, expected: dict | None, default_row: dict[str, Any]
    ) -> None:
        """Every candidate of ``kernel`` at ``bucket``. ``base``, ``expected``: the default's and the
        reference's outputs; ``default_row``: the op at every default, run once per workload (empty until
        the first bucket runs it)."""
        tunable = tuning.TUNABLES[kernel]
        default = tunable.default
        entry: dict[str, Any] = {"kernel": kernel, "bucket": bucket, "workload": load.label, "default": dict(default)}
        variants: list[dict[str, Any]] = entry.setdefault("variants", [])
        self.result["buckets"].append(entry)
        runs: dict[tuple, dict[str, Any]] = {}
        default_seen: tuple | None = None  # the default's program as the interpreter runs it
        for cfg in tunable.candidate_configs(tunable.parse_bucket(bucket)):
            if time.monotonic() > self.deadline:
                entry["stopped"] = "budget spent"
                break
            changed = {k: v for k, v in cfg.items() if v != default[k]}
            row: dict[str, Any] = {"params": dict(cfg), "changed": changed}
            variants.append(row)
            seen_as = tuple((k, v) for k, v in cfg.items() if not tunable.param(k).compiled_only)
            if default_row and (not changed or (interpreted() and seen_as == default_seen)):
                row.update(default_row, same_run_as="the op at every default (run once per shape)")
                runs.setdefault(seen_as, row)
                default_seen = seen_as if default_seen is None else default_seen
                continue
            if interpreted() and seen_as in runs:  # the same program under the interpreter
                first = runs[seen_as]
                row.update({k: v for k, v in first.items() if k not in ("params", "changed", "same_run_as")})
                row["same_run_as"] = first["changed"]
                continue
            try:
                exact = all(tunable.param(k).exact for k in changed)
                row.update(self._run(load, kernel, cfg, base, expected, exact))
            except Exception as e:  # a candidate that does not compile or launch is a finding, not the end
                row["check"] = f"error: {describe_error(e)}"
                if self.on_gpu and not self._device_alive():
                    entry["stopped"] = self.result["stopped"] = "the CUDA context failed: " + row["check"]
                    break
            runs.setdefault(seen_as, row)
            if not changed:
                default_seen = seen_as if default_seen is None else default_seen
                default_row.update({k: v for k, v in row.items() if k not in ("params", "changed")})
            shown = f"{row['median_us']:.1f} µs" if "median_us" in row else "-"
            self.log(f"  {kernel} [{bucket}] {changed or 'default'}: {shown} {row['check']}")
        if entry.get("stopped"):  # not every candidate was timed: the bucket's entry (or default) stays
            entry["winner"] = None
        else:
            self._choose(entry, variants, default)
        self.save()

    def _choose(self, entry: dict[str, Any], variants: list[dict[str, Any]], default: tuning.Config) -> None:
        timed = [v for v in variants if passed(v.get("check", "")) and "median_us" in v]
        base = next((v for v in timed if not v["changed"]), None)
        best = min(timed, key=lambda v: v["median_us"], default=None)
        kernel_entries = self.entries.setdefault(entry["kernel"], {})
        entry["winner"] = None
        if base is None or best is None:
            return
        gain = 1.0 - best["median_us"] / base["median_us"]
        entry["gain_pct"] = 100.0 * gain
        before = kernel_entries.get(entry["bucket"])
        if best["changed"] and gain >= MIN_GAIN:
            entry["winner"] = best["params"]
            kernel_entries[entry["bucket"]] = best["params"]
        else:
            kernel_entries.pop(entry["bucket"], None)  # the default wins (again): drop an older entry
        self.changed |= kernel_entries.get(entry["bucket"]) != before

    def _device_alive(self) -> bool:
        try:
            torch.cuda.synchronize(self.device)
            return True
        except Exception:
            return False

    # -- the run -----------------------------------------------------------------------------
    def run(self, workloads: Sequence[Callable[[], Workload]], labels: Sequence[str]) -> dict[str, Any]:
        """Tune each workload (built lazily: a case at 262144 keys takes seconds) in order."""
        for build, label in zip(workloads, labels, strict=True):
            record: dict[str, Any] = {"label": label, "status": "pending"}
            self.result["workloads"].append(record)
            if self.result["stopped"]:
                record["status"] = f"not run: {self.result['stopped']}"
                continue
            if self.deadline - time.monotonic() < (0 if self.dry_run else MIN_WORKLOAD_S):
                record["status"] = "not run: budget spent"
                continue
            t0 = time.monotonic()
            self.log(f"{label}")
            try:
                load = build()
                with tuning.defaults_only(), tuning.recording() as seen:
                    call, outputs = load.make()
                    t1 = time.perf_counter()
                    base = {k: v.clone() for k, v in outputs(call()).items()}
                    host_us = (time.perf_counter() - t1) * 1e6
                    del call
                expected = load.reference() if load.reference is not None else None
                # under the interpreter this first call is the default's run; on a GPU the first bucket times it
                default_row: dict[str, Any] = {}
                if not self.on_gpu:
                    default_row.update(check="bit-identical", median_us=host_us, p10_us=host_us, p90_us=host_us)
                    default_row.update(reps=1, launch="host clock")
                    if load.minimal_bytes:
                        default_row["gb_per_s"] = load.minimal_bytes / (host_us * 1e-6) / 1e9
                for kernel, bucket in dict.fromkeys(seen):
                    done_key = (kernel, load.kind) if self.dry_run else (kernel, bucket)
                    if kernel in self.kernels_wanted and done_key not in self.done:
                        self.done.add(done_key)
                        self._bucket(load, kernel, bucket, base, expected, default_row)
                record["status"] = "done"
            except Exception as e:
                record["status"] = f"error: {describe_error(e)}"
                if self.on_gpu and not self._device_alive():
                    self.result["stopped"] = "the CUDA context failed: " + record["status"]
            record["seconds"] = round(time.monotonic() - t0, 1)
            self.save()
        if any(r["status"].startswith("not run") for r in self.result["workloads"]) and not self.result["stopped"]:
            self.result["stopped"] = "budget spent"
        self.save()
        return self.result


def run_tune(
    *,
    device: torch.device | str,
    presets: Sequence[str] = PRESETS,
    modes: Sequence[str] = ("decode", "prefill"),
    ops: Sequence[str] | None = None,
    kernels: Sequence[str] | None = None,
    shapes: Sequence[str] | None = None,
    budget_s: float = 600.0,
    reps: int = REPS,
    timing_s: float = TIMING_S,
    json_path: str | Path | None = None,
    config_path: str | Path | None = None,
    dry_run: bool = False,
    resume: bool = False,
    seed: int = 0,
    command: str = "tune",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Tune (see the module docstring); returns the JSON record. ``shapes``: keep only the workloads
    whose label (``"flash indexer decode B=64 S=2 cache=2048"``) contains one of these strings.
    ``resume``: leave out the kernel buckets the starting config file already holds (a slice that goes
    on where an earlier one stopped; a bucket whose default won holds no entry and is tuned again)."""
    device = torch.device(device)
    ops = list(ops or op_names("triton"))  # an op on the reference alone has no kernel to tune
    builds: list[Callable[[], Workload]]
    if dry_run:
        loads = dry_workloads(ops, device, seed)
        builds = [functools.partial(_given, w) for w in loads]
        labels = [w.label for w in loads]
    else:
        planned = plan(presets, modes, ops)
        builds = [functools.partial(_op_workload, p, s, device, seed) for p, s in planned]
        labels = [f"{p} {s.op} {s.label}" for p, s in planned]
    if shapes:
        keep = [i for i, label in enumerate(labels) if any(text in label for text in shapes)]
        if not keep:
            raise ValueError(
                f"--shapes {','.join(shapes)}: matches none of the {len(labels)} workloads ({labels[0]!r}, ...)"
            )
        builds, labels = [builds[i] for i in keep], [labels[i] for i in keep]
    if config_path is None:  # a dry run's own folder: it starts from no earlier run's file
        folder = Path(tempfile.mkdtemp(prefix="dsv4-tune-dry-run-")) if dry_run else tuning.CONFIG_DIR
        config_path = folder / f"{tuning.device_key(device)}.json"
    tuner = Tuner(
        device, Path(config_path), None if json_path is None else Path(json_path), command, kernels_wanted=kernels,
        budget_s=budget_s, reps=reps, timing_s=timing_s, dry_run=dry_run, resume=resume, log=log,
    )  # fmt: skip
    tuner.result["settings"].update(presets=[DRY_PRESET] if dry_run else list(presets), modes=list(modes), ops=ops)
    tuner.result["settings"]["shapes"] = list(shapes or [])
    tuner.result["settings"]["resume"] = resume
    return tuner.run(builds, labels)


def _check_writable(path: Path) -> None:
    """``ValueError`` naming the config file unless it can be written (checked before any GPU time is spent)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"config file {path} (--config): its folder cannot be made ({e.strerror or e})") from None
    if path.is_dir() or not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"config file {path} (--config): not a file this process can write")


def failed_workloads(result: dict[str, Any]) -> list[str]:
    """The labels of the workloads whose op failed at its defaults (their buckets were not tuned)."""
    return [w["label"] for w in result["workloads"] if w["status"].startswith("error")]


def describe_tunables() -> str:
    """``dsv4 tune --list``: every kernel's parameters (default, values, whether they keep the bits)
    and candidates."""
    lines = []
    for name, t in sorted(tuning.TUNABLES.items()):
        lines += [f"{name}: {t.doc}", f"  bucket: {','.join(f'{d}=<int>' for d in t.dims)}"]
        for p in t.params:
            flags = [f for f, on in (("keeps the bits", p.exact), ("compiled only", p.compiled_only)) if on]
            lines.append(
                f"  {p.name} = {json.dumps(p.default)} of {json.dumps(list(p.choices))}"
                + (f" ({', '.join(flags)})" if flags else "")
                + f": {p.doc}"
            )
        if callable(t.candidates):
            for label, bucket in (("decode T=128", 128), ("prefill T=1024", 1024)):
                cands = t.candidates(dict.fromkeys(t.dims, bucket))
                lines.append(f"  candidates ({label}): " + "; ".join(json.dumps(c) for c in cands))
        else:
            lines.append("  candidates: " + "; ".join(json.dumps(c) for c in t.candidates))
    return "\n".join(lines)


def render(result: dict[str, Any]) -> str:
    """The run as a terminal table: per bucket the default's time, the best candidate's and the choice."""
    rows = []
    for b in result["buckets"]:
        timed = [v for v in b["variants"] if "median_us" in v]
        base = next((v for v in timed if not v["changed"]), None)
        best = min(timed, key=lambda v: v["median_us"], default=None)
        failed = [v for v in b["variants"] if not passed(v.get("check", ""))]
        rows.append([
            b["kernel"], b["bucket"], b["workload"], str(len(b["variants"])), str(len(failed)),
            f"{base['median_us']:.1f}" if base else "-", f"{best['median_us']:.1f}" if best else "-",
            json.dumps(best["changed"]) if best and best["changed"] else "default",
            "written" if b.get("winner") else "-",
        ])  # fmt: skip
    headers = ["kernel", "bucket", "workload", "variants", "failed", "default µs", "best µs", "best", "config"]
    lines = [
        f"dsv4 tune: device {result['device_key']} ({result['meta']['device']}); "
        f"{len(result['buckets'])} bucket(s) in {result['elapsed_s']:.0f} s"
        + (f"; stopped: {result['stopped']}" if result.get("stopped") else ""),
        report._table(headers, rows),
    ]
    for b in result["buckets"]:
        for v in b["variants"]:
            if not passed(v.get("check", "")):
                lines.append(f"  {b['kernel']} [{b['bucket']}] {json.dumps(v['changed'])}: {v.get('check')}")
    for w in result["workloads"]:
        if w["status"].startswith("error"):
            lines.append(f"  workload {w['label']}: {w['status']}")
    lines.append(f"config file: {result['config_file']}")
    return "\n".join(lines)

"""``summary.md``: the acceptance record as ready-to-paste Markdown tables.

Per op and shape: time (median, p10-p90), the floor and % of it for the device table's and the
measured copy bandwidth, speed-up over the eager reference and over ``torch.compile``, how it was
launched, and the check against the reference; the test counts; the decode step as a CUDA graph;
the per-kernel ncu bytes; checkpoint loading; random cases at tuning candidates; one tensor-parallel
rank's decode table and tune; compute-sanitizer's error counts (``sanitize``, ``initcheck``). A figure that a
failed or skipped step did not produce is written as absent, with the step and why.
"""

from __future__ import annotations

import json
from typing import Any

from .environment import describe

BACKEND_ORDER = ("triton", "reference", "compile", "library")
BASELINES = {"reference": "eager", "compile": "compile", "library": "library"}
# The issues' decode targets: (op, text in the shape label, within this many times the floor, the floor's
# bandwidth: the device table's or the measured copy's); the front end's first ones, then qkv on Hopper
# and the attention
TARGETS = (
    ("qkv_proj_rope", "decode B=64 S=2", 1.25, "table"),
    ("indexer", "cache=2048", 1.4, "table"),
    ("indexer", "cache=262144", 1.4, "table"),
    ("qkv_proj_rope", "decode B=64 S=2", 1.3, "copy"),
    ("sparse_attn", "decode B=64 S=2", 1.5, "copy"),
    ("o_proj", "decode B=64 S=2", 1.3, "copy"),
)
_BASIS = {"table": ("pct_of_floor_device_table", "the floor"), "copy": ("pct_of_floor_measured_copy",
          "the floor at the measured copy bandwidth")}  # fmt: skip
NCU_COLUMNS = (  # (metric, column, divisor of the base unit, digits)
    ("dram__bytes_read.sum", "DRAM read MB", 1e6, 3),
    ("dram__bytes_write.sum", "DRAM write MB", 1e6, 3),
    ("lts__t_bytes.sum", "L2 MB", 1e6, 3),
    ("gpu__time_duration.sum", "time µs", 1e3, 3),
    ("launch__registers_per_thread", "registers", 1, 0),
    ("sm__warps_active.avg.pct_of_peak_sustained_active", "warps active %", 1, 1),
    ("smsp__issue_active.avg.pct_of_peak_sustained_active", "issue active %", 1, 1),
    ("smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio", "long-scoreboard stall", 1, 2),
    ("smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio", "barrier stall", 1, 2),
)
# ncu's units (``--print-units base`` prints bytes and nanoseconds) -> bytes or nanoseconds
_UNIT_SCALE = {
    "byte": 1, "b": 1, "kbyte": 1e3, "kb": 1e3, "mbyte": 1e6, "mb": 1e6, "gbyte": 1e9, "gb": 1e9,
    "nsecond": 1, "ns": 1, "usecond": 1e3, "us": 1e3, "msecond": 1e6, "ms": 1e6,
}  # fmt: skip


def _md_table(headers: list[str], rows: list[list[str]], right: set[int] | frozenset = frozenset()) -> list[str]:
    align = ["---:" if i in right else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    return lines + ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]


def _us(value: float | None) -> str:
    if value is None:
        return "-"
    return format(value, ".2f" if value < 10 else ".1f" if value < 1000 else ".0f")


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _why(entry: dict[str, Any] | None) -> str:
    """Why a step left no figure: its status and reason (or that no step covers it)."""
    if entry is None:
        return "no step measures it"
    if entry["status"] == "ok" and entry.get("parse_error"):
        return f"step {entry['name']} ran but its output could not be read ({entry['parse_error']})"
    reason = f": {entry['reason']}" if entry.get("reason") else ""
    return f"step {entry['name']} {entry['status']}{reason}"


def _step(record: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((e for e in record["steps"] if e["name"] == name), None)


def _steps_table(record: dict[str, Any]) -> list[str]:
    rows = []
    for i, e in enumerate(record["steps"], 1):
        note = e.get("reason") or ""
        if e.get("parse_error"):
            note = (note + "; " if note else "") + f"output not read: {e['parse_error']}"
        seconds = "" if e.get("seconds") is None else f"{e['seconds']:.1f}"
        rows.append([str(i), f"`{e['name']}`", e["status"], seconds, note])
    return _md_table(["#", "step", "status", "s", "note"], rows, right={0, 3})


def _tests_section(record: dict[str, Any]) -> list[str]:
    entry = _step(record, "tests")
    if entry is None or not entry.get("result"):
        return [f"No test counts: {_why(entry)}."]
    result = entry["result"]
    line = (
        f"**{result['passed']} passed, {result['failed']} failed, {result['errors']} errors, "
        f"{result['skipped']} skipped** of {result['total']} (from {result['source']})"
    )
    if entry["status"] == "timeout":
        line += "; the step was stopped at its time limit, so these are the tests that finished"
    lines = [line]
    if result["failures"]:
        lines += ["", "Failing (a compiled kernel that fails its test is the first thing to fix):", ""]
        lines += [f"- `{t}`" for t in result["failures"][:30]]
        if len(result["failures"]) > 30:
            lines.append(f"- ... and {len(result['failures']) - 30} more (junit.xml)")
    return lines


def _bench_runs(record: dict[str, Any], mode: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(step entry, bench JSON) of every bench step of ``mode`` that wrote its JSON."""
    runs = []
    for e in record["steps"]:
        bench = (e.get("result") or {}).get("bench")
        if e.get("covers", {}).get("mode") == mode and bench:
            runs.append((e, bench))
    return runs


def _owner(record: dict[str, Any], mode: str, op: str, backend: str) -> dict[str, Any] | None:
    """The step that was to time ``op`` on ``backend`` in ``mode``."""
    for e in record["steps"]:
        c = e.get("covers") or {}
        if c.get("mode") == mode and op in c.get("ops", ()) and backend in c.get("backends", ()):
            return e
    return None


def _floor_pct(row: dict[str, Any]) -> tuple[float | None, str]:
    """% of the floor for a target defined against the device table's floor, and what the % is of:
    the device table's floor; on a GPU the table does not list, the measured copy bandwidth's
    memory floor (no datasheet peaks, so no compute floor), said so beside the figure."""
    table = row.get("pct_of_floor_device_table")
    if table is not None:
        return table, ""
    return row.get("pct_of_floor_measured_copy"), " of the copy-bandwidth memory floor (device not in the table)"


def bench_section(record: dict[str, Any], mode: str) -> list[str]:
    """The timing table of ``mode`` merged over its bench steps, absent figures marked."""
    runs = _bench_runs(record, mode)
    owners = [e for e in record["steps"] if (e.get("covers") or {}).get("mode") == mode]
    if not runs:
        if not owners:
            return [f"No {mode} step in this run."]
        return [f"No {mode} figures: " + "; ".join(_why(e) for e in owners) + "."]
    shapes: dict[tuple[str, str], dict[str, Any]] = {}
    timings: dict[tuple[str, str, str], dict[str, Any]] = {}
    for _, bench in runs:
        for s in bench["shapes"]:
            shapes.setdefault((s["op"], s["shape"]), s)
        for t in bench["timings"]:
            timings.setdefault((t["op"], t["shape"], t["backend"]), t)
    first = runs[0][1]
    lines = [_bandwidth_line(runs)]
    headers = ["op", "shape", "backend", "launch", "median µs", "p10–p90 µs", "floor µs table / copy"]
    headers += ["% floor (table)", "% floor (copy)", *(f"× vs {b}" for b in BASELINES.values()), "check"]
    rows, notes = [], []
    for (op, label), shape in shapes.items():
        ok = {b: t for (o, s, b), t in timings.items() if (o, s) == (op, label) and t["status"] == "ok"}
        floors = f"{_us(shape['floor_us_device_table']['floor'])} / {_us(shape['floor_us_measured_copy']['floor'])}"
        for backend in BACKEND_ORDER:
            t = timings.get((op, label, backend))
            owner = _owner(record, mode, op, backend)
            blank = [""] * (len(headers) - 8)
            if t is None:
                if owner is not None:
                    rows.append([op, label, backend, "absent", "", "", floors, *blank, _why(owner)])
                continue
            if t["status"] != "ok":  # "skipped" (no such composition of the op) or "error"
                rows.append([op, label, backend, t["status"], "", "", floors, *blank, t.get("error", "")])
                continue
            speed = [
                _num(ok[base]["median_us"] / t["median_us"], ".2f") if base in ok and base != backend else "-"
                for base in BASELINES
            ]
            launch = t["launch"] + ("*" if t.get("note") else "")
            if t.get("note"):
                notes.append(f"{op} {label} {backend}: {t['note']}")
            rows.append([
                op, label, backend, launch, _us(t["median_us"]), f"{_us(t['p10_us'])}–{_us(t['p90_us'])}", floors,
                _num(t.get("pct_of_floor_device_table"), ".1f"), _num(t.get("pct_of_floor_measured_copy"), ".1f"),
                *speed, t["check"],
            ])  # fmt: skip
    lines += [""] + _md_table(headers, rows, right=set(range(4, len(headers) - 1)))
    lines += [f"\n\\* {n}" for n in notes]
    zero = next((b.get("zero_point") for _, b in runs if b.get("zero_point")), None)
    if zero:
        lines += ["", f"Graph-launch zero point (events around an empty graph's replay): {_us(zero.get('us'))} µs."]
    lines += _kernel_split(timings)
    settings = first["settings"]
    lines += [
        "",
        f"<sub>{first['meta']['device']} · preset `{settings['preset']}` · L2 {settings['l2']} · "
        f"{len(runs)} `dsv4 bench` run(s) in this session; speed-ups compare their medians · "
        + " · ".join(f"`{b['meta']['command']}`" for _, b in runs) + "</sub>",
    ]  # fmt: skip
    if mode == "decode":
        lines += ["", *_targets(timings)]
    return lines


def _kernel_split(timings: dict[tuple[str, str, str], dict[str, Any]]) -> list[str]:
    """The Triton rows' time per kernel inside the timed call (profiler), when the bench took it."""
    rows = []
    for (op, label, backend), t in timings.items():
        if backend != "triton" or t.get("status") != "ok":
            continue
        for k in t.get("kernels") or []:
            after = k.get("us_after_previous_per_call")
            share = 100.0 * after / t["median_us"] if t.get("median_us") and after is not None else None
            rows.append([op, label, f"`{k['kernel'][:60]}`", _us(k["us_per_call"]), _num(after, ".3g"),
                         f"{k['launches_per_call']:g}", _num(share, ".0f")])  # fmt: skip
    if not rows:
        return []
    head = ["op", "shape", "kernel", "µs from its start", "µs after the previous", "launches", "% of median"]
    note = (
        "Triton kernels inside the timed call (torch.profiler, L2 flushed as timed; under PDL a kernel starts "
        "early and waits, so its share is the time it ended after the kernels before it):"
    )
    return ["", note, ""] + _md_table(head, rows, right={3, 4, 5, 6})


def _mib(nbytes: float | None) -> float | None:
    return None if nbytes is None else nbytes / 2**20


def _probe_section(record: dict[str, Any]) -> list[str]:
    entry = _step(record, "probe")
    result = ((entry or {}).get("result") or {}).get("probe")
    if not result:
        return [f"No probe figures: {_why(entry)}."]
    rows = result["rows"]
    if result.get("dry_run"):
        checks = ", ".join(f"{r['name']}: {r['check']}" for r in rows)
        return [f"Dry run: the probe's kernels under the interpreter ({checks})."]
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["name"], []).append(r)
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"- `{r['name']}` failed: {r['error']}")
    z = (by.get("zero_point") or [{}])[0]
    c = (by.get("copy") or [{}])[0]
    st = (by.get("stream_summary") or [{}])[0]
    l2 = (by.get("l2_summary") or [{}])[0]
    pf = (by.get("l2_prefetch") or [{}])[0]
    fl = (by.get("flush_method") or [{}])[0]
    table = [
        ["graph-launch zero point (empty graph)", f"{_us(z.get('empty_graph_us'))} µs"],
        ["one-kernel graph / one plain launch",
         f"{_us(z.get('one_kernel_graph_us'))} / {_us(z.get('plain_launch_us'))} µs"],
        ["copy bandwidth (read + write)", f"{_num(c.get('gb_per_s'), '.0f')} GB/s"],
        ["read stream, best", f"{_num(st.get('best_gb_per_s'), '.0f')} GB/s at "
         f"{_num(st.get('best_programs_per_sm'), 'd')} programs/SM, "
         f"{_num(st.get('best_bytes_in_flight_per_program'), 'd')} B in flight each"],
        ["bytes in flight per SM for 90% of it", f"{_num(st.get('bytes_in_flight_per_sm_for_90pct'), 'd')} B"],
        ["L2 reported / read from L2 up to", f"{_num(_mib(l2.get('l2_bytes_reported')), '.0f')} MiB / "
         f"{_num(l2.get('largest_mib_read_from_l2'), 'd')} MiB"],
        ["L2 / DRAM read bandwidth",
         f"{_num(l2.get('l2_gb_per_s'), '.0f')} / {_num(l2.get('dram_gb_per_s'), '.0f')} GB/s"],
        ["a read after the previous kernel read it (prefetch)", f"{_us(pf.get('after_prefetch_us'))} µs vs "
         f"{_us(pf.get('cold_us'))} µs flushed ({_num(pf.get('speedup'), '.2f')}x)"],
        ["read after a zero_() flush / a read flush / warm", f"{_us(fl.get('after_zero_flush_us'))} / "
         f"{_us(fl.get('after_read_flush_us'))} / {_us(fl.get('warm_us'))} µs"],
    ]  # fmt: skip
    for g in by.get("launch_gap", []):
        table.append([f"launch gap, {g.get('mode')}", f"{_us(g.get('us_per_launch'))} µs per dependent launch"])
    lines += _md_table(["what", "measured"], table)
    grid = [r for r in by.get("stream", []) if "gb_per_s" in r]
    if grid:
        per_sm = sorted({r["programs_per_sm"] for r in grid})
        flight = sorted({r["bytes_in_flight_per_program"] for r in grid})
        cell = {(r["bytes_in_flight_per_program"], r["programs_per_sm"]): r["gb_per_s"] for r in grid}
        curve = [[f"{b // 1024} KiB"] + [_num(cell.get((b, p)), ".0f") for p in per_sm] for b in flight]
        lines += ["", "Read stream GB/s by bytes in flight per program (rows) and programs per SM (columns):", ""]
        lines += _md_table(["in flight"] + [f"{p}/SM" for p in per_sm], curve, right=set(range(1, len(per_sm) + 1)))
    return lines


def _tune_section(record: dict[str, Any], name: str = "tune") -> list[str]:
    entry = _step(record, name)
    result = (entry or {}).get("result") or {}
    tune = result.get("tune")
    if not tune:
        return [f"No tuning figures: {_why(entry)}."]
    rows = []
    for b in tune["buckets"]:
        timed = [v for v in b["variants"] if "median_us" in v]
        base = next((v for v in timed if not v["changed"]), None)
        best = min(timed, key=lambda v: v["median_us"], default=None)
        failed = [v for v in b["variants"] if v.get("check") not in ("bit-identical", "within tolerance")]
        rows.append([
            f"`{b['kernel']}`", b["bucket"], b["workload"], str(len(b["variants"])), str(len(failed)),
            _us(base["median_us"]) if base else "-", _us(best["median_us"]) if best else "-",
            _num(b.get("gain_pct"), ".1f"),
            f"`{json.dumps(best['changed'])}`" if best and best["changed"] else "default",
            "written" if b.get("winner") else "-",
        ])  # fmt: skip
    head = ["kernel", "bucket", "shape", "variants", "failed", "default µs", "best µs", "gain %", "best", "config"]
    lines = _md_table(head, rows, right={3, 4, 5, 6, 7}) if rows else ["No bucket was tuned."]
    config = result.get("config")
    if config:
        lines += ["", f"Config file: `{config['file']}` for device `{config['device']}`, {config['entries']} tuned "
                  f"bucket(s) after this step: commit it as "
                  f"`src/dsv4/kernels/configs/{config['device']}.json`."]  # fmt: skip
    if tune.get("stopped"):
        lines += ["", f"The tune stopped: {tune['stopped']}; shapes left: "
                  + ", ".join(w["label"] for w in tune["workloads"] if w["status"].startswith("not run"))]  # fmt: skip
    for b in tune["buckets"]:
        for v in b["variants"]:
            if v.get("check") not in ("bit-identical", "within tolerance"):
                lines.append(f"- `{b['kernel']}` [{b['bucket']}] `{json.dumps(v['changed'])}`: {v.get('check')}")
    return lines


def _bandwidth_line(runs: list[tuple[dict[str, Any], dict[str, Any]]]) -> str:
    parts = []
    for _, bench in runs:
        table, copy = bench["bandwidth"]["device_table"], bench["bandwidth"]["measured_copy_bytes_per_s"]
        table_text = f"{table['name']} {table['bytes_per_s'] / 1e12:.2f} TB/s" if table else "n/a"
        copy_text = f"{copy / 1e12:.2f} TB/s" if copy else "n/a"
        parts.append(f"device table {table_text}, measured copy {copy_text}")
    unique = list(dict.fromkeys(parts))
    return "Bandwidth: " + "; ".join(unique) + ("" if len(unique) == 1 else " (per run)")


def _targets(timings: dict[tuple[str, str, str], dict[str, Any]]) -> list[str]:
    lines = ["Targets (Triton, % of the floor; 100% = at the floor; beside each, how many times faster than the "
             "baselines measured):", ""]  # fmt: skip
    for op, text, ratio, basis in TARGETS:
        need = 100.0 / ratio
        found = [t for (o, s, b), t in timings.items() if o == op and text in s and b == "triton"]
        key, floor = _BASIS[basis]
        what = f"`{op}` {text}: target within {ratio}x of {floor} (>= {need:.1f}%)"
        if not found or found[0]["status"] != "ok":
            lines.append(f"- {what}: not measured in this run")
            continue
        pct, of = _floor_pct(found[0]) if basis == "table" else (found[0].get(key), "")
        if pct is None:
            lines.append(f"- {what}: no floor on this device ({found[0]['shape']})")
            continue
        verdict = "met" if pct >= need else "missed"
        if found[0]["check"] != "ok":  # fast but wrong counts for nothing
            verdict += f", but the check says {found[0]['check']}"
        faster = ""  # against the baselines of the same shape, whichever bench step timed them
        for name in ("compile", "library"):
            base = timings.get((op, found[0]["shape"], name))
            if base and base.get("status") == "ok" and base.get("median_us"):
                faster += f"; {base['median_us'] / found[0]['median_us']:.2f}x faster than {name}"
        lines.append(f"- {what}: **{pct:.1f}%**{of} ({_us(found[0]['median_us'])} µs{faster}) — {verdict}")
    return lines


def _decode_graph_section(record: dict[str, Any], name: str = "decode_graph") -> list[str]:
    entry = _step(record, name)
    if entry is None or not entry.get("result"):
        return [f"No decode-loop figures: {_why(entry)}."]
    result = entry["result"]
    medians, back = result["median_ms"], result.get("back_to_back_ms") or {}
    header, rows = ["launch", "median ms per step"], [[m, f"{v:.3f}"] for m, v in medians.items()]
    # a step synchronized on its own holds the host's bookkeeping; back to back, the host runs ahead, and
    # a call's host time says whether the host or the device sets the pace
    for label, figures in (("ms per step, back to back", back), ("host ms per call", result.get("host_ms") or {})):
        if figures:
            header.append(label)
            rows = [[*row, f"{figures[row[0]]:.3f}" if row[0] in figures else "-"] for row in rows]
    lines = _md_table(header, rows, right=set(range(1, len(header))))
    if "eager" in medians and "graph" in medians:
        lines += ["", f"One CUDA graph per step is {medians['eager'] / medians['graph']:.2f}x the eager launches."]
    elif "graph" not in medians:
        lines += ["", "No graph replay in this run (`--capture` needs CUDA)."]
    if result.get("floor_ms"):
        lines += ["", f"Memory floor {result['floor_ms']:.4f} ms: " + ", ".join(
            f"{m} {v / result['floor_ms']:.1f}x" for m, v in medians.items())]  # fmt: skip
        if back:
            lines[-1] += "; back to back: " + ", ".join(f"{m} {v / result['floor_ms']:.1f}x" for m, v in back.items())
    return lines + ["", f"<sub>`{entry['commands'][0]}`</sub>"]


def _profile_section(record: dict[str, Any]) -> list[str]:
    trace = _step(record, "trace")
    t = (trace or {}).get("result")
    if t:
        lines = [f"Trace: `{t['file']}`, one decode step on backend `{t['backend']}` (open in ui.perfetto.dev)."]
    else:
        lines = [f"No trace: {_why(trace)}."]
    ncu = _step(record, "ncu")
    n = (ncu or {}).get("result")
    if not n:
        return lines + ["", f"No ncu figures: {_why(ncu)}."]
    units = n.get("units") or {}
    rows = []
    for k in n["kernels"]:
        row = [f"`{k['kernel']}`", k["grid"], k["block"], str(k["launches"])]
        for metric, _, scale, digits in NCU_COLUMNS:
            value = k.get(metric)
            unit_scale = _UNIT_SCALE.get((units.get(metric) or "").strip().lower(), 1)
            row.append("-" if value is None else f"{value * unit_scale / scale:.{digits}f}")
        rows.append(row)
    headers = ["kernel", "grid", "block", "launches"] + [label for _, label, _, _ in NCU_COLUMNS]
    lines += ["", f"ncu: {n['profiled_launches']} launches profiled (`{n['file']}`); medians per kernel and grid:", ""]
    printed = ", ".join(f"{m}: {units.get(m) or '?'}" for m, _, _, _ in NCU_COLUMNS)
    lines += _md_table(headers, rows, right=set(range(3, len(headers))))
    return lines + ["", f"<sub>units as ncu printed them: {printed}</sub>"]


def _checkpoint_section(record: dict[str, Any]) -> list[str]:
    entry = _step(record, "checkpoint")
    if entry is None or not entry.get("result"):
        return [f"No checkpoint figures: {_why(entry)}."]
    r = entry["result"]
    lines = []
    if "load_s" in r:
        lines.append(
            f"- `load_layer`: {r['load_s']:.2f} s, {r['loaded_mib']:.1f} MiB loaded, peak RSS {r['peak_rss_mib']} MiB "
            f"(+{r['rss_growth_mib']} MiB)"
        )
    if "run_result" in r:
        lines.append(
            f"- `dsv4 run --checkpoint`: {r['run_op_calls']} op calls in {r['run_s']:.1f} s, {r['run_result']}"
        )
    if entry["status"] != "ok":
        lines.append(f"- {_why(entry)}")
    return lines


def _fuzz_section(record: dict[str, Any]) -> list[str]:
    entry = _step(record, "fuzz")
    r = (entry or {}).get("result")
    if not r:
        return [f"No random cases: {_why(entry)}."]
    line = (
        f"**{r['cases']} cases, {r['failed']} failed, {r['findings']} raised or failed at candidates alone** "
        f"(preset `{r['preset']}`, seed {r['seed']})"
    )
    if r["interrupted"]:
        line += "; stopped at its time limit, so these are the cases judged"
    lines = [line]
    if r["failures"]:
        why = (
            "A failure the defaults pass is the candidates' own (their draws are in `log.txt`), to trace before a "
            "tuned file holds them: a bug, or a rounding of the kinds `docs/TESTING.md` lists where a candidate "
            "sums in another order (a K split); one the defaults share is such a rounding, or a finding:"
        )
        lines += ["", why, ""]
        for f in r["failures"]:
            defaults = f" · at the defaults: {f['defaults']}" if f["defaults"] else ""
            lines.append(f"- {f['verdict'][:160]} · `{f['case']}`{defaults}")
    if r["kernels"]:
        rows = [
            [f"`{k['kernel']}`", str(k["lookups"]), str(k["other"]), str(k["other"] - k["interpreter"])]
            for k in r["kernels"]
        ]
        head = ["kernel", "buckets looked up", "at another candidate", "of them warps, stages or PDL alone"]
        lines += ["", *_md_table(head, rows, right={1, 2, 3})]
    return lines


def _sanitizer_section(record: dict[str, Any]) -> list[str]:
    lines = []
    for name in ("sanitize", "initcheck"):
        entry = _step(record, name)
        result = (entry or {}).get("result")
        if not result:
            lines.append(f"- `{name}`: no figures: {_why(entry)}.")
            continue
        calls = (
            f"; `dsv4 run` under it: {result['op_calls']} op calls, {result['mismatches']} mismatch(es)"
            if result.get("op_calls") is not None
            else "; `dsv4 run` did not finish"
        )
        lines.append(f"- `{name}`: **{result['errors']} error(s)**{calls}")
        lines += [f"  - `{e}`" for e in result["first_errors"]]
    return lines


def render(record: dict[str, Any]) -> str:
    """The whole ``summary.md``."""
    env = record.get("environment") or {}
    device = (env.get("gpu") or {}).get("name") or ("CPU" if env else "unknown device")
    lines = [f"# dsv4 acceptance run — {device} — {record['started'][:10]}", ""]
    if record.get("dry_run"):
        lines += [
            "> **Dry run** on the CPU (`tiny` preset, a few repetitions, some steps reduced): it checks the",
            "> acceptance run itself. No figure here is a GPU figure.",
            "",
        ]
    commit = f"commit `{record.get('commit') or 'unknown'}`" + (" (dirty)" if record.get("commit_dirty") else "")
    digest = f" · source sha256 `{record['source_sha256'][:16]}`" if record.get("source_sha256") else ""
    lines.append(
        f"{commit}{digest} · started {record['started']} · {record['elapsed_s']:.0f} s of a "
        f"{record['budget_s']:g} s budget" + ("" if record.get("finished") else " · **still running or cut off**")
    )
    lines += ["", f"`{record.get('command', '')}`", ""]
    lines += (
        [f"- {line}" for line in describe(env)] if env else [f"- machine unknown: {_why(_step(record, 'environment'))}"]
    )
    sections = [
        ("Steps", _steps_table(record)),
        ("Tests compiled on the device", _tests_section(record)),
        ("Decode: time against the floor", bench_section(record, "decode")),
        ("Machine limits (dsv4 tune --probe)", _probe_section(record)),
        ("Tuning: each kernel's candidates against its default (dsv4 tune)", _tune_section(record)),
        ("One tensor-parallel rank: decode time against the floor", bench_section(record, "rank")),
        ("Tuning one tensor-parallel rank's buckets", _tune_section(record, "tune_rank")),
        ("Decode step: one CUDA graph against eager launches", _decode_graph_section(record)),
        (
            "A CSA layer's whole attention step: one CUDA graph against eager",
            _decode_graph_section(record, "attention_graph"),
        ),
        ("Profile of one decode step", _profile_section(record)),
        ("Prefill: time against the floor", bench_section(record, "prefill")),
        ("Checkpoint loading", _checkpoint_section(record)),
        ("Random cases at tuning candidates, compiled (benchmarks/fuzz_ops.py --candidates)", _fuzz_section(record)),
        ("The device's memory checks (compute-sanitizer)", _sanitizer_section(record)),
    ]
    for title, body in sections:
        lines += ["", f"## {title}", "", *body]
    return "\n".join(lines) + "\n"

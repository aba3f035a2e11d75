"""``summary.md``: the acceptance record as ready-to-paste Markdown tables.

Per op and shape: time (median, p10-p90), the floor and % of it for the device table's and the
measured copy bandwidth, speed-up over the eager reference and over ``torch.compile``, how it was
launched, and the check against the reference; the test counts; the decode step as a CUDA graph;
the per-kernel ncu bytes; checkpoint loading. A figure that a failed or skipped step did not
produce is written as absent, with the step and why.
"""

from __future__ import annotations

from typing import Any

from .environment import describe

BACKEND_ORDER = ("triton", "reference", "compile")
BASELINES = {"reference": "eager", "compile": "compile"}
# (op, text in the shape label, allowed ratio to the floor): the issues' decode targets
TARGETS = (
    ("qkv_proj_rope", "decode B=64 S=2", 1.25),
    ("indexer", "cache=2048", 1.4),
    ("indexer", "cache=262144", 1.4),
)
NCU_COLUMNS = (
    ("dram__bytes_read.sum", "DRAM read MB", 1e6),
    ("dram__bytes_write.sum", "DRAM write MB", 1e6),
    ("lts__t_bytes.sum", "L2 MB", 1e6),
    ("gpu__time_duration.sum", "time µs", 1e3),
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
    result = (entry or {}).get("result")
    if not result:
        return [f"No test counts: {_why(entry)}."]
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


def _floor_pct(row: dict[str, Any]) -> float | None:
    """% of the floor for the targets: the device table's bandwidth, else the measured copy's."""
    table = row.get("pct_of_floor_device_table")
    return table if table is not None else row.get("pct_of_floor_measured_copy")


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
    headers += ["% floor (table)", "% floor (copy)", "× vs eager", "× vs compile", "check"]
    rows, notes = [], []
    for (op, label), shape in shapes.items():
        ok = {b: t for (o, s, b), t in timings.items() if (o, s) == (op, label) and t["status"] == "ok"}
        floors = f"{_us(shape['floor_us_device_table']['floor'])} / {_us(shape['floor_us_measured_copy']['floor'])}"
        for backend in BACKEND_ORDER:
            t = timings.get((op, label, backend))
            owner = _owner(record, mode, op, backend)
            if t is None:
                if owner is not None:
                    rows.append([op, label, backend, "absent", "", "", floors, "", "", "", "", _why(owner)])
                continue
            if t["status"] != "ok":
                rows.append([op, label, backend, "error", "", "", floors, "", "", "", "", t.get("error", "")])
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
    lines += [""] + _md_table(headers, rows, right={4, 5, 6, 7, 8, 9, 10})
    lines += [f"\n\\* {n}" for n in notes]
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
    lines = ["Targets (Triton, % of the device-table floor; 100% = at the floor):", ""]
    for op, text, ratio in TARGETS:
        need = 100.0 / ratio
        found = [t for (o, s, b), t in timings.items() if o == op and text in s and b == "triton"]
        what = f"`{op}` {text}: target within {ratio}x of the floor (>= {need:.1f}%)"
        if not found or found[0]["status"] != "ok":
            lines.append(f"- {what}: not measured in this run")
            continue
        pct = _floor_pct(found[0])
        if pct is None:
            lines.append(f"- {what}: no floor on this device ({found[0]['shape']})")
            continue
        verdict = "met" if pct >= need else "missed"
        if found[0]["check"] != "ok":  # fast but wrong counts for nothing
            verdict += f", but the check says {found[0]['check']}"
        lines.append(f"- {what}: **{pct:.1f}%** ({_us(found[0]['median_us'])} µs) — {verdict}")
    return lines


def _decode_graph_section(record: dict[str, Any]) -> list[str]:
    entry = _step(record, "decode_graph")
    result = (entry or {}).get("result")
    if not result:
        return [f"No decode-loop figures: {_why(entry)}."]
    medians = result["median_ms"]
    lines = _md_table(["launch", "median ms per step"], [[m, f"{v:.3f}"] for m, v in medians.items()], right={1})
    if "eager" in medians and "graph" in medians:
        lines += ["", f"One CUDA graph per step is {medians['eager'] / medians['graph']:.2f}x the eager launches."]
    elif "graph" not in medians:
        lines += ["", "No graph replay in this run (`--capture` needs CUDA)."]
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
        for metric, _, scale in NCU_COLUMNS:
            value = k.get(metric)
            unit_scale = _UNIT_SCALE.get((units.get(metric) or "").strip().lower(), 1)
            row.append("-" if value is None else f"{value * unit_scale / scale:.3f}")
        rows.append(row)
    headers = ["kernel", "grid", "block", "launches"] + [label for _, label, _ in NCU_COLUMNS]
    lines += ["", f"ncu: {n['profiled_launches']} launches profiled (`{n['file']}`); medians per kernel and grid:", ""]
    printed = ", ".join(f"{m}: {units.get(m) or '?'}" for m, _, _ in NCU_COLUMNS)
    lines += _md_table(headers, rows, right={3, 4, 5, 6, 7})
    return lines + ["", f"<sub>units as ncu printed them: {printed}</sub>"]


def _checkpoint_section(record: dict[str, Any]) -> list[str]:
    entry = _step(record, "checkpoint")
    r = (entry or {}).get("result")
    if not r:
        return [f"No checkpoint figures: {_why(entry)}."]
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
        ("Decode step: one CUDA graph against eager launches", _decode_graph_section(record)),
        ("Profile of one decode step", _profile_section(record)),
        ("Prefill: time against the floor", bench_section(record, "prefill")),
        ("Checkpoint loading", _checkpoint_section(record)),
    ]
    for title, body in sections:
        lines += ["", f"## {title}", "", *body]
    return "\n".join(lines) + "\n"

"""Reading each step's figures back: from the files it wrote (junit XML, bench JSON, the trace) or
from the lines it printed (decode loop medians, ncu CSV, checkpoint load times, compute-sanitizer's
ERROR SUMMARY).

Each parser takes the step's ``files`` and its output and returns a JSON-able dict; a parser that
finds nothing raises, and the runner records why.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import shutil
import statistics
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .out_dir import open_nofollow

# pytest -v lines, without and with xdist: "tests/a.py::t PASSED [ 5%]", "[gw0] [ 5%] PASSED tests/a.py::t";
# a test id's parameters may hold spaces and brackets ("t[x y]", "t[[0, 1]]"): the shortest bracket part
# followed by the outcome, or by the end of the line or a summary's " - reason"
_OUTCOMES = "PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS"
_TEST_ID = r"[^\s:]+(?:::[^\s\[:]+)+(?:\[.*?\])?"
_PYTEST_LINE = re.compile(
    rf"^(?:(?P<id1>{_TEST_ID}) (?P<o1>{_OUTCOMES})\b"  # without xdist
    rf"|(?:\[gw\d+\] \[\s*\d+%\] )?(?P<o2>{_OUTCOMES}) (?P<id2>{_TEST_ID})(?= - |$))"  # with xdist, the summary
)
_MEDIANS = re.compile(r"^median ms per step: ([^;\n]+)(?:; memory floor ([0-9.]+) ms)?", re.M)
_BACK_TO_BACK = re.compile(r"^back to back, ms per step: ([^;\n]+)", re.M)
_HOST = re.compile(r"^host side of a back-to-back call, median ms: ([^;\n]+)", re.M)
_TRACE = re.compile(r"^wrote .* \(one decode step on backend (\w+)\)$", re.M)
_LOAD = re.compile(r"^load_layer\(.*\): ([\d.]+) s wall; loaded ([\d.]+) MiB; .*peak (\d+) MiB \(\+(-?\d+) MiB\)", re.M)
_RUN = re.compile(r"^(\d+) op calls in ([\d.]+) s; (.+)$", re.M)
_FUZZ = re.compile(
    r"^(\d+) cases, (\d+) failed \(preset (\S+), seed (-?\d+)\); (\d+) raised or failed at candidates alone$", re.M
)
_FUZZ_OP = re.compile(r"^  (\w+)(?: (\w+))?: (\d+) cases, (\d+) failed$", re.M)
_FUZZ_KERNEL = re.compile(
    r"^  (\S+): (\d+) buckets looked up, (\d+) of them at another candidate, (\d+) in parameters the interpreter runs$",
    re.M,
)
_FUZZ_CASE = re.compile(
    r"^((?:MISMATCH|ERROR) .*)\n  (make_case\(.*\))(?:\n  candidates: (.*)\n  at the defaults: (.*))?$", re.M
)
FUZZ_CASES_KEPT = 20  # failing cases read back (the log holds them all)
NCU_COLUMNS = {"Kernel Name": "kernel", "Grid Size": "grid", "Block Size": "block"}


def _junit_counts(path: Path) -> dict[str, Any]:
    root = ET.parse(path).getroot()
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures: list[str] = []
    for case in root.iter("testcase"):
        kinds = {child.tag for child in case}
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        if "error" in kinds:
            counts["errors"] += 1
            failures.append(test_id)
        elif "failure" in kinds:
            counts["failed"] += 1
            failures.append(test_id)
        elif "skipped" in kinds:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {**counts, "total": sum(counts.values()), "failures": failures, "source": path.name}


def _log_counts(log: str) -> dict[str, Any]:
    """Outcomes from pytest's ``-v`` lines: what a run stopped before writing its junit XML still shows."""
    outcome: dict[str, str] = {}
    for line in log.splitlines():
        m = _PYTEST_LINE.match(line.strip())
        if m:
            outcome[m["id1"] or m["id2"]] = m["o1"] or m["o2"]  # a teardown ERROR after PASSED wins
    if not outcome:
        raise ValueError("no junit XML and no pytest result lines in the output")
    # as the junit XML counts them: an expected failure is skipped, an unexpected pass passed (a strict
    # one prints FAILED)
    groups = {
        "passed": ("PASSED", "XPASS"),
        "failed": ("FAILED",),
        "errors": ("ERROR",),
        "skipped": ("SKIPPED", "XFAIL"),
    }
    counts = {k: sum(o in v for o in outcome.values()) for k, v in groups.items()}
    failures = [t for t, o in outcome.items() if o in ("FAILED", "ERROR")]
    return {**counts, "total": len(outcome), "failures": failures, "source": "pytest -v lines (no junit XML)"}


def parse_tests(files: dict[str, str], log: str) -> dict[str, Any]:
    """Pass/fail counts and the failing test ids, from the junit XML or else from the log."""
    junit = Path(files["junit"])
    if junit.is_file() and junit.stat().st_size:
        try:
            return _junit_counts(junit)
        except ET.ParseError:
            pass  # a run killed while writing: fall back to the lines it printed
    return _log_counts(log)


def parse_json(files: dict[str, str], log: str) -> dict[str, Any]:
    """The JSON file the step wrote (``environment``, ``dsv4 bench --json``)."""
    return json.loads(Path(files["json"]).read_text())


def parse_bench(files: dict[str, str], log: str) -> dict[str, Any]:
    return {"bench": parse_json(files, log)}


def _mode_figures(text: str) -> dict[str, float]:
    """``eager 1.234, graph 0.567`` -> ``{"eager": 1.234, "graph": 0.567}``."""
    return {mode: float(value) for mode, value in (part.split() for part in text.split(","))}


def parse_decode_loop(files: dict[str, str], log: str) -> dict[str, Any]:
    """``median ms per step: eager 1.234, graph 0.567[; memory floor 0.047 ms ...]`` and, where the
    loop ran ``--back-to-back``, ``back to back, ms per step: eager 1.1, graph 0.2[; ...]`` and
    ``host side of a back-to-back call, median ms: eager 0.9, graph 0.03`` ->
    ``{"median_ms": {"eager": 1.234, "graph": 0.567}, "back_to_back_ms": {...} or None, "host_ms":
    {...} or None, "floor_ms": 0.047 or None}``."""
    m = _MEDIANS.search(log)
    if not m:
        raise ValueError("decode_loop printed no 'median ms per step' line")
    back, host = _BACK_TO_BACK.search(log), _HOST.search(log)
    return {
        "median_ms": _mode_figures(m[1]),
        "back_to_back_ms": _mode_figures(back[1]) if back else None,
        "host_ms": _mode_figures(host[1]) if host else None,
        "floor_ms": float(m[2]) if m[2] else None,
        "line": m[0],
    }


def parse_trace(files: dict[str, str], log: str) -> dict[str, Any]:
    """Compress the trace into the output folder; the backend it ran on."""
    raw, gz = Path(files["raw"]), Path(files["gz"])
    with raw.open("rb") as src, open_nofollow(gz) as f, gzip.GzipFile(fileobj=f, mode="wb") as dst:
        shutil.copyfileobj(src, dst)
    m = _TRACE.search(log)
    return {"file": gz.name, "backend": m[1] if m else None, "json_bytes": raw.stat().st_size}


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def parse_ncu(files: dict[str, str], log: str) -> dict[str, Any]:
    """ncu's raw-page CSV (the lines of the output that start with a quote) into ``files["csv"]``,
    and per (kernel, grid, block): launches profiled and the median of each metric."""
    lines = [line for line in log.splitlines() if line.startswith('"')]
    if len(lines) < 2:
        raise ValueError("ncu printed no CSV (no kernel matched, or profiling was not permitted: see log.txt)")
    with open_nofollow(Path(files["csv"])) as f:
        f.write(("\n".join(lines) + "\n").encode())
    rows = list(csv.DictReader(io.StringIO("\n".join(lines))))
    units, rows = (rows[0], rows[1:]) if rows and not rows[0].get("ID", "").strip().isdigit() else ({}, rows)
    metrics = [c for c in (rows[0] if rows else {}) if "__" in c]
    groups: dict[tuple[str, ...], list[dict[str, str]]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(c, "") for c in NCU_COLUMNS), []).append(row)
    kernels = []
    for key, members in groups.items():
        entry: dict[str, Any] = dict(zip(NCU_COLUMNS.values(), key, strict=True))
        entry["launches"] = len(members)
        for metric in metrics:
            values = [v for v in (_number(r[metric]) for r in members) if v is not None]
            entry[metric] = statistics.median(values) if values else None
        kernels.append(entry)
    return {"file": Path(files["csv"]).name, "profiled_launches": len(rows), "units": units, "kernels": kernels}


def parse_checkpoint(files: dict[str, str], log: str) -> dict[str, Any]:
    """Load time and memory (``load_checkpoint.py load``) and the checked run (``dsv4 run --checkpoint``)."""
    result: dict[str, Any] = {}
    m = _LOAD.search(log)
    if m:
        result.update(load_s=float(m[1]), loaded_mib=float(m[2]), peak_rss_mib=int(m[3]), rss_growth_mib=int(m[4]))
        result["load_line"] = m[0]
    r = _RUN.search(log)
    if r:
        result.update(run_op_calls=int(r[1]), run_s=float(r[2]), run_result=r[3])
    if not result:
        raise ValueError("neither the load line nor the run line was printed")
    return result


def parse_probe(files: dict[str, str], log: str) -> dict[str, Any]:
    return {"probe": parse_json(files, log)}


def parse_tune(files: dict[str, str], log: str) -> dict[str, Any]:
    """The tune JSON (every variant) and the config file it wrote, if any (its device and entries)."""
    result: dict[str, Any] = {"tune": parse_json(files, log), "config": None}
    config = Path(files["config"])
    if config.is_file():
        data = json.loads(config.read_text())
        entries = sum(len(b) for b in data.get("kernels", {}).values())
        result["config"] = {"file": config.name, "device": data.get("device"), "entries": entries}
    return result


def parse_fuzz(files: dict[str, str], log: str) -> dict[str, Any]:
    """``benchmarks/fuzz_ops.py``'s summary: the cases, per op and kind, per kernel the candidates drawn,
    and the first failing cases with their draws and their verdict at the defaults."""
    m = _FUZZ.search(log)
    if not m:
        raise ValueError("no summary line (N cases, F failed ...) was printed")
    ops = [{"op": o[1], "kind": o[2], "cases": int(o[3]), "failed": int(o[4])} for o in _FUZZ_OP.finditer(log, m.end())]
    kernels = [
        {"kernel": k[1], "lookups": int(k[2]), "other": int(k[3]), "interpreter": int(k[4])}
        for k in _FUZZ_KERNEL.finditer(log, m.end())
    ]
    failures = [
        {"verdict": c[1], "case": c[2], "candidates": c[3], "defaults": c[4]}
        for c in list(_FUZZ_CASE.finditer(log, 0, m.start()))[:FUZZ_CASES_KEPT]
    ]
    return {
        "cases": int(m[1]), "failed": int(m[2]), "preset": m[3], "seed": int(m[4]), "findings": int(m[5]),
        "interrupted": "interrupted: the case in progress is left out" in log, "ops": ops, "kernels": kernels,
        "failures": failures,
    }  # fmt: skip


_SANITIZER_SUMMARY = re.compile(r"^=+ ERROR SUMMARY: (\d+) errors?", re.M)
_SANITIZER_ERROR = re.compile(r"^=+ ((?:Invalid|Uninitialized|Program hit|Race|Leaked) .*)$", re.M)
_RUN_CALLS = re.compile(r"^(\d+) op calls in [\d.]+ s; (all checks passed|(\d+) MISMATCH)", re.M)
SANITIZER_ERRORS_KEPT = 10


def parse_sanitize(files: dict[str, str], log: str) -> dict[str, Any]:
    """compute-sanitizer's error count and its first errors, and ``dsv4 run``'s own verdict under it
    (a failed check is not a sanitizer finding)."""
    m = _SANITIZER_SUMMARY.search(log)
    if not m:
        raise ValueError("no ERROR SUMMARY line: the sanitizer did not finish")
    run = _RUN_CALLS.search(log)
    return {
        "errors": int(m[1]),
        "first_errors": [e[1] for e in _SANITIZER_ERROR.finditer(log)][:SANITIZER_ERRORS_KEPT],
        "op_calls": int(run[1]) if run else None,
        "mismatches": (int(run[3]) if run[3] else 0) if run else None,
    }


PARSERS: dict[str, Callable[[dict[str, str], str], dict[str, Any]]] = {
    "environment": parse_json,
    "tests": parse_tests,
    "bench": parse_bench,
    "decode_loop": parse_decode_loop,
    "trace": parse_trace,
    "ncu": parse_ncu,
    "checkpoint": parse_checkpoint,
    "probe": parse_probe,
    "tune": parse_tune,
    "fuzz": parse_fuzz,
    "sanitize": parse_sanitize,
}

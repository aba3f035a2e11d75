"""How ``dsv4 bench`` results are shown: terminal tables, a JSON record with its provenance, a plot."""

from __future__ import annotations

import datetime
import json
import platform
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from .. import checkout
from ..io.atomic_write import write_atomic

MB = 1e6


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def provenance(command: str, device: torch.device | str) -> dict[str, Any]:
    """Device, versions, commit, date and ``command`` (the ``dsv4`` arguments that reproduce the run).
    The commit (and whether the tree differs from it) is None unless ``dsv4`` runs from a git checkout
    of this project (``dsv4.checkout``): an installed package is named by its version."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.processor() or platform.machine()})"
    commit, dirty = checkout.commit()
    import dsv4

    return {
        "device": name,
        "device_type": device.type,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit,
        "commit_dirty": dirty,
        "command": f"dsv4 {command}",
        "versions": {
            "dsv4": dsv4.__version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": _version("triton"),
            "cuda": torch.version.cuda,
        },
    }


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _num(value: float | None, fmt: str = ".1f") -> str:
    return "-" if value is None else format(value, fmt)


def _us(value: float) -> str:
    return format(value, ".1f" if value < 1000 else ".0f")


def model_table(result: dict[str, Any]) -> str:
    """Minimal bytes, FLOPs and floors per (op, shape)."""
    refs = list(result["shapes"][0]["floor_us_reference_devices"]) if result["shapes"] else []
    headers = ["op", "shape", "minimal MB", "read MB", "write MB", "GFLOP"] + [f"floor µs {n}" for n in refs]
    headers += [f"bound ({refs[0]})"] if refs else []
    if result["bandwidth"]["device_table"] or result["bandwidth"]["measured_copy_bytes_per_s"]:
        headers += ["floor µs (table)", "floor µs (copy)"]
    rows = []
    for s in result["shapes"]:
        m = s["model"]
        row = [s["op"], s["shape"], f"{m['bytes'] / MB:.2f}", f"{m['read_bytes'] / MB:.2f}"]
        row += [f"{m['write_bytes'] / MB:.2f}", f"{sum(m['flops'].values()) / 1e9:.2f}"]
        floors = s["floor_us_reference_devices"]
        row += [_num(floors[n]["floor"]) for n in refs]
        row += ["memory" if floors[refs[0]]["memory"] >= floors[refs[0]]["compute"] else "compute"] if refs else []
        if len(headers) > len(row):
            row += [_num(s["floor_us_device_table"]["floor"]), _num(s["floor_us_measured_copy"]["floor"])]
        rows.append(row)
    return _table(headers, rows)


def timing_table(result: dict[str, Any]) -> str:
    """Time, bandwidth, % of floor and speedups per (op, shape, backend)."""
    headers = ["op", "shape", "backend", "launch", "median µs", "p10-p90 µs", "zero µs", "GB/s", "% floor table"]
    headers += ["% floor copy", "x vs reference", "x vs compile", "x vs library", "check"]
    rows = []
    for t in result["timings"]:
        if t["status"] != "ok":
            rows.append([t["op"], t["shape"], t["backend"], t["status"], *[""] * (len(headers) - 5), t["error"]])
            continue
        speed = t.get("speedup_vs", {})
        rows.append([
            t["op"], t["shape"], t["backend"], t["launch"], _us(t["median_us"]),
            f"{_us(t['p10_us'])}-{_us(t['p90_us'])}", _num(t.get("zero_point_us"), ".2f"), f"{t['gb_per_s']:.3g}",
            _num(t["pct_of_floor_device_table"]), _num(t["pct_of_floor_measured_copy"]),
            *(_num(speed.get(b), ".2f") for b in ("reference", "compile", "library")), t["check"],
        ])  # fmt: skip
    return _table(headers, rows)


def kernel_table(result: dict[str, Any]) -> str:
    """Each kernel's own time inside the timed call (profiler), per (op, shape, backend)."""
    rows = []
    for t in result["timings"]:
        for k in t.get("kernels") or []:
            name = k["kernel"] if len(k["kernel"]) <= 60 else k["kernel"][:57] + "..."
            after = k.get("us_after_previous_per_call")
            share = 100.0 * after / t["median_us"] if t.get("median_us") and after is not None else None
            rows.append([
                t["op"], t["shape"], t["backend"], name, _us(k["us_per_call"]), _num(after, ".3g"),
                f"{k['launches_per_call']:g}", _num(share),
            ])  # fmt: skip
    headers = ["op", "shape", "backend", "kernel", "µs from its start", "µs after the previous", "launches"]
    return _table([*headers, "% of median"], rows)


def traffic_table(result: dict[str, Any]) -> str:
    """Bytes the Triton kernels request against the minimal bytes, per (op, shape)."""
    headers = ["op", "shape", "launches", "requested MB", "minimal MB", "requested/min", "sector/min", "unique/min"]
    headers += ["torch ops", "check"]
    rows = []
    for t in result["traffic"]:
        if t["status"] != "ok":
            rows.append([t["op"], t["shape"], "-", "", f"{t['minimal_bytes'] / MB:.3f}", "", "", "", "", t["error"]])
            continue
        rows.append([
            t["op"], t["shape"], str(t["launches"]), f"{t['requested_bytes'] / MB:.3f}",
            f"{t['minimal_bytes'] / MB:.3f}", f"{t['requested_over_minimal']:.2f}", f"{t['sector_over_minimal']:.2f}",
            f"{t['unique_over_minimal']:.2f}", str(sum(t["torch_ops"].values())), t["check"],
        ])  # fmt: skip
    return _table(headers, rows)


def render(result: dict[str, Any]) -> str:
    """Everything for the terminal."""
    meta, bw, st = result["meta"], result["bandwidth"], result["settings"]
    lines = [
        f"dsv4 bench: preset={st['preset']} modes={','.join(st['modes'])} device={meta['device']} "
        f"commit={(meta['commit'] or 'unknown')[:12]}{' (dirty)' if meta['commit_dirty'] else ''}",
    ]
    if bw["device_table"] or bw["measured_copy_bytes_per_s"]:
        table = bw["device_table"]
        lines.append(
            f"bandwidth: device table {table['name'] + ' ' + _num(table['bytes_per_s'] / 1e12, '.2f') + ' TB/s' if table else 'n/a'}; "  # noqa: E501
            f"measured copy {_num((bw['measured_copy_bytes_per_s'] or 0) / 1e12, '.2f')} TB/s"
        )
    for b, reason in st["skipped_backends"].items():
        lines.append(f"backend {b} skipped: {reason}")
    lines += ["", "Minimal bytes and FLOPs (bytes model; floors = max(bytes / bandwidth, FLOPs / peak))"]
    lines.append(model_table(result))
    if result["timings"]:
        where = (
            f"GPU, CUDA events, L2 {st['l2']}"
            if meta["device_type"] == "cuda"
            else "CPU host clock — CPU figures, not GPU timings"
        )
        lines += ["", f"Timings ({where}; median over reps)", timing_table(result)]
        lines += [f"  {t['op']} {t['shape']} {t['backend']}: {t['note']}" for t in result["timings"] if t.get("note")]
        zero = result.get("zero_point")
        if zero:
            lines.append(
                f"  zero µs: the graph-launch zero point, events around an empty graph's replay "
                f"({_num(zero.get('empty_graph_us'), '.2f')} µs; one 1-element kernel: "
                f"{_num(zero.get('one_kernel_graph_us'), '.2f')} µs)"
            )
        if any(t.get("kernels") for t in result["timings"]):
            lines += ["", "Kernels inside the timed call (torch.profiler, L2 flushed as timed)", kernel_table(result)]
    if result["traffic"]:
        lines += ["", "Traffic of the Triton kernels under the CPU interpreter (ratios to the minimal bytes)"]
        lines.append(traffic_table(result))
    elif st["traffic_skipped"] and st["traffic_skipped"] != "not requested":
        lines += ["", f"traffic not counted: {st['traffic_skipped']}"]
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: str | Path) -> None:
    """Write ``result`` to ``path`` whole or not at all (a run stopped mid-write leaves the last file)."""
    write_atomic(path, json.dumps(result, indent=1, sort_keys=False) + "\n")


def plot(result: dict[str, Any], path: str | Path) -> None:
    """A bar chart: % of floor per (op, shape) and backend from timings on a GPU; otherwise the
    traffic ratios of the Triton kernels (requested, sector and unique bytes over minimal bytes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gpu = result["meta"]["device_type"] == "cuda"
    groups: dict[str, dict[str, float]] = {}
    if gpu:
        title, ylabel = "% of the roofline floor (measured copy bandwidth)", "% of floor"
        for t in result["timings"]:
            value = t.get("pct_of_floor_measured_copy") or t.get("pct_of_floor_device_table")
            if t["status"] == "ok" and value is not None:
                groups.setdefault(f"{t['op']}\n{t['shape']}", {})[t["backend"]] = value
    else:
        title, ylabel = "Triton kernel traffic over minimal bytes (CPU interpreter)", "bytes / minimal bytes"
        for t in result["traffic"]:
            if t["status"] == "ok":
                groups[f"{t['op']}\n{t['shape']}"] = {
                    k: t[f"{k}_over_minimal"] for k in ("requested", "sector", "unique")
                }
    series = sorted({s for g in groups.values() for s in g})
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups) + 2), 4.5))
    width = 0.8 / max(1, len(series))
    for i, name in enumerate(series):
        xs = [j + i * width for j in range(len(groups))]
        ax.bar(xs, [g.get(name, 0.0) for g in groups.values()], width, label=name)
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(groups))], list(groups), fontsize=7)
    ax.axhline(100.0 if gpu else 1.0, color="gray", linewidth=0.8, linestyle="--")
    if not groups:
        ax.text(0.5, 0.5, "no figures (no backend produced any)", ha="center", va="center", transform=ax.transAxes)
    meta = result["meta"]
    ax.set_title(f"{title}\n{meta['device']} · {result['settings']['preset']} · {(meta['commit'] or '')[:12]}")
    ax.set_ylabel(ylabel)
    if series:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

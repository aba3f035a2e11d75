"""Golden cases on disk: ``save`` writes a case's inputs and reference outputs (safetensors) with a
JSON manifest; ``check`` replays every case of a folder on a backend and compares (spec §6).

Anyone can check their own kernel against our golden: load a case with ``load``, run it, and
``golden.compare`` the outputs with ``expected``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..harness.cases import Case, run_case
from ..harness.golden import Report, compare
from ..model.fields import build, leaves
from ..ops.registry import get_op
from ..version import __version__


def case_name(case: Case) -> str:
    m = case.meta
    return f"{case.op}-{m['preset']}-{m['mode']}-seed{m['seed']}"


def save(case: Case, outputs: dict[str, torch.Tensor], folder: str | Path) -> Path:
    """Write ``case`` and its expected ``outputs`` into ``folder``; returns the manifest path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = case_name(case)
    inputs: dict[str, torch.Tensor] = {}
    for key, value in case.args.items():
        inputs.update((path, v.detach().cpu().contiguous()) for path, v in leaves(value, key) if torch.is_tensor(v))
    save_file(inputs, folder / f"{name}.inputs.safetensors")
    save_file({k: v.detach().cpu().contiguous() for k, v in outputs.items()}, folder / f"{name}.expected.safetensors")
    manifest = {
        "name": name,
        "op": case.op,
        "meta": case.meta,
        "scalars": {k: v for k, v in case.args.items() if isinstance(v, int | float | str)},
        "inputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in inputs.items()},
        "expected": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in outputs.items()},
        "dsv4_version": __version__,
        "torch_version": torch.__version__,
    }
    path = folder / f"{name}.json"
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return path


def load(manifest_path: str | Path, device: torch.device | str = "cpu") -> tuple[Case, dict[str, torch.Tensor]]:
    """Read a saved case: ``(case, expected outputs)``, tensors on ``device``."""
    path = Path(manifest_path)
    manifest = json.loads(path.read_text())
    name, op = manifest["name"], manifest["op"]
    tensors = load_file(str(path.parent / f"{name}.inputs.safetensors"), device=str(device))
    expected = load_file(str(path.parent / f"{name}.expected.safetensors"), device=str(device))
    args: dict[str, Any] = {}
    for p in get_op(op).params:
        if dataclasses.is_dataclass(p.kind):
            args[p.name] = build(p.kind, p.name, tensors.__getitem__)
        elif p.name in tensors:
            args[p.name] = tensors[p.name]
        elif p.name in manifest["scalars"]:
            args[p.name] = manifest["scalars"][p.name]
    return Case(op, args, manifest["meta"]), expected


def check(folder: str | Path, backend: str, device: torch.device | str = "cpu") -> list[tuple[str, Report]]:
    """Replay every case in ``folder`` on ``backend``; returns ``(case name, report)`` pairs."""
    manifests = sorted(Path(folder).glob("*.json"))
    if not manifests:
        raise FileNotFoundError(f"no golden cases (*.json manifests) in {folder}")
    results = []
    for path in manifests:
        case, expected = load(path, device)
        outputs = run_case(case, backend)
        results.append((path.stem, compare(case.op, outputs, expected, case.compare_inputs())))
    return results

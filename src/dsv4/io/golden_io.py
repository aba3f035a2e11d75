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
from ..model.rope import RopeTable
from ..model.state import IndexerState
from ..model.weights import AttnWeights, CompressorWeights, IndexerWeights
from ..version import __version__

_WEIGHTS = {"qkv_proj_rope": AttnWeights, "indexer_compressor": CompressorWeights, "indexer": IndexerWeights}
_SCALARS = ("offset", "topk", "eps")
_INPUTS = {  # plain tensor arguments of each op, stored under their own names
    "qkv_proj_rope": ("x", "positions"),
    "indexer_compressor": ("x", "start_pos"),
    "indexer": ("x", "qr", "qr_scale", "start_pos"),
}


def case_name(case: Case) -> str:
    m = case.meta
    return f"{case.op}-{m['preset']}-{m['mode']}-seed{m['seed']}"


def _flatten(prefix: str, value: Any, out: dict[str, torch.Tensor]) -> None:
    if isinstance(value, torch.Tensor):
        out[prefix] = value.detach().cpu().contiguous()
    elif dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            _flatten(f"{prefix}.{f.name}", getattr(value, f.name), out)


def _build(cls: type, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}"
        kwargs[f.name] = _build(CompressorWeights, key, tensors) if f.name == "compressor" else tensors[key]
    return cls(**kwargs)


def _case_files(folder: Path, name: str) -> list[Path]:
    """The manifest and the two tensor files of case ``name``."""
    return [folder / f"{name}.json", folder / f"{name}.inputs.safetensors", folder / f"{name}.expected.safetensors"]


def save(case: Case, outputs: dict[str, torch.Tensor], folder: str | Path) -> Path:
    """Write ``case`` and its expected ``outputs`` into ``folder``; returns the manifest path.

    Raises ``FileExistsError`` (writing nothing) when a file of the case is already there."""
    folder = Path(folder)
    name = case_name(case)
    existing = [str(f) for f in _case_files(folder, name) if f.exists()]
    if existing:
        raise FileExistsError(f"golden case {name} is already in {folder} ({', '.join(existing)}); not overwritten")
    folder.mkdir(parents=True, exist_ok=True)
    inputs: dict[str, torch.Tensor] = {}
    for key, value in case.args.items():
        if key not in _SCALARS:
            _flatten(key, value, inputs)
    save_file(inputs, folder / f"{name}.inputs.safetensors")
    save_file({k: v.detach().cpu().contiguous() for k, v in outputs.items()}, folder / f"{name}.expected.safetensors")
    manifest = {
        "name": name,
        "op": case.op,
        "meta": case.meta,
        "scalars": {k: case.args[k] for k in _SCALARS if k in case.args},
        "inputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in inputs.items()},
        "expected": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in outputs.items()},
        "dsv4_version": __version__,
        "torch_version": torch.__version__,
    }
    path = folder / f"{name}.json"
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return path


def _manifest(path: Path) -> dict[str, Any]:
    """The manifest at ``path`` with the fields ``load`` uses checked; ``ValueError`` names the file and field.

    ``name`` derives the tensor files' names, so it must be a plain file stem: no path separator, no
    ``..``, not absolute (a manifest cannot make ``load`` read outside its folder)."""
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    name, op = manifest.get("name"), manifest.get("op")
    if not isinstance(name, str) or not name or name in (".", "..") or any(c in name for c in "/\\\x00"):
        raise ValueError(
            f"{path}: name must be a file stem in the manifest's folder (no '/', '\\' or '..'), got {name!r:.80}"
        )
    if op not in _WEIGHTS:
        raise ValueError(f"{path}: op must be one of {', '.join(_WEIGHTS)}, got {op!r:.40}")
    scalars, meta = manifest.get("scalars", {}), manifest.get("meta", {})
    if not (isinstance(scalars, dict) and set(scalars) <= set(_SCALARS)):
        raise ValueError(
            f"{path}: scalars must be an object with keys among {', '.join(_SCALARS)}, got {scalars!r:.80}"
        )
    for key, value in scalars.items():
        if isinstance(value, bool) or not isinstance(value, float if key == "eps" else int):
            raise ValueError(f"{path}: scalars.{key} must be {'a float' if key == 'eps' else 'an int'}, got {value!r}")
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: meta must be a JSON object, got {meta!r:.80}")
    return manifest


def _tensors(path: Path, device: torch.device | str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors' own SafetensorError for a malformed file, OSError for a missing one
        raise ValueError(f"{path}: cannot read the golden tensors ({e})") from None


def load(manifest_path: str | Path, device: torch.device | str = "cpu") -> tuple[Case, dict[str, torch.Tensor]]:
    """Read a saved case: ``(case, expected outputs)``, tensors on ``device``.

    Raises ``ValueError`` naming the file for a malformed manifest (see ``_manifest``) or tensor file,
    or a tensor the op needs that the file lacks."""
    path = Path(manifest_path)
    manifest = _manifest(path)
    name, op = manifest["name"], manifest["op"]
    _, inputs_file, expected_file = _case_files(path.parent, name)
    tensors = _tensors(inputs_file, device)
    expected = _tensors(expected_file, device)
    try:
        args: dict[str, Any] = {
            "w": _build(_WEIGHTS[op], "w", tensors),
            "rope": RopeTable(tensors["rope.cos"], tensors["rope.sin"]),
        }
        if op != "qkv_proj_rope":
            args["state"] = IndexerState(
                tensors["state.kv_state"], tensors["state.score_state"], tensors["state.idx_kv_cache"]
            )
        for key in _INPUTS[op]:
            args[key] = tensors[key]
    except KeyError as e:
        raise ValueError(f"{inputs_file}: no tensor {e} (needed by {op})") from None
    args.update(manifest["scalars"])
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

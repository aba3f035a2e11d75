"""Golden cases on disk: ``save`` writes a case's inputs and reference outputs (safetensors) with a
JSON manifest; ``check`` replays every case of a folder on a backend and compares (spec §6).

Anyone can check their own kernel against our golden: load a case with ``load``, run it (on
``case.args`` in place, or on a copy), and ``golden.compare`` the outputs with ``expected`` and
``case.compare_inputs()`` (the inputs as loaded, so the pool rows a step must not write are checked).
"""

from __future__ import annotations

import dataclasses
import json
import stat
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors

from ..harness.cases import Case, expected_for, run_case
from ..harness.golden import Report, compare
from ..model.fields import build, leaves
from ..ops.registry import INT_OR_TENSOR, get_op, op_names
from ..version import __version__
from .json_files import read_json, unique_keys


def case_name(case: Case) -> str:
    """``op-preset-mode-seedN``, with the layer kind after the mode when it is not the op's default."""
    m = case.meta
    kinds = get_op(case.op).kinds
    kind = f"-{m['kind']}" if kinds and m.get("kind", kinds[0]) != kinds[0] else ""
    preset = str(m["preset"]).replace("/", "-")  # a rank's preset (demo/tp2): one file stem, not a folder
    return f"{case.op}-{preset}-{m['mode']}{kind}-seed{m['seed']}"


def _case_files(folder: Path, name: str) -> list[Path]:
    """The manifest and the two tensor files of case ``name``."""
    return [folder / f"{name}.json", folder / f"{name}.inputs.safetensors", folder / f"{name}.expected.safetensors"]


def save(case: Case, outputs: dict[str, torch.Tensor], folder: str | Path) -> Path:
    """Write ``case`` and its expected ``outputs`` into ``folder``; returns the manifest path.

    Raises ``FileExistsError`` (writing nothing) when a file of the case is already there, a link
    (even one to nothing) included; each file is created anew, never written through a link.
    ``NotADirectoryError`` when ``folder`` is there and not a directory."""
    folder = _folder(folder)
    name = case_name(case)
    scalars = {k: v for k, v in case.args.items() if isinstance(v, int | float | str)}
    problem = _scalars_problem(case.op, scalars)
    if problem:  # a manifest load would refuse
        raise ValueError(f"golden case {name}: {problem}")
    existing = [str(f) for f in _case_files(folder, name) if f.exists() or f.is_symlink()]
    if existing:
        raise FileExistsError(f"golden case {name} is already in {folder} ({', '.join(existing)}); not overwritten")
    folder.mkdir(parents=True, exist_ok=True)
    inputs: dict[str, torch.Tensor] = {}
    for key, value in case.args.items():
        inputs.update((path, v.detach().cpu().contiguous()) for path, v in leaves(value, key) if torch.is_tensor(v))
    _create(folder / f"{name}.inputs.safetensors", save_tensors(inputs))
    expected = {k: v.detach().cpu().contiguous() for k, v in outputs.items()}
    _create(folder / f"{name}.expected.safetensors", save_tensors(expected))
    manifest = {
        "name": name,
        "op": case.op,
        "meta": case.meta,
        "scalars": scalars,
        "inputs": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in inputs.items()},
        "expected": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in outputs.items()},
        "dsv4_version": __version__,
        "torch_version": torch.__version__,
    }
    path = folder / f"{name}.json"
    _create(path, (json.dumps(manifest, indent=1) + "\n").encode())
    return path


def _folder(folder: str | Path) -> Path:
    """``folder`` as a path; ``NotADirectoryError`` naming it when it is there and not a directory."""
    folder = Path(folder)
    if (folder.exists() or folder.is_symlink()) and not folder.is_dir():
        what = "a file" if folder.exists() else "a link to nothing"
        raise NotADirectoryError(f"{folder}: is {what}, not a directory (golden cases are the files of a directory)")
    return folder


def _create(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file ``path``: ``FileExistsError`` if anything is there, a link included
    (``open``'s exclusive mode does not follow one)."""
    with open(path, "xb") as f:
        f.write(data)


def _scalar_kinds(op: str) -> dict[str, type]:
    """The arguments of ``op`` a manifest's ``scalars`` may hold, by the type each must be: its int,
    float and str parameters, and an int one (``start_pos``) that is an int for every batch row or a tensor."""
    kinds = (int, float, str, INT_OR_TENSOR)
    return {p.name: int if p.kind == INT_OR_TENSOR else p.kind for p in get_op(op).params if p.kind in kinds}


def _scalars_problem(op: str, scalars: Any) -> str:
    """Why ``scalars`` are not scalar arguments of ``op`` ('' when they are)."""
    kinds = _scalar_kinds(op)
    if not (isinstance(scalars, dict) and set(scalars) <= set(kinds)):
        return f"scalars must be an object with keys among {', '.join(kinds)}, got {scalars!r:.80}"
    for key, value in scalars.items():
        if isinstance(value, bool) or not isinstance(value, kinds[key]):
            return f"scalars.{key} must be a {kinds[key].__name__}, got {value!r:.80}"
        if isinstance(value, int) and not -(2**63) <= value < 2**63:  # the ops take them as int64
            return f"scalars.{key} must fit int64, got {value!r:.80}"
    return ""


def _manifest(path: Path) -> dict[str, Any]:
    """The manifest at ``path`` with the fields ``load`` uses checked; ``ValueError`` names the file and field.

    ``name`` derives the tensor files' names, so it must be a plain file stem: no path separator, no
    ``..``, not absolute (a manifest cannot make ``load`` read outside its folder). A key twice in
    one object is refused (JSON would keep the last)."""
    manifest = read_json(path, unique_keys)
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    missing = [k for k in ("name", "op", "scalars", "meta") if k not in manifest]
    if missing:
        raise ValueError(f"{path}: missing field(s) {', '.join(missing)} (golden save writes them all)")
    name, op = manifest.get("name"), manifest.get("op")
    if not isinstance(name, str) or not name or name in (".", "..") or any(c in name for c in "/\\\x00"):
        raise ValueError(
            f"{path}: name must be a file stem in the manifest's folder (no '/', '\\' or '..'), got {name!r:.80}"
        )
    if name != path.stem:  # another case's files would be read and reported under this one's name
        raise ValueError(f"{path}: name must be the manifest's own file stem {path.stem!r}, got {name!r:.80}")
    if op not in op_names():
        raise ValueError(f"{path}: op must be one of {', '.join(op_names())}, got {op!r:.40}")
    problem = _scalars_problem(op, manifest["scalars"])
    if problem:
        raise ValueError(f"{path}: {problem}")
    meta = manifest["meta"]
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: meta must be a JSON object, got {meta!r:.80}")
    for field in ("inputs", "expected"):  # the tensors golden save wrote: checked against the files on load
        listed = manifest.get(field, {})
        if not isinstance(listed, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("shape"), list) and isinstance(v.get("dtype"), str)
            for v in listed.values()
        ):
            raise ValueError(f"{path}: {field} must map tensor names to {{shape, dtype}}, got {listed!r:.80}")
    return manifest


def _regular_file(path: Path, folder: Path) -> Path:
    """``path``, a file of ``folder`` itself: a symbolic link (which could lead anywhere) is refused, and
    so is anything but a regular file (a named pipe would block the read). A missing file passes: its
    reader names it."""
    if path.is_symlink() or path.resolve().parent != folder.resolve():
        raise ValueError(f"{path}: a golden file must be a regular file in {folder} (it links to {path.resolve()})")
    if path.exists() and not path.is_file():
        mode = path.stat().st_mode
        what = "a directory" if stat.S_ISDIR(mode) else "a named pipe" if stat.S_ISFIFO(mode) else "a special file"
        raise ValueError(f"{path}: a golden file must be a regular file in {folder} (it is {what})")
    return path


def _matches_manifest(path: Path, tensors: dict[str, torch.Tensor], listed: dict[str, Any], field: str) -> None:
    """The tensors of a case file against the names, shapes and dtypes its manifest lists (when it does)."""
    if not listed:
        return
    if set(tensors) != set(listed):
        extra, absent = sorted(set(tensors) - set(listed)), sorted(set(listed) - set(tensors))
        raise ValueError(f"{path}: its tensors differ from the manifest's {field} (extra {extra}, missing {absent})")
    for key, t in tensors.items():
        want = listed[key]
        if list(t.shape) != want["shape"] or str(t.dtype) != want["dtype"]:
            raise ValueError(
                f"{path}: {key} is {str(t.dtype)} {list(t.shape)}, the manifest's {field} says "
                f"{want['dtype']} {want['shape']}"
            )


def _tensors(path: Path, device: torch.device | str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors' own SafetensorError for a malformed file, OSError for a missing one
        raise ValueError(f"{path}: cannot read the golden tensors ({e})") from None


def load(manifest_path: str | Path, device: torch.device | str = "cpu") -> tuple[Case, dict[str, torch.Tensor]]:
    """Read a saved case: ``(case, expected outputs)``, tensors on ``device``; the op's arguments are
    rebuilt by their kinds (its descriptor's ``params``). The case records its ``compare_inputs()``
    as loaded (``Case.record_inputs``): a kernel may then run on ``case.args`` in place.

    Raises ``ValueError`` naming the file for a malformed manifest (see ``_manifest``) or tensor file,
    or a tensor the op needs that the file lacks."""
    path = _regular_file(Path(manifest_path), Path(manifest_path).parent)
    manifest = _manifest(path)
    name, op = manifest["name"], manifest["op"]
    _, inputs_file, expected_file = (_regular_file(f, path.parent) for f in _case_files(path.parent, name))
    tensors = _tensors(inputs_file, device)
    expected = _tensors(expected_file, device)
    _matches_manifest(inputs_file, tensors, manifest.get("inputs", {}), "inputs")
    _matches_manifest(expected_file, expected, manifest.get("expected", {}), "expected")
    for out in get_op(op).outputs:
        t = expected.get(out.name)
        if out.rule == "topk" and t is not None and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
            raise ValueError(f"{expected_file}: {out.name} must hold integer indices, got {t.dtype}")
    args: dict[str, Any] = {}
    try:
        for p in get_op(op).params:
            if p.optional and not any(k == p.name or k.startswith(p.name + ".") for k in tensors):
                continue  # an optional argument the case did not pass (None)
            if dataclasses.is_dataclass(p.kind):
                args[p.name] = build(p.kind, p.name, tensors.__getitem__)
            elif p.kind in (int, float, str):  # a scalar the case did not set keeps the op's default
                if p.name in manifest["scalars"]:
                    args[p.name] = manifest["scalars"][p.name]
            elif p.name in manifest["scalars"]:  # an int start_pos
                args[p.name] = manifest["scalars"][p.name]
            else:
                args[p.name] = tensors[p.name]
    except KeyError as e:
        raise ValueError(f"{inputs_file}: no tensor {e} (needed by {op})") from None
    case = Case(op, args, manifest["meta"])
    case.record_inputs()  # compare_inputs(): the state as loaded, even after a kernel updated args in place
    return case, expected


def check(folder: str | Path, backend: str, device: torch.device | str = "cpu") -> list[tuple[str, Report]]:
    """Replay every case in ``folder`` on ``backend``; returns ``(case name, report)`` pairs.

    Raises ``NotADirectoryError`` when ``folder`` is there and not a directory, ``FileNotFoundError``
    when it holds no case."""
    folder = _folder(folder)
    manifests = sorted(folder.glob("*.json"))
    if not manifests:
        raise FileNotFoundError(f"no golden cases (*.json manifests) in {folder}")
    claimed = {f.name for path in manifests for f in _case_files(folder, path.stem)}
    orphans = sorted(str(f) for f in folder.glob("*.safetensors") if f.name not in claimed)
    if orphans:  # a case whose manifest is gone would otherwise go unchecked
        raise ValueError(f"{orphans[0]}: a golden tensor file no manifest in {folder} names (a partial case)")
    results = []
    for path in manifests:
        case, expected = load(path, device)
        outputs = run_case(case, backend)
        judged = expected_for(case, outputs, expected)  # the indexer's scores on the pool this backend wrote
        results.append((path.stem, compare(case.op, outputs, judged, case.compare_inputs())))
    return results

"""Launch choices as data: each kernel's tunable parameters, and the per-device files that fix them.

A kernel module declares a ``Tunable`` next to its tile constants: the parameters a GPU measurement
may change (tiles, warps, stages, split counts, programs per SM, PDL), each with today's reasoned
default and its allowed values, the dims that name a shape bucket, and a few candidates per bucket.
Its launcher asks ``TUNABLE.config(device, T=..., D=...)`` for the choice at that bucket and gets
the entry of ``configs/<device>.json`` when the file has one, else the defaults. The file is written
by ``dsv4 tune`` on a GPU and never changes at run time (no autotuning), so a device gives the same
bits from run to run.

- Device key: the normalized GPU name and its SM count (``h100-sxm-132``, ``h200-132``); ``cpu``
  when the kernels run under the interpreter.
- ``DSV4_KERNEL_CONFIG=PATH``: use that file for every device instead; ``none``: the defaults only.
- File schema (``SCHEMA``): ``{"schema": 1, "device": KEY, "kernels": {KERNEL: {BUCKET: {PARAM:
  VALUE}}}}`` plus free provenance fields; a bucket is ``"T=128,D=4096,N=1536"`` (the kernel's
  dims in order, its ``pow2_dims`` rounded up to a power of two). Every kernel, bucket, parameter
  and value is checked when the file is read, repeated keys and rounded dims that are no power of two
  included: a malformed file is a ``ValueError`` naming the file and the entry, never a silent
  fallback. Exact dims are not checked against each other: an entry of a shape no launch has is
  loaded and never looked up.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..io.atomic_write import write_atomic
from ..io.json_files import JSONFileError, read_json, unique_keys

SCHEMA = 1
CONFIG_DIR = Path(__file__).with_name("configs")  # ships with the package (pyproject package-data)
ENV = "DSV4_KERNEL_CONFIG"
CPU_KEY = "cpu"
# Driver names that the general rule would shorten too far: the H100 SXM part reports no form factor.
_ALIASES = {"h100 80gb hbm3": "h100-sxm"}
_DROP = re.compile(r"\d+gb|hbm\d*e?")  # memory size and type: the same chip whatever its memory
# ASCII digits, no leading zero (one key a bucket), at most 18 (below 2^63: no dim of a launch is longer)
_BUCKET_ITEM = re.compile(r"([A-Z][A-Z0-9_]*)=(0|[1-9][0-9]{0,17})")


@dataclass(frozen=True)
class Param:
    """One tunable launch parameter.

    ``choices``: every value a config file may hold (the first of them of the default's type);
    ``exact``: changing it keeps the op's output bit-identical (a candidate that changes only exact
    parameters must match the default bit for bit); ``compiled_only``: the interpreter does not see
    it (warps, stages, PDL), so under it such a candidate is the same program as the default.
    """

    name: str
    default: Any
    choices: tuple[Any, ...]
    doc: str
    exact: bool = False
    compiled_only: bool = False

    def __post_init__(self) -> None:
        if not self.accepts(self.default):
            raise ValueError(f"{self.name}: default {self.default!r} is not among {self.choices}")

    def accepts(self, value: Any) -> bool:
        return any(value == c and type(value) is type(c) for c in self.choices)


class Config(Mapping[str, Any]):
    """A kernel's resolved launch parameters; read as ``cfg.num_warps`` or ``cfg["num_warps"]``."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Config is read-only")

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Config({self._values})"


Bucket = dict[str, int]
Candidates = Callable[[Bucket], Sequence[Mapping[str, Any]]]


@dataclass(frozen=True)
class Tunable:
    """A kernel's launch parameters, the dims of its shape buckets and its candidates.

    ``candidates``: partial configs (changes from the defaults) worth timing at a bucket, or a
    function of the bucket's dims returning them. Registered by name when constructed.
    """

    name: str
    doc: str
    dims: tuple[str, ...]
    params: tuple[Param, ...]
    candidates: Sequence[Mapping[str, Any]] | Candidates = ()
    pow2_dims: tuple[str, ...] = ()  # dims a bucket rounds up to a power of two (token and key counts)
    _by_name: dict[str, Param] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._by_name.update({p.name: p for p in self.params})
        if not set(self.pow2_dims) <= set(self.dims):
            raise ValueError(f"kernel {self.name!r}: pow2_dims {self.pow2_dims} are not among its dims {self.dims}")
        if self.name in TUNABLES:
            raise ValueError(f"kernel {self.name!r} already declares its launch parameters")
        TUNABLES[self.name] = self
        for bucket_cands in [] if callable(self.candidates) else [self.candidates]:
            for c in bucket_cands:
                self.resolve(c)

    @property
    def default(self) -> Config:
        return Config({p.name: p.default for p in self.params})

    def param(self, name: str) -> Param:
        return self._by_name[name]

    def resolve(self, changes: Mapping[str, Any], where: str = "") -> Config:
        """The defaults with ``changes`` applied; ``ValueError`` for an unknown parameter or value."""
        where = where or f"kernel {self.name!r}"
        for name, value in changes.items():
            p = self._by_name.get(name)
            if p is None:
                raise ValueError(f"{where}: unknown parameter {name!r} (known: {', '.join(self._by_name)})")
            if not p.accepts(value):
                raise ValueError(f"{where}: {name} must be one of {list(p.choices)}, got {value!r}")
        return Config({**self.default, **changes})

    def bucket_key(self, dims: Mapping[str, int]) -> str:
        if tuple(dims) != self.dims:
            raise ValueError(f"kernel {self.name!r}: bucket dims {tuple(dims)} != declared {self.dims}")
        return ",".join(f"{k}={int(v)}" for k, v in dims.items())

    def parse_bucket(self, key: str) -> Bucket:
        """``"T=128,D=4096"`` -> ``{"T": 128, "D": 4096}``; ``ValueError`` when it is not this kernel's form."""
        parts = key.split(",")
        items = [m for part in parts if (m := _BUCKET_ITEM.fullmatch(part))]
        if len(items) < len(parts) or tuple(m[1] for m in items) != self.dims:
            form = ",".join(f"{d}=<int>" for d in self.dims)
            raise ValueError(f"kernel {self.name!r}: bucket {key!r:.80} is not of the form {form!r} (ints below 10^18)")
        bucket = {m[1]: int(m[2]) for m in items}
        odd = [d for d in self.pow2_dims if bucket[d] != pow2_bucket(bucket[d])]
        if odd:  # a launch rounds these up: no launch would look such a bucket up
            raise ValueError(
                f"kernel {self.name!r}: bucket {key!r}: {', '.join(odd)} must be a power of two (launches round "
                f"{', '.join(self.pow2_dims)} up to one)"
            )
        return bucket

    def candidate_configs(self, bucket: Bucket) -> list[Config]:
        """The default first, then every distinct candidate at ``bucket``, resolved."""
        changes = self.candidates(bucket) if callable(self.candidates) else self.candidates
        out = [self.default]
        for c in changes:
            cfg = self.resolve(c)
            if cfg not in out:
                out.append(cfg)
        return out

    def config(self, device: torch.device, **dims: int) -> Config:
        """The launch parameters at the bucket ``dims`` on ``device`` (see the module docstring); the
        ``pow2_dims`` are rounded up to a power of two here."""
        bucket = {d: pow2_bucket(v) if d in self.pow2_dims else v for d, v in dims.items()}
        key = self.bucket_key(bucket)
        if _STATE.recording is not None:
            _STATE.recording.append((self.name, key))
        forced = _STATE.forced.get(self.name)
        if forced is not None:
            return forced
        if _STATE.drawn is not None and not _STATE.defaults_only:  # a draw is what a file may hold at the bucket
            return _STATE.drawn.choose(self, key, bucket)
        return _table_for(device).entries.get(self.name, {}).get(key) or self.default


TUNABLES: dict[str, Tunable] = {}  # every kernel that declares its launch parameters, by name


def pow2_bucket(n: int) -> int:
    """``n`` rounded up to a power of two (token counts and key counts of a bucket)."""
    return 1 << max(0, int(n) - 1).bit_length()


# -- devices and files ---------------------------------------------------------------------


def normalize_device_name(name: str) -> str:
    """``"NVIDIA H200"`` -> ``h200``, ``"NVIDIA H100 80GB HBM3"`` -> ``h100-sxm``, ``"NVIDIA H100 NVL"`` ->
    ``h100-nvl``: lower case, without the vendor and the memory size and type."""
    text = " ".join(name.lower().replace("nvidia", " ").split())
    if text in _ALIASES:
        return _ALIASES[text]
    tokens = [t for t in re.split(r"[^a-z0-9]+", text) if t and not _DROP.fullmatch(t)]
    return "-".join(tokens) or "gpu"


_DEVICE_KEYS: dict[tuple[str, int | None], str] = {}


def device_key(device: torch.device | str) -> str:
    """The config file's name for ``device`` (without ``.json``): name and SM count, or ``cpu``."""
    device = torch.device(device)
    if device.type != "cuda":
        return CPU_KEY
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = _DEVICE_KEYS.get((device.type, index))
    if key is None:
        props = torch.cuda.get_device_properties(index)
        key = _DEVICE_KEYS[(device.type, index)] = f"{normalize_device_name(props.name)}-{props.multi_processor_count}"
    return key


@dataclass(frozen=True)
class ConfigTable:
    """A config file, checked: ``entries[kernel][bucket]`` is the resolved ``Config``."""

    path: Path | None
    device: str | None
    entries: dict[str, dict[str, Config]]
    meta: dict[str, Any]

    @property
    def buckets(self) -> int:
        return sum(len(b) for b in self.entries.values())


_EMPTY = ConfigTable(None, None, {}, {})


def parse_config(data: Any, where: str, expect_device: str | None = None) -> ConfigTable:
    """Check a config file's content (see the module docstring) -> its table; ``ValueError`` naming
    ``where`` and the first bad entry."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
    if type(data.get("schema")) is not int or data["schema"] != SCHEMA:
        raise ValueError(f"{where}: schema must be {SCHEMA}, got {data.get('schema')!r}")
    device = data.get("device")
    if not isinstance(device, str) or not device:
        raise ValueError(f"{where}: 'device' must name the device (e.g. 'h200-132'), got {device!r}")
    if expect_device is not None and device != expect_device:
        raise ValueError(f"{where}: the file of device {expect_device!r} says 'device': {device!r}")
    kernels = data.get("kernels")
    if not isinstance(kernels, dict):
        raise ValueError(f"{where}: 'kernels' must be an object of kernel -> bucket -> parameters")
    entries: dict[str, dict[str, Config]] = {}
    for kernel, buckets in kernels.items():
        tunable = TUNABLES.get(kernel)
        if tunable is None:
            raise ValueError(f"{where}: unknown kernel {kernel!r} (known: {', '.join(sorted(TUNABLES))})")
        if not isinstance(buckets, dict):
            raise ValueError(f"{where}: kernels.{kernel} must be an object of bucket -> parameters")
        entries[kernel] = {}
        for bucket, params in buckets.items():
            try:
                tunable.parse_bucket(bucket)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            if not isinstance(params, dict):
                raise ValueError(f"{where}: kernels.{kernel}[{bucket!r}] must be an object of parameters")
            entries[kernel][bucket] = tunable.resolve(params, f"{where}: kernels.{kernel}[{bucket!r}]")
    meta = {k: v for k, v in data.items() if k not in ("schema", "device", "kernels")}
    return ConfigTable(None, device, entries, meta)


def load_config(path: str | Path, expect_device: str | None = None) -> ConfigTable:
    """Read and check the config file at ``path`` (``expect_device``: the device its name promises)."""
    path = Path(path)
    try:
        data = read_json(path, object_pairs_hook=unique_keys)
    except JSONFileError as e:  # unreadable, not UTF-8 or JSON, a key twice, too large or deep
        raise ValueError(f"kernel config {e}") from None
    table = parse_config(data, f"kernel config {path}", expect_device)
    return ConfigTable(path, table.device, table.entries, table.meta)


def config_path(device: torch.device | str) -> Path | None:
    """The file that applies to ``device``: ``$DSV4_KERNEL_CONFIG``, else ``configs/<device key>.json``
    when it exists; None when the defaults apply."""
    override = os.environ.get(ENV, "")
    if override:
        return None if override.lower() == "none" else Path(override)
    path = CONFIG_DIR / f"{device_key(device)}.json"
    return path if path.is_file() else None


_TABLES: dict[tuple[str, str], ConfigTable] = {}


def _table_for(device: torch.device | str) -> ConfigTable:
    if _STATE.defaults_only:
        return _EMPTY
    override = os.environ.get(ENV, "")
    key = device_key(device)
    table = _TABLES.get((override, key))
    if table is None:
        path = config_path(device)
        try:
            table = _EMPTY if path is None else load_config(path, None if override else key)
        except ValueError as e:
            raise ValueError(f"{e} (the file {ENV} names)" if override else str(e)) from None
        _TABLES[(override, key)] = table
    return table


def reload() -> None:
    """Forget the files read so far (after one was written or ``DSV4_KERNEL_CONFIG`` changed)."""
    _TABLES.clear()


def describe_active(device: torch.device | str) -> str:
    """One line for ``dsv4 info``: the file that sets ``device``'s launch choices, or the defaults."""
    key = device_key(device)
    path = config_path(device)
    if path is None:
        why = f"{ENV}=none" if os.environ.get(ENV, "").lower() == "none" else f"no {CONFIG_DIR / (key + '.json')}"
        return f"kernel configs: built-in defaults ({why})"
    table = _table_for(device)
    return f"kernel configs: {path} ({table.buckets} tuned bucket(s) of {len(table.entries)} kernel(s))"


def write_config(
    path: str | Path, device: str, entries: Mapping[str, Mapping[str, Mapping[str, Any]]], meta: Mapping[str, Any]
) -> None:
    """Write a config file (checked first, written atomically): ``entries[kernel][bucket] = params``."""
    data = {"schema": SCHEMA, "device": device, **meta, "kernels": {k: dict(v) for k, v in sorted(entries.items())}}
    parse_config(data, f"kernel config {path}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(data, indent=1, sort_keys=False) + "\n")
    reload()


# -- overrides for ``dsv4 tune`` ------------------------------------------------------------


@dataclass
class Drawn:
    """The candidates ``drawn`` chose: ``entries[kernel][bucket]``, one per bucket looked up, kept for
    every later lookup of it (as a config file's entry is)."""

    rng: random.Random
    entries: dict[str, dict[str, Config]] = field(default_factory=dict)

    def choose(self, tunable: Tunable, key: str, dims: Mapping[str, int]) -> Config:
        mine = self.entries.setdefault(tunable.name, {})
        if key not in mine:
            mine[key] = self.rng.choice(tunable.candidate_configs(dict(dims)))
        return mine[key]

    def changes(self) -> dict[str, dict[str, dict[str, Any]]]:
        """The draws that differ from the defaults, as a config file's ``kernels`` (``write_config``
        writes them; ``DSV4_KERNEL_CONFIG`` then launches the same candidates)."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for name, buckets in self.entries.items():
            default = TUNABLES[name].default
            for key, cfg in buckets.items():
                diff = {k: v for k, v in cfg.items() if v != default[k]}
                if diff:
                    out.setdefault(name, {})[key] = diff
        return out


@dataclass
class _State:
    forced: dict[str, Config] = field(default_factory=dict)
    recording: list[tuple[str, str]] | None = None
    defaults_only: bool = False
    drawn: Drawn | None = None


_STATE = _State()


@contextmanager
def forced(kernel: str, params: Mapping[str, Any]) -> Iterator[Config]:
    """Launch ``kernel`` with ``params`` (changes from its defaults) at every bucket inside the block;
    ``ValueError`` for a kernel that declares no launch parameters."""
    if kernel not in TUNABLES:
        raise ValueError(f"kernel: expected one of {', '.join(sorted(TUNABLES))}, got {kernel!r}")
    cfg = TUNABLES[kernel].resolve(params)
    previous = _STATE.forced.get(kernel)
    _STATE.forced[kernel] = cfg
    try:
        yield cfg
    finally:
        if previous is None:
            _STATE.forced.pop(kernel, None)
        else:
            _STATE.forced[kernel] = previous


@contextmanager
def defaults_only() -> Iterator[None]:
    """Every kernel at its built-in defaults inside the block, whatever config file exists or candidates
    an enclosing ``drawn`` block draws (a ``forced`` kernel keeps its forced config)."""
    previous, _STATE.defaults_only = _STATE.defaults_only, True
    try:
        yield
    finally:
        _STATE.defaults_only = previous


@contextmanager
def drawn(rng: random.Random) -> Iterator[Drawn]:
    """Launch each kernel at each bucket inside the block with one of its declared candidates there,
    drawn from ``rng`` (the default among them), instead of the config file: what a tuned file may set,
    at shapes the tune did not time. A forced kernel keeps its forced config."""
    previous, _STATE.drawn = _STATE.drawn, Drawn(rng)
    try:
        yield _STATE.drawn
    finally:
        _STATE.drawn = previous


@contextmanager
def recording() -> Iterator[list[tuple[str, str]]]:
    """Collect ``(kernel, bucket)`` of every lookup inside the block, in order."""
    previous, _STATE.recording = _STATE.recording, []
    try:
        yield _STATE.recording
    finally:
        _STATE.recording = previous

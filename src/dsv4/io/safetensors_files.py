"""Memory-mapped access to the tensors of a (sharded) safetensors checkpoint, by name.

Every file's JSON header is parsed and checked here against the format's own rules before any
tensor is read (spec §7): the 8-byte header length is bounded by the file and by 100 MB, the header
is a JSON object whose entries each have a known dtype, a shape of non-negative ints and
``data_offsets`` whose byte length matches, and the entries tile the data region exactly (in
bounds, no overlap, no gap). So a file whose dtypes the installed ``safetensors`` or torch does not
know (``F8_E8M0`` on older versions) can still be listed and read, and a malformed file is refused
by name whichever path reads it. Data is read through ``safetensors.safe_open`` when torch has the
stored dtype, otherwise from the raw bytes through ``numpy.memmap``; either way only the requested
rows are read. The raw path is taken for a file ``safe_open`` refuses only when the file holds a
dtype older ``safetensors`` releases do not know (``NEWER_DTYPES``); any other refusal is an error.
"""

from __future__ import annotations

import math
import re
import struct
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Any, Self

import numpy as np
import torch
from safetensors import safe_open

from .fp8 import e4m3_bytes_to_float32, e8m0_bytes_to_float32
from .json_files import JSONFileError, parse_json, read_json, unique_keys

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header

# safetensors dtype name -> (bytes per element, torch dtype name)
DTYPES: dict[str, tuple[int, str]] = {
    "BOOL": (1, "bool"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"),
    "F8_E8M0": (1, "float8_e8m0fnu"),
    "I8": (1, "int8"),
    "U8": (1, "uint8"),
    "BF16": (2, "bfloat16"),
    "F16": (2, "float16"),
    "I16": (2, "int16"),
    "U16": (2, "uint16"),
    "F32": (4, "float32"),
    "I32": (4, "int32"),
    "U32": (4, "uint32"),
    "I64": (8, "int64"),
    "U64": (8, "uint64"),
    "F64": (8, "float64"),
}
NEWER_DTYPES = frozenset({"F8_E8M0"})  # older safetensors releases refuse a whole file holding one of these
_RAW_NUMPY = {"BF16": np.int16, "F32": np.float32}  # raw-bytes views of the plain dtypes we read


class CheckpointError(ValueError):
    """A checkpoint that is missing, malformed, or does not hold what a model layer needs."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies: ``file``, absolute byte range ``[begin, end)``, dtype name, shape."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _entry(path: Path, name: str, entry: object, data_len: int) -> tuple[str, tuple[int, ...], int, int]:
    """``(dtype, shape, begin, end)`` of one header entry (offsets relative to the data region)."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: expected a JSON object with dtype, shape, data_offsets, got {entry!r:.80}")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CheckpointError(f"{where}: unknown dtype {dtype!r:.40} (known: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
        raise CheckpointError(f"{where}: shape must be a list of non-negative ints, got {shape!r:.80}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise CheckpointError(f"{where}: data_offsets must be two ints [begin, end], got {offsets!r:.80}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise CheckpointError(
            f"{where}: data_offsets {offsets} outside the data region [0, {data_len}] (need 0 <= begin <= end)"
        )
    nbytes = math.prod(shape) * DTYPES[dtype][0]
    if end - begin != nbytes:
        raise CheckpointError(f"{where}: {dtype} {shape} is {nbytes} bytes, data_offsets {offsets} span {end - begin}")
    return dtype, tuple(shape), begin, end


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Every tensor of one safetensors file (8-byte little-endian header length, JSON header, data),
    checked against the format's rules (see the module docstring); raises ``CheckpointError``
    naming the file and the entry."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: {size} bytes, too short for a safetensors header")
            (length,) = struct.unpack("<Q", head)
            if length > min(size - 8, MAX_HEADER_BYTES):
                raise CheckpointError(
                    f"{path}: header length {length} exceeds "
                    + (f"the file ({size} bytes)" if length > size - 8 else f"{MAX_HEADER_BYTES} bytes")
                )
            header = parse_json(f.read(length), path, object_pairs_hook=unique_keys)
    except OSError as e:
        raise CheckpointError(f"{path}: not a readable file ({e})") from None
    except JSONFileError as e:  # bad UTF-8 or JSON, a repeated key, nested too deep
        raise CheckpointError(str(e)) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the header must be a JSON object, got {type(header).__name__}")
    metadata = header.get("__metadata__", {})
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings, got {metadata!r:.80}")
    data_start, data_len = 8 + length, size - 8 - length
    tensors = {}
    for name, entry in header.items():
        if name != "__metadata__":
            dtype, shape, begin, end = _entry(path, name, entry, data_len)
            tensors[name] = TensorInfo(name, path, dtype, shape, data_start + begin, data_start + end)
    # The entries must tile the data region: sorted by offset, each starts where the previous ends.
    covered, previous = data_start, None
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin != covered:
            what = f"overlaps {previous!r}" if info.begin < covered else "leaves a gap before it"
            raise CheckpointError(
                f"{path}: tensor {info.name!r} at data_offsets [{info.begin - data_start}, {info.end - data_start}] "
                f"{what} (tensors must tile the data region without overlap or gap)"
            )
        covered, previous = info.end, info.name
    if covered != size:
        raise CheckpointError(
            f"{path}: the tensors cover {covered - data_start} of the {data_len} data bytes after the header"
        )
    return tensors


def check_shard_name(index: Path, tensor: str, shard: object) -> str:
    """``shard`` if it is a relative file name inside the checkpoint directory: not absolute, no
    ``..`` component (checked on the string, so symlinked hub-cache snapshots keep working)."""
    if not isinstance(shard, str) or not shard.strip():
        raise CheckpointError(f"{index}: weight_map[{tensor!r}] must be a file name, got {shard!r:.80}")
    parts = re.split(r"[\\/]", shard)
    if shard[0] in "/\\" or PureWindowsPath(shard).drive or ".." in parts or "\x00" in shard:
        raise CheckpointError(
            f"{index}: weight_map[{tensor!r}] = {shard!r:.120} leaves the checkpoint directory "
            "(shard names must be relative, without '..')"
        )
    return shard


def _torch_dtype(dtype: str) -> torch.dtype | None:
    return getattr(torch, DTYPES[dtype][1], None) if dtype in DTYPES else None


class ShardedCheckpoint:
    """The tensors of a checkpoint directory: ``model.safetensors.index.json`` and its shards, or a
    single ``model.safetensors``. Shard headers are parsed on first use, so looking up one layer
    touches only the files that hold it.

    ``raw_bytes``: read data from the raw bytes even where ``safetensors``/torch could decode it
    (``None``: only where they cannot). Use as a context manager to close the files it opened.
    """

    def __init__(self, directory: str | Path, raw_bytes: bool | None = None):
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise CheckpointError(
                f"checkpoint {self.directory} is not a directory: a checkpoint is a folder holding "
                f"{INDEX_FILE} and its shards, or {SINGLE_FILE}"
            )
        if not self.directory.is_dir():
            raise CheckpointError(f"checkpoint directory {self.directory} does not exist")
        index = self.directory / INDEX_FILE
        if index.is_file():
            weight_map = self._read_index(index)
        elif (self.directory / SINGLE_FILE).is_file():
            weight_map = dict.fromkeys(read_header(self.directory / SINGLE_FILE), SINGLE_FILE)
        else:
            raise CheckpointError(f"{self.directory}: neither {INDEX_FILE} nor {SINGLE_FILE} found")
        self.weight_map = weight_map
        self.raw_bytes = raw_bytes
        self._headers: dict[str, dict[str, TensorInfo]] = {}
        self._handles: dict[Path, Any] = {}
        self.raw_reasons: dict[Path, str] = {}  # files read from raw bytes because safe_open refused them, and why
        self._files = ExitStack()

    @staticmethod
    def _read_index(index: Path) -> dict[str, str]:
        """The index file's ``weight_map`` (tensor name -> shard file name), every shard name checked."""
        try:
            raw = read_json(index, object_pairs_hook=unique_keys)
        except JSONFileError as e:
            raise CheckpointError(str(e)) from None
        weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: expected a JSON object with a weight_map object, got {raw!r:.80}")
        return {name: check_shard_name(index, name, shard) for name, shard in weight_map.items()}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._files.close()
        self._handles.clear()

    def names(self) -> list[str]:
        return list(self.weight_map)

    def info(self, name: str) -> TensorInfo | None:
        """Metadata of ``name``, or None when the checkpoint has no such tensor."""
        shard = self.weight_map.get(name)
        if shard is None:
            return None
        if shard not in self._headers:
            path = self.directory / shard
            if not path.is_file():
                raise CheckpointError(f"{INDEX_FILE} maps {name} to {shard}, which is not in {self.directory}")
            self._headers[shard] = read_header(path)
        found = self._headers[shard].get(name)
        if found is None:
            raise CheckpointError(f"{INDEX_FILE} maps {name} to {shard}, which does not hold it")
        return found

    def check_headers(self) -> None:
        """Every shard's header read and checked (``read_header``), and every tensor the index lists found
        in its shard: what ``info`` checks on first use, for all of them (headers only, no tensor data)."""
        for name in self.weight_map:
            self.info(name)

    def _handle(self, path: Path) -> Any | None:
        """An open ``safe_open`` of ``path``, or None when this ``safetensors`` refuses a file that holds
        a dtype older releases do not know (``NEWER_DTYPES``; the reason is kept in ``raw_reasons``).
        Any other refusal raises: the header already passed ``read_header``, so it is not a format error
        the raw path could paper over."""
        if path not in self._handles:
            try:
                self._handles[path] = self._files.enter_context(safe_open(str(path), framework="pt"))
            except Exception as e:  # safetensors raises its own SafetensorError (and others) here
                newer = sorted({t.dtype for t in read_header(path).values()} & NEWER_DTYPES)
                if not newer:
                    raise CheckpointError(f"{path}: safetensors cannot open it ({e})") from None
                self.raw_reasons[path] = f"safetensors cannot open a file holding {', '.join(newer)} ({e})"
                self._handles[path] = None
        return self._handles[path]

    def _library_handle(self, info: TensorInfo) -> Any | None:
        """The ``safe_open`` that reads ``info``, or None when its bytes are decoded here (``raw_bytes``)."""
        if self.raw_bytes or _torch_dtype(info.dtype) is None:
            return None
        return self._handle(info.file)

    def rows(self, info: TensorInfo, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``[start, stop)`` of a tensor, decoded: FP8 types to fp32, others in their own dtype."""
        stop = info.shape[0] if stop is None else stop
        handle = self._library_handle(info)
        if handle is not None:
            t = handle.get_slice(info.name)[start:stop]
            return t.to(torch.float32) if info.dtype.startswith("F8_") else t
        row_bytes = info.nbytes // max(1, info.shape[0])
        count = (stop - start) * row_bytes
        raw = np.memmap(info.file, dtype=np.uint8, mode="r", offset=info.begin + start * row_bytes, shape=(count,))
        shape = (stop - start, *info.shape[1:])
        if info.dtype == "F8_E4M3":
            return e4m3_bytes_to_float32(torch.from_numpy(np.array(raw)).view(shape))
        if info.dtype == "F8_E8M0":
            return e8m0_bytes_to_float32(torch.from_numpy(np.array(raw)).view(shape))
        if info.dtype in _RAW_NUMPY:
            t = torch.from_numpy(np.array(raw).view(_RAW_NUMPY[info.dtype])).view(shape)
            return t.view(torch.bfloat16) if info.dtype == "BF16" else t
        raise CheckpointError(f"{info.name}: cannot decode dtype {info.dtype} from raw bytes")

"""Memory-mapped access to the tensors of a (sharded) safetensors checkpoint, by name.

Tensor metadata comes from each file's JSON header, parsed here, so a file whose dtypes the
installed ``safetensors`` or torch does not know (``F8_E8M0`` on older versions) can still be
listed. Data is read through ``safetensors.safe_open`` when torch has the stored dtype, otherwise
from the raw bytes through ``numpy.memmap``; either way only the requested rows are read.
"""

from __future__ import annotations

import json
import math
import struct
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from .fp8 import e4m3_bytes_to_float32, e8m0_bytes_to_float32

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# safetensors dtype name -> (bytes per element, torch dtype name)
DTYPES: dict[str, tuple[int, str]] = {
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E8M0": (1, "float8_e8m0fnu"),
    "I8": (1, "int8"),
    "U8": (1, "uint8"),
    "BF16": (2, "bfloat16"),
    "F16": (2, "float16"),
    "F32": (4, "float32"),
    "I32": (4, "int32"),
    "I64": (8, "int64"),
    "F64": (8, "float64"),
}
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


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Every tensor of one safetensors file (8-byte little-endian header length, JSON header, data)."""
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (OSError, struct.error, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    size = path.stat().st_size
    data_start = 8 + length
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = (data_start + o for o in entry["data_offsets"])
        shape = tuple(int(n) for n in entry["shape"])
        dtype = entry["dtype"]
        if dtype in DTYPES and end - begin != math.prod(shape) * DTYPES[dtype][0]:
            raise CheckpointError(f"{path}: tensor {name} ({dtype} {list(shape)}) spans {end - begin} bytes")
        if end > size:
            raise CheckpointError(f"{path}: tensor {name} ends at byte {end}, past the end of the file ({size} bytes)")
        tensors[name] = TensorInfo(name, path, dtype, shape, begin, end)
    return tensors


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
        if not self.directory.is_dir():
            raise CheckpointError(f"checkpoint directory {self.directory} does not exist")
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{index}: no readable weight_map ({e!r})") from None
        elif (self.directory / SINGLE_FILE).is_file():
            weight_map = dict.fromkeys(read_header(self.directory / SINGLE_FILE), SINGLE_FILE)
        else:
            raise CheckpointError(f"{self.directory}: neither {INDEX_FILE} nor {SINGLE_FILE} found")
        self.weight_map = weight_map
        self.raw_bytes = raw_bytes
        self._headers: dict[str, dict[str, TensorInfo]] = {}
        self._handles: dict[Path, Any] = {}
        self._files = ExitStack()

    def __enter__(self) -> ShardedCheckpoint:
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

    def _handle(self, path: Path) -> Any | None:
        """An open ``safe_open`` of ``path``, or None when this ``safetensors`` cannot open it."""
        if path not in self._handles:
            try:
                self._handles[path] = self._files.enter_context(safe_open(str(path), framework="pt"))
            except Exception:  # e.g. a dtype this safetensors version does not know: read raw bytes
                self._handles[path] = None
        return self._handles[path]

    def _library_reads(self, info: TensorInfo) -> bool:
        return not self.raw_bytes and _torch_dtype(info.dtype) is not None and self._handle(info.file) is not None

    def rows(self, info: TensorInfo, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``[start, stop)`` of a tensor, decoded: FP8 types to fp32, others in their own dtype."""
        stop = info.shape[0] if stop is None else stop
        if self._library_reads(info):
            t = self._handle(info.file).get_slice(info.name)[start:stop]
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

"""Bad checkpoint files for the hardening tests: a valid synthetic FP8 checkpoint of one ratio-4
``tiny`` layer (two shards, an index and a ``config.json``), and generators that break it one field at
a time — the header length, the header's JSON structure, every field of a tensor entry, the offsets'
tiling of the data region, the index's shard names, ``config.json``'s fields — each with the words
the error must contain."""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsv4 import PRESETS
from fp8_checkpoint import config_json, layer_tensors, write_checkpoint

TINY = PRESETS["tiny"]
LAYER = 1
PREFIX = f"layers.{LAYER}."
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
INDEX = "model.safetensors.index.json"
# One tensor of each stored kind, and the shard that holds it
TARGETS = {
    f"{PREFIX}attn.wq_a.weight": SHARDS[0],  # F8_E4M3
    f"{PREFIX}attn.q_norm.weight": SHARDS[0],  # BF16
    f"{PREFIX}attn.indexer.compressor.ape": SHARDS[1],  # F32
    f"{PREFIX}attn.indexer.wq_b.scale": SHARDS[1],  # F8_E8M0
}


def write_valid(directory: Path) -> Path:
    """Layer 1 (ratio 4): the attention tensors in shard 1, the indexer's in shard 2."""
    tensors = layer_tensors(TINY, LAYER, 4)
    first = {k: v for k, v in tensors.items() if ".indexer." not in k}
    second = {k: v for k, v in tensors.items() if ".indexer." in k}
    return write_checkpoint(directory, [first, second], config_json(TINY, [0, 4]))


def digest(directory: Path) -> dict[str, str]:
    """sha256 of every file under ``directory``: to show a refused load changed nothing."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.rglob("*")
            if p.is_file()}  # fmt: skip


def split_file(path: Path) -> tuple[dict[str, Any], bytes]:
    """A valid safetensors file as ``(header, data)``."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join_file(path: Path, header: object, data: bytes, length: int | None = None) -> None:
    """Write ``header`` (a JSON value, or raw bytes) and ``data``, with the true header length unless
    ``length`` is given."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)


@dataclass(frozen=True)
class Corruption:
    """One way to break a checkpoint: ``apply(directory)`` edits ``file`` (relative to it) in place; the
    load must raise with ``file``'s path and every word of ``words`` in the message."""

    id: str
    file: str
    apply: Callable[[Path], object]
    words: tuple[str, ...]

    def message_words(self, directory: Path) -> tuple[str, ...]:
        return (str(directory / self.file), *self.words)


def _edit_header(shard: str, edit: Callable[[dict[str, Any], bytes], tuple[object, bytes]]) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        header, data = split_file(directory / shard)
        join_file(directory / shard, *edit(header, data))

    return apply


def _edit_entry(shard: str, name: str, edit: Callable[[dict[str, Any]], object]) -> Callable[[Path], None]:
    def change(header: dict[str, Any], data: bytes) -> tuple[object, bytes]:
        header[name] = edit(dict(header[name]))
        return header, data

    return _edit_header(shard, change)


def _set(field: str, value: object) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda entry: {**entry, field: value}


def _drop(field: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda entry: {k: v for k, v in entry.items() if k != field}


def _length(value: int | Callable[[int], int]) -> Callable[[Path], None]:
    """Rewrite the 8-byte header length (``value`` or ``value(file size)``)."""

    def apply(directory: Path) -> None:
        path = directory / SHARDS[0]
        raw = bytearray(path.read_bytes())
        raw[:8] = struct.pack("<Q", value(len(raw)) if callable(value) else value)
        path.write_bytes(bytes(raw))

    return apply


def _oversized_header(directory: Path) -> None:
    """A sparse file of 100 MB + 16 bytes whose header length is 100 MB + 1: within the file, over the limit."""
    path = directory / SHARDS[0]
    with path.open("r+b") as f:
        f.write(struct.pack("<Q", 100_000_001))
        f.truncate(100_000_016)


def _raw_header(text: bytes) -> Callable[[Path], None]:
    return _edit_header(SHARDS[0], lambda header, data: (text, data))


DEEP = 200_000  # levels of nesting in the files below: ~400 KB of brackets, valid JSON
# ~200 KB of a string of escaped quotes that never closes: malformed JSON that a string pattern that
# rescans from every quote takes minutes over (time quadratic in the size); refused at once here
UNTERMINATED = '{"hidden_size": "' + '\\"' * 100_000


def _deep(inner: str = "") -> str:
    """``inner`` nested ``DEEP`` arrays deep: valid JSON that a recursive parser cannot read."""
    return "[" * DEEP + inner + "]" * DEEP


def deep_in_object(text: str, key: str) -> str:
    """The JSON object ``text`` with one more field, ``key``, nested ``DEEP`` levels deep."""
    return text.rstrip()[:-1] + f', "{key}": {_deep()}}}'


def _duplicate_entry(header: dict[str, Any], data: bytes) -> tuple[object, bytes]:
    """q_norm listed twice, the second time with kv_norm's offsets (JSON would keep the last silently)."""
    q, kv = f"{PREFIX}attn.q_norm.weight", f"{PREFIX}attn.kv_norm.weight"
    text = json.dumps(header)[:-1] + f", {json.dumps(q)}: {json.dumps(header[kv])}}}"
    return text.encode(), data


def structure_corruptions() -> list[Corruption]:
    """The 8-byte length and the header's JSON structure (in shard 1)."""
    return [
        Corruption("length-2^33", SHARDS[0], _length(2**33), ("header length", "exceeds")),
        Corruption("length-2^60", SHARDS[0], _length(2**60), ("header length", "exceeds")),
        Corruption("length-2^63-1", SHARDS[0], _length(2**63 - 1), ("header length", "exceeds")),
        Corruption("length-2^64-1", SHARDS[0], _length(2**64 - 1), ("header length", "exceeds")),
        Corruption("length-file-size", SHARDS[0], _length(lambda size: size), ("header length", "exceeds")),
        Corruption("length-over-100MB", SHARDS[0], _oversized_header, ("header length", "100000000")),
        Corruption("length-too-short", SHARDS[0], _length(lambda size: 10), ("not valid JSON",)),
        Corruption("file-of-3-bytes", SHARDS[0], lambda d: (d / SHARDS[0]).write_bytes(b"abc"), ("too short",)),
        Corruption("header-not-utf8", SHARDS[0], _raw_header(b'{"\xff": 1}'), ("not valid JSON",)),
        Corruption("header-not-json", SHARDS[0], _raw_header(b"{not json"), ("not valid JSON",)),
        Corruption(
            "header-a-list", SHARDS[0], _edit_header(SHARDS[0], lambda h, d: (list(h.items()), d)), ("JSON object",)
        ),
        Corruption("header-a-string", SHARDS[0], _raw_header(b'"hello"'), ("JSON object", "str")),
        Corruption("header-null", SHARDS[0], _raw_header(b"null"), ("JSON object",)),
        Corruption("header-number", SHARDS[0], _raw_header(b"123"), ("JSON object",)),
        Corruption("header-deeply-nested", SHARDS[0], _raw_header(_deep().encode()), ("nested", "levels deep")),
        Corruption(
            "header-metadata-deeply-nested",
            SHARDS[0],
            _edit_header(SHARDS[0], lambda h, d: (deep_in_object(json.dumps(h), "__metadata__").encode(), d)),
            ("nested", "levels deep"),
        ),  # fmt: skip
        Corruption("header-unterminated-string", SHARDS[0], _raw_header(UNTERMINATED.encode()), ("not valid JSON",)),
        Corruption("header-nested-in-a-string", SHARDS[0], _raw_header(f'"{_deep()}"'.encode()), ("JSON object",)),
        Corruption(
            "duplicate-key",
            SHARDS[0],
            _edit_header(SHARDS[0], _duplicate_entry),
            ("appears twice",),
        ),
        Corruption(
            "metadata-a-list",
            SHARDS[0],
            _edit_header(SHARDS[0], lambda h, d: ({**h, "__metadata__": [1]}, d)),
            ("__metadata__",),
        ),
        Corruption(
            "metadata-value-int",
            SHARDS[0],
            _edit_header(SHARDS[0], lambda h, d: ({**h, "__metadata__": {"format": 1}}, d)),
            ("__metadata__",),
        ),
    ]


# (field edit id, edit, words) applied to every entry of TARGETS
_ENTRY_EDITS: list[tuple[str, Callable[[dict[str, Any]], object], tuple[str, ...]]] = [
    ("entry-a-list", lambda e: [e["dtype"], e["shape"], e["data_offsets"]], ("JSON object",)),
    ("entry-a-string", lambda e: "F32", ("JSON object",)),
    ("no-dtype", _drop("dtype"), ("dtype",)),
    ("no-shape", _drop("shape"), ("shape",)),
    ("no-data_offsets", _drop("data_offsets"), ("data_offsets",)),
    ("dtype-unknown", _set("dtype", "F9_E9M9"), ("unknown dtype", "F9_E9M9")),
    ("dtype-lowercase", _set("dtype", "f32"), ("unknown dtype",)),
    ("dtype-an-int", _set("dtype", 7), ("unknown dtype",)),
    ("dtype-wider", lambda e: {**e, "dtype": "F64" if e["dtype"] != "F64" else "F32"}, ("bytes", "span")),
    ("shape-negative", lambda e: {**e, "shape": [-e["shape"][0], *e["shape"][1:]]}, ("shape", "non-negative")),
    ("shape-float", lambda e: {**e, "shape": [float(n) for n in e["shape"]]}, ("shape",)),
    ("shape-bool", lambda e: {**e, "shape": [True] * len(e["shape"])}, ("shape",)),
    ("shape-a-string", _set("shape", "128"), ("shape",)),
    ("shape-null", _set("shape", None), ("shape",)),
    ("shape-larger", lambda e: {**e, "shape": [e["shape"][0] * 2, *e["shape"][1:]]}, ("bytes", "span")),
    ("shape-huge", lambda e: {**e, "shape": [2**62, 2**62]}, ("bytes", "span")),
    ("offsets-float", lambda e: {**e, "data_offsets": [float(o) for o in e["data_offsets"]]}, ("data_offsets",)),
    ("offsets-negative", lambda e: {**e, "data_offsets": [o - 2**20 for o in e["data_offsets"]]}, ("data_offsets",)),
    ("offsets-three", lambda e: {**e, "data_offsets": [*e["data_offsets"], 0]}, ("data_offsets",)),
    ("offsets-one", lambda e: {**e, "data_offsets": e["data_offsets"][:1]}, ("data_offsets",)),
    ("offsets-strings", lambda e: {**e, "data_offsets": [str(o) for o in e["data_offsets"]]}, ("data_offsets",)),
    ("offsets-reversed", lambda e: {**e, "data_offsets": e["data_offsets"][::-1]}, ("data_offsets",)),
    ("offsets-past-end", lambda e: {**e, "data_offsets": [o + 2**40 for o in e["data_offsets"]]}, ("data_offsets",)),
    ("offsets-shifted", lambda e: {**e, "data_offsets": [o + 2 for o in e["data_offsets"]]}, ("data_offsets",)),
    ("offsets-null", _set("data_offsets", None), ("data_offsets",)),
]


def entry_corruptions() -> Iterator[Corruption]:
    """Every field edit of ``_ENTRY_EDITS`` on every tensor of ``TARGETS``; the message must name the
    file and the tensor."""
    for name, shard in TARGETS.items():
        for edit_id, edit, words in _ENTRY_EDITS:
            yield Corruption(
                f"{name.removeprefix(PREFIX)}-{edit_id}", shard, _edit_entry(shard, name, edit), (name, *words)
            )


def _share_offsets(name: str, other: str) -> Callable[[dict[str, Any], bytes], tuple[object, bytes]]:
    """``name`` reads ``other``'s bytes (same size): its own bytes become a gap."""

    def edit(header: dict[str, Any], data: bytes) -> tuple[object, bytes]:
        header[name] = {**header[name], "data_offsets": header[other]["data_offsets"]}
        return header, data

    return edit


def _append(extra: bytes) -> Callable[[dict[str, Any], bytes], tuple[object, bytes]]:
    return lambda header, data: (header, data + extra)


def _overlap_next(header: dict[str, Any], data: bytes) -> tuple[object, bytes]:
    """The last tensor by offset grows backwards into the one before it; the file stays the same size."""
    entries = sorted((v["data_offsets"], k) for k, v in header.items() if k != "__metadata__")
    (begin, end), last = entries[-1]
    header[last] = {**header[last], "data_offsets": [begin - 2, end - 2]}
    return header, data[:-2]


def tiling_corruptions() -> list[Corruption]:
    """Offsets that are each well-formed but do not tile the data region."""
    q, kv = f"{PREFIX}attn.q_norm.weight", f"{PREFIX}attn.kv_norm.weight"
    return [
        Corruption(
            "kv_norm-shares-q_norm-bytes", SHARDS[0], _edit_header(SHARDS[0], _share_offsets(kv, q)), ("overlap",)
        ),
        Corruption(
            "q_norm-shares-kv_norm-bytes", SHARDS[0], _edit_header(SHARDS[0], _share_offsets(q, kv)), ("overlap",)
        ),
        Corruption("trailing-bytes", SHARDS[0], _edit_header(SHARDS[0], _append(b"\0" * 64)), ("cover",)),
        Corruption("last-tensor-overlaps", SHARDS[0], _edit_header(SHARDS[0], _overlap_next), ("overlap",)),
        Corruption("data-truncated", SHARDS[1], _edit_header(SHARDS[1], lambda h, d: (h, d[:-1])), ("data_offsets",)),
    ]


def _index_edit(edit: Callable[[dict[str, Any]], object]) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        index = json.loads((directory / INDEX).read_text())
        (directory / INDEX).write_text(json.dumps(edit(index)))

    return apply


def _remap(shard: object) -> Callable[[dict[str, Any]], object]:
    """Map the q_norm entry (loaded by every layer load) to ``shard``."""
    name = f"{PREFIX}attn.q_norm.weight"
    return lambda index: {**index, "weight_map": {**index["weight_map"], name: shard}}


def index_corruptions(outside: Path) -> list[Corruption]:
    """Index files whose shard names leave the directory (``outside`` holds a valid copy of shard 1,
    so following them would load) or are not file names, and malformed index files."""
    name = f"{PREFIX}attn.q_norm.weight"
    words = (name, "leaves the checkpoint directory")
    up = f"../{outside.name}/{SHARDS[0]}"
    return [
        Corruption("shard-dotdot", INDEX, _index_edit(_remap(up)), words),
        Corruption("shard-dotdot-deep", INDEX, _index_edit(_remap(f"sub/../../{outside.name}/{SHARDS[0]}")), words),
        Corruption("shard-absolute", INDEX, _index_edit(_remap(str(outside / SHARDS[0]))), words),
        Corruption("shard-backslash-dotdot", INDEX, _index_edit(_remap(up.replace("/", "\\"))), words),
        Corruption(
            "shard-windows-drive",
            INDEX,
            _index_edit(
                _remap(
                    "C:\\models\\x.safetensors",
                )
            ),
            words,
        ),
        Corruption("shard-nul", INDEX, _index_edit(_remap(SHARDS[0] + "\0.txt")), words),
        Corruption("shard-empty", INDEX, _index_edit(_remap("")), (name, "file name")),
        Corruption("shard-a-number", INDEX, _index_edit(_remap(3)), (name, "file name")),
        Corruption("shard-null", INDEX, _index_edit(_remap(None)), (name, "file name")),
        Corruption("weight_map-a-list", INDEX, _index_edit(lambda i: {**i, "weight_map": [1]}), ("weight_map",)),
        Corruption("no-weight_map", INDEX, _index_edit(lambda i: {"metadata": {}}), ("weight_map",)),
        Corruption("index-a-list", INDEX, _index_edit(lambda i: [i]), ("weight_map",)),
        Corruption("index-not-json", INDEX, lambda d: (d / INDEX).write_text("{"), ("not valid JSON",)),
        Corruption("index-deeply-nested", INDEX, lambda d: (d / INDEX).write_text(_deep()), ("nested", "levels deep")),
        Corruption(
            "index-field-deeply-nested",
            INDEX,
            lambda d: (d / INDEX).write_text(deep_in_object((d / INDEX).read_text(), "metadata_extra")),
            ("nested", "levels deep"),
        ),  # fmt: skip
    ]


def _config_edit(edit: Callable[[dict[str, Any]], object], raw: str | None = None) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        path = directory / "config.json"
        path.write_text(raw if raw is not None else json.dumps(edit(json.loads(path.read_text()))))

    return apply


def _field(field: str, value: object) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda raw: {**raw, field: value}


def _scaling(field: str, value: object) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda raw: {**raw, "rope_scaling": {**raw["rope_scaling"], field: value}}


def _drop_scaling(field: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda raw: {**raw, "rope_scaling": {k: v for k, v in raw["rope_scaling"].items() if k != field}}


def config_corruptions() -> list[Corruption]:
    """``config.json`` fields of the wrong type or out of range; the message names the file and field."""
    cases: list[tuple[str, Callable[[dict[str, Any]], object], tuple[str, ...]]] = [
        ("config-a-list", lambda raw: [raw], ("JSON object",)),
        ("config-a-string", lambda raw: "tiny", ("JSON object",)),
        ("hidden_size-null", _field("hidden_size", None), ("hidden_size",)),
        ("hidden_size-float", _field("hidden_size", 256.5), ("hidden_size",)),
        ("hidden_size-string", _field("hidden_size", "256"), ("hidden_size",)),
        ("hidden_size-bool", _field("hidden_size", True), ("hidden_size",)),
        ("head_dim-zero", _field("head_dim", 0), ("head_dim",)),
        ("index_topk-negative", _field("index_topk", -16), ("index_topk",)),
        ("max_position_embeddings-negative", _field("max_position_embeddings", -1), ("max_position_embeddings",)),
        ("sliding_window-string", _field("sliding_window", "16"), ("sliding_window",)),
        ("sliding_window-zero", _field("sliding_window", 0), ("sliding_window",)),
        ("rope_theta-zero", _field("rope_theta", 0), ("rope_theta",)),
        ("rope_theta-infinity", _field("rope_theta", math.inf), ("rope_theta",)),
        ("compress_rope_theta-nan", _field("compress_rope_theta", math.nan), ("compress_rope_theta",)),
        ("compress_rope_theta-list", _field("compress_rope_theta", [1]), ("compress_rope_theta",)),
        ("rms_norm_eps-zero", _field("rms_norm_eps", 0), ("rms_norm_eps",)),
        ("rms_norm_eps-nan", _field("rms_norm_eps", math.nan), ("rms_norm_eps",)),
        ("rms_norm_eps-zero-in-fp32", _field("rms_norm_eps", 1e-50), ("rms_norm_eps", "fp32")),
        ("rope_theta-past-a-float", _field("rope_theta", 10**400), ("rope_theta",)),  # JSON has no such limit
        ("rope_scaling-a-string", _field("rope_scaling", "yarn"), ("rope_scaling",)),
        ("rope_scaling-a-list", _field("rope_scaling", [16]), ("rope_scaling",)),
        ("rope_scaling-factor-string", _scaling("factor", "16"), ("rope_scaling.factor",)),
        ("rope_scaling-factor-negative", _scaling("factor", -16), ("rope_scaling.factor",)),
        ("rope_scaling-orig-negative", _scaling("original_max_position_embeddings", -1), ("original_max_position",)),
        ("rope_scaling-beta_fast-nan", _scaling("beta_fast", math.nan), ("rope_scaling.beta_fast",)),
        ("rope_scaling-beta_fast-negative", _scaling("beta_fast", -1e9), ("rope_scaling.beta_fast", "> 0")),
        ("rope_scaling-beta_slow-zero", _scaling("beta_slow", 0), ("rope_scaling.beta_slow", "> 0")),
        ("rope_scaling-type-linear", _scaling("type", "linear"), ("rope_scaling.type", "yarn", "linear")),
        ("rope_scaling-rope_type-dynamic", _scaling("rope_type", "dynamic"), ("rope_scaling.rope_type", "dynamic")),
        (
            "rope_scaling-factor-without-orig",
            _drop_scaling("original_max_position_embeddings"),
            ("rope_scaling.original_max_position_embeddings", "missing", "rope_scaling.factor"),
        ),
        ("qk_rope_head_dim-odd", _field("qk_rope_head_dim", 63), ("qk_rope_head_dim", "even")),
        ("qk_rope_head_dim-over-head_dim", _field("qk_rope_head_dim", 256), ("qk_rope_head_dim", "head_dim")),
        ("index_head_dim-below-rope", _field("index_head_dim", 32), ("qk_rope_head_dim", "index_head_dim")),
        ("index_head_dim-not-power-of-two", _field("index_head_dim", 96), ("index_head_dim", "power of two")),
        ("compress_rope_theta-one", _field("compress_rope_theta", 1), ("compress_rope_theta", "> 1")),
        ("rope_theta-half", _field("rope_theta", 0.5), ("rope_theta", "> 1")),
        ("index_topk-over-the-kernels", _field("index_topk", 5000), ("index_topk", "4096")),
        ("sliding_window-past-int32", _field("sliding_window", 2**31), ("sliding_window", "2^31")),
        ("max_position_embeddings-3", _field("max_position_embeddings", 3), ("max_position_embeddings", ">= 4")),
        ("quantization_config-a-list", _field("quantization_config", [128, 128]), ("quantization_config",)),
        ("compress_ratios-strings", _field("compress_ratios", ["0", "4"]), ("compress_ratios",)),
        ("compress_ratios-null-entry", _field("compress_ratios", [0, None]), ("compress_ratios",)),
        ("compress_ratios-a-dict", _field("compress_ratios", {"1": 4}), ("compress_ratios",)),
    ]
    out = [Corruption(i, "config.json", _config_edit(edit), words) for i, edit, words in cases]
    out.append(
        Corruption(
            "config-duplicate-key", "config.json",
            lambda d: (d / "config.json").write_text(
                (d / "config.json").read_text().replace('"rope_theta":', '"rope_theta": 50000,\n  "rope_theta":', 1)
            ),
            ("not valid JSON", "'rope_theta' appears twice"),
        )
    )  # fmt: skip
    out.append(Corruption("config-not-json", "config.json", _config_edit(lambda r: r, raw="{"), ("not valid JSON",)))
    out.append(
        Corruption(
            "config-unterminated-string", "config.json", _config_edit(lambda r: r, raw=UNTERMINATED),
            ("config.json", "not valid JSON", "Unterminated string"),
        )
    )  # fmt: skip
    deep = ("nested", "levels deep")
    out.append(Corruption("config-deeply-nested", "config.json", _config_edit(lambda r: r, raw=_deep()), deep))
    out.append(
        Corruption(
            "config-field-deeply-nested", "config.json",
            lambda d: (d / "config.json").write_text(deep_in_object((d / "config.json").read_text(), "rope_scaling")),
            deep,
        )
    )  # fmt: skip
    return out

"""JSON from files a user hands us (a checkpoint's index and ``config.json``, safetensors headers,
golden manifests), parsed within bounds: at most ``MAX_JSON_BYTES`` and ``MAX_JSON_DEPTH`` levels of
nesting. Python's parser recurses once per level, so a file of a few hundred KB of brackets would
otherwise end in a ``RecursionError`` instead of a message naming the file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

MAX_JSON_BYTES = 100_000_000  # safetensors' own header limit; index files of the largest models are ~10 MB
MAX_JSON_DEPTH = 64  # nesting levels; the files read here use at most 4 (header > entry > shape list)
# A JSON string literal (its brackets are not nesting), or an unterminated one up to the end of the text
# (a lone trailing backslash included): every match that starts at a quote succeeds and consumes what it
# scans, so the text is scanned once (a pattern that can fail after a long scan would rescan from every
# escaped quote inside an unterminated string: quadratic time)
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = np.zeros(256, np.int64)  # byte -> change of nesting depth
_STEP[[ord("["), ord("{")]], _STEP[[ord("]"), ord("}")]] = 1, -1


class JSONFileError(ValueError):
    """A JSON file or text that is malformed or over the bounds; the message starts with its source."""


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An ``object_pairs_hook``: a JSON object with no repeated key (``json`` would silently keep the last one)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out


def nesting_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in ``text`` (brackets inside strings do not count)."""
    brackets = _STRING.sub("", text).encode("utf-8", "surrogatepass").translate(None, _NOT_BRACKETS)
    return int(np.cumsum(_STEP[np.frombuffer(brackets, np.uint8)]).max(initial=0))


def parse_json(
    data: bytes | str, source: str | Path, object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None
) -> Any:
    """``data`` (UTF-8 bytes or text) parsed as JSON; raises ``JSONFileError`` naming ``source`` for text
    that is not UTF-8 or not JSON, more than ``MAX_JSON_BYTES``, or nested deeper than ``MAX_JSON_DEPTH``
    (``object_pairs_hook`` may refuse an object with a ``ValueError`` of its own: named the same way)."""
    if len(data) > MAX_JSON_BYTES:
        raise JSONFileError(f"{source}: {len(data)} bytes of JSON, more than the {MAX_JSON_BYTES} accepted")
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        depth = nesting_depth(text)
        if depth > MAX_JSON_DEPTH:
            raise JSONFileError(f"{source}: JSON nested {depth} levels deep, more than the {MAX_JSON_DEPTH} accepted")
        return json.loads(text, object_pairs_hook=object_pairs_hook)
    except JSONFileError:
        raise
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, a key the hook refused
        raise JSONFileError(f"{source}: not valid JSON ({e})") from None


def read_json(path: str | Path, object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None) -> Any:
    """The JSON file at ``path`` (see ``parse_json``); a file that cannot be read raises ``JSONFileError``
    too. Reads at most ``MAX_JSON_BYTES + 1`` bytes."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
    except OSError as e:
        raise JSONFileError(f"{path}: not a readable file ({e.strerror or e})") from None
    return parse_json(data, path, object_pairs_hook)

"""The bounds on a config and on the JSON files it comes from, at their exact edge: the last value a
bound allows is accepted, the next one is refused naming the field. The other tests of these checks
use values far past each bound (``index_topk`` 5000, ``max_position_embeddings`` 1), where a bound one
off goes unseen (docs/TESTING.md, "Bugs planted on purpose")."""

from __future__ import annotations

import json
import re

import pytest

import dsv4
from dsv4 import CheckpointError
from dsv4.io.checkpoint import config_from_json
from dsv4.io.json_files import MAX_JSON_DEPTH, JSONFileError, parse_json, read_json
from dsv4.ops.validate import INDEX_LIMIT, MAX_TOPK
from fp8_checkpoint import config_json

TINY = dsv4.get_config("tiny")
RATIOS = list(TINY.compress_ratios)


def test_max_position_embeddings_of_one_compressed_block_is_a_config() -> None:
    """``max_position_embeddings`` must hold one compressed block of 4 positions: 4 is accepted, 3 is not."""
    assert TINY.replace(max_position_embeddings=4).max_position_embeddings == 4
    with pytest.raises(ValueError, match="max_position_embeddings: expected >= 4"):
        TINY.replace(max_position_embeddings=3)


def test_index_topk_up_to_the_kernels_limit_is_read_from_config_json() -> None:
    raw = config_json(TINY, RATIOS)
    assert config_from_json(raw | {"index_topk": MAX_TOPK}).index_topk == MAX_TOPK
    with pytest.raises(CheckpointError, match=f"index_topk must be <= {MAX_TOPK}"):
        config_from_json(raw | {"index_topk": MAX_TOPK + 1})


def test_window_and_compressed_rows_up_to_the_int32_indices_are_read_from_config_json() -> None:
    """``sliding_window + max_position_embeddings // 4`` (the largest selected index plus its offset)
    must stay below 2^31: one below is accepted, 2^31 itself is refused."""
    raw = config_json(TINY, RATIOS)
    positions = raw["max_position_embeddings"]
    window = INDEX_LIMIT - 1 - positions // 4
    assert config_from_json(raw | {"sliding_window": window}).sliding_window == window
    with pytest.raises(CheckpointError, match="sliding_window \\+ max_position_embeddings // 4 must be < 2\\^31"):
        config_from_json(raw | {"sliding_window": window + 1})


def test_json_nested_as_deep_as_allowed_is_parsed() -> None:
    deepest = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    nested: list = []
    for _ in range(MAX_JSON_DEPTH - 1):
        nested = [nested]
    assert parse_json(deepest, "deep.json") == nested
    with pytest.raises(JSONFileError, match=f"deep.json: JSON nested {MAX_JSON_DEPTH + 1} levels deep"):
        parse_json("[" + deepest + "]", "deep.json")


def test_a_json_file_as_large_as_allowed_is_read(tmp_path, monkeypatch) -> None:
    """A file of ``MAX_JSON_BYTES`` bytes is read, one byte more is refused naming the file (the limit lowered
    to the size of a small ``config.json``)."""
    path = tmp_path / "config.json"
    text = json.dumps(config_json(TINY, RATIOS))
    path.write_text(text)
    monkeypatch.setattr("dsv4.io.json_files.MAX_JSON_BYTES", len(text))
    assert read_json(path) == json.loads(text)
    path.write_text(text + " ")
    words = f"{path}: {len(text) + 1} bytes of JSON, more than the {len(text)} accepted"
    with pytest.raises(JSONFileError, match=f"^{re.escape(words)}$"):
        read_json(path)

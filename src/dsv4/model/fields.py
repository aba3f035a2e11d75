"""Dataclasses of tensors (weights, RoPE table, state) as flat lists of named leaves, and back.

The custom ops take every tensor of an argument separately and golden files store them by name; both
walk the same field order: a dataclass's fields in declaration order, nested dataclasses expanded.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterator
from typing import Any


def leaf_kinds(kind: Any, path: str) -> Iterator[tuple[str, Any]]:
    """``(dotted path, kind)`` of every leaf of a value of type ``kind`` named ``path``; a
    non-dataclass kind is its own single leaf."""
    if dataclasses.is_dataclass(kind):
        hints = typing.get_type_hints(kind)
        for f in dataclasses.fields(kind):
            yield from leaf_kinds(hints[f.name], f"{path}.{f.name}")
    else:
        yield path, kind


def leaves(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    """``(dotted path, leaf)`` of ``value`` (a dataclass is walked in field order)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from leaves(getattr(value, f.name), f"{path}.{f.name}")
    else:
        yield path, value


def build(kind: Any, path: str, leaf: Callable[[str], Any]) -> Any:
    """The value of type ``kind`` named ``path`` whose leaf at each dotted path is ``leaf(path)``."""
    if not (isinstance(kind, type) and dataclasses.is_dataclass(kind)):
        return leaf(path)
    hints = typing.get_type_hints(kind)
    return kind(**{f.name: build(hints[f.name], f"{path}.{f.name}", leaf) for f in dataclasses.fields(kind)})

"""``argparse`` types shared by the ``dsv4`` command, the acceptance run, the benchmarks and the
examples: a bad value is a usage error naming the option (exit 2), before anything runs."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence


def int_at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An int in ``[minimum, maximum]`` (no upper bound when ``maximum`` is None)."""
    want = f"an int >= {minimum}" + ("" if maximum is None else f" and <= {maximum}")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected {want}, got {value}")
        return value

    return parse


def ints_at_least(minimum: int) -> Callable[[str], list[int]]:
    """A comma-separated list of ints, each ``>= minimum`` (``1,2,5``)."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",")]
        except ValueError:
            values = []
        if not values or min(values) < minimum:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of ints >= {minimum}, got {text!r}")
        return values

    return parse


def names_in(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """A comma-separated list of names, each one of ``choices``."""

    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        if not names or any(n not in choices for n in names):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(choices)}, got {text!r}")
        return names

    return parse


def positive_float(text: str) -> float:
    """A finite number > 0 (seconds, budgets)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def device(text: str) -> str:
    """``cpu`` or a ``cuda[:N]`` this machine has, as ``torch.device`` spells it (``dsv4.devices``)."""
    from .devices import check_device  # here: the acceptance run's parser does not load torch

    try:
        return str(check_device(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("device: ")) from None

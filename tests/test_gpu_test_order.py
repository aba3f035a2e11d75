"""The order the suite runs its tests in on a GPU (``conftest._in_turns``): compiles shared, not repeated."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from conftest import _in_turns


def test_a_gpu_runs_the_cases_of_each_function_in_turns() -> None:
    """Every function's first case, then its second, ...; each function's cases keep their order and
    every test runs once."""
    ids = ["a.py::f[1]", "a.py::f[2]", "a.py::f[3]", "a.py::g", "b.py::h[x-[1]]", "b.py::h[y]", "b.py::C::k[0]"]
    items: list[Any] = [SimpleNamespace(nodeid=i) for i in ids]  # all that _in_turns reads of a pytest.Item
    got = [item.nodeid for item in _in_turns(items)]
    assert got == [
        "a.py::f[1]", "a.py::g", "b.py::h[x-[1]]", "b.py::C::k[0]",  # first cases
        "a.py::f[2]", "b.py::h[y]",
        "a.py::f[3]",
    ]  # fmt: skip
    assert _in_turns([]) == []

"""Shared test setup: the device under test, the backends every op test runs on, and the ``full`` mark.

Without a GPU the Triton kernels run through Triton's interpreter; ``dsv4.kernels.interpreter``
chooses it, and is imported here before any test module imports a kernel.

``pytest`` runs in parallel (``-n auto`` in pyproject.toml: one pytest-xdist worker per core), and on
a CPU it leaves out the tests marked ``full``: the interpreter-heavy repeats (full-size dims, long
contexts, the rest of a grid) of code paths the default tests already take. ``pytest -m full`` runs
exactly those; on a GPU every test runs by default. docs/TESTING.md lists the commands and times.
"""

from __future__ import annotations

import os

# Before torch and numpy load their thread pools. Each worker shares the cores with the others: an
# OpenMP thread waiting for a descheduled partner sleeps instead of spinning on a core another worker
# needs (the thread counts, and so the bits of every result, stay as they are); numpy's BLAS (the
# interpreter's tl.dot) runs on one thread.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import dsv4.kernels.interpreter  # noqa: E402, F401  (before any kernel module: selects the interpreter without CUDA)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Every backend implements every op; each op test runs on all of them.
BACKENDS = ["reference", "triton"]

# A test or case that repeats, at a larger size or in another combination, a code path that a
# default test already takes: run by `pytest -m full` (and CI), left out of `pytest` on a CPU.
FULL = pytest.mark.full


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On a CPU without ``-m``, leave out the ``full`` tests (on a GPU they are cheap: all run)."""
    if DEVICE.type == "cuda" or config.option.markexpr:
        return
    full = [item for item in items if item.get_closest_marker("full")]
    if full:
        config.hook.pytest_deselected(items=full)
        items[:] = [item for item in items if not item.get_closest_marker("full")]

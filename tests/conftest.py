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
import zlib
from collections.abc import Iterator

# Before torch and numpy load their thread pools. Each worker shares the cores with the others: an
# OpenMP thread waiting for a descheduled partner sleeps instead of spinning on a core another worker
# needs (the thread counts, and so the bits of every result, stay as they are); numpy's BLAS (the
# interpreter's tl.dot) runs on one thread.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import dsv4.kernels.interpreter  # noqa: E402, F401  (before any kernel module: selects the interpreter without CUDA)
from dsv4.kernels.interpreter_speed import patch_language_once_per_launch  # noqa: E402

patch_language_once_per_launch()  # under the interpreter: the same bits, a third less of its own work

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Each op test runs on every backend (`backends_of`: one the op has no implementation in is a skip).
BACKENDS = ["reference", "triton"]


def backends_of(op: str) -> list[str]:
    """The ``BACKENDS`` that implement ``op`` (every built-in op has both; an op registered with the
    reference alone gets its Triton tests as soon as its kernel is registered)."""
    from dsv4.ops import get_op

    have = get_op(op).implementations
    return [b for b in BACKENDS if b in have]


# A test or case that repeats, at a larger size or in another combination, a code path that a
# default test already takes: run by `pytest -m full` (and CI), left out of `pytest` on a CPU.
FULL = pytest.mark.full

# A test that measures what Triton's interpreter loads, stores or launches (``dsv4.bench.interp_traffic``,
# the bench's traffic mode): on a GPU the kernels are compiled and pass none of its hooks.
INTERPRETER_TRAFFIC = pytest.mark.skipif(
    DEVICE.type == "cuda", reason="measures the loads and stores of Triton's CPU interpreter; kernels are compiled here"
)


# Modules whose tests share one expensive session fixture (an sm_90 build of every variant, a dry run,
# a bench run): all their tests go to one worker, so the fixture runs once per `pytest`. Every other
# test is handed out on its own.
ONE_WORKER_MODULES = frozenset({
    "tests/test_acceptance.py",
    "tests/test_bench.py",
    "tests/test_kernels_compile.py",
    "tests/test_kernels_qkv_proj_rope_compile.py",
    "tests/test_kernels_sparse_attn_compile.py",
    "tests/test_tune.py",
})  # fmt: skip


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """Under ``-n`` with the default ``--dist load``: tests one by one, except that a module of
    ``ONE_WORKER_MODULES`` is one unit of work (pytest-xdist's ``loadgroup`` cannot do this on
    pytest >= 9.2, which ignores the group suffix it appends to node ids)."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleOrTest(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module in ONE_WORKER_MODULES else nodeid

    return ModuleOrTest(config, log)


@pytest.fixture(autouse=True)
def _seed_of_its_own(request: pytest.FixtureRequest) -> None:
    """Every test starts torch's global generator at a seed of its own (from its id): a test that draws
    without a generator of its own gets the same inputs whichever tests ran before it on its worker."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True, scope="session")
def _kernels_keep_to_their_tensors() -> Iterator[None]:
    """Under the interpreter, every load, store and atomic of every kernel in every test must fall inside
    a tensor its launch was given (``interp_traffic.bounds_checked``; else ``OutOfBounds``):
    the interpreter reads and writes raw memory, so a mask that lets a lane past its tensor would
    otherwise pass here and fault, or read garbage, on a GPU. And every ``tl.dot`` of fp32 operands
    must multiply values tf32 holds exactly (``interp_traffic.dots_checked``; else ``InexactDot``):
    compiled, such a dot runs in tf32, which the interpreter does not."""
    from dsv4.kernels.interpreter import interpreted

    if not interpreted():
        yield
        return
    from dsv4.bench.interp_traffic import bounds_checked, dots_checked

    with bounds_checked(), dots_checked():
        yield


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On a CPU without ``-m``, leave out the ``full`` tests (on a GPU they are cheap: all run); on a GPU,
    run the tests in turns of their functions (``_in_turns``)."""
    if DEVICE.type == "cuda":
        items[:] = _in_turns(items)
        return
    if config.option.markexpr:
        return
    full = [item for item in items if item.get_closest_marker("full")]
    if full:
        config.hook.pytest_deselected(items=full)
        items[:] = [item for item in items if not item.get_closest_marker("full")]


def _in_turns(items: list[pytest.Item]) -> list[pytest.Item]:
    """The first case of every test function, then every second case, and so on (each function's cases
    in their order). On a GPU a test's time is mostly Triton compiling the variants it launches, and
    the cases of one function mostly launch the same variants: handed out in collection order, the
    workers would compile them side by side, each its own copy, where in turns one compiles and the
    later cases find it in Triton's cache. A model of the acceptance run's 14 workers over the
    compile census's per-test variants (``benchmarks/compile_census.py``) puts the step at 59 s in
    turns against 71 s in collection order (docs/TESTING.md, "On a GPU")."""
    by_function: dict[str, list[pytest.Item]] = {}
    for item in items:
        by_function.setdefault(item.nodeid.split("[", 1)[0], []).append(item)
    cases = list(by_function.values())
    return [case[turn] for turn in range(max(map(len, cases), default=0)) for case in cases if turn < len(case)]

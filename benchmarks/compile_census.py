"""The kernel variants a pytest selection compiles for sm_90, and the seconds each takes: no GPU.

On a GPU the tests compile every kernel variant they launch before they run it, and the acceptance
run's ``tests`` step is mostly those compiles. This runs a selection (by default that step's, the
acceptance plan's ``GPU_TESTS``) with every launch compiled for an H100 through ``tests/sm90.py``'s
stand-in and timed, into an empty Triton cache, and nothing launched: the tests' own checks fail (no
kernel ran), their launches and specializations are the GPU's. It prints, per kernel, the variants
compiled and the seconds they took, and per test module the seconds of its first compiles; then a
model of the GPU's tests step (``modeled_step``: its workers, each test's compiles at this CPU's speed)
in collection order and in the order a GPU runs the tests (``tests/conftest.py``'s ``_in_turns``).

    python benchmarks/compile_census.py [--json out.json] [--workers 2] [-- pytest selection and options ...]

Times are one CPU core's per compile (the workers compile side by side); the GPU machine's cores differ.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import heapq
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECORDS = "COMPILE_CENSUS_RECORDS"  # the plugin's output: one JSON file per pytest process under this folder
MODEL_TEST_S = 0.3  # a modeled test's time besides its compiles (a GPU runs a test's kernels in milliseconds)

# ----- the pytest plugin (``-p compile_census`` in the child pytest, TRITON_INTERPRET=0) -----

_records: list[tuple[str, str, str, float]] = []  # (test, kernel, variant hash, seconds in the JIT's run)
_test = {"id": ""}
_collected: list[str] = []  # the selection's tests in collection order (every worker collects them all)


def pytest_configure(config) -> None:  # noqa: ANN001
    if RECORDS not in os.environ:
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from triton.runtime.jit import JITFunction

    import sm90

    sm90._on_h100([])  # every launch compiles its sm_90 variant and runs nothing
    compile_only = JITFunction.run

    def timed(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        t0 = time.perf_counter()
        kernel = compile_only(self, *args, **kwargs)
        _records.append((_test["id"], self.fn.__name__, kernel.hash, time.perf_counter() - t0))
        return kernel

    JITFunction.run = timed


def pytest_runtest_setup(item) -> None:  # noqa: ANN001
    _test["id"] = item.nodeid


def pytest_collection_finish(session) -> None:  # noqa: ANN001
    _collected[:] = [item.nodeid for item in session.items]


def pytest_sessionfinish(session) -> None:  # noqa: ANN001
    if RECORDS in os.environ:
        Path(os.environ[RECORDS], f"{os.getpid()}.json").write_text(json.dumps([_collected, _records]))


# ----- the command -----


def census(records: list[tuple[str, str, str, float]]) -> dict:
    """Each variant's first compile (the JIT's run of a variant already built takes microseconds), per
    kernel and per test module."""
    first: dict[str, tuple[str, str, float]] = {}
    for test, kernel, variant, seconds in records:
        if variant not in first or seconds > first[variant][2]:
            first[variant] = (test, kernel, seconds)
    kernels: dict[str, dict] = collections.defaultdict(lambda: {"variants": 0, "seconds": 0.0})
    modules: dict[str, float] = collections.defaultdict(float)
    for test, kernel, seconds in first.values():
        kernels[kernel]["variants"] += 1
        kernels[kernel]["seconds"] += seconds
        modules[test.split("::")[0]] += seconds
    order = sorted(kernels, key=lambda k: -kernels[k]["seconds"])
    return {
        "variants": len(first),
        "seconds": round(sum(s for *_, s in first.values()), 1),
        "kernels": {k: {"variants": kernels[k]["variants"], "seconds": round(kernels[k]["seconds"], 1)} for k in order},
        "modules": {m: round(s, 1) for m, s in sorted(modules.items(), key=lambda x: -x[1])},
    }


def modeled_step(records: list[tuple[str, str, str, float]], order: list[str], workers: int, test_s: float) -> float:
    """Seconds until the last of ``order``'s tests ends when ``workers`` processes take the next test as
    each frees, every test taking ``test_s`` besides its compiles, and a variant is compiled by every
    worker that needs it before its first compile has ended (the workers share Triton's cache on disk,
    not their compiles in flight) and found in the cache after."""
    needs: dict[str, list[str]] = collections.defaultdict(list)  # test -> the variants it launches
    seconds: dict[str, float] = {}
    for test, _, variant, s in records:
        seconds[variant] = max(seconds.get(variant, 0.0), s)
        needs[test].append(variant)
    built: dict[str, float] = {}  # variant -> when its first compile ended
    free = [(0.0, w) for w in range(workers)]
    end = 0.0
    for test in order:
        now, worker = heapq.heappop(free)
        for variant in dict.fromkeys(needs.get(test, ())):
            if built.get(variant, float("inf")) > now:
                now += seconds[variant]
                built[variant] = min(built.get(variant, now), now)
        now += test_s
        end = max(end, now)
        heapq.heappush(free, (now, worker))
    return end


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the census here")
    parser.add_argument("--workers", type=int, default=2, help="pytest-xdist workers (0: one process)")
    parser.add_argument(
        "--model-workers", type=int, default=14,
        help="workers of the modeled GPU tests step (the acceptance run's XDIST_WORKERS on its 16-core machine)",
    )  # fmt: skip
    parser.add_argument("selection", nargs="*", help="pytest paths and options (default: the GPU tests step's files)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from dsv4.acceptance.plan import GPU, _tests

    selection = args.selection or _tests(GPU, ROOT)
    with tempfile.TemporaryDirectory() as records, tempfile.TemporaryDirectory() as cache:
        path = [str(ROOT / "src"), str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")]
        env = {
            **os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": cache, RECORDS: records,
            "PYTHONPATH": os.pathsep.join(path),
        }  # fmt: skip
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "compile_census"]
        command += ["-m", "full or not full", "-n", str(args.workers), *selection]  # a GPU runs every test
        t0 = time.perf_counter()
        subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, check=False)
        wall = time.perf_counter() - t0
        found = [json.loads(f.read_text()) for f in Path(records).glob("*.json")]
    records_found = [r for _, worker_records in found for r in worker_records]
    order: list[str] = max((collected for collected, _ in found), key=len, default=[])
    result = census(records_found)
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import _in_turns  # the order a GPU runs the tests in

    stand_ins: list[Any] = [types.SimpleNamespace(nodeid=t) for t in order]  # all that _in_turns reads of an item
    in_turns = [item.nodeid for item in _in_turns(stand_ins)]
    result["model"] = {
        "workers": args.model_workers, "seconds_a_test_besides_compiles": MODEL_TEST_S,
        "collection_order_s": round(modeled_step(records_found, order, args.model_workers, MODEL_TEST_S), 1),
        "in_turns_s": round(modeled_step(records_found, in_turns, args.model_workers, MODEL_TEST_S), 1),
    }  # fmt: skip
    print(f"{result['variants']} variants, {result['seconds']} s of compiles", end=" ")
    print(f"({wall:.0f} s wall, {args.workers} workers)")
    for kernel, row in result["kernels"].items():
        print(f"  {kernel:32s} {row['variants']:4d} variants {row['seconds']:8.1f} s")
    for module, seconds in result["modules"].items():
        print(f"  {module:48s} {seconds:8.1f} s")
    m = result["model"]
    print(f"modeled tests step, {m['workers']} workers at this CPU's compile speed: {m['collection_order_s']} s in")
    print(f"collection order, {m['in_turns_s']} s with the cases of each function in turns (the GPU's order)")
    if args.json:
        import triton

        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        meta = {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "commit": commit or None,
            "triton": triton.__version__,
            "command": " ".join(["python", "benchmarks/compile_census.py", *sys.argv[1:]]),
        }
        Path(args.json).write_text(json.dumps({"meta": meta, **result}, indent=1) + "\n")


if __name__ == "__main__":
    main()

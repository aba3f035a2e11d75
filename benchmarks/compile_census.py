"""The kernel variants a pytest selection compiles for sm_90, and the seconds each takes: no GPU.

On a GPU the tests compile every kernel variant they launch before they run it, and the acceptance
run's ``tests`` step is mostly those compiles. This runs a selection (by default that step's, the
acceptance plan's ``GPU_TESTS``) with every launch compiled for an H100 through ``tests/sm90.py``'s
stand-in and timed, into an empty Triton cache, and nothing launched: the tests' own checks fail (no
kernel ran), their launches and specializations are the GPU's. It prints, per kernel, the variants
compiled and the seconds they took, and per test module the seconds of its first compiles.

    python benchmarks/compile_census.py [--json out.json] [--workers 2] [pytest selection ...]

Times are one CPU core's per compile (the workers compile side by side); the GPU machine's cores differ.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORDS = "COMPILE_CENSUS_RECORDS"  # the plugin's output: one JSON file per pytest process under this folder

# ----- the pytest plugin (``-p compile_census`` in the child pytest, TRITON_INTERPRET=0) -----

_records: list[tuple[str, str, str, float]] = []  # (test, kernel, variant hash, seconds in the JIT's run)
_test = {"id": ""}


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


def pytest_sessionfinish(session) -> None:  # noqa: ANN001
    if RECORDS in os.environ:
        Path(os.environ[RECORDS], f"{os.getpid()}.json").write_text(json.dumps(_records))


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the census here")
    parser.add_argument("--workers", type=int, default=2, help="pytest-xdist workers (0: one process)")
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
        records_found = [r for f in Path(records).glob("*.json") for r in json.loads(f.read_text())]
    result = census(records_found)
    print(f"{result['variants']} variants, {result['seconds']} s of compiles", end=" ")
    print(f"({wall:.0f} s wall, {args.workers} workers)")
    for kernel, row in result["kernels"].items():
        print(f"  {kernel:32s} {row['variants']:4d} variants {row['seconds']:8.1f} s")
    for module, seconds in result["modules"].items():
        print(f"  {module:48s} {seconds:8.1f} s")
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

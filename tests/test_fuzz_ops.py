"""``benchmarks/fuzz_ops.py``: random cases drawn, run on both backends and judged, as a user runs it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv4.kernels import tuning
from subprocesses import run_python

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fuzz_ops.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_draws_runs_and_judges_cases(tmp_path: Path) -> None:
    """``window_kv_write`` (bit-exact by the spec) for two seconds: at least one case, every verdict
    ``ok``, each case recorded with the ``make_case`` call that rebuilds it, and the summary's count."""
    out = tmp_path / "cases.json"
    done = _run("--seconds", "2", "--seed", "0", "--ops", "window_kv_write", "--json", str(out))
    assert done.returncode == 0, done.stderr
    cases = json.loads(out.read_text())["cases"]
    assert cases and all(c["verdict"] == "ok" for c in cases)
    assert all(c["case"].startswith("make_case(get_config('tiny'), 'window_kv_write', 'decode', ") for c in cases)
    assert f"{len(cases)} cases, 0 failed (preset tiny, seed 0)" in done.stdout


def test_candidates_drawn_per_case_are_recorded_and_judged(tmp_path: Path) -> None:
    """``--candidates`` on ``qkv_proj_rope`` (whose projection, rows and q heads all declare candidates
    that run differently under the interpreter): every case's verdict ``ok``, its non-default draws
    recorded as a config file's ``kernels`` (each of them a declared candidate at its bucket), some case
    at another candidate than the default, and a summary line per kernel."""
    out = tmp_path / "cases.json"
    done = _run("--seconds", "3", "--seed", "3", "--ops", "qkv_proj_rope", "--candidates", "--json", str(out))
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    assert data["candidates"] is True and data["cases"]
    assert all(c["verdict"] == "ok" for c in data["cases"])
    drawn = [c["kernels"] for c in data["cases"]]
    assert any(drawn)
    for kernels in drawn:
        for name, buckets in kernels.items():
            tunable = tuning.TUNABLES[name]
            for key, diff in buckets.items():
                assert tunable.resolve(diff) in tunable.candidate_configs(tunable.parse_bucket(key)), (name, key)
    for name in ("qkv.projection", "qkv.rows", "qkv.q_heads"):
        assert f"  {name}: {len(data['cases'])} buckets looked up, " in done.stdout
    ran = re.search(
        r"qkv.q_heads: \d+ buckets looked up, \d+ of them at another candidate, (\d+) in parameters", done.stdout
    )
    assert ran and int(ran[1]) > 0  # the q heads' tiles, pairing or QL split: another program ran


# a run_case whose kernel reads one element past its tensor, and the verdict fuzz_ops.judge gives the case
PAST_THE_END = """
import sys
import torch
import triton
import triton.language as tl
sys.path.insert(0, sys.argv[1])
import fuzz_ops
from dsv4.model.config import get_config


@triton.jit
def _past_the_end(x_ptr, n):
    tl.store(x_ptr, tl.load(x_ptr + n))


def run_case(case, backend):
    x = torch.zeros(4)
    _past_the_end[(1,)](x, 4)
    return {}


fuzz_ops.run_case = run_case
print(fuzz_ops.judge(get_config("tiny"), "window_kv_write", 0, "cpu", 1, 2, [0], None))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the check is the interpreter's")
def test_an_access_outside_the_tensors_is_a_named_error(tmp_path: Path) -> None:
    """On the CPU a case runs under the tests' checks of the interpreter (in a process of its own, without
    the test suite's): a load past a tensor is an ``OutOfBounds`` error naming the kernel, not the
    neighbour's bytes read (or, stored, the process ended)."""
    script = tmp_path / "past_the_end.py"
    script.write_text(PAST_THE_END)
    done = run_python([str(script), str(SCRIPT.parent)], TRITON_INTERPRET="1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith('ERROR InterpreterError: OutOfBounds("_past_the_end: a load of 1 x 4 B outside')


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_cuda_refused_without_a_gpu() -> None:
    done = _run("--device", "cuda", "--seconds", "1")
    assert done.returncode == 2 and "--device cuda: no CUDA device here" in done.stderr

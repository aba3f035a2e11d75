"""``benchmarks/fuzz_ops.py``: random cases drawn, run on both backends and judged, as a user runs it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv4.acceptance.results import FUZZ_CASES_KEPT, parse_fuzz
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
    assert f"{len(cases)} cases, 0 failed (preset tiny, seed 0); 0 raised or failed at candidates alone" in done.stdout


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


# fuzz_ops.main with a judge whose verdicts are given: the first for a case's own run, the second for its
# run again at the built-in defaults (which fuzz_ops asks for right after a case that failed)
GIVEN_VERDICTS = """
import sys
sys.path.insert(0, sys.argv[1])
import fuzz_ops
from dsv4.kernels import tuning

own, at_defaults = sys.argv[2], sys.argv[3]
last = None


def judge(*case):
    global last
    if case == last:  # judged again: at the built-in defaults, whatever a config file holds
        verdict = at_defaults if tuning._STATE.defaults_only else "ERROR judged again at a config file's choice"
    else:
        verdict = own
    last = None if case == last else case
    return verdict


fuzz_ops.judge = judge
sys.argv = ["fuzz_ops.py", "--seconds", "0.3", "--ops", "window_kv_write", *sys.argv[4:]]
sys.exit(fuzz_ops.main())
"""


@pytest.mark.parametrize(
    ("own", "at_defaults", "candidates", "status"),
    [
        ("ok", "ok", True, 0),
        ("MISMATCH kv: 3 of 64 off", "ok", True, 1),  # the candidates' own failure
        ("MISMATCH kv: 3 of 64 off", "MISMATCH kv: 3 of 64 off", True, 0),  # a rounding the defaults share
        ("MISMATCH kv: 3 of 64 off", "ok", False, 0),  # no candidates drawn: nothing to tell it from a rounding
        ("ERROR RuntimeError: boom", "ERROR RuntimeError: boom", False, 1),  # an error is never a rounding
        ("MISMATCH kv: 3 of 64 off", "ERROR RuntimeError: boom", True, 1),
        ("ERROR CompilationError: at 12:8:\n    acc = tl.dot(a, b)\nunsupported", "ok", True, 1),  # several lines
    ],
)
def test_exit_status_names_errors_and_failures_of_the_candidates_alone(
    tmp_path: Path, own: str, at_defaults: str, candidates: bool, status: int
) -> None:
    """The exit status is 1 for a case that raised, or that failed at its candidates and passes at the
    defaults; failures the defaults share are printed and counted, and leave it 0. Each failing case is
    printed so that the acceptance run's parser reads it back, an error of several lines too."""
    script = tmp_path / "given_verdicts.py"
    script.write_text(GIVEN_VERDICTS)
    args = [str(script), str(SCRIPT.parent), own, at_defaults, *(["--candidates"] if candidates else [])]
    done = run_python(args, TRITON_INTERPRET="1")
    assert done.returncode == status, done.stderr
    summary = re.search(
        r"^(\d+) cases, (\d+) failed \(preset tiny, seed 0\); (\d+) raised or failed", done.stdout, re.M
    )
    assert summary, done.stdout[-2000:]
    cases, failed, findings = map(int, summary.groups())
    assert cases > 0
    assert failed == (0 if own == "ok" else cases)
    assert findings == (cases if status else 0)
    if own != "ok":
        first, *more = own.splitlines()
        assert done.stdout.count(f"{first}\n  make_case(get_config('tiny'), 'window_kv_write'") == cases
        assert all(f"\n    {line}\n" in done.stdout for line in more)
        assert (f"at the defaults: {at_defaults}" in done.stdout) == candidates
        listed = parse_fuzz({}, done.stdout)["failures"]
        assert len(listed) == min(cases, FUZZ_CASES_KEPT)
        assert all(f["verdict"] == first and f["case"].startswith("make_case(") for f in listed)
        assert all(f["defaults"] == (at_defaults if candidates else None) for f in listed)


# fuzz_ops.main with a judge that passes two cases and is interrupted (Ctrl-C, a runner's time limit) in the
# third
INTERRUPTED_IN_THE_THIRD_CASE = """
import sys
sys.path.insert(0, sys.argv[1])
import fuzz_ops

calls, first = 0, sys.argv[3]


def judge(*case):
    global calls
    calls += 1
    if calls == 3:
        raise KeyboardInterrupt
    return first if calls == 1 else "ok"


fuzz_ops.judge = judge
sys.argv = ["fuzz_ops.py", "--seconds", "60", "--ops", "window_kv_write", "--json", sys.argv[2]]
sys.exit(fuzz_ops.main())
"""


@pytest.mark.parametrize(("first", "status"), [("ok", 130), ("ERROR RuntimeError: boom", 1)])
def test_an_interrupted_run_reports_the_cases_judged(first: str, status: int, tmp_path: Path) -> None:
    """Interrupted inside a case, the run still prints its summary and writes its JSON, without the
    case in progress, and exits 130; 1 when a case judged before raised (a finding outranks the
    interruption)."""
    script, out = tmp_path / "interrupted.py", tmp_path / "cases.json"
    script.write_text(INTERRUPTED_IN_THE_THIRD_CASE)
    done = run_python([str(script), str(SCRIPT.parent), str(out), first], TRITON_INTERPRET="1")
    assert done.returncode == status, done.stderr
    assert "interrupted: the case in progress is left out" in done.stdout
    n = int(first != "ok")
    assert f"2 cases, {n} failed (preset tiny, seed 0); {n} raised or failed at candidates alone" in done.stdout
    assert len(json.loads(out.read_text())["cases"]) == 2


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--seconds", "0"], "--seconds"), (["--seconds", "-1"], "--seconds"), (["--seconds", "nan"], "--seconds"),
        (["--json", "{tmp}"], "is a directory"), (["--json", "{tmp}/missing/cases.json"], "does not exist"),
        (["--batches", "x"], "ints >= 1"), (["--batches", "2,0"], "ints >= 1"), (["--seqs", "0"], "ints >= 1"),
        (["--ops", "bogus"], "window_kv_write"), (["--preset", "bogus"], "unknown preset 'bogus'"),
        (["--max-start", "-1"], "an int >= 0"), (["--max-start", "3840"], "4352 positions (the start, the longest"),
        (["--max-start", "1000", "--seqs", "3096"], "4352 positions"),
    ],
    ids=["seconds=0", "seconds=-1", "seconds=nan", "json-a-directory", "json-in-a-missing-directory", "batches=x",
         "batches=2,0", "seqs=0", "ops=bogus", "preset=bogus", "max-start=-1", "max-start-past-tiny",
         "a-step-past-tiny"],
)  # fmt: skip
def test_bad_arguments_are_refused_before_any_case(args: list[str], words: str, tmp_path: Path) -> None:
    """``--seconds 0`` judged no case and exited 0; a ``--json`` that cannot be written failed after the
    whole run; ``--batches 0`` or ``--seqs 0`` judged every case of the time given as failed, and an
    unknown op or a B that is not a number ended in a traceback. Each is refused first: exit 2, the
    argument named, no case drawn, nothing written. ``tiny`` has 4,096 positions: ``--max-start 3839``
    fits (a start up to 3,840, one past it at a boundary, and a pool block of room), 3,840 does not, nor a
    start of 1,000 with a step of 3,096."""
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    done = _run("--ops", "window_kv_write", "--seconds", "2", *args)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert args[0] in done.stderr and words in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == "" and list(tmp_path.iterdir()) == []


def test_a_run_that_judged_no_case_exits_1() -> None:
    """A time too short for even one case (a deadline that has passed by the first check) compared nothing:
    exit 1, saying so, not a run that passed."""
    done = _run("--ops", "window_kv_write", "--seconds", "1e-12")
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert done.stdout.startswith("0 cases, 0 failed") and "no case judged in --seconds 1e-12" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_cuda_refused_without_a_gpu() -> None:
    done = _run("--device", "cuda", "--seconds", "1")
    assert done.returncode == 2 and "argument --device: 'cuda', but CUDA is not available" in done.stderr


# fuzz_ops.main with a judge that records what it is asked and passes every case at once: what is drawn
RECORDED_DRAWS = """
import json
import sys
sys.path.insert(0, sys.argv[1])
import fuzz_ops

asked = []


def judge(cfg, op, seed, device, b, s, starts, kind, positions):
    asked.append({"op": op, "b": b, "s": s, "starts": starts, "kind": kind, "positions": positions})
    return "ok"


fuzz_ops.judge = judge
out = __file__ + ".asked.json"
sys.argv = ["fuzz_ops.py", "--seconds", "1", "--seed", "5", *sys.argv[2:]]
try:
    fuzz_ops.main()
finally:
    open(out, "w").write(json.dumps(asked))
"""


def _recorded_draws(tmp_path: Path, *argv: str) -> tuple[list[dict], dict]:
    """``fuzz_ops.py argv`` with ``RECORDED_DRAWS``'s judge -> (what it was asked, the JSON it wrote)."""
    script, out = tmp_path / "draws.py", tmp_path / "cases.json"
    script.write_text(RECORDED_DRAWS)
    done = run_python([str(script), str(SCRIPT.parent), *argv, "--json", str(out)], TRITON_INTERPRET="1")
    assert done.returncode == 0, done.stderr
    asked, got = json.loads(Path(f"{script}.asked.json").read_text()), json.loads(out.read_text())
    assert len(asked) == len(got["cases"]) > 100
    return asked, got


def test_the_draws_cover_the_options_given_and_the_printed_call_is_the_case(tmp_path: Path) -> None:
    """Every kind of each op, every B of ``--batches`` and every S of ``--seqs`` (and no other), and each
    case recorded with the ``make_case`` call of the very draw judged."""
    argv = ["--ops", "sparse_attn,kv_compressor", "--batches", "2,3", "--seqs", "5,17"]
    asked, got = _recorded_draws(tmp_path, *argv)
    cases = got["cases"]
    assert {(a["op"], a["kind"]) for a in asked} == {("sparse_attn", k) for k in ("csa", "hca", "swa")} | {
        ("kv_compressor", k) for k in ("csa", "hca")
    }
    assert {a["b"] for a in asked} == {2, 3} and {a["s"] for a in asked} == {5, 17}
    for a, c in zip(asked, cases, strict=True):
        call = f"batch={a['b']}, seq={a['s']}, start_pos={a['starts']}, kind={a['kind']!r}, max_position=2304)"
        assert f"'{a['op']}', 'decode', " in c["case"] and call in c["case"], (a, c["case"])
        assert a["positions"] == 2304  # the positions of the runs TESTING.md lists, whose calls rebuild them


def test_late_starts_are_drawn_up_to_max_start(tmp_path: Path) -> None:
    """``--max-start 20000`` at a flash rank: starts up to 20,000 (and one past a boundary), at and next to
    the boundaries as below it, every case holding 20,480 positions (20,000 and a pool block, in blocks)."""
    asked, got = _recorded_draws(tmp_path, "--preset", "flash/tp8", "--max-start", "20000", "--batches", "3")
    assert got["max_start"] == 20000
    starts = [p for a in asked for p in a["starts"]]
    assert all(0 <= p <= 20001 for p in starts) and {a["positions"] for a in asked} == {20480}
    assert sum(p > 16384 for p in starts) > len(starts) // 10  # the indexer's rows of over 4,096 keys
    assert sum(p % 256 == 0 for p in starts) > len(starts) // 80
    assert all("max_position=20480)" in c["case"] for c in got["cases"])


def test_a_late_start_runs_the_chunked_top_k(tmp_path: Path) -> None:
    """A row of 4,416 keys (start 17,664 at a flash rank, seed 27's first case), judged like any other:
    the top-k selects it in chunks (``topk.select_chunks`` looked up), and the case passes."""
    out = tmp_path / "cases.json"
    args = ["--preset", "flash/tp8", "--ops", "indexer", "--max-start", "20000", "--batches", "1", "--seqs", "1"]
    done = _run(*args, "--candidates", "--seconds", "1", "--seed", "27", "--json", str(out))
    assert done.returncode == 0, (done.stdout, done.stderr)
    cases = json.loads(out.read_text())["cases"]
    assert "start_pos=[17664]" in cases[0]["case"] and all(c["verdict"] == "ok" for c in cases)
    assert re.search(r"topk\.select_chunks: [1-9]\d* buckets looked up", done.stdout), done.stdout


DRAWN_STARTS = """
import random
import sys
sys.path.insert(0, sys.argv[1])
import fuzz_ops

rng = random.Random(0)
print(" ".join(str(fuzz_ops.draw_start(rng)) for _ in range(4000)))
"""


def test_half_the_starts_are_at_or_next_to_a_boundary(tmp_path: Path) -> None:
    """Each boundary (4, 16, 64, 128, 256) is drawn and, beside it, its two positions below, itself and the
    one above: a start exactly on a boundary of 256 is about one draw in 40, not one in 256."""
    script = tmp_path / "starts.py"
    script.write_text(DRAWN_STARTS)
    done = run_python([str(script), str(SCRIPT.parent)], TRITON_INTERPRET="1")
    assert done.returncode == 0, done.stderr
    starts = [int(v) for v in done.stdout.split()]
    assert all(0 <= p <= 2000 + 1 for p in starts)
    for m in (128, 256):
        for offset in (-2, -1, 0, 1):
            assert sum(1 for p in starts if p > 2 and (p - offset) % m == 0) > 4000 // 256, (m, offset)
    assert sum(1 for p in starts if p and p % 256 == 0) > 4000 // 80


INEXACT_DOT = """
import sys
import torch
import triton
import triton.language as tl
sys.path.insert(0, sys.argv[1])
import fuzz_ops
from dsv4.model.config import get_config


@triton.jit
def _fp32_dot(a_ptr, out_ptr):
    r = tl.arange(0, 16)
    a = tl.load(a_ptr + r[:, None] * 16 + r[None, :])
    tl.store(out_ptr + r[:, None] * 16 + r[None, :], tl.dot(a, a))


def run_case(case, backend):
    a = torch.full((16, 16), 1 + 2**-20)  # not a tf32 value: a GPU's tf32 dot would round it
    _fp32_dot[(1,)](a, torch.empty(16, 16))
    return {}


fuzz_ops.run_case = run_case
print(fuzz_ops.judge(get_config("tiny"), "window_kv_write", 0, "cpu", 1, 2, [0], None))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the check is the interpreter's")
def test_an_fp32_dot_that_tf32_would_round_is_a_named_error(tmp_path: Path) -> None:
    script = tmp_path / "inexact_dot.py"
    script.write_text(INEXACT_DOT)
    done = run_python([str(script), str(SCRIPT.parent)], TRITON_INTERPRET="1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ERROR ") and "InexactDot" in done.stdout and "_fp32_dot" in done.stdout

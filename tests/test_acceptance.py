"""The GPU acceptance run (``benchmarks/gpu_acceptance.sh``), checked on the CPU.

The dry run drives every step of the real run with the ``tiny`` preset; with an injected failing
step the rest must still run and the summary and record must be complete. The budget and the
per-step timeout are checked on steps that sleep; the summary's merging of bench runs, absent
figures and targets on a hand-built record; the output parsers on hand-written output.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from dsv4.acceptance.__main__ import main
from dsv4.acceptance.out_dir import KIND, RECORD
from dsv4.acceptance.plan import DRY, GPU, OPS, TUNE_MARGIN_S, Paths, Step, build_plan
from dsv4.acceptance.results import (
    parse_checkpoint,
    parse_decode_loop,
    parse_fuzz,
    parse_ncu,
    parse_tests,
    parse_tune,
)
from dsv4.acceptance.runner import KILL_GRACE_S, OUTPUTS, Runner
from dsv4.acceptance.summary import render
from subprocesses import ROOT, run_python

# What the device tool brings back: at most 8 files, names of letters, digits, '.', '_', '-'
MAX_FILES = 8
NAME = re.compile(r"^[A-Za-z0-9._-]+$")
# parse_ncu's error when ncu printed no CSV rows
NCU_NO_CSV = "ncu printed no CSV (no kernel matched, or profiling was not permitted: see log.txt)"


def _tables(markdown: str) -> list[list[str]]:
    """Every Markdown table (consecutive lines starting with '|')."""
    tables, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables


def _cells(line: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def _assert_well_formed(markdown: str) -> None:
    """Each table has a header, an alignment row and rows of the header's width."""
    tables = _tables(markdown)
    assert tables
    for table in tables:
        width = len(_cells(table[0]))
        assert all(re.fullmatch(r"-+:?|:?-+", c) for c in _cells(table[1])), table[:2]
        assert all(len(_cells(row)) == width for row in table), table


def _step_rows(markdown: str) -> dict[str, list[str]]:
    steps = next(t for t in _tables(markdown) if _cells(t[0])[:2] == ["#", "step"])
    return {_cells(row)[1].strip("`"): _cells(row) for row in steps[2:]}


@pytest.fixture(scope="session")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path, float]:
    """The whole dry run through the shell entry point, with a failing step injected first."""
    out = tmp_path_factory.mktemp("acceptance")
    # its pytest step (two small test files) in one process: worker start-ups would cost more than the tests
    env = {**os.environ, "PYTHON": sys.executable, "PYTEST_XDIST_AUTO_NUM_WORKERS": "0"}
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_acceptance.sh"), str(out), "--dry-run", "--inject-failure"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    print(f"dry run: {seconds:.1f} s wall")
    return proc, out, seconds


def test_dry_run_keeps_going_after_a_failing_step(dry_run) -> None:
    proc, out, _ = dry_run
    assert proc.returncode == 1, proc.stderr[-2000:]  # the injected failure
    record = json.loads((out / "acceptance.json").read_text())
    names = [s["name"] for s in record["steps"]]
    assert names[:4] == ["environment", "injected_failure", "tests", "bench_decode"]
    status = {s["name"]: s for s in record["steps"]}
    assert status["injected_failure"]["status"] == "failed"
    assert status["injected_failure"]["returncodes"] == [1]
    after = record["steps"][2:]
    assert all(s["status"] in ("ok", "skipped") for s in after), [(s["name"], s["status"]) for s in after]
    ran = [s["name"] for s in after if s["status"] == "ok"]
    assert {
        "tests",
        "bench_decode",
        "probe",
        "tune",
        "decode_graph",
        "attention_graph",
        "trace",
        "bench_prefill",
        "checkpoint",
        "fuzz",
    } <= set(ran)
    assert (status["ncu"]["status"] == "skipped") == (shutil.which("ncu") is None)
    assert all(not s.get("parse_error") for s in record["steps"]), [s.get("parse_error") for s in record["steps"]]
    assert record["finished"] and record["dry_run"] is True
    assert record["elapsed_s"] < record["budget_s"]


def test_dry_run_record_holds_every_figure(dry_run) -> None:
    _, out, _ = dry_run
    record = json.loads((out / "acceptance.json").read_text())
    import torch

    assert record["environment"]["torch"] == torch.__version__
    steps = {s["name"]: s for s in record["steps"]}
    tests = steps["tests"]["result"]
    assert tests["passed"] == tests["total"] > 0 and tests["failures"] == []
    timings = steps["bench_decode"]["result"]["bench"]["timings"]
    assert {(t["backend"], t["status"], t["check"]) for t in timings} == {
        ("triton", "ok", "ok"),
        ("reference", "ok", "is the reference"),
        ("library", "ok", "ok"),
    }
    assert all(r["check"] == "ok" for r in steps["probe"]["result"]["probe"]["rows"])
    tune = steps["tune"]["result"]
    assert {b["kernel"] for b in tune["tune"]["buckets"]} == {"qkv.rows", "qkv.q_heads"}
    assert all(
        v["check"] in ("bit-identical", "within tolerance") for b in tune["tune"]["buckets"] for v in b["variants"]
    )
    assert tune["config"]["file"] == "kernel-config.json" and tune["config"]["device"] == "cpu"
    assert steps["decode_graph"]["result"]["median_ms"]["eager"] > 0
    assert set(steps["attention_graph"]["result"]["median_ms"]) == {"eager", "graph"}
    assert set(steps["attention_graph"]["result"]["back_to_back_ms"]) == {"eager", "graph"}
    assert set(steps["attention_graph"]["result"]["host_ms"]) == {"eager", "graph"}
    with gzip.open(out / "trace.json.gz") as f:
        assert json.load(f)["traceEvents"]
    # the dry run's checkpoint layer runs on the reference (checkpoint_backend): nothing compared, and it says so
    assert steps["checkpoint"]["result"]["run_result"].startswith("on the reference alone: nothing compared")
    assert steps["checkpoint"]["result"]["load_s"] >= 0 and steps["checkpoint"]["result"]["loaded_mib"] > 0
    fuzz = steps["fuzz"]["result"]
    assert fuzz["cases"] > 0 and fuzz["findings"] == 0 and fuzz["preset"] == "tiny"
    assert [o["op"] for o in fuzz["ops"]] == ["qkv_proj_rope"] and fuzz["ops"][0]["cases"] == fuzz["cases"]
    assert {k["kernel"] for k in fuzz["kernels"]} >= {"qkv.projection", "qkv.rows", "qkv.q_heads"}


def test_dry_run_output_fits_what_the_device_returns(dry_run) -> None:
    _, out, _ = dry_run
    files = list(out.iterdir())
    assert all(f.is_file() and NAME.match(f.name) for f in files), files
    assert len(files) <= MAX_FILES
    assert {"summary.md", "acceptance.json", "log.txt", "junit.xml", "trace.json.gz", "kernel-config.json"} <= {
        f.name for f in files
    }
    assert all(f.stat().st_size < 16 << 20 for f in files)


def test_dry_run_summary_is_ready_to_paste(dry_run) -> None:
    proc, out, _ = dry_run
    summary = (out / "summary.md").read_text()
    _assert_well_formed(summary)
    record = json.loads((out / "acceptance.json").read_text())
    rows = _step_rows(summary)
    assert list(rows) == [s["name"] for s in record["steps"]]
    assert rows["injected_failure"][2] == "failed" and rows["checkpoint"][2] == "ok"
    tests = record["steps"][2]["result"]
    assert f"**{tests['passed']} passed, 0 failed, 0 errors, 0 skipped**" in summary
    timing = next(t for t in _tables(summary) if "median µs" in _cells(t[0]))
    header = _cells(timing[0])
    triton = next(dict(zip(header, _cells(r), strict=True)) for r in timing[2:] if "| triton |" in r)
    assert triton["op"] == "qkv_proj_rope" and triton["check"] == "ok" and float(triton["median µs"]) > 0
    assert "Dry run" in summary and "not measured in this run" in summary  # no flash shape on the CPU
    loop = next(t for t in _tables(summary) if "host ms per call" in _cells(t[0]))
    assert [_cells(r)[0] for r in loop[2:]] == ["eager", "graph"]  # the attention step's modes, each with its figures
    assert all(float(c) > 0 for r in loop[2:] for c in _cells(r)[1:])
    assert summary in proc.stdout  # the summary is printed last


def test_budget_stops_new_steps(tmp_path) -> None:
    """A 2 s budget (dry mode from the environment variable): the first step is stopped when it
    runs out, nothing after it starts, and the summary is still written."""
    t0 = time.perf_counter()
    proc = run_python(["-m", "dsv4.acceptance", str(tmp_path), "--budget-s", "2"], DSV4_ACCEPTANCE_DRY="1")
    assert time.perf_counter() - t0 < 60
    assert proc.returncode == 1
    record = json.loads((tmp_path / "acceptance.json").read_text())
    assert record["dry_run"] and record["elapsed_s"] <= 2 + sum(KILL_GRACE_S) + 1
    later = record["steps"][1:]
    assert all(s["status"] in ("not run", "skipped") for s in later)
    assert any("budget spent" in s["reason"] for s in later)
    rows = _step_rows((tmp_path / "summary.md").read_text())
    assert rows["tests"][2] == "not run"


def _runner(tmp_path: Path, steps: list[Step], budget_s: float) -> Runner:
    (tmp_path / "work").mkdir()
    paths = Paths(root=ROOT, out=tmp_path, work=tmp_path / "work", python=sys.executable)
    return Runner(steps, paths, budget_s, {"dry_run": False, "command": "test"})


def _python_step(name: str, code: str, timeout_s: float) -> Step:
    return Step(name, name, ((sys.executable, "-c", code),), timeout_s, min_s=0.5)


def test_a_failed_step_is_parsed_and_its_last_lines_are_echoed(tmp_path, capsys, monkeypatch) -> None:
    """A step that exits 1 still has its output parsed (a tests step's counts are what failed), and the
    terminal shows its last lines, where the error is, not its first."""
    from dsv4.acceptance import runner as runner_module

    monkeypatch.setitem(
        runner_module.PARSERS, "lines", lambda files, log: {"lines": len(re.findall(r"^line \d+$", log, re.M))}
    )
    code = "import sys\nfor i in range(40): print(f'line {i}')\nsys.exit(1)"
    step = Step("fails", "fails", ((sys.executable, "-c", code),), 30, min_s=0.5, parse="lines")
    runner = _runner(tmp_path, [step], budget_s=60)
    assert runner.run() == 1
    (entry,) = runner.record["steps"]
    assert entry["status"] == "failed" and entry["result"] == {"lines": 40}
    echoed = [line.strip() for line in capsys.readouterr().out.splitlines() if line.startswith("    line ")]
    assert echoed == [f"line {i}" for i in range(25, 40)]


def test_a_step_past_its_timeout_is_stopped_and_the_next_one_runs(tmp_path) -> None:
    hang = _python_step("hang", "import time; time.sleep(60)", timeout_s=1)
    after = _python_step("after", "print('after the hang')", timeout_s=30)
    runner = _runner(tmp_path, [hang, after], budget_s=60)
    assert runner.run() == 1
    steps = {s["name"]: s for s in runner.record["steps"]}
    assert steps["hang"]["status"] == "timeout" and steps["hang"]["seconds"] < 1 + KILL_GRACE_S[0]
    assert steps["hang"]["reason"] == "stopped at its time limit (1 s)"
    assert steps["after"]["status"] == "ok"
    assert "after the hang" in (tmp_path / "log.txt").read_text()
    _assert_well_formed((tmp_path / "summary.md").read_text())


def test_the_budget_stops_a_running_step_and_no_other_starts(tmp_path) -> None:
    hang = _python_step("hang", "import time; time.sleep(60)", timeout_s=100)
    after = _python_step("after", "print('never')", timeout_s=30)
    runner = _runner(tmp_path, [hang, after], budget_s=1.5)
    runner.run()
    steps = {s["name"]: s for s in runner.record["steps"]}
    assert steps["hang"]["status"] == "timeout" and steps["hang"]["seconds"] < 1.5 + KILL_GRACE_S[0]
    assert steps["hang"]["reason"].startswith("stopped at the end of the budget")
    assert steps["after"]["status"] == "not run" and "budget spent" in steps["after"]["reason"]
    assert "never" not in (tmp_path / "log.txt").read_text()


def test_a_step_stops_at_its_first_command_that_fails(tmp_path) -> None:
    """A step of several commands (the checkpoint's write, load and run) stops at the first that fails:
    the step failed, with that command's exit code, and the commands after it do not run."""
    after = tmp_path / "after"
    commands = ((sys.executable, "-c", "raise SystemExit(3)"), (sys.executable, "-c", f"open({str(after)!r}, 'w')"))
    runner = _runner(tmp_path, [Step("two", "two", commands, 30, 0.5)], budget_s=60)
    assert runner.run() == 1
    (step,) = runner.record["steps"]
    assert (step["status"], step["reason"], step["returncodes"]) == ("failed", "exit code 3 from command 1 of 2", [3])
    assert not after.exists()


def test_a_long_step_log_keeps_its_head_and_its_tail(tmp_path, monkeypatch) -> None:
    """A step's output past the log's cap keeps its start and its end (where an error is), with the count
    of characters left out between them."""
    import dsv4.acceptance.runner as runner_module

    monkeypatch.setattr(runner_module, "LOG_CAP_BYTES", 200)
    code = "print('HEAD-LINE' + 'x' * 1000 + 'Traceback: the error at the end')"
    runner = _runner(tmp_path, [_python_step("long", code, timeout_s=30)], budget_s=60)
    assert runner.run() == 0
    log = (tmp_path / "log.txt").read_text()
    assert "HEAD-LINE" in log and "Traceback: the error at the end" in log
    assert re.search(r"\[\.\.\. (\d+) characters left out \.\.\.\]", log)
    assert log.count("HEAD-LINE") == 1 and log.count("x" * 101) == 0


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (killed, waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _assert_stopped(pid: int, what: str) -> None:
    """Process ``pid`` no longer runs (``what`` says which, if it does); killed either way, so a failing
    test leaves nothing behind."""
    try:
        assert not _running(pid), what
    finally:
        if _running(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_a_worker_that_outlives_its_step_is_stopped_with_it(tmp_path) -> None:
    """A step's first process that exits on SIGINT while a worker of its process group ignores it: the
    worker is killed before the next step starts (it would hold the GPU into the steps after it)."""
    pid_file = tmp_path / "worker.pid"
    worker = (
        "import os, signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    )
    leader = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {worker!r}]); time.sleep(60)"
    check = f"import sys; sys.exit(0 if open({str(pid_file)!r}).read() else 1)"
    runner = _runner(tmp_path, [_python_step("hang", leader, timeout_s=2), _python_step("next", check, 30)], 60)
    runner.run()
    pid = int(pid_file.read_text())
    _assert_stopped(pid, "the worker of a stopped step still runs")


def test_a_signal_during_a_parse_stops_the_run(tmp_path, monkeypatch) -> None:
    """SIGTERM (the machine's time is up) while a step's output is parsed ends the run: a parser's
    ``except Exception`` does not take it for a parse error and go on with the next steps."""
    from dsv4.acceptance import runner as runner_module

    def parse_and_get_stopped(files: dict[str, str], log: str) -> dict[str, Any]:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises in here
        return {}

    monkeypatch.setitem(runner_module.PARSERS, "stopped", parse_and_get_stopped)
    first = Step("first", "first", ((sys.executable, "-c", "print(1)"),), 30, 0.5, parse="stopped")
    runner = _runner(tmp_path, [first, _python_step("second", "print('second ran')", 30)], 60)
    assert runner.run() == 1
    steps = {s["name"]: s for s in runner.record["steps"]}
    assert "parse_error" not in steps["first"]
    assert steps["second"]["status"] == "not run" and steps["second"]["reason"] == "the run was interrupted"


def test_a_command_that_cannot_start_fails_its_step_and_the_next_one_runs(tmp_path) -> None:
    """A step whose program is not there (a tool missing on the rented machine) fails, saying it could not
    start it, with no exit code; the steps after it still run."""
    missing = str(tmp_path / "no-such-tool")
    absent = Step("absent", "absent", ((missing, "--version"),), 30, 0.5)
    runner = _runner(tmp_path, [absent, _python_step("after", "print('after the absent tool')", 30)], 60)
    assert runner.run() == 1
    steps = {s["name"]: s for s in runner.record["steps"]}
    assert (steps["absent"]["status"], steps["absent"]["returncodes"]) == ("failed", [None])
    assert steps["absent"]["reason"].startswith(f"could not start {missing}: [Errno 2] No such file or directory")
    assert steps["after"]["status"] == "ok"
    row = _step_rows((tmp_path / "summary.md").read_text())["absent"]
    assert row[2] == "failed" and row[4] == steps["absent"]["reason"]


@pytest.mark.parametrize(
    ("ignored", "stopped_by"), [(("SIGINT",), signal.SIGTERM), (("SIGINT", "SIGTERM"), signal.SIGKILL)]
)
def test_a_step_that_ignores_a_signal_is_sent_the_next_one(
    ignored: tuple[str, ...], stopped_by: signal.Signals, tmp_path, monkeypatch
) -> None:
    """A step past its timeout that ignores SIGINT gets SIGTERM after the grace period, and one that ignores
    SIGTERM too gets SIGKILL: it is stopped all the same and the next step runs."""
    from dsv4.acceptance import runner as runner_module

    monkeypatch.setattr(runner_module, "KILL_GRACE_S", (0.2, 0.2))
    ready = tmp_path / "ready"
    ignore = "; ".join(f"signal.signal(signal.{name}, signal.SIG_IGN)" for name in ignored)
    code = f"import signal, time; {ignore}; open({str(ready)!r}, 'w').close(); time.sleep(30)"
    runner = _runner(tmp_path, [_python_step("deaf", code, 2), _python_step("after", "print('after')", 30)], 60)
    assert runner.run() == 1
    steps = {s["name"]: s for s in runner.record["steps"]}
    assert ready.exists()
    assert (steps["deaf"]["status"], steps["deaf"]["returncodes"]) == ("timeout", [-stopped_by])
    assert steps["deaf"]["seconds"] < 2 + 0.4 + 2
    assert steps["after"]["status"] == "ok"


def test_stopping_a_step_whose_processes_are_gone_does_nothing() -> None:
    """A signal that reaches the runner as its step ends: the step's process group is gone by the time it is
    stopped, and stopping it is quiet, not a ``ProcessLookupError`` that would lose the record."""
    from dsv4.acceptance.runner import _stop

    proc = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    proc.wait()
    _stop(proc)
    assert proc.returncode == 0


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_a_signal_while_a_step_runs_stops_the_step_and_the_run(tmp_path) -> None:
    """SIGTERM to the runner (the machine's time is up) while a step runs: the step's process is stopped, the
    step is recorded as interrupted with its output in the log, no later step starts, and the record and
    the summary are written."""
    pid_file = tmp_path / "step.pid"
    code = (
        f"import os, signal, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
        "print('step started', flush=True); os.kill(os.getppid(), signal.SIGTERM); time.sleep(60)"
    )
    runner = _runner(tmp_path, [_python_step("first", code, 30), _python_step("second", "print('second ran')", 30)], 60)
    assert runner.run() == 1
    pid = int(pid_file.read_text())
    _assert_stopped(pid, "the interrupted step still runs")
    steps = {s["name"]: s for s in json.loads((tmp_path / RECORD).read_text())["steps"]}
    assert (steps["first"]["status"], steps["first"]["reason"]) == ("interrupted", "the run was interrupted (SIGTERM)")
    assert (steps["second"]["status"], steps["second"]["reason"]) == ("not run", "the run was interrupted")
    log = (tmp_path / "log.txt").read_text()
    assert "===== first: interrupted (the run was interrupted (SIGTERM)) in " in log and "step started" in log
    assert "second ran" not in log
    assert _step_rows((tmp_path / "summary.md").read_text())["first"][2] == "interrupted"


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_a_step_dies_with_the_runner(tmp_path) -> None:
    """Each step's first process is set to get SIGKILL when the runner dies, so that a runner killed outright
    does not leave its step holding the GPU."""
    code = (
        "import ctypes; PR_GET_PDEATHSIG = 2; sig = ctypes.c_int(); "
        "ctypes.CDLL(None, use_errno=True).prctl(PR_GET_PDEATHSIG, ctypes.byref(sig)); "
        "print(f'death signal {sig.value}')"
    )
    runner = _runner(tmp_path, [_python_step("asks", code, 30)], 60)
    assert runner.run() == 0
    assert f"death signal {int(signal.SIGKILL)}" in (tmp_path / "log.txt").read_text()


def test_a_step_whose_output_cannot_be_read_records_why_and_the_run_goes_on(tmp_path) -> None:
    """An ncu step that profiled nothing exits 0 with no CSV: the step is ok, the parser's error is recorded,
    no ``ncu.csv`` is written, the next step runs, the summary says why there are no ncu figures, and the
    run exits 1 (figures it was to give are missing)."""
    printed = "==PROF== Connected to process 1\n==WARNING== No kernels were profiled.\n"
    csv_file = tmp_path / "ncu.csv"
    ncu = Step(
        "ncu", "ncu", ((sys.executable, "-c", f"print({printed!r})"),), 30, 0.5, parse="ncu",
        files={"csv": str(csv_file)},
    )  # fmt: skip
    runner = _runner(tmp_path, [ncu, _python_step("after", "print('after')", 30)], 60)
    assert runner.run() == 1
    steps = {s["name"]: s for s in runner.record["steps"]}
    assert steps["ncu"]["status"] == "ok" and "result" not in steps["ncu"]
    assert steps["ncu"]["parse_error"] == f"ValueError: {NCU_NO_CSV}"
    assert steps["after"]["status"] == "ok" and not csv_file.exists()
    summary = (tmp_path / "summary.md").read_text()
    assert _step_rows(summary)["ncu"][4] == f"output not read: ValueError: {NCU_NO_CSV}"
    assert f"No ncu figures: step ncu ran but its output could not be read (ValueError: {NCU_NO_CSV})." in summary


def test_ncu_profiles_the_triton_kernels_alone() -> None:
    """The ncu step's kernel filter (a regular expression searched in each kernel's mangled name) takes
    the project's Triton kernels, whose unmangled names begin with an underscore, and none of PyTorch's
    (the reference's checks run in the same process): mangled C++ names begin with ``_Z``, and by
    function name ``at::_assert_async_cuda_kernel`` and ``at::_scatter_gather_elementwise_kernel``
    matched (the H100 run's ncu.csv holds both). The bench under it times no per-kernel split (ten
    more profiler runs a shape)."""
    (ncu,) = [s for s in build_plan(GPU, Paths(ROOT, Path("out"), Path("work"), "python")) if s.name == "ncu"]
    (command,) = ncu.commands
    assert command[command.index("--kernel-name-base") + 1] == "mangled" and "--no-kernel-split" in command
    pattern = command[command.index("--kernel-name") + 1].removeprefix("regex:")
    for name in ("_q_heads_kernel", "_split_k_projection_kernel", "_score_kernel", "_select_row_kernel"):
        assert re.search(pattern, name), name
    pytorch = (
        "_ZN2at6native24_assert_async_cuda_kernelIbEEvPKT_NS_3MsgE",
        "_ZN2at6native34_scatter_gather_elementwise_kernelILi128ELi8EZNS0_16_cuda_scatter_gather_internal_kernel",
        "vectorized_elementwise_kernel", "reduce_kernel", "gemv2T_kernel_val", "ampere_bf16_s16816gemm",
    )  # fmt: skip
    for name in pytorch:
        assert not re.search(pattern, name), name


def test_the_dry_runs_ncu_bench_keeps_a_shape_of_its_preset(tmp_path) -> None:
    """Where ``ncu`` exists, the dry run profiles its bench: the bench under it, run here without ncu,
    must keep a shape of tiny's (the GPU run's ``B=64,cache=262144`` keep none, and it refused to start)."""
    paths = Paths(ROOT, tmp_path / "out", tmp_path, sys.executable)
    (ncu,) = [s for s in build_plan(DRY, paths) if s.name == "ncu"]
    (command,) = ncu.commands
    bench = list(command[command.index(sys.executable) :])
    proc = run_python(bench[1:], DSV4_ACCEPTANCE_DRY="1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "decode B=4 S=2" in proc.stdout


def test_the_gpu_plan_covers_every_owed_figure(capsys, monkeypatch) -> None:
    monkeypatch.delenv("DSV4_ACCEPTANCE_DRY", raising=False)
    assert main(["unused-out-dir", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "tests/test_decode_graph.py" in listing and "tests/test_kernels_topk.py" in listing
    assert "tests/test_kernels_fp8_quant.py" in listing and "_compile.py" not in listing  # sm90.py's builds run on CPUs
    assert f"--preset flash --mode decode --ops {','.join(OPS)} --backends triton,reference" in listing
    assert "--ops qkv_proj_rope,indexer_compressor --backends compile" in listing
    assert "--ops indexer --backends compile" in listing
    assert "decode_loop.py --preset flash --batch 64 --seq 2 --prefill 4096 --steps 100 --capture" in listing
    assert "--model-only --trace" in listing and "--mode prefill" in listing
    assert "load_checkpoint.py load" in listing and "--device cuda" in listing
    assert "fuzz_ops.py --device cuda --preset flash --candidates --batches 1,2,3,5,50,64" in listing
    # one tensor-parallel rank, timed and its own buckets tuned into the run's config file
    assert "bench --preset flash/tp8 --mode decode --ops qkv_proj_rope,sparse_attn_write,o_proj" in listing
    assert "tune --preset flash/tp8 --mode decode --shapes 'qkv_proj_rope decode B=64 S=2," in listing
    assert "qkv_proj_rope decode B=1 S=2' --ops qkv_proj_rope,sparse_attn_write,o_proj" in listing
    before_graph = listing.split("\ndecode_graph ")[0]
    timeouts = [float(t) for t in re.findall(r"\(timeout (\d+) s\)", before_graph)]
    assert sum(timeouts) + GPU.min_s <= GPU.budget_s  # steps that all time out still leave the graph its turn


# -- the summary on a hand-built record: merged runs, absent figures, targets ----------------


def _shape(op: str, label: str, floor_us: float) -> dict:
    floor = {"memory": floor_us, "compute": 1.0, "floor": floor_us}
    return {"op": op, "shape": label, "floor_us_device_table": floor, "floor_us_measured_copy": floor}


def _timing(op: str, label: str, backend: str, median_us: float, floor_us: float) -> dict:
    pct = 100.0 * floor_us / median_us
    return {
        "op": op, "shape": label, "backend": backend, "status": "ok", "median_us": median_us, "p10_us": median_us,
        "p90_us": median_us, "launch": "cuda graph", "check": "ok", "note": "", "pct_of_floor_device_table": pct,
        "pct_of_floor_measured_copy": pct,
    }  # fmt: skip


def _bench(timings: list[dict], shapes: list[dict], command: str) -> dict:
    return {
        "meta": {"device": "NVIDIA H100 80GB HBM3", "command": command},
        "bandwidth": {"device_table": {"name": "H100 SXM", "bytes_per_s": 3.35e12}, "measured_copy_bytes_per_s": 3e12},
        "settings": {"preset": "flash", "l2": "flushed"},
        "shapes": shapes,
        "timings": timings,
    }


def _entry(
    name: str, status: str, ops: list[str], backends: list[str], bench: dict | None = None, mode: str = "decode"
) -> dict:
    entry: dict[str, Any] = {
        "name": name, "status": status, "reason": "stopped at its time limit (120 s)" if status == "timeout" else "",
        "seconds": 1.0, "commands": [name], "covers": {"mode": mode, "ops": ops, "backends": backends},
    }  # fmt: skip
    if bench is not None:
        entry["result"] = {"bench": bench}
    return entry


def _record(*steps: dict) -> dict:
    """A one-minute run's record of ``steps`` (the summary's input)."""
    return {
        "started": "2026-01-01T00:00:00+00:00", "finished": "2026-01-01T00:01:00+00:00", "elapsed_s": 60.0,
        "budget_s": 480, "command": "python -m dsv4.acceptance out", "environment": None, "steps": list(steps),
    }  # fmt: skip


def test_summary_merges_runs_marks_absent_figures_and_judges_targets() -> None:
    qkv, idx = ("qkv_proj_rope", "decode B=64 S=2"), ("indexer", "decode B=64 S=2 cache=2048")
    shapes = [_shape(*qkv, 16.0), _shape(*idx, 15.0)]
    wrong = {**_timing(*idx, "triton", 30.0, 15.0), "check": "MISMATCH score"}
    first = _bench(
        [_timing(*qkv, "triton", 20.0, 16.0), _timing(*qkv, "reference", 60.0, 16.0),
         wrong, _timing(*idx, "reference", 90.0, 15.0)],
        shapes, "dsv4 bench ... --backends triton,reference",
    )  # fmt: skip
    second = _bench([_timing(*qkv, "compile", 40.0, 16.0)], shapes[:1], "dsv4 bench ... --backends compile")
    record = {
        "started": "2026-01-01T00:00:00+00:00", "finished": "2026-01-01T00:08:00+00:00", "elapsed_s": 470.0,
        "budget_s": 480, "command": "python -m dsv4.acceptance out", "environment": None,
        "steps": [
            _entry("bench_decode", "ok", ["qkv_proj_rope", "indexer"], ["triton", "reference"], first),
            _entry("bench_decode_compile", "ok", ["qkv_proj_rope"], ["compile"], second),
            _entry("bench_decode_compile_indexer", "timeout", ["indexer"], ["compile"]),
        ],
    }  # fmt: skip
    summary = render(record)
    _assert_well_formed(summary)
    table = next(t for t in _tables(summary) if "median µs" in _cells(t[0]))
    header = _cells(table[0])
    rows = {(r["op"], r["backend"]): r for r in (dict(zip(header, _cells(line), strict=True)) for line in table[2:])}
    assert rows[("qkv_proj_rope", "triton")]["× vs eager"] == "3.00"  # 60 / 20
    assert rows[("qkv_proj_rope", "triton")]["× vs compile"] == "2.00"  # 40 / 20, from the second run
    assert rows[("qkv_proj_rope", "triton")]["% floor (table)"] == "80.0"
    assert rows[("indexer", "compile")]["launch"] == "absent"
    assert "bench_decode_compile_indexer timeout" in rows[("indexer", "compile")]["check"]
    # exactly at the target (80.0% is 1.25x) is met
    assert re.search(r"^- `qkv_proj_rope` decode B=64 S=2: target within 1\.25x of the floor \(>= 80\.0%\): "
                     r"\*\*80\.0%\*\* .* — met$", summary, re.M)  # fmt: skip
    assert re.search(
        r"1\.3x of the floor at the measured copy bandwidth .*\*\*80\.0%\*\* "
        r"\(20\.0 µs; 2\.00x faster than compile\) — met",
        summary,
    )
    assert re.search(r"`sparse_attn` decode B=64 S=2: .* not measured", summary)
    assert re.search(r"`indexer` cache=2048: .*\*\*50\.0%\*\* .* missed, but the check says MISMATCH", summary)
    assert re.search(r"`indexer` cache=262144: .* not measured", summary)
    assert "No test counts: no step measures it." in summary


def test_each_shape_is_sped_up_against_its_own_baselines() -> None:
    """Two shapes of one op: each Triton row's "× vs eager" is over the reference's time at that shape."""
    big, small = ("qkv_proj_rope", "decode B=64 S=2"), ("qkv_proj_rope", "decode B=1 S=1")
    timings = [_timing(*big, "triton", 20.0, 16.0), _timing(*big, "reference", 60.0, 16.0),
               _timing(*small, "triton", 10.0, 5.0), _timing(*small, "reference", 50.0, 5.0)]  # fmt: skip
    bench = _bench(timings, [_shape(*big, 16.0), _shape(*small, 5.0)], "dsv4 bench ... --backends triton,reference")
    summary = render(_record(_entry("bench_decode", "ok", ["qkv_proj_rope"], ["triton", "reference"], bench)))
    _assert_well_formed(summary)
    table = next(t for t in _tables(summary) if "median µs" in _cells(t[0]))
    rows = [dict(zip(_cells(table[0]), _cells(line), strict=True)) for line in table[2:]]
    faster = {r["shape"]: r["× vs eager"] for r in rows if r["backend"] == "triton"}
    assert faster == {"decode B=64 S=2": "3.00", "decode B=1 S=1": "5.00"}


def test_a_target_finds_its_shape_inside_a_longer_label() -> None:
    """``sparse_attn``'s target names "decode B=64 S=2"; the bench labels its shapes with the layer's
    kind after it ("decode B=64 S=2 kind=csa"): the target is judged on that row."""
    attn = ("sparse_attn", "decode B=64 S=2 kind=csa")
    bench = _bench([_timing(*attn, "triton", 20.0, 15.0)], [_shape(*attn, 15.0)], "dsv4 bench ... --backends triton")
    summary = render(_record(_entry("bench_decode", "ok", ["sparse_attn"], ["triton"], bench)))
    _assert_well_formed(summary)
    assert re.search(r"^- `sparse_attn` decode B=64 S=2: target within 1\.5x .*\*\*75\.0%\*\* .* — met$", summary, re.M)


def test_a_kernels_share_is_a_percentage_of_the_calls_median() -> None:
    """The profiler's split of a timed call: a kernel that ended 8 µs after the kernels before it, in a
    call of 20 µs median, is 40% of it."""
    qkv = ("qkv_proj_rope", "decode B=64 S=2")
    kernels = [{"kernel": "_q_heads_kernel", "us_per_call": 12.0, "us_after_previous_per_call": 8.0,
                "launches_per_call": 1}]  # fmt: skip
    timing = {**_timing(*qkv, "triton", 20.0, 16.0), "kernels": kernels}
    bench = _bench([timing], [_shape(*qkv, 16.0)], "dsv4 bench ... --backends triton")
    summary = render(_record(_entry("bench_decode", "ok", ["qkv_proj_rope"], ["triton"], bench)))
    _assert_well_formed(summary)
    table = next(t for t in _tables(summary) if "% of median" in _cells(t[0]))
    (row,) = [dict(zip(_cells(table[0]), _cells(line), strict=True)) for line in table[2:]]
    assert (row["µs from its start"], row["µs after the previous"], row["% of median"]) == ("12.0", "8", "40")


def test_the_ncu_table_scales_each_metric_from_the_unit_ncu_printed() -> None:
    """ncu prints each metric in a unit of its choosing: 25 Kbyte are 0.025 MB, 1.5 Mbyte 1.5 MB, 3 usecond
    3 µs; a unit the table does not know (registers) is taken as it is."""
    kernel = {"kernel": "_score_kernel", "grid": "(16, 64, 1)", "block": "(128, 1, 1)", "launches": 3,
              "dram__bytes_read.sum": 25.0, "dram__bytes_write.sum": 1.5, "lts__t_bytes.sum": 4000.0,
              "gpu__time_duration.sum": 3.0, "launch__registers_per_thread": 128.0}  # fmt: skip
    units = {"dram__bytes_read.sum": "Kbyte", "dram__bytes_write.sum": "Mbyte", "lts__t_bytes.sum": "byte",
             "gpu__time_duration.sum": "usecond", "launch__registers_per_thread": "register/thread"}  # fmt: skip
    ncu = {"file": "ncu.csv", "profiled_launches": 3, "units": units, "kernels": [kernel]}
    summary = render(_record({"name": "ncu", "status": "ok", "reason": "", "seconds": 30.0, "result": ncu}))
    _assert_well_formed(summary)
    table = next(t for t in _tables(summary) if "DRAM read MB" in _cells(t[0]))
    (row,) = [dict(zip(_cells(table[0]), _cells(line), strict=True)) for line in table[2:]]
    assert (row["DRAM read MB"], row["DRAM write MB"], row["L2 MB"]) == ("0.025", "1.500", "0.004")
    assert (row["time µs"], row["registers"], row["launches"]) == ("3.000", "128", "3")


@pytest.mark.parametrize(("failed", "more"), [(30, None), (31, "- ... and 1 more (junit.xml)")])
def test_the_failing_tests_listed_stop_at_thirty(failed: int, more: str | None) -> None:
    """The summary lists the first 30 failing tests, then how many more the junit XML holds; at exactly
    30 there is no such line."""
    failures = [f"tests/test_a.py::test_{i}" for i in range(failed)]
    result = {"passed": 1, "failed": failed, "errors": 0, "skipped": 0, "total": failed + 1,
              "source": "junit.xml", "failures": failures}  # fmt: skip
    summary = render(_record({"name": "tests", "status": "failed", "reason": "", "seconds": 9.0, "result": result}))
    listed = [line for line in summary.splitlines() if line.startswith("- `tests/test_a.py::")]
    assert listed == [f"- `{t}`" for t in failures[:30]]
    assert [line for line in summary.splitlines() if "more (junit.xml)" in line] == ([more] if more else [])
    assert "time limit" not in summary  # failed, not stopped: the counts are the whole run's


def test_a_table_target_on_a_gpu_the_table_lacks_says_which_floor_it_used() -> None:
    """On a GPU the device table does not list, a target defined against the table's floor is judged
    against the measured copy bandwidth's memory floor (the only one), and the summary says so."""
    qkv = ("qkv_proj_rope", "decode B=64 S=2")
    shape = {**_shape(*qkv, 17.0), "floor_us_device_table": {"memory": None, "compute": None, "floor": None}}
    timing = {**_timing(*qkv, "triton", 20.0, 17.0), "pct_of_floor_device_table": None}  # copy: 85%
    bench = _bench([timing], [shape], "dsv4 bench ... --backends triton")
    bench["meta"]["device"] = "NVIDIA A100-SXM4-80GB"
    bench["bandwidth"]["device_table"] = None
    record = _record(_entry("bench_decode", "ok", ["qkv_proj_rope"], ["triton"], bench))
    summary = render(record)
    _assert_well_formed(summary)
    target = next(line for line in summary.splitlines() if "target within 1.25x of the floor" in line)
    assert "**85.0%** of the copy-bandwidth memory floor (device not in the table) (20.0 µs) — met" in target
    # the copy-bandwidth target says nothing more: its floor is the copy's by definition
    copy = next(line for line in summary.splitlines() if "1.3x of the floor at the measured copy" in line)
    assert "**85.0%** (20.0 µs) — met" in copy


def test_a_ranks_figures_have_sections_of_their_own() -> None:
    """One tensor-parallel rank's bench (shapes labelled as the whole layer's) and tune: their own tables,
    never merged into the whole layer's decode table nor judged against its targets; a rank candidate
    that fails its check is shown."""
    qkv = ("qkv_proj_rope", "decode B=64 S=2")
    layer = _bench([_timing(*qkv, "triton", 40.0, 16.0)], [_shape(*qkv, 16.0)], "dsv4 bench --preset flash")
    rank = _bench([_timing(*qkv, "triton", 5.0, 4.25)], [_shape(*qkv, 4.25)], "dsv4 bench --preset flash/tp8")
    bad = {"check": "MISMATCH q: 2/100 off", "changed": {"tokens": 64}}
    ok = {"check": "bit-identical", "median_us": 5.0, "changed": {}}
    tune = {"buckets": [{"kernel": "qkv.q_heads", "bucket": "T=128,H=8", "workload": "flash/tp8 qkv_proj_rope",
                         "variants": [ok, bad], "gain_pct": 0.0, "winner": None}], "workloads": []}  # fmt: skip
    modes = {
        s.name: str(s.covers.get("mode")) for s in build_plan(GPU, Paths(ROOT, Path("out"), Path("work"), "python"))
    }
    record = {
        "started": "2026-01-01T00:00:00+00:00", "finished": "2026-01-01T00:08:00+00:00", "elapsed_s": 470.0,
        "budget_s": 480, "command": "python -m dsv4.acceptance out", "environment": None,
        "steps": [
            _entry("bench_decode", "ok", ["qkv_proj_rope"], ["triton"], layer, mode=modes["bench_decode"]),
            _entry("bench_rank", "ok", ["qkv_proj_rope"], ["triton"], rank, mode=modes["bench_rank"]),  # the plan's
            {"name": "tune_rank", "status": "ok", "reason": "", "seconds": 50.0, "result": {"tune": tune}},
        ],
    }  # fmt: skip
    summary = render(record)
    _assert_well_formed(summary)
    decode = summary.split("## Decode: time against the floor")[1].split("\n## ")[0]
    rank_part = summary.split("## One tensor-parallel rank: decode time against the floor")[1].split("\n## ")[0]
    assert "| 40.0 |" in decode and "| 5.00 |" not in decode
    assert "| 5.00 |" in rank_part and "flash/tp8" in rank_part
    assert re.search(r"`qkv_proj_rope` decode B=64 S=2: .*\*\*40\.0%\*\* .* missed", decode)
    tuning = summary.split("## Tuning one tensor-parallel rank's buckets")[1].split("\n## ")[0]
    assert '`{"tokens": 64}`: MISMATCH q: 2/100 off' in tuning


def test_missing_probe_figures_are_dashes() -> None:
    """A probe whose stream and L2 experiments failed: their figures are '-', not 0 or None."""
    rows = [{"name": "stream", "error": "RuntimeError: boom"}, {"name": "l2", "error": "RuntimeError: boom"}]
    record = _record(
        {"name": "probe", "status": "ok", "reason": "", "seconds": 9.0, "result": {"probe": {"rows": rows}}}
    )
    probe = render(record).split("## Machine limits")[1].split("\n## ")[0]
    assert "| L2 reported / read from L2 up to | - MiB / - MiB |" in probe
    assert "- programs/SM, - B in flight each" in probe
    assert "None" not in probe and " 0 MiB" not in probe


def test_a_tune_stops_starting_candidates_before_its_step_times_out(tmp_path) -> None:
    """The tune steps' ``--budget-s`` is their timeout less ``TUNE_MARGIN_S`` (20 s: the tune step's 100 of
    120): a tune stopped at its timeout would lose the bucket it was in; one whose budget ends saves it."""
    paths = Paths(root=ROOT, out=tmp_path / "out", work=tmp_path / "work", python=sys.executable)
    plan = {s.name: s for s in build_plan(GPU, paths)}
    for name, budget in (("tune", 100), ("tune_rank", 40)):
        (command,) = plan[name].commands
        assert float(command[command.index("--budget-s") + 1]) == plan[name].timeout_s - TUNE_MARGIN_S == budget


def test_the_bench_steps_take_their_modes_repetitions_and_prefill_times_qkv_last(tmp_path, monkeypatch) -> None:
    """Decode timings take the profile's ``reps`` (100), prefill ones its ``prefill_reps`` (20); the prefill
    step times ``qkv_proj_rope`` last (its figures were taken before, the others' are owed); the tests
    step passes pytest-timeout's ``--timeout`` where that plugin is installed."""
    import importlib.util

    from dsv4.acceptance.plan import TEST_TIMEOUT_S

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "pytest_timeout" else
                        find_spec(name, *a))  # fmt: skip
    paths = Paths(root=ROOT, out=tmp_path / "out", work=tmp_path / "work", python=sys.executable)
    plan = {s.name: s for s in build_plan(GPU, paths)}

    def option(name: str, flag: str) -> str:
        (command,) = plan[name].commands
        return command[command.index(flag) + 1]

    assert (option("bench_decode", "--reps"), option("bench_prefill", "--reps")) == (
        str(GPU.reps),
        str(GPU.prefill_reps),
    )
    assert GPU.reps != GPU.prefill_reps
    prefill_ops = option("bench_prefill", "--ops").split(",")
    assert sorted(prefill_ops) == sorted(OPS) and prefill_ops[-1] == "qkv_proj_rope" != prefill_ops[0]
    (command,) = plan["tests"].commands
    assert f"--timeout={TEST_TIMEOUT_S}" in command


def test_sanitizer_findings_and_failed_checks_are_told_apart(tmp_path) -> None:
    """compute-sanitizer's error count and first errors come back from its output, apart from ``dsv4 run``'s
    own verdict under it; each tool is a step of its own, with PyTorch's caching allocator off and an exit
    code of its own."""
    from dsv4.acceptance.plan import SANITIZER_EXIT, build_plan
    from dsv4.acceptance.results import parse_sanitize

    paths = Paths(root=ROOT, out=tmp_path / "out", work=tmp_path / "work", python=sys.executable)
    plan = {s.name: s for s in build_plan(GPU, paths)}
    for name, tool in (("sanitize", "memcheck"), ("initcheck", "initcheck")):
        (command,) = plan[name].commands
        assert command[:2] == ("env", "PYTORCH_NO_CUDA_MEMORY_CACHING=1")
        assert command[command.index("--tool") + 1] == tool
        assert command[command.index("--error-exitcode") + 1] == str(SANITIZER_EXIT) != "1"
    log = (
        "========= COMPUTE-SANITIZER\n"
        "========= Invalid __global__ read of size 4 bytes\n"
        "=========     at _score_kernel+0x1a0\n"
        "30 op calls in 9.1 s; 2 MISMATCH(ES)\n"
        "========= ERROR SUMMARY: 1 error\n"
    )
    found = parse_sanitize({}, log)
    assert found == {
        "errors": 1, "first_errors": ["Invalid __global__ read of size 4 bytes"], "op_calls": 30, "mismatches": 2
    }  # fmt: skip
    clean = parse_sanitize({}, "30 op calls in 9.1 s; all checks passed\n========= ERROR SUMMARY: 0 errors\n")
    assert (clean["errors"], clean["mismatches"]) == (0, 0)
    with pytest.raises(ValueError, match="ERROR SUMMARY"):
        parse_sanitize({}, "30 op calls in 9.1 s; all checks passed\n")
    record = _record(
        {"name": "sanitize", "status": "failed", "reason": f"exit code {SANITIZER_EXIT}", "seconds": 30.0,
         "result": found}
    )  # fmt: skip
    summary = render(record)
    assert "- `sanitize`: **1 error(s)**; `dsv4 run` under it: 30 op calls, 2 mismatch(es)" in summary
    assert "  - `Invalid __global__ read of size 4 bytes`" in summary
    assert "- `initcheck`: no figures: no step measures it." in summary


def test_summary_shows_the_probe_and_the_tuning() -> None:
    """The probe's and the tune's GPU figures (hand-built) become tables: the machine's limits, the
    bytes-in-flight curve, and per tuned bucket the default's time against the best candidate's."""
    rows = [
        {"name": "zero_point", "empty_graph_us": 2.1, "one_kernel_graph_us": 4.0, "plain_launch_us": 6.5, "us": 2.1},
        {"name": "copy", "gb_per_s": 4300.0},
        *(
            {"name": "stream", "programs_per_sm": p, "bytes_in_flight_per_program": b, "gb_per_s": 1000.0 * p}
            for p in (1, 2)
            for b in (4096, 16384)
        ),  # fmt: skip
        {
            "name": "stream_summary",
            "best_gb_per_s": 2000.0,
            "best_programs_per_sm": 2,
            "best_bytes_in_flight_per_program": 16384,
            "bytes_in_flight_per_sm_for_90pct": 32768,
        },  # fmt: skip
        {
            "name": "l2_summary",
            "l2_bytes_reported": 60 << 20,
            "largest_mib_read_from_l2": 48,
            "l2_gb_per_s": 9000.0,
            "dram_gb_per_s": 4000.0,
        },  # fmt: skip
        {"name": "launch_gap", "mode": "graph + PDL", "us_per_launch": 0.8},
        {"name": "flush_method", "error": "RuntimeError: out of memory"},
    ]
    variant = {"check": "bit-identical", "median_us": 40.0, "changed": {}}
    best = {"check": "within tolerance", "median_us": 30.0, "changed": {"splits": 8}}
    bad = {"check": "MISMATCH q: 3/100 off", "changed": {"block_n": 64}}
    tune = {
        "buckets": [
            {
                "kernel": "qkv.projection",
                "bucket": "T=128,D=4096,N=1536",
                "workload": "flash qkv_proj_rope",
                "variants": [variant, best, bad],
                "gain_pct": 25.0,
                "winner": {"splits": 8},
            }
        ],  # fmt: skip
        "workloads": [{"label": "flash indexer decode B=1 S=2 cache=65536", "status": "not run: budget spent"}],
        "stopped": "budget spent",
    }
    record = {
        "started": "2026-01-01T00:00:00+00:00", "finished": "2026-01-01T00:08:00+00:00", "elapsed_s": 470.0,
        "budget_s": 480, "command": "python -m dsv4.acceptance out", "environment": None,
        "steps": [
            {"name": "probe", "status": "ok", "reason": "", "seconds": 20.0, "result": {"probe": {"rows": rows}}},
            {"name": "tune", "status": "ok", "reason": "", "seconds": 100.0, "result": {
                "tune": tune, "config": {"file": "kernel-config.json", "device": "h200-132", "entries": 1}}},
        ],
    }  # fmt: skip
    summary = render(record)
    _assert_well_formed(summary)
    assert "| graph-launch zero point (empty graph) | 2.10 µs |" in summary
    assert "| L2 reported / read from L2 up to | 60 MiB / 48 MiB |" in summary  # 60 << 20 bytes
    assert "| launch gap, graph + PDL | 0.80 µs per dependent launch |" in summary
    assert "| 16 KiB | 1000 | 2000 |" in summary  # the bytes-in-flight curve
    assert "`flush_method` failed: RuntimeError: out of memory" in summary
    tuned = next(t for t in _tables(summary) if "gain %" in _cells(t[0]))
    row = dict(zip(_cells(tuned[0]), _cells(tuned[2]), strict=True))
    assert (row["default µs"], row["best µs"], row["gain %"], row["config"]) == ("40.0", "30.0", "25.0", "written")
    assert "commit it as `src/dsv4/kernels/configs/h200-132.json`" in summary
    assert '`{"block_n": 64}`: MISMATCH q: 3/100 off' in summary
    assert "shapes left: flash indexer decode B=1 S=2 cache=65536" in summary


@pytest.mark.parametrize(
    ("status", "reason", "note", "why"),
    [
        ("ok", "", f"output not read: ValueError: {NCU_NO_CSV}",
         f"step ncu ran but its output could not be read (ValueError: {NCU_NO_CSV})"),
        ("failed", "exit code 1", f"exit code 1; output not read: ValueError: {NCU_NO_CSV}",
         "step ncu failed: exit code 1"),
    ],
    ids=["ok", "failed"],
)  # fmt: skip
def test_a_step_whose_output_was_not_read_says_so_in_its_row_and_its_section(
    status: str, reason: str, note: str, why: str
) -> None:
    """The parser's error is the steps table's note, after the step's own reason where it has one; the
    section of a step that ran but left no figures says so, apart from one that failed."""
    entry = {"name": "ncu", "status": status, "reason": reason, "seconds": 30.0,
             "parse_error": f"ValueError: {NCU_NO_CSV}"}  # fmt: skip
    summary = render(_record(entry))
    _assert_well_formed(summary)
    assert _step_rows(summary)["ncu"][4] == note
    assert f"No ncu figures: {why}." in summary.splitlines()


def test_a_tests_step_stopped_at_its_time_limit_says_its_counts_are_partial() -> None:
    """A tests step stopped at its timeout (pytest still wrote its junit XML): the counts are of the tests
    that finished, and the summary says so."""
    result = {"passed": 40, "failed": 0, "errors": 0, "skipped": 2, "total": 42, "source": "junit.xml",
              "failures": []}  # fmt: skip
    entry = {"name": "tests", "status": "timeout", "reason": "stopped at its time limit (150 s)", "seconds": 150.0,
             "result": result}  # fmt: skip
    summary = render(_record(entry))
    _assert_well_formed(summary)
    tests = summary.split("## Tests compiled on the device")[1].split("\n## ")[0].strip()
    assert tests == (
        "**40 passed, 0 failed, 0 errors, 2 skipped** of 42 (from junit.xml); the step was stopped at its time "
        "limit, so these are the tests that finished"
    )


def _decode_rows(summary: str) -> dict[str, dict[str, str]]:
    """The decode timing table's rows by backend."""
    table = next(t for t in _tables(summary) if "median µs" in _cells(t[0]))
    rows = (dict(zip(_cells(table[0]), _cells(line), strict=True)) for line in table[2:])
    return {r["backend"]: r for r in rows}


def test_a_timing_that_raised_is_an_error_row_with_its_error() -> None:
    """A backend that raised at a shape (out of memory) is a row saying so, with its error and no time,
    and the Triton row has no speed-up over it; a backend the bench skipped (no library composition of
    the op) is a skipped row with its reason, not an error."""
    qkv = ("qkv_proj_rope", "decode B=64 S=2")
    oom = {"op": qkv[0], "shape": qkv[1], "backend": "reference", "status": "error",
           "error": "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"}  # fmt: skip
    none = {"op": qkv[0], "shape": qkv[1], "backend": "library", "status": "skipped",
            "error": "no library composition of qkv_proj_rope"}  # fmt: skip
    timings = [_timing(*qkv, "triton", 20.0, 16.0), oom, none]
    bench = _bench(timings, [_shape(*qkv, 16.0)], "dsv4 bench ... --backends t,r,l")
    summary = render(
        _record(_entry("bench_decode", "ok", ["qkv_proj_rope"], ["triton", "reference", "library"], bench))
    )
    _assert_well_formed(summary)
    rows = _decode_rows(summary)
    reference = rows["reference"]
    assert (reference["launch"], reference["median µs"], reference["check"]) == ("error", "", oom["error"])
    assert reference["floor µs table / copy"] == "16.0 / 16.0"
    assert (rows["library"]["launch"], rows["library"]["check"]) == ("skipped", none["error"])
    assert rows["triton"]["× vs eager"] == "-"


def test_a_timing_with_a_note_is_starred_and_the_note_printed_under_the_table() -> None:
    """A timing the bench could not take as a CUDA graph: its launch is starred and the reason is printed
    under the table."""
    qkv = ("qkv_proj_rope", "decode B=64 S=2")
    note = "not capturable (a host synchronization: .item())"
    timing = {**_timing(*qkv, "triton", 20.0, 16.0), "launch": "plain launches", "note": note}
    bench = _bench([timing], [_shape(*qkv, 16.0)], "dsv4 bench ... --backends triton")
    summary = render(_record(_entry("bench_decode", "ok", ["qkv_proj_rope"], ["triton"], bench)))
    _assert_well_formed(summary)
    assert _decode_rows(summary)["triton"]["launch"] == "plain launches*"
    assert f"\\* qkv_proj_rope decode B=64 S=2 triton: {note}" in summary.splitlines()


def test_the_graph_launch_zero_point_is_printed_under_the_table() -> None:
    """The bench's graph-launch zero point (what any timed replay costs before its work) is the line under
    the timing table."""
    qkv = ("qkv_proj_rope", "decode B=64 S=2")
    bench = _bench([_timing(*qkv, "triton", 20.0, 16.0)], [_shape(*qkv, 16.0)], "dsv4 bench ... --backends triton")
    bench["zero_point"] = {"empty_graph_us": 2.1, "one_kernel_graph_us": 4.0, "us": 2.1}
    summary = render(_record(_entry("bench_decode", "ok", ["qkv_proj_rope"], ["triton"], bench)))
    _assert_well_formed(summary)
    assert "Graph-launch zero point (events around an empty graph's replay): 2.10 µs." in summary.splitlines()


def test_a_target_with_no_floor_on_this_device_says_so() -> None:
    """A bench with neither the device table's bandwidth nor a measured copy (the CPU): each target of a
    timed shape says there is no floor, not a percentage of nothing."""
    qkv = ("qkv_proj_rope", "decode B=64 S=2")
    none = {"memory": None, "compute": None, "floor": None}
    shape = {**_shape(*qkv, 16.0), "floor_us_device_table": none, "floor_us_measured_copy": none}
    timing = {**_timing(*qkv, "triton", 20.0, 16.0), "pct_of_floor_device_table": None,
              "pct_of_floor_measured_copy": None}  # fmt: skip
    bench = _bench([timing], [shape], "dsv4 bench ... --backends triton")
    bench["bandwidth"] = {"device_table": None, "measured_copy_bytes_per_s": None}
    summary = render(_record(_entry("bench_decode", "ok", ["qkv_proj_rope"], ["triton"], bench)))
    _assert_well_formed(summary)
    assert "Bandwidth: device table n/a, measured copy n/a" in summary.splitlines()
    assert [line for line in summary.splitlines() if line.startswith("- `qkv_proj_rope` ")] == [
        "- `qkv_proj_rope` decode B=64 S=2: target within 1.25x of the floor (>= 80.0%): no floor on this device "
        "(decode B=64 S=2)",
        "- `qkv_proj_rope` decode B=64 S=2: target within 1.3x of the floor at the measured copy bandwidth "
        "(>= 76.9%): no floor on this device (decode B=64 S=2)",
    ]


DECODE_LOOP_GPU = (
    "median ms per step: eager 0.900, graph 0.120; memory floor 0.0473 ms (H200): eager 19.0x, graph 2.5x\n"
)


@pytest.mark.parametrize(
    ("log", "lines"),
    [
        ("median ms per step: eager 1.250\n", ["No graph replay in this run (`--capture` needs CUDA)."]),
        (DECODE_LOOP_GPU,
         ["One CUDA graph per step is 7.50x the eager launches.", "Memory floor 0.0473 ms: eager 19.0x, graph 2.5x"]),
        (DECODE_LOOP_GPU + "back to back, ms per step: eager 0.700, graph 0.060; memory floor 0.0473 ms (H200): "
         "eager 14.8x, graph 1.3x\n",
         ["One CUDA graph per step is 7.50x the eager launches.",
          "Memory floor 0.0473 ms: eager 19.0x, graph 2.5x; back to back: eager 14.8x, graph 1.3x"]),
    ],
    ids=["eager only", "floor", "floor and back to back"],
)  # fmt: skip
def test_the_decode_loops_lines_under_its_table(log: str, lines: list[str]) -> None:
    """Under the decode loop's table: without a graph (the CPU), that nothing was replayed; with the loop's
    memory floor, each mode's time as a multiple of it, back to back too where the loop ran so."""
    entry = {"name": "decode_graph", "status": "ok", "reason": "", "seconds": 20.0,
             "commands": ["python examples/decode_loop.py"], "result": parse_decode_loop({}, log)}  # fmt: skip
    summary = render(_record(entry))
    _assert_well_formed(summary)
    section = summary.split("## Decode step: one CUDA graph against eager launches")[1].split("\n## ")[0]
    assert [line for line in section.splitlines() if line and not line.startswith(("|", "<sub>"))] == lines


# -- parsers -------------------------------------------------------------------------------


def test_test_counts_come_from_pytest_lines_when_junit_is_missing(tmp_path) -> None:
    log = "\n".join([
        "tests/test_a.py::test_one PASSED                [ 25%]",
        "[gw1] [ 50%] FAILED tests/test_a.py::test_two[flash]",
        "[gw0] [ 75%] SKIPPED tests/test_b.py::test_gpu_only",
        "tests/test_b.py::test_teardown PASSED           [100%]",
        "tests/test_b.py::test_teardown ERROR            [100%]",
        "tests/test_c.py::test_args[--steps ,] PASSED    [100%]",  # parameters with spaces and brackets
        "tests/test_c.py::TestK::test_rows[[0, 1]] FAILED [100%]",
        "[gw1] [100%] FAILED tests/test_c.py::test_args[--budget-s -5]",
        "[gw0] [100%] PASSED tests/test_c.py::test_args[--budget-s nan]",
        "FAILED tests/test_c.py::test_args[--budget-s -5] - assert 1 == 2",  # the summary repeats a failure
    ])  # fmt: skip
    counts = parse_tests({"junit": str(tmp_path / "missing.xml")}, log)
    assert (counts["passed"], counts["failed"], counts["errors"], counts["skipped"]) == (3, 3, 1, 1)
    assert counts["failures"] == [
        "tests/test_a.py::test_two[flash]",
        "tests/test_b.py::test_teardown",
        "tests/test_c.py::TestK::test_rows[[0, 1]]",
        "tests/test_c.py::test_args[--budget-s -5]",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="no junit XML"):
        parse_tests({"junit": str(tmp_path / "missing.xml")}, "collected 0 items")


def test_a_junit_xml_cut_off_mid_write_falls_back_to_the_pytest_lines(tmp_path) -> None:
    """A tests step killed while pytest wrote its junit XML: the counts come from the ``-v`` lines it
    printed, and say so, rather than the step losing its figures."""
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="2">'
        '<testcase classname="tests.test_a" name="test_one"'
    )
    log = "tests/test_a.py::test_one PASSED    [ 50%]\ntests/test_a.py::test_two FAILED    [100%]\n"
    counts = parse_tests({"junit": str(junit)}, log)
    assert (counts["passed"], counts["failed"], counts["total"]) == (1, 1, 2)
    assert counts["source"] == "pytest -v lines (no junit XML)"
    assert counts["failures"] == ["tests/test_a.py::test_two"]


def test_the_tuned_config_files_entries_are_its_buckets(tmp_path) -> None:
    """The tune step's figures: the config file it wrote, its device and how many tuned buckets it holds
    (what the summary says to commit)."""
    config, tune = tmp_path / "kernel-config.json", tmp_path / "tune.json"
    kernels = {"qkv.rows": {"T=2,QL=128,HD=128": {"num_warps": 8}, "T=4,QL=128,HD=128": {"num_warps": 8}},
               "o_proj.quant": {"T=2,N=128": {"num_warps": 8}}}  # fmt: skip
    config.write_text(json.dumps({"schema": 1, "device": "h200-132", "kernels": kernels}))
    tune.write_text(json.dumps({"buckets": [], "workloads": []}))
    result = parse_tune({"json": str(tune), "config": str(config)}, "")
    assert result["config"] == {"file": "kernel-config.json", "device": "h200-132", "entries": 3}


def test_a_tune_that_wrote_no_config_file_leaves_nothing_to_commit(tmp_path) -> None:
    """A tune in which no candidate beat a default writes no config file: its figures are read back with
    no config, and the summary shows the tuned buckets with no file to commit."""
    tune = tmp_path / "tune.json"
    variant = {"check": "bit-identical", "median_us": 40.0, "changed": {}}
    bucket = {"kernel": "qkv.rows", "bucket": "T=128,QL=128,HD=128", "workload": "flash qkv_proj_rope",
              "variants": [variant], "gain_pct": 0.0, "winner": None}  # fmt: skip
    tune.write_text(json.dumps({"buckets": [bucket], "workloads": [], "stopped": None}))
    result = parse_tune({"json": str(tune), "config": str(tmp_path / "kernel-config.json")}, "")
    assert result["config"] is None
    summary = render(_record({"name": "tune", "status": "ok", "reason": "", "seconds": 100.0, "result": result}))
    _assert_well_formed(summary)
    tuning = summary.split("## Tuning: each kernel's candidates against its default (dsv4 tune)")[1].split("\n## ")[0]
    assert "| `qkv.rows` | T=128,QL=128,HD=128 |" in tuning and "Config file" not in tuning


def test_a_tools_version_is_the_last_line_it_prints(monkeypatch) -> None:
    """``ncu --version`` prints a banner and a copyright before its version: the environment keeps the last line."""
    from dsv4.acceptance import environment

    printed = (
        "NVIDIA (R) Nsight Compute Command Line Profiler\nCopyright (c) 2018-2024 NVIDIA Corporation\n"
        "Version 2024.1.1.0 (build 33998838) (public-release)"
    )
    monkeypatch.setattr(environment.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(environment, "_run", lambda argv: printed if argv == ["ncu", "--version"] else None)
    assert environment._tool_version("ncu") == "Version 2024.1.1.0 (build 33998838) (public-release)"


def test_the_environment_names_the_first_gpu_in_its_units(monkeypatch) -> None:
    """nvidia-smi prints a line per GPU: the first is device 0's, its current clocks beside their maxima.
    Memory in GiB, the runtime's clocks (kHz) in MHz."""
    from dsv4.acceptance import environment

    lines = (
        "NVIDIA H200, 570.1, 1755, 1980, 2619, 3201, 700.00, 35\nNVIDIA H200, 570.1, 345, 1980, 1593, 3201, 700.00, 30"
    )
    monkeypatch.setattr(environment.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(environment, "_run", lambda argv: lines if argv[0] == "nvidia-smi" else None)
    smi = environment._nvidia_smi()
    assert smi is not None and smi["clocks.sm"] == "1755" and smi["clocks.mem"] == "2619"
    props = SimpleNamespace(name="NVIDIA H200", major=9, minor=0, multi_processor_count=132, total_memory=150 * 2**30,
                            L2_cache_size=60 * 2**20)  # fmt: skip
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    env = environment.collect()
    assert env["gpu"]["memory_gib"] == 150.0 and env["gpu"]["l2_mib"] == 60.0 and env["gpu"]["sm_count"] == 132
    env["gpu"]["triton_device_properties"] = {
        "sm_clock_rate": 1980000,
        "mem_clock_rate": 3201000,
        "mem_bus_width": 6144,
    }
    text = "\n".join(environment.describe(env))
    assert "150.0 GiB" in text and "clocks (CUDA runtime): SM 1980 MHz, memory 3201 MHz, bus 6144 bit" in text
    assert "clocks: SM 1755 MHz (max 1980), memory 2619 MHz (max 3201); power limit 700.00 W" in text


def test_the_environment_step_takes_one_path(tmp_path, capsys) -> None:
    """``python -m dsv4.acceptance.environment PATH.json``: no path, or more than one, prints the usage
    and exits 2 before anything is collected or written."""
    from dsv4.acceptance import environment

    for argv in ([], [str(tmp_path / "a.json"), str(tmp_path / "b.json")]):
        assert environment.main(argv) == 2
        assert capsys.readouterr().err.startswith("usage: python -m dsv4.acceptance.environment PATH.json")
    assert list(tmp_path.iterdir()) == []


# fuzz_ops.py's output: a case that failed at its candidates and passes at the defaults, a case that
# raised, then the summary of a run stopped at its time limit
FUZZ_LOG = """$ python benchmarks/fuzz_ops.py --device cuda --preset flash --candidates
MISMATCH q: 1,770 of 24,576 off (ratio 0.072 > 0.005)
  make_case(get_config('flash'), 'qkv_proj_rope', 'decode', 4521, batch=3, seq=2, start_pos=[5, 63, 64], kind=None, \
max_position=2304)
  candidates: {"qkv.q_heads": {"T=8,D=4096": {"num_warps": 4}}}
  at the defaults: ok
ERROR RuntimeError: Triton Error [CUDA]: an illegal memory access was encountered
  make_case(get_config('flash'), 'sparse_attn', 'decode', 77, batch=50, seq=1, start_pos=[0], kind='csa', \
max_position=2304)
  candidates: {}
  at the defaults: ERROR RuntimeError: Triton Error [CUDA]: an illegal memory access was encountered
interrupted: the case in progress is left out
41 cases, 2 failed (preset flash, seed 0); 2 raised or failed at candidates alone
  qkv_proj_rope: 20 cases, 1 failed
  sparse_attn csa: 21 cases, 1 failed
  qkv.q_heads: 20 buckets looked up, 9 of them at another candidate, 5 in parameters the interpreter runs
  sparse_attn: 21 buckets looked up, 7 of them at another candidate, 3 in parameters the interpreter runs
"""


def test_fuzz_summary_cases_and_candidates_are_read_back() -> None:
    """The step's figures: the counts, per op and kind, per kernel the draws, and each failing case with its
    draws and its verdict at the defaults; in the summary, the count of draws only a GPU runs."""
    r = parse_fuzz({}, FUZZ_LOG)
    assert (r["cases"], r["failed"], r["findings"], r["preset"], r["seed"]) == (41, 2, 2, "flash", 0)
    assert r["interrupted"] is True
    assert r["ops"] == [
        {"op": "qkv_proj_rope", "kind": None, "cases": 20, "failed": 1},
        {"op": "sparse_attn", "kind": "csa", "cases": 21, "failed": 1},
    ]
    assert r["kernels"][0] == {"kernel": "qkv.q_heads", "lookups": 20, "other": 9, "interpreter": 5}
    first, second = r["failures"]
    assert first["verdict"].startswith("MISMATCH q: 1,770") and first["defaults"] == "ok"
    assert first["case"].endswith("kind=None, max_position=2304)")
    assert json.loads(first["candidates"]) == {"qkv.q_heads": {"T=8,D=4096": {"num_warps": 4}}}
    assert second["verdict"].startswith("ERROR RuntimeError") and second["defaults"].startswith("ERROR")
    with pytest.raises(ValueError, match="no summary line"):
        parse_fuzz({}, FUZZ_LOG.split("interrupted")[0])
    record = {"steps": [{"name": "fuzz", "status": "timeout", "reason": "", "seconds": 120.0, "result": r}]}
    from dsv4.acceptance.summary import _fuzz_section

    section = "\n".join(_fuzz_section(record))
    _assert_well_formed(section)
    assert "**41 cases, 2 failed, 2 raised or failed at candidates alone**" in section
    assert "stopped at its time limit" in section and "at the defaults: ok" in section
    assert "| `qkv.q_heads` | 20 | 9 | 4 |" in section  # 9 drawn elsewhere, 5 of them run by the interpreter


def test_fuzz_findings_are_the_raised_count_not_the_failed_count() -> None:
    r = parse_fuzz({}, "30 cases, 2 failed (preset tiny, seed 5); 0 raised or failed at candidates alone\n")
    assert (r["cases"], r["failed"], r["findings"], r["seed"]) == (30, 2, 0, 5)


# the checkpoint step's log: load_checkpoint.py load's line, then dsv4 run --checkpoint's verdict
CHECKPOINT_LOG = (
    "load_layer(/tmp/ckpt, 1, device=cuda): 0.20 s wall; loaded 136.7 MiB; RSS 620 MiB after imports (heap 308, "
    "file pages 303), peak 887 MiB (+267 MiB), now 662 MiB (heap 341, file pages 311); torch threads 16\n"
    "12 op calls in 3.5 s; all checks passed\n"
)


def test_the_checkpoint_steps_load_line_is_read_back() -> None:
    log = CHECKPOINT_LOG
    r = parse_checkpoint({}, log)
    assert (r["load_s"], r["loaded_mib"], r["peak_rss_mib"], r["rss_growth_mib"]) == (0.2, 136.7, 887, 267)
    assert (r["run_op_calls"], r["run_s"], r["run_result"]) == (12, 3.5, "all checks passed")
    # a peak that rounds below the RSS before the load (ru_maxrss and /proc's figure): the growth as printed
    r = parse_checkpoint({}, log.replace("peak 887 MiB (+267 MiB)", "peak 620 MiB (+-0 MiB)"))
    assert (r["peak_rss_mib"], r["rss_growth_mib"]) == (620, 0)
    # the write or the load failed before either line was printed
    with pytest.raises(ValueError, match="neither the load line nor the run line was printed"):
        parse_checkpoint({}, "Traceback (most recent call last):\nOSError: [Errno 28] No space left on device\n")


def test_a_failed_checkpoint_step_keeps_its_load_figures_and_says_why() -> None:
    """The load printed its line and then ``dsv4 run --checkpoint`` failed: the load's figures stand, and the
    step's failure is the line after them."""
    result = parse_checkpoint({}, CHECKPOINT_LOG.splitlines()[0] + "\nTraceback (most recent call last):\n")
    entry = {"name": "checkpoint", "status": "failed", "reason": "exit code 1 from command 3 of 3", "seconds": 40.0,
             "result": result}  # fmt: skip
    summary = render(_record(entry))
    _assert_well_formed(summary)
    section = summary.split("## Checkpoint loading")[1].split("\n## ")[0].strip()
    assert section.splitlines() == [
        "- `load_layer`: 0.20 s, 136.7 MiB loaded, peak RSS 887 MiB (+267 MiB)",
        "- step checkpoint failed: exit code 1 from command 3 of 3",
    ]


def test_decode_loop_medians() -> None:
    log = "preset=flash ...\nmedian ms per step: eager 1.250, graph 0.500\n"
    assert parse_decode_loop({}, log)["median_ms"] == {"eager": 1.25, "graph": 0.5}
    assert parse_decode_loop({}, log)["floor_ms"] is None
    log = "median ms per step: eager 0.900, graph 0.120; memory floor 0.0473 ms (H200): eager 19.0x, graph 2.5x\n"
    result = parse_decode_loop({}, log)
    assert result["median_ms"] == {"eager": 0.9, "graph": 0.12} and result["floor_ms"] == 0.0473
    assert result["back_to_back_ms"] is None
    log += "back to back, ms per step: eager 0.700, graph 0.060; memory floor 0.0473 ms (H200): eager 14.8x, graph 1.3x"
    result = parse_decode_loop({}, log)
    assert result["back_to_back_ms"] == {"eager": 0.7, "graph": 0.06} and result["median_ms"]["graph"] == 0.12
    assert result["host_ms"] is None
    log += "\nhost side of a back-to-back call, median ms: eager 0.650, graph 0.021\n"
    assert parse_decode_loop({}, log)["host_ms"] == {"eager": 0.65, "graph": 0.021}
    with pytest.raises(ValueError):
        parse_decode_loop({}, "Traceback ...")


def test_ncu_csv_is_grouped_per_kernel_and_grid(tmp_path) -> None:
    header = '"ID","Kernel Name","Grid Size","Block Size","dram__bytes_read.sum","lts__t_bytes.sum"'
    rows = [
        '"","","","","byte","byte"',
        '"0","_score_kernel","(16, 64, 1)","(128, 1, 1)","1,000","5000"',
        '"1","_score_kernel","(16, 64, 1)","(128, 1, 1)","6000","9000"',  # the median, not the mean
        '"2","_score_kernel","(16, 64, 1)","(128, 1, 1)","2000","6000"',
        '"3","_score_kernel","(2048, 1, 1)","(128, 1, 1)","9000","9000"',
    ]
    log = "\n".join(
        ["==PROF== Connected to process 1", "dsv4 bench: preset=flash", header, *rows, "==PROF== Disconnected"]
    )
    result = parse_ncu({"csv": str(tmp_path / "ncu.csv")}, log)
    assert result["profiled_launches"] == 4 and result["units"]["dram__bytes_read.sum"] == "byte"
    first, second = result["kernels"]
    assert (first["grid"], first["launches"], first["dram__bytes_read.sum"], first["lts__t_bytes.sum"]) == (
        "(16, 64, 1)", 3, 2000.0, 6000.0,
    )  # fmt: skip
    assert (second["grid"], second["launches"]) == ("(2048, 1, 1)", 1)
    assert (tmp_path / "ncu.csv").read_text().splitlines()[0] == header


def test_ncu_values_that_are_not_numbers_are_left_out_of_the_median(tmp_path) -> None:
    """ncu prints ``n/a`` for a metric it could not collect on a launch: the median is of the launches that
    have a number, and a metric with none is ``None`` (a '-' in the summary), not 0."""
    header = '"ID","Kernel Name","Grid Size","Block Size","dram__bytes_read.sum","lts__t_bytes.sum"'
    rows = [
        '"","","","","byte","byte"',
        '"0","_score_kernel","(16, 64, 1)","(128, 1, 1)","n/a","n/a"',
        '"1","_score_kernel","(16, 64, 1)","(128, 1, 1)","1,000","n/a"',
        '"2","_score_kernel","(16, 64, 1)","(128, 1, 1)","3000","n/a"',
    ]
    (kernel,) = parse_ncu({"csv": str(tmp_path / "ncu.csv")}, "\n".join([header, *rows]))["kernels"]
    assert (kernel["launches"], kernel["dram__bytes_read.sum"], kernel["lts__t_bytes.sum"]) == (3, 2000.0, None)


@pytest.mark.parametrize(
    "log",
    [
        "==PROF== Connected to process 1\n==WARNING== No kernels were profiled.\n==PROF== Disconnected from process 1",
        '"ID","Kernel Name","Grid Size","Block Size","dram__bytes_read.sum"\n==WARNING== No kernels were profiled.',
    ],
    ids=["no CSV", "a header alone"],
)
def test_ncu_output_without_csv_rows_is_refused_and_writes_no_file(log: str, tmp_path) -> None:
    """ncu that matched no kernel (or was not permitted to profile) prints no CSV rows: the parser raises
    saying so and writes no ``ncu.csv``."""
    csv_file = tmp_path / "ncu.csv"
    with pytest.raises(ValueError, match=r"^ncu printed no CSV \(no kernel matched, or profiling was not permitted"):
        parse_ncu({"csv": str(csv_file)}, log)
    assert not csv_file.exists()


def test_ncu_profiles_every_layer_kind_at_the_deployment_batch_and_the_longest_context(tmp_path) -> None:
    """The ncu step's bench covers each kernel at B=64 in every layer kind and the indexer and attention at
    the longest cache, and no shape twice for one kernel (``sparse_attn_write`` runs ``sparse_attn``'s);
    the summary has a column for every metric it asks ncu for."""
    from dsv4.acceptance.plan import NCU_METRICS, build_plan
    from dsv4.acceptance.summary import NCU_COLUMNS
    from dsv4.bench.runner import run_bench
    from dsv4.cli import build_parser
    from dsv4.model.config import get_config

    assert [metric for metric, *_ in NCU_COLUMNS] == list(NCU_METRICS)
    paths = Paths(root=ROOT, out=tmp_path / "out", work=tmp_path / "work", python=sys.executable)
    (step,) = [s for s in build_plan(GPU, paths) if s.name == "ncu"]
    words = list(step.commands[0])
    assert ",".join(NCU_METRICS) in words
    assert words[words.index("--clock-control") + 1] == "none"  # ncu's default locks the clocks at base
    args = build_parser().parse_args(words[words.index("dsv4") + 1 :])
    figures = run_bench(get_config(args.preset), ops=args.ops, shapes=args.shapes, backends=[], traffic=False)
    shapes = [(s["op"], s["shape"]) for s in figures["shapes"]]
    for kind in ("", " kind=hca", " kind=swa"):
        assert ("sparse_attn", f"decode B=64 S=2 cache=2048{kind}") in shapes
        assert ("sparse_attn", f"decode B=1 S=2 cache=262144{kind}") in shapes
    assert {("kv_compressor", "decode B=64 S=2 kind=hca"), ("indexer", "decode B=1 S=2 cache=262144")} < set(shapes)
    assert {op for op, _ in shapes} == set(OPS) - {"sparse_attn_write"}
    assert not any("65536" in label or "B=8" in label for _, label in shapes)


def test_every_dsv4_command_of_the_gpu_plan_parses(tmp_path) -> None:
    """The GPU run's ``dsv4`` commands (inside ``ncu`` too) are accepted by ``dsv4``'s own parser:
    an argument it refuses would lose the step on the GPU, where no one can fix it."""
    from dsv4.acceptance.plan import build_plan
    from dsv4.cli import build_parser

    paths = Paths(root=ROOT, out=tmp_path / "out", work=tmp_path / "work", python=sys.executable)
    parsed = 0
    for step in build_plan(GPU, paths):
        for command in step.commands:
            words = list(command)
            for i in range(len(words) - 1):
                if words[i : i + 2] == ["-m", "dsv4"]:
                    args = ["cpu" if w == "cuda" else w for w in words[i + 2 :]]  # no GPU here to name
                    build_parser().parse_args(args)  # exits 2 on a refused argument
                    parsed += 1
    assert parsed >= 6, f"only {parsed} dsv4 commands found in the plan"


# -- arguments and OUT_DIR: refused before anything runs or changes ---------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["--steps", ","], ["--steps", ""], ["--steps", " , "], ["--budget-s", "nan"], ["--budget-s", "-5"],
        ["--budget-s", "0"], ["--budget-s", "inf"], ["--budget-s", "ten"],
    ],
    ids=lambda a: " ".join(a),
)  # fmt: skip
def test_bad_arguments_are_refused(argv, capsys) -> None:
    """With ``--list`` (nothing would run either way): a refused argument exits 2 naming it."""
    with pytest.raises(SystemExit) as info:
        main(["unused-out-dir", "--list", *argv])
    assert info.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_an_unknown_step_is_refused_with_the_steps_named(tmp_path, capsys) -> None:
    """``--steps`` naming a step the plan has not is a usage error (exit 2, as argparse's), not a failed
    step (exit 1); the message lists the plan's steps, and ``OUT_DIR`` is not made."""
    out = tmp_path / "out"
    assert main([str(out), "--dry-run", "--steps", "tests,bench_decode,benchmark"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("--steps: unknown benchmark; the steps are environment, tests, bench_decode, ")
    assert not out.exists()


def test_a_relative_out_dir_is_the_callers(tmp_path, capsys, monkeypatch) -> None:
    """The steps run in the project's root, so a relative ``OUT_DIR`` is made absolute from the directory
    the run was started in, where the user named it."""
    monkeypatch.chdir(tmp_path)
    assert main(["relative-out", "--dry-run", "--list", "--steps", "tests"]) == 0
    assert f"--junitxml={tmp_path.resolve() / 'relative-out' / 'junit.xml'} " in capsys.readouterr().out


def test_chosen_steps_keep_the_environment_and_the_dry_run_has_its_own_budget(tmp_path, capsys, monkeypatch) -> None:
    """``--steps`` runs the steps named and the environment step before them (the record's description of
    the machine); the dry run's budget is its own (300 s), not the GPU run's (480 s)."""
    from dsv4.acceptance.plan import DRY

    monkeypatch.delenv("DSV4_ACCEPTANCE_DRY", raising=False)
    assert main(["unused-out-dir", "--list", "--steps", "tests"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if not line.startswith(" ")]
    assert listed == ["environment", "tests"]
    out = tmp_path / "out"
    assert main([str(out), "--dry-run", "--steps", "environment"]) == 0
    record = json.loads((out / RECORD).read_text())
    assert record["budget_s"] == DRY.budget_s != GPU.budget_s
    assert [s["name"] for s in record["steps"]] == ["environment"]


def test_a_commit_that_is_not_the_checkouts_head_is_refused(tmp_path, capsys, monkeypatch) -> None:
    """``--commit`` names the code where there is no git; where there is, it must be HEAD (the record
    would otherwise name code that did not run), and nothing is written. Git's answers are the test's
    own, so it runs the same in a checkout, an unpacked sdist or the GPU machine's copy of the tree."""
    from dsv4.acceptance import __main__ as acceptance_main

    head = "1" * 40
    monkeypatch.setattr(acceptance_main.checkout, "commit", lambda: (head, False))
    other = "0" * 40
    out = tmp_path / "out"
    assert main([str(out), "--dry-run", "--steps", "environment", "--commit", other[:12]]) == 2
    assert "--commit" in capsys.readouterr().err and not out.exists()


def _out_dir_cases(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "a-file").write_text("mine\n")
    return {
        "a-file": tmp_path / "a-file",
        "below-a-file": tmp_path / "a-file" / "out",
        "under-proc": Path("/proc/dsv4-acceptance-out"),
        "proc-itself": Path("/proc/self"),
    }


@pytest.mark.parametrize("which", ["a-file", "below-a-file", "under-proc", "proc-itself"])
def test_an_out_dir_it_cannot_use_is_one_line(which, tmp_path, capsys) -> None:
    out = _out_dir_cases(tmp_path)[which]
    assert main([str(out), "--dry-run", "--steps", "environment"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("OUT_DIR:") and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert (tmp_path / "a-file").read_text() == "mine\n"


def test_a_directory_it_did_not_make_is_left_alone(tmp_path, capsys) -> None:
    """A user's own summary.md and log.txt (no acceptance.json of an earlier run): refused, nothing deleted."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.md").write_text("my notes\n")
    (out / "log.txt").write_text("my log\n")
    (out / RECORD).write_text(json.dumps({"kind": "my own record"}))
    assert main([str(out), "--dry-run", "--steps", "environment"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["acceptance.json", "log.txt", "summary.md"]
    assert (out / "summary.md").read_text() == "my notes\n" and (out / "log.txt").read_text() == "my log\n"


def test_planted_links_are_never_written_through(tmp_path) -> None:
    """An earlier run's directory (re-used) with links planted at every name the run writes, temp names
    included: the run replaces or removes the links and writes nothing outside OUT_DIR."""
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    (out / RECORD).write_text(json.dumps({"kind": KIND, "steps": []}))
    (out / "notes.txt").write_text("kept\n")
    names = [*OUTPUTS, "acceptance.json.tmp", "summary.md.tmp", "log.txt.tmp", ".write-check.tmp"]
    names.remove(RECORD)
    for name in names:
        (outside / name).write_text("outside\n")
        (out / name).symlink_to(outside / name)
    assert main([str(out), "--dry-run", "--steps", "environment", "--budget-s", "120"]) == 0
    assert all((outside / name).read_text() == "outside\n" for name in names)
    assert sorted(p.name for p in outside.iterdir()) == sorted(names)
    for name in ("summary.md", "acceptance.json", "log.txt"):
        assert (out / name).is_file() and not (out / name).is_symlink()
    assert json.loads((out / RECORD).read_text())["kind"] == KIND
    assert (out / "notes.txt").read_text() == "kept\n"  # not an output of the run: untouched
    assert main([str(out), "--dry-run", "--steps", "environment", "--budget-s", "120"]) == 0  # its own dir again


def test_an_installed_package_is_refused_before_anything_runs(tmp_path) -> None:
    """From an installed copy of the package (a venv's site-packages), the steps' scripts are not there:
    the run used to go ahead, fail every step and record the digest of no files; now it is refused up
    front, exit 2 naming the missing folders, and nothing is written."""
    site = tmp_path / "venv" / "lib" / "python3.11" / "site-packages"
    shutil.copytree(ROOT / "src" / "dsv4", site / "dsv4", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "out"
    for extra in (["--dry-run", "--steps", "decode_graph"], ["--list"]):
        done = subprocess.run(
            [sys.executable, "-m", "dsv4.acceptance", str(out), *extra],
            capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)}, timeout=120,
        )  # fmt: skip
        assert done.returncode == 2, (extra, done.stdout, done.stderr)
        err = done.stderr.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert all(f"{d}/" in err for d in ("tests", "benchmarks", "examples")) and str(site.parent) in err, err
        assert done.stdout == "" and not out.exists()


def test_the_pytest_lines_count_as_the_junit_xml_does(tmp_path) -> None:
    """A run that stopped before its junit XML is counted from its ``-v`` lines as the XML would have
    counted it: an expected failure (``XFAIL``) as skipped, an unexpected pass that is not strict
    (``XPASS``) as passed, a strict one as failed; from a real pytest run of each outcome."""
    # a file of one test per outcome for the child pytest to run: its skip and xfail marks are the outcomes
    # under test, not tests of this suite left out
    (tmp_path / "test_outcomes.py").write_text(
        "import pytest\n"
        "def test_pass(): pass\n"
        "def test_fail(): assert False\n"
        "@pytest.mark.skip(reason='x')\ndef test_skip(): pass\n"
        "@pytest.mark.xfail(reason='x')\ndef test_xfail(): assert False\n"
        "@pytest.mark.xfail(reason='x')\ndef test_xpass(): pass\n"
        "@pytest.mark.xfail(reason='x', strict=True)\ndef test_xpass_strict(): pass\n"
        "@pytest.mark.parametrize('a', ['x y', '[0, 1]'])\ndef test_spaced(a): assert a == 'x y'\n"
        "@pytest.fixture\ndef broken(): raise RuntimeError('x')\ndef test_error(broken): pass\n"
    )
    junit = tmp_path / "junit.xml"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-p", "no:xdist", f"--junitxml={junit}",
         "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path / "test_outcomes.py")],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert junit.is_file(), done.stdout[-2000:] + done.stderr[-2000:]
    from_xml = parse_tests({"junit": str(junit)}, done.stdout)
    from_lines = parse_tests({"junit": str(tmp_path / "missing.xml")}, done.stdout)
    keys = ("passed", "failed", "errors", "skipped", "total")
    assert [from_xml[k] for k in keys] == [3, 3, 1, 2, 9]
    assert [from_lines[k] for k in keys] == [from_xml[k] for k in keys]
    failed = ["test_fail", "test_xpass_strict", "test_spaced[[0, 1]]", "test_error"]
    assert [t.rsplit("::", 1)[-1] for t in from_lines["failures"]] == failed
    assert [t.rsplit("::", 1)[-1] for t in from_xml["failures"]] == failed

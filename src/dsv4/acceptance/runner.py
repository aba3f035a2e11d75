"""Run the plan under one total budget: each step in its own process group with its own timeout,
a failing or hung step recorded and the next one started, ``acceptance.json`` and ``summary.md``
rewritten after every step, no step started once the budget cannot fit it.

A step past its timeout, or running when the budget ends, gets SIGINT first (pytest then still
writes its junit XML), SIGTERM, then SIGKILL: the run ends within the budget plus those few
seconds of grace. Whatever is left of a step's process group when its first process ends is killed
(a worker holding the GPU must not run into the next step), and a step dies with the runner
(``PR_SET_PDEATHSIG``). If the runner itself is interrupted (SIGINT or SIGTERM), it stops the running
step and writes the record and the summary before it exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from ..io.atomic_write import write_atomic
from .environment import describe
from .out_dir import RECORD, open_nofollow
from .plan import Paths, Step
from .results import PARSERS
from .summary import render

KILL_GRACE_S = (5.0, 3.0)  # after SIGINT, after SIGTERM: then SIGKILL
LOG_CAP_BYTES = 1 << 20  # per step in log.txt: head and tail kept (the device returns files up to 16 MiB)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
TAIL_LINES = 15  # of a failing step's output, echoed to the terminal
OUTPUTS = (
    "summary.md", "acceptance.json", "log.txt", "junit.xml", "bench-decode.png", "trace.json.gz", "ncu.csv",
    "kernel-config.json",
)  # fmt: skip


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT, SIGTERM, SIGKILL to the step's process group, each after a grace period."""
    for sig, grace in ((signal.SIGINT, KILL_GRACE_S[0]), (signal.SIGTERM, KILL_GRACE_S[1]), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    proc.wait()
    _kill_group(proc)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to whatever is left of the step's process group once its first process is gone (a worker it
    started that outlived it would hold the GPU into the next step)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _die_with_the_runner() -> None:
    """In the step's first process, before it runs: SIGKILL when the runner dies (Linux ``prctl``), so that
    a runner killed outright does not leave its step running in a session of its own."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the runner still stops the group itself
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class _Interrupted(BaseException):
    """The runner got SIGTERM (the machine's time is up) or SIGINT; a ``BaseException`` so that no
    ``except Exception`` on the way (a parser's) takes it for an error of its own."""


def _raise_interrupted(signum: int, frame: Any) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)  # a second signal must not cut the clean-up short
    raise _Interrupted(signal.Signals(signum).name)


def _tail(text: str, cap: int) -> str:
    if len(text) <= cap:
        return text
    half = cap // 2
    return f"{text[:half]}\n[... {len(text) - cap} characters left out ...]\n{text[-half:]}"


def _pending(step: Step) -> dict[str, Any]:
    """A step's entry in the record before it runs."""
    return {
        "name": step.name,
        "title": step.title,
        "commands": [shlex.join(c) for c in step.commands],
        "timeout_s": step.timeout_s,
        "covers": step.covers,
        "status": "pending",
        "reason": "",
        "seconds": None,
        "returncodes": [],
    }


class Runner:
    """Runs ``steps`` into ``paths.out`` within ``budget_s`` seconds; ``record`` is what
    ``acceptance.json`` holds (``meta`` fields are merged into it)."""

    def __init__(self, steps: list[Step], paths: Paths, budget_s: float, meta: dict[str, Any]) -> None:
        self.steps, self.paths, self.budget_s = steps, paths, budget_s
        self.record: dict[str, Any] = {
            **meta,
            "budget_s": budget_s,
            "started": _now(),
            "finished": None,
            "elapsed_s": 0.0,
            "environment": None,
            "steps": [_pending(s) for s in steps],
        }
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(paths.root / "src"), env.get("PYTHONPATH")) if p)
        env.update(PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
        self.env = env

    # -- output ----------------------------------------------------------------------------
    def save(self) -> None:
        out = self.paths.out
        write_atomic(out / RECORD, json.dumps(self.record, indent=1) + "\n")
        write_atomic(out / "summary.md", render(self.record))

    def _append_log(self, step: Step, entry: dict[str, Any], text: str) -> None:
        reason = f" ({entry['reason']})" if entry["reason"] else ""
        header = f"===== {step.name}: {entry['status']}{reason} in {entry['seconds'] or 0:.1f} s =====\n"
        with open_nofollow(self.paths.out / "log.txt", append=True) as f:
            f.write((header + _tail(text, LOG_CAP_BYTES) + "\n").encode())

    # -- one step --------------------------------------------------------------------------
    def _run_commands(self, step: Step, log_path: Path, deadline: float) -> tuple[str, str, list[int | None]]:
        """Run the step's commands in order until ``deadline`` -> (status, reason, return codes)."""
        codes: list[int | None] = []
        for k, argv in enumerate(step.commands, 1):
            with log_path.open("ab") as log:
                log.write(f"$ {shlex.join(argv)}\n".encode())
                log.flush()
                try:
                    proc = subprocess.Popen(
                        argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.paths.root,
                        env=self.env, start_new_session=True, preexec_fn=_die_with_the_runner,
                    )  # fmt: skip
                except OSError as e:
                    codes.append(None)
                    return "failed", f"could not start {argv[0]}: {e}", codes
                try:
                    codes.append(proc.wait(timeout=max(0.0, deadline - time.monotonic())))
                    _kill_group(proc)
                except subprocess.TimeoutExpired:
                    _stop(proc)
                    codes.append(proc.returncode)
                    return "timeout", "", codes
                except _Interrupted:
                    _stop(proc)
                    raise
            if codes[-1] != 0:
                which = f" from command {k} of {len(step.commands)}" if len(step.commands) > 1 else ""
                return "failed", f"exit code {codes[-1]}{which}", codes
        return "ok", "", codes

    def _step(self, i: int, step: Step, run_deadline: float) -> None:
        entry = self.record["steps"][i]
        left = run_deadline - time.monotonic()
        prefix = f"[{i + 1}/{len(self.steps)}] {step.name}"
        if step.skip:
            entry.update(status="skipped", reason=step.skip)
            print(f"{prefix}: skipped ({step.skip})", flush=True)
            return
        if left < step.min_s:
            entry.update(status="not run", reason=f"budget spent: {max(left, 0):.0f} s left, needs {step.min_s:g} s")
            print(f"{prefix}: not run ({entry['reason']})", flush=True)
            return
        allowed = min(step.timeout_s, left)
        print(f"{prefix}: {step.title} (up to {allowed:.0f} s; {left:.0f} s of the budget left)", flush=True)
        log_path = self.paths.work / f"{step.name}.log"
        entry["status"] = "running"
        self.save()
        t0 = time.monotonic()
        try:
            status, reason, codes = self._run_commands(step, log_path, t0 + allowed)
        except _Interrupted as e:
            status, reason, codes = "interrupted", f"the run was interrupted ({e})", []
        if status == "timeout":
            limit = "its time limit" if allowed == step.timeout_s else "the end of the budget"
            reason = f"stopped at {limit} ({allowed:.0f} s)"
        entry.update(status=status, reason=reason, returncodes=codes, seconds=round(time.monotonic() - t0, 1))
        text = log_path.read_text(errors="replace") if log_path.exists() else ""
        if status == "interrupted":
            self._append_log(step, entry, text)
            raise _Interrupted(reason)
        if step.parse:
            try:
                entry["result"] = PARSERS[step.parse](step.files, text)
            except Exception as e:  # a step that printed or wrote nothing usable: say so, go on
                entry["parse_error"] = f"{type(e).__name__}: {e}"
        if step.name == "environment" and "result" in entry:
            self.record["environment"] = entry.pop("result")
        self._append_log(step, entry, text)
        print(f"{prefix}: {status} in {entry['seconds']:.1f} s {reason}".rstrip(), flush=True)
        if status != "ok":
            print("\n".join("    " + line for line in text.splitlines()[-TAIL_LINES:]), flush=True)

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> int:
        """Every step in order; returns 0 when every step that should run ran, passed and printed what its
        parser reads (a step whose figures could not be read has none to show: 1)."""
        start = time.monotonic()
        run_deadline = start + self.budget_s
        previous = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.save()
            for i, step in enumerate(self.steps):
                try:
                    self._step(i, step, run_deadline)
                finally:
                    self.record["elapsed_s"] = round(time.monotonic() - start, 1)
                    self.save()
                if step.name == "environment" and self.record["environment"]:
                    print("\n".join("    " + line for line in describe(self.record["environment"])), flush=True)
        except _Interrupted:
            for entry in self.record["steps"]:
                if entry["status"] in ("pending", "running"):
                    entry.update(status="not run", reason="the run was interrupted")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.record["finished"] = _now()
            self.record["elapsed_s"] = round(time.monotonic() - start, 1)
            self.save()
        print("\n" + render(self.record), flush=True)
        bad = [e for e in self.record["steps"] if e["status"] not in ("ok", "skipped") or e.get("parse_error")]
        return 1 if bad else 0

"""``benchmarks/host_step.py``: the host side of a decode step, timed per module and part as a user runs it."""

from __future__ import annotations

import json

import pytest

from subprocesses import ROOT, run_python

KINDS = ["csa", "hca", "swa"]
MODULES = [f"DecodeAttention {k}" for k in KINDS] + [f"DecodeAttention {k} eager forward" for k in KINDS]
MODULES += ["DecodeFrontEnd", "DecodeFrontEnd eager forward"]


def test_host_step_times_every_module_and_part(tmp_path) -> None:
    """Each module at each context gets a line and a JSON row; each part's median is positive and at
    most the whole step's (the step is the parts back to back); ``--eager`` adds each module's
    ``forward`` with its ops stubbed."""
    out = tmp_path / "host.json"
    args = ["--preset", "tiny", "--batch", "3", "--context", "0", "70", "--steps", "40", "--warmup", "5", "--eager"]
    proc = run_python([str(ROOT / "benchmarks" / "host_step.py"), *args, "--json", str(out)])
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["module"], r["context"]) for r in rows] == [(m, c) for c in (0, 70) for m in MODULES]
    for r in rows:
        ms = r["median_ms"]
        parts = {k: v for k, v in ms.items() if k != "step"}
        assert len(parts) == (1 if "eager" in r["module"] else 3), r
        assert all(0 < v <= ms["step"] for v in parts.values()), r
    lines = [line for line in proc.stdout.splitlines() if ": host step " in line]
    assert len(lines) == len(rows) and lines[0].startswith("DecodeAttention csa B=3 S=2 context=0: host step ")


def test_host_step_refuses_a_warmup_past_its_steps() -> None:
    proc = run_python([str(ROOT / "benchmarks" / "host_step.py"), "--preset", "tiny", "--steps", "5", "--warmup", "5"])
    assert proc.returncode == 2 and "--warmup" in proc.stderr


@pytest.mark.parametrize(
    ("flag", "value"), [("--batch", "0"), ("--seq", "0"), ("--context", "-5"), ("--steps", "0"), ("--warmup", "-1")]
)
def test_host_step_refuses_bad_sizes_as_usage_errors(flag: str, value: str) -> None:
    """A size no step can have is one line naming the flag and exit status 2, before any module is
    built (a traceback from the module, or ``range()``'s, before)."""
    proc = run_python([str(ROOT / "benchmarks" / "host_step.py"), "--preset", "tiny", flag, value])
    assert proc.returncode == 2, proc.stderr
    assert f"argument {flag}: expected an int >= " in proc.stderr and "Traceback" not in proc.stderr

"""Run Python in a fresh interpreter on this checkout's ``src`` (the CLI, the examples, compile scripts)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_python(args: list[str], timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    """``python *args`` with ``src`` first on ``PYTHONPATH`` and ``env`` set -> the finished process
    (stdout and stderr captured as text)."""
    path = str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")
    full_env = {**os.environ, **env, "PYTHONPATH": path}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=full_env, timeout=timeout)


def run_dsv4(*argv: str) -> subprocess.CompletedProcess:
    """``dsv4 *argv`` (as ``python -m dsv4``)."""
    return run_python(["-m", "dsv4", *argv])


def run_python_without_cuda(args: list[str], interpret: str | None = None) -> subprocess.CompletedProcess:
    """``python *args`` as a fresh shell runs it on a machine without CUDA: no CUDA device, and
    ``TRITON_INTERPRET`` as given (unset for None; the suite's own process set it)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret is not None:
        env["TRITON_INTERPRET"] = interpret
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600)

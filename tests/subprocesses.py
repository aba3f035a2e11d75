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

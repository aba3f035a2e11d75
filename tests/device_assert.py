"""Bad *values* in tensors on a GPU are caught on the device (spec §7 without a host sync): the op
queues ``torch._assert_async`` ahead of its kernels, the stream stops at a device-side assert that
names the argument, and the process's CUDA context is unusable from then on. Such calls are made in
a child process, so the test session goes on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
CHILD_TIMEOUT_S = 100  # a fresh interpreter: torch import, CUDA context (inside the 120 s per-test limit)


def assert_stops_on_device(script: str, words: tuple[str, ...]) -> None:
    """Run ``script`` (with the tests folder on ``sys.path``) in a child; it must fail with a
    device-side assert whose output holds every one of ``words``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    prelude = "import torch\n"
    epilogue = "\ntorch.cuda.synchronize()\nprint('NO DEVICE ASSERT')\n"
    proc = subprocess.run(
        [sys.executable, "-c", prelude + script + epilogue],
        capture_output=True, text=True, env=env, cwd=TESTS.parent, timeout=CHILD_TIMEOUT_S,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "NO DEVICE ASSERT" not in output, f"the call ran to the end:\n{output[-2000:]}"
    # the kernel's own line, "Assertion `<message>` failed."; the Python error that follows depends on
    # which CUDA call next meets the lost context ("device-side assert triggered", a cuBLAS error, ...)
    assert "Assertion `" in output, f"no device-side assert:\n{output[-2000:]}"
    missing = [w for w in words if w not in output]
    assert not missing, f"the assert does not name {missing}:\n{output[-2000:]}"

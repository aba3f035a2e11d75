"""README "Requirements": without CUDA, the first use of the Triton kernels sets ``TRITON_INTERPRET=1`` in
``os.environ`` (children inherit it) unless the caller chose a value; an explicit ``0`` is kept, and the
Triton backend is then unavailable on the CPU while the reference runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from subprocesses import ROOT

CODE = """
import json, os, subprocess, sys
import dsv4
before = os.environ.get("TRITON_INTERPRET")
backends = dsv4.available_backends("cpu")
child = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('TRITON_INTERPRET'))"],
                       capture_output=True, text=True, check=True).stdout.strip()
print(json.dumps({"before": before, "after": os.environ.get("TRITON_INTERPRET"), "backends": backends,
                  "child": child}))
"""


def _run(interpret: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the suite's own process set it
    if interpret is not None:
        env["TRITON_INTERPRET"] = interpret
    env["CUDA_VISIBLE_DEVICES"] = ""  # no CUDA device, on any machine
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("interpret", [None, "0"], ids=["unset", "explicit-0"])
def test_interpreter_choice_in_the_environment(interpret: str | None) -> None:
    pytest.importorskip("triton")
    seen = _run(interpret)
    assert seen["before"] == interpret  # ``import dsv4`` alone sets nothing
    if interpret is None:
        assert seen["after"] == "1" and seen["child"] == "1"
        assert seen["backends"] == ["triton", "reference"]
    else:
        assert seen["after"] == "0" and seen["child"] == "0"
        assert seen["backends"] == ["reference"]

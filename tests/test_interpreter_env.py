"""README "Requirements": without CUDA, the first use of the Triton kernels sets ``TRITON_INTERPRET=1`` in
``os.environ`` (children inherit it) unless the caller chose a value; an explicit ``0`` is kept, and the
Triton backend is then unavailable on the CPU while the reference runs."""

from __future__ import annotations

import json

import pytest
import torch

from subprocesses import run_python_without_cuda

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
    done = run_python_without_cuda(["-c", CODE], interpret)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize(
    ("interpret", "interpreted"),
    [(None, True), ("0", False), ("false", False), ("", False), ("True", True)],
    ids=["unset", "explicit-0", "explicit-false", "empty", "explicit-True"],
)
def test_interpreter_choice_in_the_environment(interpret: str | None, interpreted: bool) -> None:
    """A value the caller chose is kept and read as Triton reads it (``false`` and an empty value run
    compiled, so the Triton backend is unavailable on the CPU)."""
    pytest.importorskip("triton")
    seen = _run(interpret)
    assert seen["before"] == interpret  # ``import dsv4`` alone sets nothing
    kept = "1" if interpret is None else interpret
    assert seen["after"] == kept and seen["child"] == kept
    assert seen["backends"] == (["triton", "reference"] if interpreted else ["reference"])


# What a process asks first must not load Triton before the interpreter is chosen: Triton reads
# ``TRITON_INTERPRET`` when its own library functions (``tl.cdiv``) are defined, and a kernel calling
# them fails at its launch otherwise.
RUN_AN_OP = (
    "from dsv4.harness.cases import make_case, run_case\n"
    "from dsv4.model.config import get_config\n"
    "run_case(make_case(get_config('tiny'), 'o_proj', seed=1), 'triton')\n"
)


# The entry points that load Triton themselves, each asked first: whether Triton runs, a traffic count,
# the acceptance run's description of the machine (which reads Triton's version).
FIRST = {
    "triton_missing": "from dsv4.ops.backends import triton_missing\nassert triton_missing() is None\n",
    "count_traffic": "from dsv4.bench.interp_traffic import count_traffic\nwith count_traffic():\n    pass\n",
    "environment": "from dsv4.acceptance.environment import collect\nassert collect()['triton']\n",
}


@pytest.mark.parametrize("first", FIRST)
def test_what_loads_triton_first_chooses_the_interpreter_before(first: str) -> None:
    pytest.importorskip("triton")
    done = run_python_without_cuda(["-c", FIRST[first] + RUN_AN_OP])
    assert done.returncode == 0, done.stderr[-2000:]


def test_dsv4_tune_runs_the_interpreter_from_a_fresh_shell() -> None:
    pytest.importorskip("triton")
    tune = ["tune", "--dry-run", "--preset", "tiny", "--ops", "o_proj", "--mode", "decode"]
    done = run_python_without_cuda(["-m", "dsv4", *tune])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "error" not in done.stdout


def test_without_triton_it_says_so() -> None:
    """Triton installed but not importable: ``triton_missing`` names the import failure."""
    code = (
        "import sys\n"
        "class NoTriton:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ImportError('no triton here')\n"
        "sys.meta_path.insert(0, NoTriton())\n"
        "from dsv4.ops.backends import triton_missing\n"
        "print(triton_missing())\n"
    )
    done = run_python_without_cuda(["-c", code])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "cannot import triton: no triton here"


def test_the_triton_backend_runs_on_cuda_and_on_an_interpreted_cpu_only() -> None:
    pytest.importorskip("triton")
    from dsv4.kernels.interpreter import interpreted, unavailable_reason

    assert unavailable_reason(torch.device("cuda")) is None
    assert (unavailable_reason(torch.device("cpu")) is None) is interpreted()
    assert unavailable_reason(torch.device("meta")) == "no Triton target for device type 'meta'"

"""``dsv4.kernels.interpreter_speed``: Triton's interpreter patches ``triton.language`` once a launch, not
again at each helper call, and still patches a helper's other language module (``tl.core``). The
suite runs with it (``conftest.py``), so every kernel test also holds its results to the reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from conftest import INTERPRETER_TRAFFIC
from dsv4.kernels.interpreter_speed import patch_language_once_per_launch
from lang_core_helper import magnitude, root_magnitude_kernel
from subprocesses import run_python_without_cuda

pytestmark = INTERPRETER_TRAFFIC

N = 16


@triton.jit
def _halved(x):
    return x * 0.5


@triton.jit
def _helpers_kernel(x_ptr, out_ptr, N: tl.constexpr, CALLS: tl.constexpr, CORE: tl.constexpr):
    x = tl.load(x_ptr + tl.arange(0, N))
    for _ in tl.static_range(CALLS):
        x = _halved(x)
    if CORE:
        x = magnitude(x)
    tl.store(out_ptr + tl.arange(0, N), x)


def _run(calls: int, core: bool) -> torch.Tensor:
    x = torch.linspace(-4, 4, N)
    out = torch.empty(N)
    _helpers_kernel[(1,)](x, out, N=N, CALLS=calls, CORE=core)
    return out


def _installed() -> None:
    # Only a Triton release outside ``CHECKED`` (or an interpreter without the hook points) returns False:
    # there it is not taken, and nothing of it is left to test; the release test below holds that case.
    if not patch_language_once_per_launch():
        pytest.skip("this Triton's interpreter is built otherwise: it patches at each helper call, as it comes")


def test_a_helper_naming_tl_core_is_patched_inside_the_launch() -> None:
    """The kernel's module names ``tl``; the helper's names ``core`` alone, which the launch did not patch."""
    _installed()
    x = torch.linspace(-4, 4, N)
    assert torch.equal(_run(2, core=True), (x * 0.25).abs())


def test_a_helper_naming_tl_as_well_is_patched_inside_a_launch_that_patched_core_alone() -> None:
    _installed()
    x = torch.linspace(-4, 4, N)
    out = torch.empty(N)
    root_magnitude_kernel[(1,)](x, out)
    assert torch.allclose(out, x.abs().sqrt())


def test_a_helper_naming_core_as_well_is_patched_inside_a_launch_that_patched_tl_alone() -> None:
    """The kernel's module names ``tl`` (and, once the interpreter has rewritten a function of it, only
    ``tl`` more); the helper's names ``tl`` and ``core``: sharing one module with the launch is not
    enough, ``core`` must still be patched for it. In a fresh process: run after the tests above in
    this one, the same launch passed with ``core`` left unpatched."""
    code = (
        "import sys, torch, triton, triton.language as tl\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from dsv4.kernels.interpreter_speed import patch_language_once_per_launch\n"
        "from lang_both_helper import root_magnitude\n"
        "@triton.jit\n"
        "def root_kernel(x_ptr, out_ptr):\n"
        "    offs = tl.arange(0, 16)\n"
        "    tl.store(out_ptr + offs, root_magnitude(tl.load(x_ptr + offs)))\n"
        "print(patch_language_once_per_launch())\n"
        "x, out = torch.linspace(-4, 4, 16), torch.empty(16)\n"
        "root_kernel[(1,)](x, out)\n"
        "print(torch.allclose(out, x.abs().sqrt()))\n"
    )
    done = run_python_without_cuda(["-c", code], interpret="1")
    assert done.returncode == 0, done.stderr[-2000:]
    installed, right = done.stdout.split()[-2:]
    if installed != "True":  # as in ``_installed``: a release outside ``CHECKED`` does not take it
        pytest.skip("this Triton's interpreter is built otherwise: it patches at each helper call, as it comes")
    assert right == "True"


def test_helper_calls_patch_nothing_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A launch whose kernel calls a helper 3 times scans the language modules as often as one that calls
    none; the helper's results are as written."""
    import triton.runtime.interpreter as interpreter

    _installed()
    scans = []
    real = interpreter._patch_builtin

    def counted(pkg: object, *args: object) -> None:
        scans.append(pkg)
        real(pkg, *args)

    monkeypatch.setattr(interpreter, "_patch_builtin", counted)
    x = torch.linspace(-4, 4, N)
    assert torch.equal(_run(0, core=False), x)
    alone = len(scans)
    assert alone > 0
    assert torch.equal(_run(3, core=False), x * 0.125)
    assert len(scans) == 2 * alone


def test_it_is_turned_on_once() -> None:
    """A second call changes nothing: the launch is wrapped once, not once per call."""
    import triton.runtime.interpreter as interpreter

    _installed()
    patch, launch = interpreter._patch_lang, interpreter.GridExecutor.__call__
    assert patch_language_once_per_launch()
    assert (interpreter._patch_lang, interpreter.GridExecutor.__call__) == (patch, launch)


def test_the_dsv4_command_turns_it_on() -> None:
    """``dsv4`` (here ``dsv4 info``, from a fresh shell) runs its interpreted kernels so; importing ``dsv4``
    alone changes nothing."""
    code = (
        "import triton.runtime.interpreter as i, dsv4\n"
        "before = getattr(i._patch_lang, 'once_per_launch', False)\n"
        "from dsv4.cli import main\n"
        "main(['info'])\n"
        "print(before, getattr(i._patch_lang, 'once_per_launch', False))\n"
    )
    done = run_python_without_cuda(["-c", code])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-2:] == ["False", "True"]


@pytest.mark.parametrize("version", ["3.6.0", "3.9.1"])
def test_the_releases_it_was_checked_on_take_it(version: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _installed()
    monkeypatch.setattr(triton, "__version__", version)
    assert patch_language_once_per_launch()


@pytest.mark.parametrize("version", ["3.5.1", "3.10.0", "4.0.0+git1234"])
def test_a_release_it_was_not_checked_on_runs_as_it_comes(version: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import triton.runtime.interpreter as interpreter

    patch, launch = interpreter._patch_lang, interpreter.GridExecutor.__call__
    monkeypatch.setattr(triton, "__version__", version)
    assert not patch_language_once_per_launch()
    assert (interpreter._patch_lang, interpreter.GridExecutor.__call__) == (patch, launch)

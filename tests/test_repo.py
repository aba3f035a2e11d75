"""The repository keeps its promises: CI runs the README's test command and the type check; the
package ships its types."""

from __future__ import annotations

import re
import runpy
import tomllib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command() -> None:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    test_commands = [line for block in blocks for line in block.splitlines() if "pytest" in line]
    assert len(test_commands) == 1, test_commands
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_commands[0].strip() in ci_lines


def test_the_package_ships_its_types_and_ci_checks_them() -> None:
    """README: the annotations are the package's types (``py.typed``, packaged) and CI runs ``mypy`` on the
    package, the examples, the benchmark scripts and the tests."""
    assert (ROOT / "src" / "dsv4" / "py.typed").is_file()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["dsv4"]
    assert set(project["tool"]["mypy"]["files"]) == {"src/dsv4", "examples", "benchmarks", "tests"}
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert any(re.fullmatch(r"(.*&& )?mypy", line) for line in ci_lines), ci_lines


def test_the_readme_api_snippets_are_the_type_checked_example_and_run() -> None:
    """The README's two API snippets are a caller's code: ``examples/readme_api.py`` holds them verbatim,
    so ``mypy`` (which checks examples/, CI runs it) type-checks them as written, and they run."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    script = ROOT / "examples" / "readme_api.py"
    assert len(blocks) >= 2
    for block in blocks[:2]:
        assert block in script.read_text(), block
    scope = runpy.run_path(str(script), run_name="readme_api")
    assert tuple(scope["y"].shape) == (8, scope["cfg"].hidden_size) and scope["y"].dtype == torch.bfloat16
    assert bool(torch.isfinite(scope["y"].float()).all())


def test_the_safetensors_floor_can_save_and_read_float8() -> None:
    """Golden cases hold float8_e4m3fn tensors: safetensors 0.4.1 cannot save one (KeyError on the dtype)
    nor read one back ("Dtype not understood: F8_E4M3"); 0.4.2 does both. The declared floor keeps 0.4.1 out."""
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (req,) = [Requirement(r) for r in project["project"]["dependencies"] if Requirement(r).name == "safetensors"]
    assert not req.specifier.contains("0.4.1")
    assert req.specifier.contains("0.4.2")

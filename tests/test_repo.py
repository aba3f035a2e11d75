"""The repository keeps its promises: CI runs the README's test command and the type check; the
package ships its types."""

from __future__ import annotations

import importlib
import re
import runpy
import tomllib
from pathlib import Path

import pytest
import torch

import dsv4

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


def test_the_readme_golden_snippet_passes_a_kernel_and_fails_a_wrong_one(tmp_path, monkeypatch) -> None:
    """The README's golden snippet as written, on the case its ``dsv4 golden save`` line writes, with the
    indexer as "your kernel": it passes, and a kernel whose scores are all zero fails its assert."""
    from dsv4.cli import main

    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    (snippet,) = [b for b in blocks if "golden_io import load" in b]
    monkeypatch.chdir(tmp_path)
    save = "golden save golden/ --preset tiny --op indexer --mode decode --seed 0"  # the README's line
    assert save in (ROOT / "README.md").read_text()
    assert main(save.split()) == 0
    exec(snippet, {"my_indexer": dsv4.indexer})
    zero_scores = lambda **args: (o := dsv4.indexer(**args))._replace(score=torch.zeros_like(o.score))  # noqa: E731
    with pytest.raises(AssertionError, match="MISMATCH score"):
        exec(snippet, {"my_indexer": zero_scores})


def test_the_safetensors_floor_can_save_and_read_float8() -> None:
    """Golden cases hold float8_e4m3fn tensors: safetensors 0.4.1 cannot save one (KeyError on the dtype)
    nor read one back ("Dtype not understood: F8_E4M3"); 0.4.2 does both. The declared floor keeps 0.4.1 out."""
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (req,) = [Requirement(r) for r in project["project"]["dependencies"] if Requirement(r).name == "safetensors"]
    assert not req.specifier.contains("0.4.1")
    assert req.specifier.contains("0.4.2")


def test_the_license_is_the_apache_text_the_metadata_declares() -> None:
    """pyproject declares Apache-2.0 as an SPDX expression and ships ``LICENSE`` (wheel and sdist), which
    holds the license's whole text, not a summary."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    assert project["project"]["license-files"] == ["LICENSE"]
    from packaging.requirements import Requirement

    (setuptools,) = [Requirement(r) for r in project["build-system"]["requires"] if r.startswith("setuptools")]
    assert not setuptools.specifier.contains("76.9")  # the SPDX string and license-files need setuptools 77
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    titles = re.findall(r"^   \d\. ([A-Z][^.]*)\.", text, flags=re.M)  # the nine sections of the terms
    assert len(titles) == 9 and titles[0] == "Definitions", titles
    assert titles[-1] == "Accepting Warranty or Additional Liability", titles
    assert "END OF TERMS AND CONDITIONS" in text


def test_the_sdist_holds_what_pytest_needs() -> None:
    """MANIFEST.in, as setuptools reads it, puts the whole test suite into the sdist (its conftest and data,
    the scripts and examples the tests run, the CI script a test reads) and the docs and the license."""
    filelist = pytest.importorskip("setuptools._distutils.filelist")
    files = filelist.FileList()
    folders = ("tests", "benchmarks", "examples", "docs", ".ci")
    files.allfiles = [str(p.relative_to(ROOT)) for d in folders for p in (ROOT / d).rglob("*") if p.is_file()]
    files.allfiles += [p.name for p in ROOT.iterdir() if p.is_file()]
    for line in (ROOT / "MANIFEST.in").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            files.process_template_line(line)
    shipped = set(files.files)
    needed = [p for p in files.allfiles if p.split("/")[0] in folders and "__pycache__" not in p]
    assert sorted(set(needed) - shipped) == []
    assert {"LICENSE", "README.md", "tests/conftest.py", "tests/data/golden_vectors/index.json"} <= shipped
    assert {"docs/SPEC.md", "benchmarks/gpu_acceptance.sh", ".ci/run"} <= shipped


def test_the_dev_extra_holds_every_other_extra_and_the_checkers() -> None:
    """``pip install ".[dev]"`` is enough for the tests, ruff, mypy and ``pytest --cov``: mypy reads matplotlib
    (bench/report.py, cli.py) and tqdm, so the dev extra holds the test and bench extras' requirements as well."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    dev = set(extras["dev"])
    for name, requirements in extras.items():
        assert set(requirements) <= dev, (name, sorted(set(requirements) - dev))
    assert {r.split(">")[0] for r in dev} >= {"ruff", "mypy", "matplotlib", "tqdm", "pytest", "pytest-cov"}


def _resolves(dotted: str) -> bool:
    """Whether ``dotted`` (``dsv4.x.y``) names a module, or an attribute of the longest module prefix."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        obj: object
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        return all((obj := getattr(obj, p, None)) is not None for p in parts[i:])
    return False


def test_the_docs_name_modules_and_objects_that_exist() -> None:
    """Every ``dsv4.<name>`` the README and docs/ write imports, or is an attribute of a module that does."""
    pytest.importorskip("triton")  # the docs name the kernels' modules too
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    missing = {
        f"{doc.relative_to(ROOT)}: {m.group(0)}"
        for doc in docs
        for m in re.finditer(r"(?<![\w/.])dsv4(?:\.[A-Za-z_]\w*)+", doc.read_text())
        if not _resolves(m.group(0))
    }
    assert sorted(missing) == []


def test_the_readme_names_the_ops_that_take_eps() -> None:
    """README: every op takes ``backend``, and the ops it lists as applying an RMSNorm take ``eps=1e-6``; the
    others (the attention, the window write, the output projection) have no ``eps``."""
    import inspect

    import dsv4
    from dsv4.ops.registry import op_names

    readme = " ".join((ROOT / "README.md").read_text().split())
    listed = re.search(r"the ops that apply an RMSNorm \(([^)]*)\) also take `eps=1e-6`", readme)
    assert listed is not None
    with_eps = set(re.findall(r"`(\w+)`", listed.group(1)))
    for name in op_names():
        params = inspect.signature(getattr(dsv4, name)).parameters
        assert params["backend"].default == "auto", name
        assert ("eps" in params) == (name in with_eps), name
        assert name not in with_eps or params["eps"].default == 1e-6, name

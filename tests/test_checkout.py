"""A run's record names dsv4's commit only when dsv4 runs from a git checkout of this project
(``dsv4.checkout``): an installed copy inside the user's own git project records no commit, where
asking git from the package folder would have named the user's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dsv4.checkout import checkout_root, commit
from subprocesses import ROOT

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _git(cwd: Path, *args: str) -> str:
    full = ["git", "-c", "user.email=u@example.com", "-c", "user.name=u", "-c", "commit.gpgsign=false", *args]
    return subprocess.run(full, cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def _user_repo(tmp_path: Path) -> Path:
    """A git project of the user's own, with one commit."""
    repo = tmp_path / "userproj"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "main.py").write_text("print('mine')\n")
    _git(repo, "add", "main.py")
    _git(repo, "commit", "-q", "-m", "the user's project")
    return repo


def _copy_package(dest: Path) -> Path:
    shutil.copytree(ROOT / "src" / "dsv4", dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def test_an_installed_copy_inside_a_users_repo_has_no_commit(tmp_path) -> None:
    repo = _user_repo(tmp_path)
    for where in (".venv/lib/python3.11/site-packages/dsv4", "lib/dsv4"):  # a venv, ``pip install --target lib``
        package = _copy_package(repo / where)
        assert checkout_root(package) is None, where
        assert commit(package) == (None, None), where


def test_a_checkout_of_the_project_names_its_head_and_dirty_tree(tmp_path) -> None:
    repo = _user_repo(tmp_path)
    package = _copy_package(repo / "src" / "dsv4")
    assert checkout_root(package) is None  # the files are there but git does not track them
    _git(repo, "add", "src")
    _git(repo, "commit", "-q", "-m", "dsv4")
    head = _git(repo, "rev-parse", "HEAD")
    assert checkout_root(package) == repo.resolve()
    assert commit(package) == (head, False)
    (repo / "notes.txt").write_text("untracked\n")  # a file git does not track changes no tracked file
    assert commit(package) == (head, False)
    with (package / "version.py").open("a") as f:
        f.write("# changed\n")
    assert commit(package) == (head, True)


def test_only_src_dsv4_at_gits_top_level_is_the_checkout(tmp_path) -> None:
    """The project's tracked ``src/dsv4`` is its checkout, also through a link of another name; beside
    it, a copy in another folder of it (``lib/dsv4``) is an installed copy; and a ``src/dsv4`` whose
    ``src`` is not at git's top level (a project inside another git project) is not this project's
    checkout either."""
    repo = _user_repo(tmp_path)
    _copy_package(repo / "src" / "dsv4")
    inner = _copy_package(repo / "sub" / "src" / "dsv4")
    _git(repo, "add", "src", "sub")
    _git(repo, "commit", "-q", "-m", "dsv4, twice")
    lib = _copy_package(repo / "lib" / "dsv4")
    assert checkout_root(repo / "src" / "dsv4") == repo.resolve()
    link = tmp_path / "pkg"  # the checkout's package reached through a link named otherwise
    link.symlink_to(repo / "src" / "dsv4", target_is_directory=True)
    assert checkout_root(link) == repo.resolve()
    assert checkout_root(lib) is None and commit(lib) == (None, None)
    assert checkout_root(inner) is None and commit(inner) == (None, None)


def test_a_bench_record_from_an_install_inside_a_users_repo_names_no_commit(tmp_path) -> None:
    """``dsv4 bench --json``'s (and ``dsv4 tune``'s) provenance, from a copy of the package installed under
    the user's repo and run there: no commit (the user's HEAD is not dsv4's), the version instead."""
    repo = _user_repo(tmp_path)
    lib = repo / ".venv-lib"
    _copy_package(lib / "dsv4")
    code = (
        "import json, dsv4; from dsv4.bench.report import provenance; "
        "print(json.dumps({'file': dsv4.__file__, **provenance('bench', 'cpu')}))"
    )
    env = {**os.environ, "PYTHONPATH": str(lib)}
    done = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    meta = json.loads(done.stdout)
    assert Path(meta["file"]).resolve().is_relative_to(lib.resolve()), meta["file"]
    assert meta["commit"] is None and meta["commit_dirty"] is None
    assert meta["versions"]["dsv4"]

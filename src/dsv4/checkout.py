"""Whether ``dsv4`` runs from this project's git checkout, and git's answers about that checkout.

A run's record names the commit of the code that ran only when that code is a checkout of this
project: an installed ``dsv4`` (a wheel in a virtual environment, which may sit inside the user's own
git project) has no commit of its own, and git asked from its folder would answer with the
enclosing project's. There the record keeps the distribution's version alone.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent  # the imported ``dsv4`` package folder


def _run_git(cwd: Path, *args: str) -> str | None:
    """``git args`` in ``cwd``: its stripped stdout, or None when git is missing, fails or takes over 10 s."""
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def checkout_root(package_dir: Path = PACKAGE_DIR) -> Path | None:
    """The root of this project's git checkout when ``package_dir`` (a ``dsv4`` package folder) is its
    ``src/dsv4``, the root is git's top level and git tracks ``src/dsv4/__init__.py`` there; else None
    (an installed copy, or a copy git does not track)."""
    package_dir = package_dir.resolve()
    if package_dir.name != "dsv4" or package_dir.parent.name != "src":
        return None
    root = package_dir.parent.parent
    top = _run_git(root, "rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != root:
        return None
    if _run_git(root, "ls-files", "--error-unmatch", "--", "src/dsv4/__init__.py") is None:
        return None
    return root


def git(*args: str, package_dir: Path = PACKAGE_DIR) -> str | None:
    """``git args`` run in the checkout ``package_dir`` belongs to (``checkout_root``): its stripped
    stdout, or None where there is no such checkout, no git, or git fails."""
    root = checkout_root(package_dir)
    return None if root is None else _run_git(root, *args)


def commit(package_dir: Path = PACKAGE_DIR) -> tuple[str | None, bool | None]:
    """The checkout's HEAD and whether tracked files differ from it, or ``(None, None)`` where
    ``package_dir`` is not in a checkout of this project (``checkout_root``)."""
    head = git("rev-parse", "HEAD", package_dir=package_dir)
    status = git("status", "--porcelain", "--untracked-files=no", package_dir=package_dir) if head else None
    return head, (None if status is None else bool(status))

"""``OUT_DIR``: made ready before any step runs, and written without following a link out of it.

The run writes only into a directory that is new, empty, or was written by an earlier acceptance run
(its ``acceptance.json`` says so: ``"kind": "dsv4 acceptance run"``); there it removes its own outputs
of that run and nothing else. Any other directory is refused before anything changes, so a user's own
``summary.md`` or ``log.txt`` is never deleted. Files the run writes itself are created under fresh
random names (``O_EXCL``) and renamed into place, or opened with ``O_NOFOLLOW``: a link planted in the
directory is replaced or refused, never written through.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

RECORD = "acceptance.json"
KIND = "dsv4 acceptance run"  # the record's "kind": marks a directory an acceptance run wrote
MAX_RECORD_BYTES = 64 << 20  # an earlier record read to recognize the directory (a real one is < 1 MiB)


class OutDirError(ValueError):
    """An ``OUT_DIR`` the run cannot or may not write into; the message names it and why."""


def _nofollow(path: Path, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)


def open_nofollow(path: Path, append: bool = False) -> BinaryIO:
    """``path`` opened for writing (truncated, or appended to), refusing a symlink (``OSError``)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    return os.fdopen(_nofollow(path, flags), "ab" if append else "wb")


def _written_by_a_run(out: Path) -> bool:
    """Whether ``out`` holds the record of an earlier acceptance run (a regular file, not a link)."""
    try:
        with os.fdopen(_nofollow(out / RECORD, os.O_RDONLY), "rb") as f:
            data = f.read(MAX_RECORD_BYTES + 1)
        record = json.loads(data) if len(data) <= MAX_RECORD_BYTES else None
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(record, dict) and record.get("kind") == KIND


def prepare_out_dir(out: Path, outputs: Iterable[str]) -> None:
    """Make ``out`` ready for a run: created when absent; when it exists it must be a directory that is
    empty or that an earlier run wrote (then the ``outputs`` of that run are removed, links included,
    without following them). Checks that files can be created there. Raises ``OutDirError`` naming
    ``out`` and the reason, before anything in it changes."""
    try:
        if out.is_symlink() or out.exists():
            if not out.is_dir():
                raise OutDirError(f"OUT_DIR: {out} exists and is not a directory")
            if any(out.iterdir()) and not _written_by_a_run(out):
                raise OutDirError(
                    f"OUT_DIR: {out} is not empty and holds no {RECORD} of an earlier acceptance run; "
                    "name a new or empty directory (nothing in this one was changed)"
                )
        else:
            out.mkdir(parents=True)
        for name in outputs:
            (out / name).unlink(missing_ok=True)  # an earlier run's file, or a link: the link itself goes
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-check.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutDirError(f"OUT_DIR: cannot write into {out} ({e.strerror or e})") from None

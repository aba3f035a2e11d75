"""Files replaced whole or not at all: what the tune, the bench and the acceptance run write."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """``path`` replaced whole by ``data``: written to a new file of a random name beside it, then renamed
    over it (a rename replaces a link at ``path`` itself, never its target; a link planted at a fixed
    temporary name cannot redirect the write). The file gets the mode a plain ``open`` would give it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would keep a result file from its readers
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's file mode creation mask (read by setting it, then setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask

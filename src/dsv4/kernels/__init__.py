"""The Triton backend: fused kernels for every op, one module per kernel family.

On a machine without CUDA the same kernel source runs on the CPU through Triton's interpreter;
``TRITON_INTERPRET`` is read when a kernel is defined, so it is set here, before any kernel
module is imported.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402,F401  (an ImportError here marks the backend unavailable)


def interpreted() -> bool:
    """True when kernels run through Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton backend cannot run on ``device``, or None."""
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if interpreted():
            return None
        return "CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before importing dsv4.kernels"
    return f"no Triton target for device type {device.type!r}"


# The entry points, imported after ``interpreted`` (the kernel modules use it). Submodule names
# differ from the entry points: importing ``kernels/x.py`` binds ``x`` on this package. Each takes
# the reference's arguments plus ``out=`` (and ``ws=``, a ``Workspace`` for scratch).
from .compressor import indexer_compressor  # noqa: E402,F401
from .lightning_indexer import indexer  # noqa: E402,F401
from .qkv_proj_rope import qkv_proj_rope  # noqa: E402,F401
from .workspace import Workspace  # noqa: E402,F401

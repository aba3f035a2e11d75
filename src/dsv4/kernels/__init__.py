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

from ..rope import RopeTable  # noqa: E402
from ..state import IndexerState  # noqa: E402
from ..structs import IndexerOut, StepPositions, copy_into  # noqa: E402
from ..weights import IndexerWeights  # noqa: E402


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
# differ from the entry points: importing ``kernels/x.py`` binds ``x`` on this package.
from .compressor import indexer_compressor  # noqa: E402,F401
from .lightning_indexer import indexer as _indexer  # noqa: E402
from .qkv_proj_rope import qkv_proj_rope  # noqa: E402,F401


def indexer(
    x: torch.Tensor,
    qr: torch.Tensor,
    qr_scale: torch.Tensor,
    w: IndexerWeights,
    state: IndexerState,
    pos: StepPositions,
    offset: int,
    rope: RopeTable,
    topk: int,
    eps: float,
    out: IndexerOut | None = None,
) -> IndexerOut:
    return copy_into(_indexer(x, qr, qr_scale, w, state, pos, offset, rope, topk, eps), out)

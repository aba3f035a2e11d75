"""Where the Triton kernels run: compiled on a CUDA GPU, through Triton's interpreter on a CPU.

``TRITON_INTERPRET`` is read when a kernel is defined, so it must be set before any kernel module
imports Triton. This module sets it (unless the caller already chose) when CUDA is absent; the
kernels package imports it first, and the test suite imports it before anything else.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def interpreted() -> bool:
    """True when kernels run through Triton's CPU interpreter: Triton's own reading of ``TRITON_INTERPRET``
    (``1``, ``true``, ``on``, ``yes`` in any case; ``false``, ``off`` and anything else run compiled)."""
    from triton import knobs

    return bool(knobs.runtime.interpret)


def unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton backend cannot run on ``device``, or None."""
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if interpreted():
            return None
        return "CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before importing dsv4.kernels"
    return f"no Triton target for device type {device.type!r}"

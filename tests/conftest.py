"""Shared test setup: the device under test and the backends every op test runs on.

Without a GPU the Triton kernels run through Triton's interpreter; ``dsv4.kernels.interpreter``
chooses it, and is imported here before any test module imports a kernel.
"""

from __future__ import annotations

import torch

import dsv4.kernels.interpreter  # noqa: F401  (before any kernel module: selects the interpreter without CUDA)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Every backend implements every op; each op test runs on all of them.
BACKENDS = ["reference", "triton"]


def backends_of(op: str) -> list:
    """``BACKENDS`` as pytest params for ``op``: a backend the op has no implementation in yet is
    skipped, and says so (the attention ops are on the reference backend only for now)."""
    import pytest

    from dsv4.ops import get_op

    have = get_op(op).implementations
    return [
        pytest.param(b, marks=pytest.mark.skip(reason=f"{op} has no {b} implementation yet")) if b not in have else b
        for b in BACKENDS
    ]

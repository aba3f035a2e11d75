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

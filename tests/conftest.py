"""Shared test setup: the device under test and the backends every op test runs on.

Without a GPU the Triton kernels run through Triton's interpreter; the variable must be set
before any kernel module is imported.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Every backend implements every op; each op test runs on all of them.
BACKENDS = ["reference", "triton"]

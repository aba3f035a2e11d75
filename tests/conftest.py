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

# The backends each op is tested on: every backend that implements it.
OP_BACKENDS: dict[str, list[str]] = {
    "qkv_proj_rope": ["reference"],
    "indexer_compressor": ["reference", "triton"],
    "indexer": ["reference", "triton"],
}

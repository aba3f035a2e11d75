"""Launch helpers shared by every kernel family: device facts and tile arithmetic.

Tiles are fixed, reasoned choices keyed on shapes (no autotuning): the interpreter would run every
candidate configuration, and a fixed choice is reproducible from run to run.
"""

from __future__ import annotations

import torch
import triton.language as tl

from .interpreter import interpreted

H100_SMS = 132  # SMs of an H100 SXM; off-GPU the grids are laid out for it, so CPU runs use the decode tiling

# Kernels branch on this (at compile time) only to work around the interpreter's bf16 handling.
INTERPRETED = tl.constexpr(interpreted())


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; ``H100_SMS`` when the kernels do not run on a GPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return H100_SMS


def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch (``griddepcontrol``): compiled kernels on sm_90 or newer.

    A kernel launched with ``launch_pdl=True`` may start while its predecessor in the stream still
    runs; it must ``gdc_wait()`` before touching anything the predecessor writes or reads.
    """
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two that divides ``n`` and is at most ``cap`` (``cap`` a power of two)."""
    return min(n & -n, cap)


def require(ok: bool, name: str, expected: str) -> None:
    """A launcher's check of an operand the kernels rely on: ``ValueError`` naming the tensor when not ``ok``."""
    if not ok:
        raise ValueError(f"{name}: the Triton kernels need {expected}")

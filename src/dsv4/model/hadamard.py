"""The orthonormal Sylvester Walsh-Hadamard matrix used by the indexer (spec §2)."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=8)
def _hadamard_cpu(n: int) -> torch.Tensor:
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard order must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h * n**-0.5


def hadamard_matrix(
    n: int = 128, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """``[n, n]`` Sylvester Hadamard matrix times ``n^-0.5`` (orthonormal and symmetric), a tensor of
    the caller's own (writing it changes no later call's)."""
    return _hadamard_cpu(n).to(dtype=dtype, device=device, copy=True)


@functools.lru_cache(maxsize=16)
def _hadamard_on(n: int, device: str) -> torch.Tensor:
    return _hadamard_cpu(n).to(dtype=torch.float32, device=device)


def shared_hadamard(n: int, device: torch.device | str) -> torch.Tensor:
    """``hadamard_matrix(n)`` fp32 on ``device``, one tensor per (n, device) shared by every caller:
    after the first call no copy to the device is made (a step that uses it can be captured in a
    CUDA graph). Read it, never write it."""
    return _hadamard_on(n, str(torch.device(device)))

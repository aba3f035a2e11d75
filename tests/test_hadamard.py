"""The Hadamard rotation of the indexer (spec §2)."""

from __future__ import annotations

import pytest
import torch

import dsv4
from dsv4.model.hadamard import shared_hadamard


def test_order_128_orthonormal_symmetric() -> None:
    h = dsv4.hadamard_matrix(128, dtype=torch.float64)
    assert h.shape == (128, 128)
    torch.testing.assert_close(h @ h.T, torch.eye(128, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(h, h.T)
    assert torch.equal(h.abs(), torch.full_like(h, 128**-0.5))


def test_sylvester_construction() -> None:
    h = (dsv4.hadamard_matrix(128, dtype=torch.float64) * 128**0.5).round()
    i, j = torch.meshgrid(torch.arange(128), torch.arange(128), indexing="ij")
    parity = torch.zeros(128, 128, dtype=torch.long)
    for bit in range(7):  # H[i, j] = (-1)^popcount(i & j)
        parity += ((i & j) >> bit) & 1
    assert torch.equal(h, (1 - 2 * (parity % 2)).double())


@pytest.mark.parametrize("n", [96, 3, 0, -4])
def test_rejects_non_power_of_two(n: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        dsv4.hadamard_matrix(n)


def test_a_written_result_changes_no_later_call() -> None:
    fresh = dsv4.hadamard_matrix(16, dtype=torch.float64).clone()
    dsv4.hadamard_matrix(16, dtype=torch.float64).mul_(2)  # the dtype the cache holds: no conversion to copy
    dsv4.hadamard_matrix(16).zero_()
    assert torch.equal(dsv4.hadamard_matrix(16, dtype=torch.float64), fresh)
    assert torch.equal(shared_hadamard(16, "cpu"), fresh.float())

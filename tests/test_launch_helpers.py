"""The launchers' tile arithmetic and device facts (``dsv4.kernels.launch``), against their definitions."""

from __future__ import annotations

import pytest
import torch

from dsv4.kernels.launch import H100_SMS, is_pow2, pdl_supported, pow2_divisor, require, sm_count


def test_is_pow2_is_one_bit_set() -> None:
    assert [n for n in range(-4, 1025) if is_pow2(n)] == [2**k for k in range(11)]


def test_pow2_divisor_is_the_largest_power_of_two_dividing_n_up_to_cap() -> None:
    for cap in (1, 16, 64, 256):
        for n in range(1, 1100):
            want = max(d for d in (2**k for k in range(cap.bit_length())) if n % d == 0)
            assert pow2_divisor(n, cap) == want, (n, cap)


def test_off_a_gpu_the_grids_are_laid_out_for_an_h100_without_pdl() -> None:
    cpu = torch.device("cpu")
    assert sm_count(cpu) == H100_SMS == 132 and not pdl_supported(cpu)


@pytest.mark.parametrize("major", [8, 9, 10])
def test_pdl_is_taken_from_sm_90_on(monkeypatch: pytest.MonkeyPatch, major: int) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
    assert pdl_supported(torch.device("cuda", 0)) is (major >= 9)


def test_require_names_the_tensor_and_what_the_kernels_need() -> None:
    require(True, "w.x", "anything")
    with pytest.raises(ValueError, match=r"^w\.norm_w: the Triton kernels need a power of two, got 96$"):
        require(False, "w.norm_w", "a power of two, got 96")

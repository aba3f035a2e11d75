"""The register-tile FP8 quantizer (``dsv4.kernels.fp8_quant``) against ``dsv4.model.fp8_row``, bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

kernels = pytest.importorskip("dsv4.kernels")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from conftest import DEVICE  # noqa: E402
from dsv4.kernels.fp8_quant import dequant_e4m3, quant_e4m3  # noqa: E402
from dsv4.model.fp8_row import dequantize_e4m3_blocks, quantize_e4m3_blocks  # noqa: E402


@triton.jit
def _round_trip_kernel(v_ptr, codes_ptr, e_ptr, deq_ptr, M: tl.constexpr, BLOCK: tl.constexpr):
    rows, cols = tl.arange(0, M), tl.arange(0, BLOCK)
    at = rows[:, None] * BLOCK + cols[None, :]
    codes, e = quant_e4m3(tl.load(v_ptr + at))
    tl.store(codes_ptr + at, codes)
    tl.store(e_ptr + rows, e)
    tl.store(deq_ptr + at, dequant_e4m3(codes, e))


def _blocks(block: int) -> torch.Tensor:
    """Blocks whose amax sits at, just below and just above every ``448 * 2^k``, with values at e4m3
    rounding ties and tiny (subnormal once scaled) entries; then NaN, infinite, zero and -0 blocks."""
    g = torch.Generator().manual_seed(7)
    rows = []
    for k in range(-24, 121, 3):
        edge = 448.0 * 2.0**k
        for amax in (edge, math.nextafter(edge, 0.0), math.nextafter(edge, math.inf)):
            v = torch.randn(block, generator=g, dtype=torch.float64) * amax / 4
            v[0] = -amax if k % 2 else amax
            v[1:9] = torch.tensor([1.0625, 1.1875, 0.5 * 2**-6, 3 * 2**-10, 15.5, 31.9, -0.0, 2**-12]) * 2.0**k
            rows.append(v.clamp(-amax, amax))
    rows.append(torch.zeros(block, dtype=torch.float64))
    rows.append(-torch.zeros(block, dtype=torch.float64))
    for bad in (float("nan"), float("inf"), -float("inf")):
        v = torch.randn(block, generator=g, dtype=torch.float64)
        v[5] = bad
        rows.append(v)
    v = torch.stack(rows).to(torch.float32)
    pad = (1 << (v.shape[0] - 1).bit_length()) - v.shape[0]  # rows to a power of two
    return torch.cat((v, torch.randn(pad, block, generator=g) * 3.0))


@pytest.mark.parametrize("block", [64, 128])
def test_quant_e4m3_matches_the_model_bit_for_bit(block: int) -> None:
    v = _blocks(block)
    m = v.shape[0]
    codes = torch.empty(m, block, dtype=torch.uint8, device=DEVICE)
    e = torch.empty(m, dtype=torch.int32, device=DEVICE)
    deq = torch.empty(m, block, device=DEVICE)
    _round_trip_kernel[(1,)](v.to(DEVICE), codes, e, deq, m, block)
    codes, e, deq = codes.cpu(), e.cpu(), deq.cpu()
    want_codes, want_e = quantize_e4m3_blocks(v, block)
    assert torch.equal(e, want_e[:, 0])
    assert torch.equal(codes, want_codes.view(torch.uint8))
    want = dequantize_e4m3_blocks(want_codes, want_e)
    assert torch.equal(deq.isnan(), want.isnan())
    assert torch.equal(deq.nan_to_num(), want.nan_to_num())

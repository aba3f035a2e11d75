"""Per-row INT8 quantization (spec §2)."""

from __future__ import annotations

import torch

import dsv4


def test_bounds_and_dequant_error() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1024, generator=g) * torch.logspace(-3, 3, 64).unsqueeze(1)
    q, scale = dsv4.quantize_int8_per_row(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (64, 1)
    assert int(q.abs().max()) <= 127
    assert torch.equal(q.abs().amax(-1), torch.full((64,), 127, dtype=torch.int8))  # each row's amax maps to 127
    # dequantized values are within half a step of the input
    assert torch.all((q.float() * scale - x).abs() <= 0.5 * scale * (1 + 1e-5))


def test_round_half_even() -> None:
    # amax 127 makes s = 1, so q = round(v) exactly: halves go to the even neighbour
    row = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 126.5]])
    q, scale = dsv4.quantize_int8_per_row(row)
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -2, 4, 126]]
    assert scale.item() == 1.0


def test_amax_floor_and_zero_rows() -> None:
    rows = torch.tensor([[0.0, 0.0, 0.0, 0.0], [5e-5, -2.5e-5, 0.0, 1e-5], [1e-4, 0.0, 0.0, -1e-4]])
    q, scale = dsv4.quantize_int8_per_row(rows)
    expected_scale = torch.tensor(1.0) / (torch.tensor(127.0) / torch.tensor(1e-4))
    assert torch.equal(scale, expected_scale.expand(3, 1))  # amax floored to 1e-4 in every row
    assert q[0].tolist() == [0, 0, 0, 0]  # an all-zero row stays zero, no NaN
    assert q[1].tolist() == [64, -32, 0, 13]  # round(5e-5 * 127/1e-4) = round(63.5) = 64
    assert q[2].tolist() == [127, 0, 0, -127]


def test_leading_axes_and_bf16_input() -> None:
    x = torch.randn(2, 3, 5, 128).to(torch.bfloat16)
    q, scale = dsv4.quantize_int8_per_row(x)
    assert q.shape == x.shape and scale.shape == (2, 3, 5, 1)
    q2, s2 = dsv4.quantize_int8_per_row(x.float().reshape(-1, 128))
    assert torch.equal(q.reshape(-1, 128), q2) and torch.equal(scale.reshape(-1, 1), s2)


def test_weight_quantization_per_output_channel() -> None:
    w = torch.randn(96, 40) * torch.linspace(0.01, 2.0, 96).unsqueeze(1)
    q, scale = dsv4.quantize_weight_int8(w)
    assert q.shape == (96, 40) and q.dtype == torch.int8 and scale.shape == (96,)
    amax = w.abs().amax(1).clamp_min(1e-4)
    assert torch.allclose(scale, amax / 127, rtol=1e-6)
    assert torch.all((q.float() * scale[:, None] - w).abs() <= 0.5 * scale[:, None] * (1 + 1e-5))

"""Per-row INT8 quantization (spec §2) and the pool-row formats built on it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import dsv4
from conftest import DEVICE
from dsv4.harness.cases import make_case, run_case
from dsv4.harness.golden import compare
from dsv4.model.pool_format import FP8_KV, INT8_KEYS
from dsv4.model.state import IndexerState


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


def test_a_formats_code_max_and_floor_replace_127_and_1e_4() -> None:
    """``code_max`` and ``amax_floor`` (a pool format's constants) replace 127 and 1e-4: with 31 and 2^-10,
    a row under the floor is scaled as if its amax were 2^-10, codes within +-31 (every value here and
    every product a power-of-two multiple, exact in fp32 and float64)."""
    floor = 2.0**-10
    rows = torch.tensor([[2.0**-11, -(2.0**-12), 0.0, 2.0**-13], [2.0**-9, -(2.0**-10), 2.0**-11, 0.0]])
    q, scale = dsv4.quantize_int8_per_row(rows, 31.0, floor)
    s = 31.0 / rows.double().abs().amax(-1, keepdim=True).clamp_min(floor)
    assert torch.equal(q, torch.round(rows.double() * s).to(torch.int8))
    assert q.tolist() == [[16, -8, 0, 4], [31, -16, 8, 0]]  # 15.5 -> 16, -15.5 -> -16: half to even
    assert torch.equal(scale, (1.0 / s).float())


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


@pytest.mark.parametrize("shape", [(96,), (2, 96, 40)])
def test_weights_that_are_not_2d_are_refused(shape: tuple[int, ...]) -> None:
    """Per-output-channel INT8 takes ``[out, in]``: a vector or a stack of matrices has no output channels
    to give one scale each, a ``ValueError`` naming ``w``."""
    with pytest.raises(ValueError, match="w must be 2-D"):
        dsv4.quantize_weight_int8(torch.randn(shape))


def test_int8_keys_format_is_the_spec_row() -> None:
    """The indexer's key row (spec §2, §4): the per-row INT8 codes and one fp32 scale a row, stored
    ``[..., HID]`` and ``[...]``; 128 + 4 bytes at HID=128; dequantized within half a step."""
    x = torch.randn(3, 5, 128) * torch.logspace(-2, 2, 5).unsqueeze(-1)
    codes, scales = INT8_KEYS.quantize(x)
    q, scale = dsv4.quantize_int8_per_row(x)
    assert torch.equal(codes, q) and torch.equal(scales, scale.squeeze(-1))
    assert codes.dtype == INT8_KEYS.code_dtype == torch.int8 and scales.dtype == INT8_KEYS.scale_dtype
    assert torch.all((INT8_KEYS.dequantize(codes, scales) - x).abs() <= 0.5 * scale * (1 + 1e-5))
    assert INT8_KEYS.row_bytes(128) == 128 + 4 and INT8_KEYS.scale_shape(128) == ()
    state = IndexerState.fresh(2, 40, 128, block_size=16)  # 3 blocks a slot
    assert state.key_format is INT8_KEYS
    assert (state.keys.dtype, tuple(state.keys.shape)) == (torch.int8, (6, 16, 128))
    assert (state.key_scale.dtype, tuple(state.key_scale.shape)) == (torch.float32, (6, 16))
    with pytest.raises(ValueError, match="tail"):
        INT8_KEYS.row_bytes(128, tail=64)


def test_the_record_holds_the_fp8_kv_row() -> None:
    """The attention layer's FP8 KV row (attention spec §2: e4m3 codes of the 448 NOPE columns, a UE8M0
    scale byte per 64 of them in 8 bytes, the 64 rope columns bf16) is an entry of the same record."""
    fp8 = dataclasses.replace(
        INT8_KEYS, name="fp8-kv", code_dtype=torch.float8_e4m3fn, scale_dtype=torch.uint8, scale_block=64,
        scale_align=8, tail_dtype=torch.bfloat16, code_max=448.0,
    )  # fmt: skip
    assert fp8.row_bytes(448, tail=64) == 584 and fp8.scale_shape(448) == (8,)
    codes, scales = fp8.empty(3, 16, 448)
    assert (codes.dtype, tuple(codes.shape)) == (torch.float8_e4m3fn, (3, 16, 448))
    assert (scales.dtype, tuple(scales.shape)) == (torch.uint8, (3, 16, 8))


def test_a_partial_block_of_columns_gets_its_own_scale() -> None:
    """A row's scale count is ``ceil(W / scale_block)`` rounded up to ``scale_align``: 65 columns in blocks
    of 64 take two scales, 520 take nine, stored in 16 bytes at the FP8 row's alignment of 8."""
    unaligned = dataclasses.replace(FP8_KV, scale_align=1)
    assert unaligned.scale_shape(64) == (1,) and unaligned.scale_shape(65) == (2,)
    assert unaligned.row_bytes(65) == 65 + 2
    assert FP8_KV.scale_shape(512) == (8,) and FP8_KV.scale_shape(520) == (16,)


def _int6_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    codes, scale = dsv4.quantize_int8_per_row(rows, 31.0, 1e-3)
    return codes, scale.squeeze(-1)


def test_both_backends_write_keys_in_the_pool_format(monkeypatch: pytest.MonkeyPatch) -> None:
    """A key pool of another format (codes in [-31, 31], amax floor 1e-3): the reference quantizes with
    the format, the kernels get its constants from the launchers, and both write the same pool."""
    int6 = dataclasses.replace(INT8_KEYS, name="int6", code_max=31.0, amax_floor=1e-3, quantize=_int6_rows)
    monkeypatch.setattr(IndexerState, "key_format", int6)
    case = make_case(dsv4.get_config("tiny"), "indexer_compressor", seed=2, device=DEVICE, batch=2, seq=4)
    before = case.state().clone()
    ref, tri = run_case(case, "reference"), run_case(case, "triton")
    written = ref["key_scale"] != before.key_scale
    assert written.sum() == 2  # one closed block a row
    assert ref["keys"][written].abs().amax() == 31 and tri["keys"][written].abs().amax() == 31
    report = compare("indexer_compressor", tri, ref, case.compare_inputs())
    assert report, str(report)


def test_the_scale_is_127_over_amax_correctly_rounded() -> None:
    """``s = 127 / amax`` is one correctly rounded fp32 division (spec §2): ``127 * (1 / amax)`` rounds
    twice and is one ulp off for about a quarter of these rows, which moves their scale (and a code
    wherever ``row * s`` lies near a half). Expected values from float64, rounded once to fp32."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4096, 8, generator=g) * torch.logspace(-3, 3, 4096).unsqueeze(1)
    q, scale = dsv4.quantize_int8_per_row(x)
    amax = x.abs().amax(-1, keepdim=True).clamp_min(1e-4).double()
    s = (127.0 / amax).float()  # float64, then fp32: one rounding unless the float64 quotient is an fp32 midpoint
    assert torch.equal(scale, (1.0 / s.double()).float())
    assert torch.equal(q, torch.round(x * s).to(torch.int8))

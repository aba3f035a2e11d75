"""The FP8 KV row and activation quant (attention spec §2, §6), and the comparators of §8 that judge
pools of such rows."""

from __future__ import annotations

import math

import pytest
import torch

import dsv4
from dsv4.harness.golden import bit_identical, e4m3_step, fp8_rows_allclose
from dsv4.model.fp8_row import (
    block_exponents,
    dequantize_fp8_weight,
    fp8_round_trip,
    fp8_rows,
    quantize_e4m3_blocks,
    quantize_fp8_weight,
)
from dsv4.model.pool_format import FP8_KV
from dsv4.ops import Tolerance
from fp8_checkpoint import dequantize_f64, quantize_fp8_blocks

ROWS = Tolerance(1e-4, 1 / 128)


def _e(amax: float) -> int:
    return int(block_exponents(torch.tensor([amax], dtype=torch.float64))[0])


def test_exponent_is_the_smallest_that_fits_448() -> None:
    """``e = ceil(log2(amax / 448))`` exactly, at and around every power of two, with the 1e-4 floor."""
    for k in range(-20, 120):
        edge = 448.0 * 2.0**k
        assert _e(edge) == k and _e(math.nextafter(edge, math.inf)) == k + 1, k
        assert _e(math.nextafter(edge, 0.0)) == k, k
    assert _e(0.0) == _e(1e-4) == -22  # the floor: 448 * 2^-23 < 1e-4 <= 448 * 2^-22
    assert _e(3.3895e38) == 120  # the largest bf16


@pytest.mark.parametrize("ulps", [1, -1])
def test_exponent_stays_exact_where_log2_is_an_ulp_off(ulps: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The exponent is exact whatever the last bit of ``log2`` (a device's float64 ``log2`` need not be
    correctly rounded): ``log2`` one ulp high at ``amax = 448 * 2^k`` gives ``ceil = k + 1``, one ulp low
    just above it gives ``k``; both sides are checked against ``448 * 2^e`` and corrected."""
    log2 = torch.log2

    def off(x: torch.Tensor) -> torch.Tensor:
        y = log2(x)
        return torch.nextafter(y, torch.full_like(y, math.inf * ulps))

    monkeypatch.setattr(torch, "log2", off)
    for k in range(-20, 120):
        edge = 448.0 * 2.0**k
        assert _e(edge) == k and _e(math.nextafter(edge, math.inf)) == k + 1, k
        assert _e(math.nextafter(edge, 0.0)) == k, k


def test_row_codes_never_saturate_and_decode_exactly() -> None:
    g = torch.Generator().manual_seed(0)
    v = (
        torch.randn(64, 128, generator=g) * torch.exp2(torch.randint(-30, 30, (64, 1), generator=g).float())
    ).bfloat16()
    v[0, :64] = 0.0  # a zero block: the floor
    v[1, :64] = 1e-6  # a tiny block
    rows = dsv4.fp8_rows(v, 64)
    assert rows.nope.dtype == torch.float8_e4m3fn and rows.scale.shape == (64, 8) and rows.rope.shape == (64, 64)
    codes = rows.nope.to(torch.float32)
    assert codes.abs().amax() <= 448 and not codes.isnan().any()
    e = rows.scale[:, 0].int() - 127
    amax = v[:, :64].float().abs().amax(-1).clamp_min(1e-4)
    assert bool(((amax <= 448 * torch.exp2(e.float())) & (amax > 224 * torch.exp2(e.float()))).all())
    assert torch.equal(rows.scale[:, 1:], torch.zeros_like(rows.scale[:, 1:]))  # bytes >= NOPE/64 are 0
    assert torch.equal(rows.rope, v[:, 64:])  # the rope part as is
    deq = dsv4.dequantize_fp8_rows(*rows)
    exact = codes * torch.exp2(e.float())[:, None]
    assert torch.equal(deq[:, :64].float(), exact)  # exact in bf16
    assert torch.equal(fp8_round_trip(deq, 64), deq)  # stored values are fixed points
    assert FP8_KV.row_bytes(448, tail=64) == 584 and FP8_KV.scale_shape(448) == FP8_KV.scale_shape(64) == (8,)
    codes, scales = FP8_KV.quantize(v[:, :64].float())  # the record quantizes as fp8_rows does
    assert torch.equal(codes.view(torch.uint8), rows.nope.view(torch.uint8)) and torch.equal(scales, rows.scale)
    assert torch.equal(FP8_KV.dequantize(codes, scales), exact)


def test_codes_round_half_to_even() -> None:
    """1.0625 lies halfway between the e4m3 values 1 and 1.125: it rounds to 1 (even), 1.1875 to 1.25."""
    blk = torch.zeros(64)
    blk[0], blk[1], blk[2] = 448.0, 1.0625, 1.1875  # e = 0: the codes are the values
    codes, e = quantize_e4m3_blocks(blk, 64)
    assert int(e[0]) == 0 and codes[:3].float().tolist() == [448.0, 1.0, 1.25]


def test_the_top_binade_decodes_to_inf() -> None:
    """At ``e = 120`` an entry of at least ``248 * 2^120`` (finite in bf16) rounds to code 256 and
    ``256 * 2^120 = 2^128`` overflows: the formula's value (docs/SPEC.md, FP8 KV row). One bf16 step
    below, the entry rounds to code 240 and decodes finite."""
    big = torch.tensor(248 * 2.0**120, dtype=torch.bfloat16)
    v = torch.ones(2, 128, dtype=torch.bfloat16)
    v[0, 0] = big
    v[1, 0] = 247 * 2.0**120  # the bf16 below
    rows = dsv4.fp8_rows(v, 64)
    assert rows.scale[:, 0].tolist() == [127 + 120] * 2
    assert rows.nope[:, 0].float().tolist() == [256.0, 240.0]
    deq = dsv4.dequantize_fp8_rows(*rows)
    assert deq[0, 0] == float("inf") and torch.isfinite(deq[1]).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_nonfinite_block_stores_nan(bad: float) -> None:
    v = torch.ones(2, 192, dtype=torch.bfloat16)  # HD 192, R 64: two blocks of 64
    v[0, 70] = bad
    rows = dsv4.fp8_rows(v, 64)
    assert rows.scale[0].tolist() == [127 - 8, 255, 0, 0, 0, 0, 0, 0]  # block 0: amax 1 -> e = -8
    assert (rows.nope[0, 64:].view(torch.uint8) == 0x7F).all() and not rows.nope[0, :64].float().isnan().any()
    deq = dsv4.dequantize_fp8_rows(*rows)
    assert deq[0, 64:128].isnan().all() and torch.isfinite(deq[0, :64]).all() and torch.isfinite(deq[1]).all()


@pytest.mark.parametrize(("hd", "r"), [(128, 96), (160, 64), (640, 64), (64, 64)])
def test_rows_whose_nope_part_has_no_fp8_layout_are_refused(hd: int, r: int) -> None:
    """An FP8 KV row stores ``NOPE = HD - R`` codes in 64-blocks with 8 scale bytes: NOPE must be a multiple
    of 64 in [64, 512] (32, 96, 576 and 0 are not), a ``ValueError`` naming ``head_dim`` before anything is
    quantized."""
    with pytest.raises(ValueError, match="head_dim"):
        dsv4.fp8_rows(torch.ones(2, hd, dtype=torch.bfloat16), r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rows_that_are_not_bf16_are_refused(dtype: torch.dtype) -> None:
    """KV rows come as bf16 (attention spec §2): an fp32 row would keep rope entries bf16 cannot hold."""
    with pytest.raises(TypeError, match="v: expected bf16"):
        dsv4.fp8_rows(torch.ones(2, 128, dtype=dtype), 64)


def test_activation_quant_per_128() -> None:
    a = torch.randn(3, 256, generator=torch.Generator().manual_seed(0)).bfloat16()
    a[1, 128:] = 0.0
    codes, scale = dsv4.fp8_act_quant(a)
    assert codes.shape == (3, 256) and scale.shape == (3, 2) and scale.dtype == torch.float32
    assert torch.equal(torch.log2(scale), torch.log2(scale).round())  # powers of two
    assert float(scale[1, 1]) == 2.0**-22  # the 1e-4 floor
    back = (codes.float().view(3, 2, 128) * scale[..., None]).view(3, 256)
    # round to nearest e4m3: half a step, 1/16 of the value where it is normal (3 mantissa bits) and
    # 2^-10 of the block's scale where it is subnormal (steps of 2^-9)
    bound = a.float().abs() / 16 + scale.repeat_interleave(128, dim=1) * 2.0**-10
    assert ((back - a.float()).abs() <= bound).all()


def test_weight_quant_matches_the_checkpoint_format() -> None:
    """The synthetic weights' FP8 blocks are the ones an independent quantizer (the test checkpoints')
    writes, edge blocks included; dequantization is exact."""
    w = torch.randn(300, 200) * 0.05
    w8, scale = quantize_fp8_weight(w)
    ref8, ref_scale = quantize_fp8_blocks(w)
    assert torch.equal(w8.view(torch.uint8), ref8.view(torch.uint8))
    assert torch.equal(scale, torch.exp2(ref_scale.view(torch.uint8).double() - 127).float())
    assert torch.equal(dequantize_fp8_weight(w8, scale).double(), dequantize_f64(ref8, ref_scale))


def test_weight_blocks_are_scaled_by_their_largest_magnitude_even_when_negative() -> None:
    """A weight block's exponent comes from ``max|w|``: in a block whose extreme is -20 among entries below
    0.2, the scale is ``2^ceil(log2(20 / 448))`` and every code decodes finite (a signed max would pick
    ``0.2``'s exponent and overflow the -20), as the independent quantizer writes it."""
    w = torch.randn(256, 200, generator=torch.Generator().manual_seed(4)) * 0.05
    w[130, 7] = -20.0  # block (1, 0)
    w8, scale = quantize_fp8_weight(w)
    assert float(scale[1, 0]) == 2.0 ** math.ceil(math.log2(20 / 448))
    ref8, ref_scale = quantize_fp8_blocks(w)
    assert torch.equal(w8.view(torch.uint8), ref8.view(torch.uint8))
    assert torch.equal(scale, torch.exp2(ref_scale.view(torch.uint8).double() - 127).float())
    deq = dequantize_fp8_weight(w8, scale)
    assert torch.isfinite(deq).all() and float(deq[130, 7]) == -20.0


# --- the §8 comparators ----------------------------------------------------------------------------


def _pool(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = dsv4.fp8_rows(torch.randn(4, 16, 128, generator=g).bfloat16(), 64)
    return {"nope": rows.nope, "rope": rows.rope, "scale": rows.scale}


def _copy(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in p.items()}


def test_fp8_rows_comparator_accepts_one_step_and_a_scale_byte() -> None:
    before, expected = _pool(0), _pool(0)
    new = _pool(1)
    for k in expected:  # the step writes rows (2, 5) and (2, 6): 256 values, one may be off (ratio 0.005)
        expected[k][2, 5:7] = new[k][2, 5:7]
    actual = _copy(expected)
    codes = actual["nope"].view(torch.uint8)
    codes[2, 5, 3] += 1 if codes[2, 5, 3] & 0x7F < 0x7E else -1  # one e4m3 step
    assert fp8_rows_allclose(actual, expected, ROWS, before)
    actual["scale"][2, 5, 0] += 1  # the whole block one binade up: beyond one step for most elements
    check = fp8_rows_allclose(actual, expected, ROWS, before)
    assert not check and "e4m3 step" in check.detail


def test_fp8_rows_comparator_catches_a_code_two_steps_off_and_untouched_rows_moved() -> None:
    before, expected = _pool(0), _pool(0)
    for k in expected:
        expected[k][1, 1] = _pool(2)[k][1, 1]
    actual = _copy(expected)
    codes = actual["nope"].view(torch.uint8)
    codes[1, 1, 0] = (codes[1, 1, 0] & 0x80) | ((codes[1, 1, 0] & 0x7F) + 2).clamp(max=0x7E)
    assert not fp8_rows_allclose(actual, expected, ROWS, before)
    actual = _copy(expected)
    actual["rope"][3, 15, 0] += 1  # a row the step does not write
    check = fp8_rows_allclose(actual, expected, ROWS, before)
    assert not check and "does not write changed" in check.detail
    check = fp8_rows_allclose(actual, expected, ROWS)  # without `before` every row counts as written
    assert not check and "e4m3 step" in check.detail and "does not write" not in check.detail


def test_fp8_rows_comparator_allows_more_than_a_step_within_the_tolerance() -> None:
    """An element within ``deq``'s tolerance passes however many e4m3 steps it is off (§8: only the
    elements beyond the tolerance must be within one step): in a block of values near 1e-5 (scale
    2^-22, steps of 2^-20) a code eight codes up (at least eight steps) is still inside atol 1e-4."""
    g = torch.Generator().manual_seed(3)
    rows = dsv4.fp8_rows((torch.randn(2, 16, 128, generator=g) * 1e-5).bfloat16(), 64)
    expected = {"nope": rows.nope, "rope": rows.rope, "scale": rows.scale}
    assert int(expected["scale"][0, 0, 0]) == 127 - 22
    actual = _copy(expected)
    codes = actual["nope"].view(torch.uint8)
    codes[0, 0, 0] = (codes[0, 0, 0] & 0x80) | ((codes[0, 0, 0] & 0x7F) + 8).clamp(max=0x7E)
    diff = (actual["nope"][0, 0, 0].float() - expected["nope"][0, 0, 0].float()).abs() * 2.0**-22
    assert 2 * float(e4m3_step(expected["nope"][0, 0, 0].float() * 2.0**-22, torch.tensor(-22.0))) < diff < 1e-4
    assert fp8_rows_allclose(actual, expected, ROWS)
    tight = Tolerance(0.0, 1 / 128)  # the same element beyond a tolerance without atol: one step binds
    check = fp8_rows_allclose(actual, expected, tight)
    assert not check and "e4m3 step" in check.detail


def test_e4m3_step() -> None:
    e = torch.zeros(4)
    assert e4m3_step(torch.tensor([1.0, 1.9, 448.0, 0.0]), e).tolist() == [0.125, 0.125, 32.0, 2.0**-9]
    assert float(e4m3_step(torch.tensor([3.0]), torch.tensor([-4.0]))) == 0.25  # 3 = 48 * 2^-4: steps of 4 * 2^-4


def test_bit_identical_sees_nan_payloads_and_signed_zeros() -> None:
    a = torch.tensor([0.0, float("nan")])
    assert bit_identical(a, a.clone())
    assert not bit_identical(a, torch.tensor([-0.0, float("nan")]))


def test_the_rope_part_is_the_rows_own_copy() -> None:
    """``fp8_rows`` keeps the rope part in a tensor of its own: a caller that then reuses the buffer of
    its rows leaves the stored rows as they were."""
    v = torch.randn(3, 512, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    rows = fp8_rows(v, 64)
    kept = rows.rope.clone()
    assert torch.equal(kept, v[:, 448:])
    v.zero_()
    assert torch.equal(rows.rope, kept)

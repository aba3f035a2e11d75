"""Comparator rules of spec §6 / attention spec §8 beyond ``tests/test_comparators.py``: each test
fails on the planted bug its docstring names (docs/TESTING.md, "Bugs planted on purpose")."""

from __future__ import annotations

import pytest
import torch

import dsv4
from dsv4.harness.golden import (
    bit_identical,
    compare,
    exact_outputs,
    fp8_rows_allclose,
    ratio_allclose,
    step_inputs,
    topk_allclose,
)
from dsv4.ops import Tolerance

MASKED = torch.finfo(torch.float32).min
INF = float("inf")
ROWS = Tolerance(1e-4, 1 / 128)


def test_ratio_allclose_refuses_an_infinity_where_the_reference_is_finite() -> None:
    """An infinity matches only the same infinity, for every element whatever the ratio: one +inf or
    -inf in ``actual`` where the reference is finite fails (plant: ``inf_mismatch`` looked only at the
    reference's infinities, and the element's error, masked to 0, was not even counted)."""
    e = torch.linspace(1, 2, 1000)
    for bad in (INF, -INF):
        a = e.clone()
        a[7] = bad
        check = ratio_allclose(a, e, 1e-4, 1 / 128, 0.5)
        assert not check and check.violation_ratio > 0, (bad, check)
    # kv_state's rule (ratio 0): an inf in the backend's ring where the reference's is finite
    st = torch.zeros(1, 8, 4)
    got = st.clone()
    got[0, 3, 1] = INF
    assert not ratio_allclose(got, st, 1e-4, 1e-4, 0.0)
    # and through compare: a score the backend turned into +inf
    e = torch.tensor([[[1.0, 2.0, MASKED]]])
    leaked = torch.tensor([[[1.0, INF, MASKED]]])
    report = compare("indexer", {"score": leaked}, {"score": e})
    assert not next(c for c in report.checks if c.name == "score")


def test_compare_score_refuses_a_real_score_in_the_padded_columns() -> None:
    """Positions ``>= cache_len`` must be absent or -inf-like (spec §6): a wider ``score`` whose extra
    column holds a real value fails (plant: only the masked entries inside the reference's width were
    checked)."""
    e = torch.tensor([[[1.0, 2.0, MASKED]]])
    padded = torch.tensor([[[1.0, 2.0, MASKED, MASKED]]])
    leaked = torch.tensor([[[1.0, 2.0, MASKED, 0.5]]])

    def score_check(actual: torch.Tensor) -> dsv4.golden.Check:
        return next(c for c in compare("indexer", {"score": actual}, {"score": e}).checks if c.name == "score")

    assert score_check(padded)
    check = score_check(leaked)
    assert not check and "masked position holds a real score" in check.detail


def test_compare_key_pool_row_just_past_the_step_must_be_identical() -> None:
    """Start 4, S=4 writes compressed row 1 only; row 2 (the next, same block) is not written and must
    stay bit-identical, even for a change the written-row rule would allow (one code +1 in 40).
    Plant: ``_written_slots`` counted rows up to ``(p + S) // 4`` inclusive."""
    before = dsv4.IndexerState.paged(1, 2, 16, 40, torch.tensor([[1, 0]]))
    expected = before.clone()
    expected.keys[1, 1] = torch.arange(-20, 20, dtype=torch.int8)
    expected.key_scale[1, 1] = 0.01
    inputs = step_inputs(torch.zeros(1, 4, 8), 4, before)
    assert compare("indexer_compressor", expected.tensors(), expected.tensors(), inputs)
    keys = expected.keys.clone()
    keys[1, 2, 0] = 1  # row 2: one code of 40 one off, scale unchanged
    report = compare("indexer_compressor", {**expected.tensors(), "keys": keys}, expected.tensors(), inputs)
    assert not report and "does not write changed" in str(report)


def _pool(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = dsv4.fp8_rows(torch.randn(4, 16, 128, generator=g).bfloat16(), 64)
    return {"nope": rows.nope, "rope": rows.rope, "scale": rows.scale}


def test_fp8_rows_comparator_refuses_a_scale_byte_two_off_even_where_values_decode_equal() -> None:
    """Scale bytes equal or ±1 (attention spec §8), judged on the bytes: a block of zero codes decodes
    to 0 whatever its scale byte, so only the byte rule can see a byte 2 off, and an unused scale byte
    (beyond NOPE/64) is held to it too, a byte two below as two above. Plants: ``> 1`` loosened to ``> 2``;
    the difference taken without its sign."""
    before, expected = _pool(0), _pool(0)
    new = _pool(1)
    for k in expected:
        expected[k][2, 5] = new[k][2, 5]
    expected["nope"][2, 5] = 0  # block 0 of row (2, 5): every code 0
    actual = {k: v.clone() for k, v in expected.items()}
    written = torch.zeros(4, 16, dtype=torch.bool)
    written[2, 5] = True
    assert fp8_rows_allclose(actual, expected, ROWS, before, written)
    actual["scale"][2, 5, 0] += 1
    assert fp8_rows_allclose(actual, expected, ROWS, before, written)  # ±1 allowed
    actual["scale"][2, 5, 0] += 1
    check = fp8_rows_allclose(actual, expected, ROWS, before, written)
    assert not check and "scale byte more than 1 off" in check.detail
    actual["scale"][2, 5, 0] -= 4  # two below
    check = fp8_rows_allclose(actual, expected, ROWS, before, written)
    assert not check and "scale byte more than 1 off" in check.detail
    actual = {k: v.clone() for k, v in expected.items()}
    for byte in (2, 1):  # an unused byte (NOPE 64: one block) is written 0 (spec A2): no ±1 there
        actual["scale"][2, 5, 3] = byte
        check = fp8_rows_allclose(actual, expected, ROWS, before, written)
        assert not check and "padding scale byte not as written" in check.detail, byte


def test_fp8_rows_comparator_matches_an_infinity_with_the_same_infinity_only() -> None:
    """A written row whose rope part holds +inf (the bf16 tail keeps it) passes against itself, and
    fails where the backend has -inf or a number there (plant: equal infinities left to the step check,
    whose |inf - inf| is NaN)."""
    expected = _pool(0)
    expected["rope"][2, 5, 3] = INF
    written = torch.zeros(4, 16, dtype=torch.bool)
    written[2, 5] = True
    assert fp8_rows_allclose({k: v.clone() for k, v in expected.items()}, expected, ROWS, written=written)
    for other in (-INF, 1.0):
        actual = {k: v.clone() for k, v in expected.items()}
        actual["rope"][2, 5, 3] = other
        assert not fp8_rows_allclose(actual, expected, ROWS, written=written), other


def test_compare_key_pool_holds_an_infinite_reference_scale_to_the_same_infinity() -> None:
    """A written key row whose reference scale is +inf (an infinite ``norm_w`` makes one) passes only
    with +inf: a finite scale, 0 or -inf fails (plant: ``|a - inf| <= rtol * inf`` held for any a)."""
    before = dsv4.IndexerState.paged(1, 2, 16, 40, torch.tensor([[1, 0]]))
    expected = before.clone()
    expected.key_scale[1, 1] = INF
    inputs = step_inputs(torch.zeros(1, 4, 8), 4, before)
    assert compare("indexer_compressor", expected.tensors(), expected.tensors(), inputs)
    for other in (1.0, 0.0, -INF, 1e-30):
        scale = expected.key_scale.clone()
        scale[1, 1] = other
        report = compare("indexer_compressor", {**expected.tensors(), "key_scale": scale}, expected.tensors(), inputs)
        assert not report and "ks off" in str(report), other


def test_compare_key_pool_needs_one_start_per_row() -> None:
    """The key-pool rule marks the rows each of the step's rows writes, so ``start_pos`` must give one
    per row: an int is refused naming it (it marked row 0's rows only and blamed the expected pool)."""
    before = dsv4.IndexerState.paged(1, 2, 16, 40, torch.tensor([[1, 0]]))
    inputs = {**step_inputs(torch.zeros(1, 4, 8), 4, before), "start_pos": 4}
    with pytest.raises(ValueError, match=r"inputs\['start_pos'\]: expected one value per row"):
        compare("indexer_compressor", before.tensors(), before.tensors(), inputs)


def test_compare_score_holds_a_visible_minus_inf_to_minus_inf() -> None:
    """A visible score the reference makes -inf (an infinite head weight) is a score, not a mask: the
    most negative finite value or -2e38 there fails, -inf passes (plant: every value below -1e38 taken
    as masked, whatever its column)."""
    e = torch.tensor([[[1.0, -INF, MASKED]]])

    def score_check(actual: torch.Tensor) -> bool:
        return bool(next(c for c in compare("indexer", {"score": actual}, {"score": e}).checks if c.name == "score"))

    assert score_check(e.clone()) and score_check(torch.tensor([[[1.0, -INF, -INF]]]))
    for other in (MASKED, -2e38):
        assert not score_check(torch.tensor([[[1.0, other, MASKED]]])), other


def test_topk_a_reference_listing_a_nan_after_a_number_is_out_of_order() -> None:
    """NaNs rank first (spec §6, as ``topk_allclose`` documents): indices listing a NaN score after a
    number are out of order even when they are the reference's own (the -inf case of
    ``test_topk_an_infinite_score_matches_only_the_same_infinity`` for a NaN). Plant: the NaN clause of
    the order check dropped."""
    sc = torch.tensor([[[0.5, float("nan"), 2.0, 1.0]]])
    good = torch.tensor([[[1, 2]]])  # NaN, 2.0
    assert topk_allclose(good.clone(), good, sc)
    rising = torch.tensor([[[2, 1]]])  # 2.0, then NaN
    check = topk_allclose(rising, rising, sc)
    assert not check and "not in descending order" in check.detail, check.detail


def test_ratio_allclose_refuses_a_number_where_the_reference_is_nan() -> None:
    """NaN violates on either side: a finite value where the reference holds NaN is off (plant: only the
    backend's NaNs counted)."""
    e = torch.tensor([1.0, float("nan"), 2.0, 3.0])
    check = ratio_allclose(torch.tensor([1.0, 0.0, 2.0, 3.0]), e, 1e-4, 1 / 128, 0.2)
    assert not check and check.violation_ratio == 0.25, check


def test_topk_refuses_an_index_below_the_offset_and_a_gap_in_the_prefix() -> None:
    """An index below ``offset`` is no key of the call's (plant: only the upper end checked, so it read a
    score from the row's far end); a ``-1`` inside the valid prefix is named as such."""
    sc = torch.tensor([[[0.5, 3.0, 2.0, 1.0, MASKED, MASKED]]])
    ref = torch.tensor([[[101, 102, 103, -1]]])
    below = topk_allclose(torch.tensor([[[101, 102, 96, -1]]]), ref, sc, offset=100)
    assert not below and "index out of [offset, offset+6)" in below.detail, below
    gap = topk_allclose(torch.tensor([[[101, -1, 102, 103]]]), ref, sc, offset=100)
    assert not gap and "3 valid entries, expected 3 as a prefix" in gap.detail, gap


def test_topk_fails_on_one_token_off_among_many() -> None:
    """Top-k has no share of tokens allowed off: one token of 400 with a real miss fails the check
    (plant: passed while at most 0.5% of tokens were off)."""
    sc = torch.tensor([0.5, 3.0, 2.0, 1.0]).expand(1, 400, 4).clone()
    ref = torch.tensor([1, 2, 3]).expand(1, 400, 3).clone()
    got = ref.clone()
    got[0, 123] = torch.tensor([1, 2, 0])  # 0.5 where the reference's third is 1.0
    check = topk_allclose(got, ref, sc, start_pos=400)
    assert not check and check.violation_ratio == 1 / 400 and "[b=0, s=123] slot 2" in check.detail, check


def test_topk_start_pos_must_be_one_value_or_one_per_row() -> None:
    """``start_pos`` of two values for three rows is a ``ValueError`` naming it (plant: any count up to
    the batch taken, and torch's expand failing instead)."""
    sc = torch.zeros(3, 1, 8)
    idx = torch.zeros(3, 1, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"^start_pos: expected an int or one value per row \(3\), got 2 values"):
        topk_allclose(idx, idx, sc, start_pos=torch.tensor([8, 8]))


def test_topk_without_start_pos_sees_up_to_the_references_own_choice() -> None:
    """Without ``start_pos`` a token sees at least every key the reference chose, even one whose real
    score is the masked value (plant: the chosen key itself left out)."""
    sc = torch.tensor([[[1.0, MASKED, MASKED, MASKED]]])
    ref = torch.tensor([[[0, 1]]])
    assert topk_allclose(ref.clone(), ref, sc)


def test_compare_key_pool_a_step_into_an_unallocated_block_writes_no_row() -> None:
    """A step whose row lies in an unallocated block (table entry -1) writes nothing: the pool's last
    block, which a negative index would reach, must stay as it was (plant: -1 taken as a block index,
    so that row counted as written and a change to it passed within ``ks``'s tolerance)."""
    before = dsv4.IndexerState.paged(2, 4, 16, 8, torch.tensor([[-1, 0], [1, 3]]))
    before.key_scale[3, 1] = 1.0  # slot 1's row 49, filled before the step
    expected = before.clone()
    inputs = step_inputs(torch.zeros(1, 4, 8), 4, before)  # slot 0's row 1: in its unallocated block 0
    got = expected.clone()
    got.key_scale[3, 1] = 1.0 + 1 / 1024
    report = compare("indexer_compressor", got.tensors(), expected.tensors(), inputs)
    assert not report and "does not write changed" in str(report), report


def test_compare_key_pool_refuses_an_expected_pool_that_changed_an_unwritten_row() -> None:
    """An expected pool (a golden file) whose row the step does not write differs from the pool before
    the step is a corrupt expected file, named so, even where the backend's pool matches it (plant:
    only the backend's pool checked)."""
    before = dsv4.IndexerState.paged(1, 2, 16, 8, torch.tensor([[0, 1]]))
    inputs = step_inputs(torch.zeros(1, 4, 8), 4, before)  # writes row 1 of block 0
    expected = before.clone()
    expected.key_scale[1, 5] = 0.5  # a row of block 1, which the step does not write
    report = compare("indexer_compressor", expected.clone().tensors(), expected.tensors(), inputs)
    assert not report and "in the expected pool (a corrupt expected file)" in str(report), report


def test_compare_score_of_another_batch_or_seq_is_a_failed_check() -> None:
    """A score whose leading dims differ from the reference's fails by its shape, not by an exception
    from the masking (plant: only the key axis compared)."""
    e = torch.zeros(1, 3, 8)
    check = next(
        c for c in compare("indexer", {"score": torch.zeros(2, 3, 8)}, {"score": e}).checks if c.name == "score"
    )
    assert not check and "does not cover expected [1, 3, 8]" in check.detail, check


def test_bit_identical_needs_the_same_dtype_as_well_as_the_same_bytes() -> None:
    """Zeros of fp32 and of int32 have the same bytes; they are not the same output (plant: dtype not
    compared)."""
    check = bit_identical(torch.zeros(4), torch.zeros(4, dtype=torch.int32), "y")
    assert not check and "torch.float32 [4] != expected torch.int32 [4]" in check.detail, check


def test_fp8_rows_comparator_fails_pools_of_other_shapes() -> None:
    """A pool of another shape fails by its shapes (plant: went on to compare rows)."""
    expected = _pool(0)
    actual = {k: v[:3].clone() for k, v in expected.items()}  # one block short
    check = fp8_rows_allclose(actual, expected, ROWS)
    assert not check and "pool shapes" in check.detail, check


def test_exact_outputs_of_a_record_are_its_own_tensors_only() -> None:
    """``exact_outputs(..., "ring")`` holds ``ring`` and every ``ring.*`` tensor to its bits, not another
    output whose name merely starts the same (plant: ``ring_scale`` taken as part of ``ring``)."""
    expected = {"ring.kv": torch.ones(2), "ring.score": torch.zeros(2), "ring_scale": torch.ones(2)}
    actual = {**expected, "ring_scale": torch.full((2,), 2.0)}
    assert exact_outputs(actual, expected, "ring")
    actual["ring.score"] = torch.full((2,), -0.0)  # one bit apart
    check = exact_outputs(actual, expected, "ring")
    assert not check and check.name == "ring", check


def test_fp8_rows_comparator_refuses_a_number_where_the_reference_decodes_nan() -> None:
    """A NaN matches only a NaN: a written row whose expected code is e4m3's NaN and whose actual code is
    a number fails (plant: every expected NaN taken as matched)."""
    expected = _pool(0)
    actual = {k: v.clone() for k, v in expected.items()}
    expected["nope"].view(torch.uint8)[2, 5, 7] = 0x7F  # e4m3fn's NaN
    written = torch.zeros(4, 16, dtype=torch.bool)
    written[2, 5] = True
    assert fp8_rows_allclose({k: v.clone() for k, v in expected.items()}, expected, ROWS, written=written)
    check = fp8_rows_allclose(actual, expected, ROWS, written=written)
    assert not check, check

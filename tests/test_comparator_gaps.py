"""Comparator rules of spec §6 / attention spec §8 beyond ``tests/test_comparators.py``: each test
fails on the planted bug its docstring names (docs/TESTING.md, "Bugs planted on purpose")."""

from __future__ import annotations

import torch

import dsv4
from dsv4.harness.golden import compare, fp8_rows_allclose, ratio_allclose, step_inputs, topk_allclose
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
    (beyond NOPE/64) is held to it too. Plant: ``> 1`` loosened to ``> 2``."""
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
    actual = {k: v.clone() for k, v in expected.items()}
    actual["scale"][2, 5, 3] = 2  # an unused byte (NOPE 64: one block), expected 0
    check = fp8_rows_allclose(actual, expected, ROWS, before, written)
    assert not check and "scale byte more than 1 off" in check.detail


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

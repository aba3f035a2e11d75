"""The radix-select top-k kernels against the reference ``select_topk`` (spec §5 step 6, §6 rule).

Ties are broken by lower index in both, so beyond the spec's tie-tolerant comparison the indices
are expected to be identical. Rows longer than ``ROW_IN_REGISTERS`` go through the chunked plan:
its first-digit histogram is built either by ``select_topk`` itself or, as a score kernel would,
by a test kernel that calls ``first_digit_histogram`` per block of keys.
"""

from __future__ import annotations

import contextlib
import time

import pytest
import torch
import triton
import triton.language as tl

from conftest import DEVICE, FULL
from dsv4.harness.golden import tolerance, topk_allclose
from dsv4.kernels.interpreter import interpreted
from dsv4.kernels.topk import (
    CHUNK,
    FIRST_DIGIT_BINS,
    HIST_WORDS,
    ROW_IN_REGISTERS,
    ROW_TUNING,
    first_digit_histogram,
    select_topk,
)
from dsv4.model.structs import MASKED_SCORE, StepPositions
from dsv4.ops.validate import step_positions
from dsv4.reference.indexer import select_topk as reference_select_topk
from program_order import programs_shuffled

OFFSET = 128  # the attention's window size, added to every index


def _positions(batch: int, seq: int, start_pos) -> StepPositions:
    start = torch.tensor(start_pos) if isinstance(start_pos, list) else start_pos
    return step_positions(start, batch, seq, DEVICE)


def _masked(score: torch.Tensor, pos: StepPositions) -> torch.Tensor:
    """The reference's layout: positions past vis(b, s) hold MASKED_SCORE."""
    vis = (pos.token_positions() + 1) // 4
    hidden = torch.arange(score.shape[-1], device=score.device) >= vis.unsqueeze(-1)
    return score.masked_fill(hidden, MASKED_SCORE).contiguous()


def _check(score: torch.Tensor, pos: StepPositions, topk: int) -> None:
    got = select_topk(score, pos, topk, OFFSET)
    expected = reference_select_topk(score, pos, topk, OFFSET)
    tol = tolerance("score")
    check = topk_allclose(got, expected, score, OFFSET, tol.atol, tol.rtol)
    assert check, check.detail
    assert got.dtype == torch.int32 and got.shape == expected.shape
    assert torch.equal(got, expected), "equal scores must come lowest index first, as in the reference"


def _random_scores(batch: int, seq: int, n: int, seed: int, distinct_values: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if distinct_values is None:
        score = torch.randn(batch, seq, n, generator=g)
    else:  # planted ties: few values, so the k-th position falls inside a run of equal scores
        score = torch.randint(0, distinct_values, (batch, seq, n), generator=g).float() * 0.25 - 0.5
    return score.to(DEVICE)


SHAPES = [  # (batch, seq, start_pos, topk): cache lengths from 0 keys up past one register row
    (1, 1, 0, 8),  # nothing visible: all -1
    (1, 1, 3, 8),  # one key
    (1, 3, 17, 16),  # vis 4, 5, 5 < topk: all of them, then -1
    (3, 2, [3, 40, 63], 16),
    (3, 3, [100, 403, 1000], 16),
    (2, 2, [2040, 8190], 512),  # 2048 keys: flash decode's row length
    (1, 2, 4 * ROW_IN_REGISTERS - 2, 1024),  # the longest single-program row
    (1, 2, 4 * ROW_IN_REGISTERS + 2, 1024),  # one key more: the chunked path, a 1-key last chunk
    (3, 1, [60, 20000, 41000], 512),  # chunked; rows of 15, 5000 and 10250 keys
    (2, 2, [1, 4 * ROW_IN_REGISTERS + 2], 16),  # chunked; two rows with nothing visible
]


def _id(v) -> str:
    return "-".join(map(str, v)) if isinstance(v, list) else str(v)


@pytest.mark.parametrize("distinct_values", [None, 3], ids=["distinct", "ties"])
@pytest.mark.parametrize("batch,seq,start_pos,topk", SHAPES, ids=_id)
def test_topk_matches_reference(batch: int, seq: int, start_pos, topk: int, distinct_values: int | None) -> None:
    pos = _positions(batch, seq, start_pos)
    score = _masked(_random_scores(batch, seq, pos.max_cache_len, seed=topk, distinct_values=distinct_values), pos)
    _check(score, pos, topk)


@pytest.mark.parametrize("n", [300, 3 * CHUNK + 77], ids=["one-program", "chunked"])
def test_hidden_columns_are_not_read(n: int) -> None:
    """Only ``j < vis(b, s)`` is read: hidden columns holding the largest scores of the row (not the
    reference's mask) change no index, also where the row's first-digit histogram is built from it."""
    pos = _positions(2, 2, [4 * n - 2, 4 * n - 4 * (n // 3)])  # rows see n-1, n, n//3-1 and n//3 keys
    masked = _masked(_random_scores(2, 2, n, seed=n), pos)
    garbage = masked.masked_fill(masked == MASKED_SCORE, 1e30)
    expected = reference_select_topk(masked, pos, 64, OFFSET)
    assert torch.equal(select_topk(garbage, pos, 64, OFFSET), expected)


@pytest.mark.parametrize("n", [300, 3 * CHUNK + 77], ids=["one-program", "chunked"])
def test_topk_special_rows(n: int) -> None:
    """Rows that stress the threshold search: all equal, signed zeros, outliers, negatives."""
    _check(*_special_rows(n), 16)


def _special_rows(n: int) -> tuple[torch.Tensor, StepPositions]:
    g = torch.Generator().manual_seed(n)
    rows = torch.randn(6, n, generator=g)
    rows[0] = 1.0  # every score ties
    rows[1] = torch.where(torch.rand(n, generator=g) < 0.5, -0.0, 0.0)  # -0.0 and +0.0 tie too
    rows[2, torch.randperm(n, generator=g)[:16]] = 1e6 + torch.arange(16.0)  # the top-k in one top digit
    rows[3] = -rows[3].abs() - 1.0  # all negative
    rows[4] = torch.randint(0, 2, (n,), generator=g).float()  # two values: ties across every chunk
    rows[5, : n // 2] = float("-inf")  # -inf scores are real (if useless) candidates
    pos = _positions(1, 6, 4 * n - 6)  # the last row sees all n keys
    return _masked(rows.view(1, 6, n).to(DEVICE), pos), pos


# The one-program plan's other ways (ROW_TUNING's candidates that change the selection, not only the launch):
# 11-bit digits, and the threshold's later digits over its first digit's bin (listed, or re-read from the
# row when it overflows the list: 3-valued rows, and N(0,1) rows of 2048 keys at 8 bits, ~585 keys a bin).
assert not callable(ROW_TUNING.candidates)  # one list for every bucket
OTHER_PLANS = [
    cfg for cfg in ROW_TUNING.candidates if set(cfg) <= {"radix_bits", "bin_slots"} and cfg != ROW_TUNING.default
]


@pytest.mark.parametrize("plan", OTHER_PLANS, ids=lambda cfg: ",".join(f"{k}={v}" for k, v in cfg.items()))
@pytest.mark.parametrize("distinct_values", [None, 3], ids=["distinct", "ties"])
def test_topk_row_plans_agree(plan: dict, distinct_values: int | None) -> None:
    """The one-program plan's other ways (``radix_bits``: 8+8+8+8 or 11+11+10 bits; ``bin_slots``: one
    pass over the row, then digits over the threshold's bin) give the reference's indices too, on rows
    from nothing visible to the longest single-program row; NaNs of either sign first, the stress rows
    of ``test_topk_special_rows``."""
    from dsv4.kernels import tuning

    with tuning.forced("topk.select_row", plan):
        for batch, seq, start_pos, topk in [SHAPES[0], SHAPES[2], SHAPES[4], SHAPES[5], SHAPES[6]]:
            pos = _positions(batch, seq, start_pos)
            score = _random_scores(batch, seq, pos.max_cache_len, seed=topk, distinct_values=distinct_values)
            _check(_masked(score, pos), pos, topk)
        if distinct_values is None:
            _check(*_special_rows(300), 16)
            pos = _positions(1, 2, 4 * 300 - 2)
            score = _random_scores(1, 2, 300, seed=9)
            score[0, 0, ::7] = float("nan")
            score[0, 1, ::5] = torch.tensor(-4194304, dtype=torch.int32).view(torch.float32)  # 0xFFC00000
            score = _masked(score, pos)
            got = select_topk(score, pos, 64, OFFSET)
            assert torch.equal(got, reference_select_topk(score, pos, 64, OFFSET))
            assert torch.equal(got[0, 0, :43] - OFFSET, torch.arange(0, 300, 7, dtype=torch.int32, device=DEVICE))


@FULL  # 262144 keys, three index digits: test_topk_all_scores_equal[262144-hist]; no hist: [65536] there
def test_topk_long_context() -> None:
    """262144 keys (1M tokens), topk 1024, distinct and tied scores: the long-context shape."""
    pos = _positions(1, 2, 262144 * 4 - 2)
    score = _random_scores(1, 2, pos.max_cache_len, seed=7)
    score[0, 1] = torch.randint(0, 64, (pos.max_cache_len,)).float()  # ~4096 keys per value
    t0 = time.perf_counter()
    _check(_masked(score, pos), pos, 1024)
    print(f"select_topk, 2 rows x 262144 keys, topk 1024, interpreter: {time.perf_counter() - t0:.1f} s")


# ----- the chunked plan: the histogram a score kernel builds, long rows, worst cases, determinism -----

SCORE_BLOCK = 128  # keys per program of the index score kernel, whose epilogue the histogram test mimics
STAND_IN_BLOCK = 2048  # keys per program of the stand-in elsewhere: fewer interpreted programs


@triton.jit
def _score_epilogue_kernel(score_ptr, start_ptr, hist_ptr, seq, n, KEYS: tl.constexpr, WORDS: tl.constexpr):
    """What a score kernel does for ``select_topk``: per (token row, block of keys), add the block's
    first-digit histogram to the row's ``hist`` with relaxed atomics."""
    r = tl.program_id(0).to(tl.int64)
    index = tl.program_id(1) * KEYS + tl.arange(0, KEYS)
    valid = index < (tl.load(start_ptr + r // seq) + r % seq + 1) // 4
    counts = first_digit_histogram(tl.load(score_ptr + r * n + index, mask=valid, other=0.0), valid)
    bins = tl.arange(0, 256)
    tl.atomic_add(hist_ptr + r * WORDS + bins, counts, mask=counts > 0, sem="relaxed")


def _score_kernel_hist(score: torch.Tensor, pos: StepPositions, block: int = STAND_IN_BLOCK) -> torch.Tensor:
    b, s, n = score.shape
    hist = torch.zeros(b * s, HIST_WORDS, dtype=torch.int32, device=score.device)
    grid = (b * s, triton.cdiv(n, block))
    _score_epilogue_kernel[grid](score, pos.start, hist, s, n, KEYS=block, WORDS=HIST_WORDS)
    return hist


def _first_digits_reference(score: torch.Tensor, pos: StepPositions) -> torch.Tensor:
    """``[B*S, 256]`` counts of the top 8 bits of the order key over the visible keys, in torch."""
    bits = (score + 0.0).view(torch.int32).to(torch.int64)  # + 0.0: -0.0 counts as +0.0
    key = torch.where(bits < 0, -1 - bits, bits + (1 << 31))  # integer order = float order
    visible = torch.arange(score.shape[-1], device=score.device) < ((pos.token_positions() + 1) // 4).unsqueeze(-1)
    digit = torch.where(visible, key >> 24, FIRST_DIGIT_BINS).view(-1, score.shape[-1])  # hidden: an extra bin
    counts = torch.zeros(digit.shape[0], FIRST_DIGIT_BINS + 1, dtype=torch.int64, device=score.device)
    return counts.scatter_add_(1, digit, torch.ones_like(digit))[:, :FIRST_DIGIT_BINS]


def test_first_digit_histogram_matches_torch() -> None:
    """Every bin, from the helper a score kernel calls, against torch; masked tails not counted."""
    pos = _positions(2, 2, [400, 4001])  # 100 to 1000 visible keys of 1001
    g = torch.Generator().manual_seed(3)
    score = torch.randn(2, 2, 1001, generator=g) * torch.logspace(-30, 30, 1001)  # many exponents, both signs
    score[..., :8] = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1e-45, -1e-45, 3e38, -3e38])
    score = score.to(DEVICE)
    hist = _score_kernel_hist(score, pos, SCORE_BLOCK)
    expected = _first_digits_reference(score, pos)
    assert torch.equal(hist[:, :FIRST_DIGIT_BINS].long(), expected)
    assert expected.sum() == ((pos.token_positions() + 1) // 4).sum() and (expected > 0).sum() > 100
    assert hist[:, FIRST_DIGIT_BINS:].eq(0).all()


def _check_with_hist(score: torch.Tensor, pos: StepPositions, topk: int) -> None:
    """``_check`` through the score kernel's histogram; the selection leaves its counters zero."""
    hist = _score_kernel_hist(score, pos)
    counts = hist[:, :FIRST_DIGIT_BINS].clone()
    got = select_topk(score, pos, topk, OFFSET, hist=hist)
    assert torch.equal(got, reference_select_topk(score, pos, topk, OFFSET))
    assert torch.equal(hist[:, :FIRST_DIGIT_BINS], counts) and hist[:, FIRST_DIGIT_BINS:].eq(0).all()


def _long_rows(n: int, seed: int) -> tuple[torch.Tensor, StepPositions]:
    """Two tokens of one sequence, the second seeing ``n`` keys: random scores, and scores of 64
    values (about n/64 keys on each, so thousands tie at the threshold)."""
    pos = _positions(1, 2, 4 * n - 2)
    g = torch.Generator().manual_seed(seed)
    score = torch.stack([torch.randn(n, generator=g), torch.randint(0, 64, (n,), generator=g).float()])
    return _masked(score.view(1, 2, n).to(DEVICE), pos), pos


@pytest.mark.parametrize(
    "n,topk,hist_given",
    [
        (ROW_IN_REGISTERS + 1, 512, True),
        (65536, 512, True),
        (65536, 1024, False),
        pytest.param(262144, 512, True, marks=FULL),  # 262144 keys: test_topk_all_scores_equal[262144-hist]
    ],
    ids=["4097-512-hist", "65536-512-hist", "65536-1024", "262144-512-hist"],
)
def test_topk_long_rows(n: int, topk: int, hist_given: bool) -> None:
    """Long rows through both ways of getting the first-digit histogram (262144 keys, topk 1024,
    standalone: ``test_topk_long_context``)."""
    score, pos = _long_rows(n, seed=n + topk)
    if hist_given:
        _check_with_hist(score, pos, topk)
    else:
        _check(score, pos, topk)


@pytest.mark.parametrize("n,hist_given", [(65536, False), (262144, True)], ids=["65536", "262144-hist"])
def test_topk_all_scores_equal(n: int, hist_given: bool) -> None:
    """The worst case of the chunked plan: every visible key ties on the whole order key, more than a
    row's candidate list holds, so the row is finished from its scores and the ties are taken by index
    alone. Signed zeros in the second row."""
    pos = _positions(1, 2, 4 * n - 2)
    score = torch.ones(1, 2, n)
    score[0, 1] = torch.where(torch.arange(n) % 3 == 0, -0.0, 0.0)
    score = _masked(score.to(DEVICE), pos)
    got = select_topk(score, pos, 1024, OFFSET, hist=_score_kernel_hist(score, pos) if hist_given else None)
    lowest = torch.arange(1024, dtype=torch.int32, device=DEVICE) + OFFSET  # of the n - 1 and n visible keys
    assert torch.equal(got[0, 0], lowest) and torch.equal(got[0, 1], lowest)


def test_topk_ties_straddling_chunks() -> None:
    """Threshold ties on both sides of chunk boundaries, more of them than are taken: the lowest
    indices must win whichever program appended them first."""
    n = 3 * CHUNK + 5
    g = torch.Generator().manual_seed(11)
    rows = torch.randn(2, n, generator=g)
    rows[0, CHUNK - 300 : CHUNK + 300] = 7.0  # 600 ties around the first boundary, 512 - 10 taken
    rows[0, torch.arange(10) * 300 + 2 * CHUNK] = 8.0  # 10 certain winners in chunk 2
    rows[1, torch.arange(0, n, 7)] = 7.0  # ties spread over every chunk
    rows[1, n - 1] = 7.0  # and in the 5-key last chunk
    pos = _positions(1, 2, 4 * n - 2)
    score = _masked(rows.view(1, 2, n).to(DEVICE), pos)
    _check(score, pos, 512)
    _check_with_hist(score, pos, 512)


@pytest.mark.skipif(not interpreted(), reason="reorders the interpreter's programs; on a GPU the repeat test runs")
def test_topk_independent_of_program_order() -> None:
    """Another program finishing each row, candidates appended in another order: the same bits."""
    n = 5 * CHUNK + 100
    score, pos = _long_rows(n, seed=5)
    expected = reference_select_topk(score, pos, 1024, OFFSET)
    for seed in range(3):
        with programs_shuffled(seed):
            assert torch.equal(select_topk(score, pos, 1024, OFFSET), expected)
            hist = _score_kernel_hist(score, pos)
            assert torch.equal(select_topk(score, pos, 1024, OFFSET, hist=hist), expected)


def test_topk_runs_are_bit_identical() -> None:
    """Repeated calls on the same scratch (a workspace) give the same bits, chunked and not."""
    from dsv4.kernels.workspace import Workspace

    ws = Workspace()
    for n in (ROW_IN_REGISTERS, 3 * CHUNK + 77):
        score, pos = _long_rows(n, seed=n)
        first = select_topk(score, pos, 512, OFFSET, ws=ws)
        for _ in range(2):
            assert torch.equal(select_topk(score, pos, 512, OFFSET, ws=ws), first)
            assert torch.equal(select_topk(score, pos, 512, OFFSET, ws=ws, hist=_score_kernel_hist(score, pos)), first)


@pytest.mark.skipif(not interpreted(), reason="counts interpreted launches")
def test_topk_launches() -> None:
    """One launch per plan, two when the chunked plan builds its own histogram; no other torch op."""
    from dsv4.bench.interp_traffic import count_traffic

    short, pos_short = _long_rows(ROW_IN_REGISTERS, seed=1)
    long, pos_long = _long_rows(2 * CHUNK + 1, seed=2)
    hist = _score_kernel_hist(long, pos_long)
    for args, hist_arg, kernels in [
        ((short, pos_short), None, ["_select_row_kernel"]),
        ((long, pos_long), None, ["_first_digit_kernel", "_select_chunks_kernel"]),
        ((long, pos_long), hist, ["_select_chunks_kernel"]),
    ]:
        with count_traffic() as log:
            select_topk(*args, 512, OFFSET, hist=hist_arg)
        assert [launch.kernel for launch in log.launches] == kernels


@pytest.mark.parametrize("values", [3, 40])
def test_a_row_that_overflows_its_list_is_finished_from_its_scores(values: int) -> None:
    """Scores of a few values: tens of thousands tie with the threshold, more than a row's list of
    ``LIST_PER_TOPK x topk`` keys holds (a tenth of the row here), so the finishing program takes the
    threshold's last digits and its lowest-index ties from the row's scores. The same indices as the
    reference, in any program order; 40 values leave about 2,000 ties, which the list holds."""
    from dsv4.kernels import topk as module
    from dsv4.kernels.workspace import Workspace

    n = 16 * CHUNK
    pos = _positions(1, 2, 4 * n - 2)
    g = torch.Generator().manual_seed(values)
    score = _masked((torch.randint(0, values, (1, 2, n), generator=g).float() - 1.5).to(DEVICE), pos)
    expected = reference_select_topk(score, pos, 256, OFFSET)
    ws = Workspace()
    orders = [contextlib.nullcontext()] + ([programs_shuffled(values)] if interpreted() else [])
    for order in orders:
        with order:
            hist = _score_kernel_hist(score, pos)
            assert torch.equal(select_topk(score, pos, 256, OFFSET, ws=ws, hist=hist), expected)
            assert torch.equal(select_topk(score, pos, 256, OFFSET, ws=ws), expected)
    assert ws._buffers["topk.candidates"].shape[-1] == module.LIST_PER_TOPK * 256 < n


@pytest.mark.parametrize("hist_given", [False, True], ids=["standalone", "hist"])
def test_a_row_finished_from_its_scores_takes_only_the_ties_left(hist_given: bool) -> None:
    """Ten winners near the end of the row and every other key tied at 0, far more ties than the row's
    list holds: finishing from the scores takes the lowest-index ties only while the count of ties in
    earlier blocks leaves room, so the ten winners at the end are not crowded out of the k taken."""
    from dsv4.kernels.topk import LIST_PER_TOPK

    n = 16 * CHUNK
    assert n - 100 > LIST_PER_TOPK * 256  # the zeros overflow the list
    pos = _positions(1, 2, 4 * n - 2)  # the rows see n - 1 and n keys
    score = torch.zeros(1, 2, n)
    score[..., n - 100 : n - 90] = 1.0
    score = _masked(score.to(DEVICE), pos)
    hist = _score_kernel_hist(score, pos) if hist_given else None
    got = select_topk(score, pos, 256, OFFSET, hist=hist)
    assert torch.equal(got, reference_select_topk(score, pos, 256, OFFSET))


@pytest.mark.skipif(not interpreted(), reason="counts interpreted launches")
def test_chunks_list_only_tie_keys_that_can_still_be_taken() -> None:
    """Scores uniform in [2, 8): every key shares the threshold's first digit. A chunk program lists the
    tie-bin keys from the second digit that the row's counts so far (its own included) allow, not its
    whole share of the bin: the launch stores under a tenth of the 8 B a key that listing the bin takes
    (1.1 MB for these two rows), in any program order, and selects the same indices."""
    from dsv4.bench.interp_traffic import count_traffic

    n = 16 * CHUNK
    pos = _positions(1, 2, 4 * n - 2)
    g = torch.Generator().manual_seed(7)
    score = _masked((2 + 6 * torch.rand(1, 2, n, generator=g)).to(DEVICE), pos)
    hist = _score_kernel_hist(score, pos)
    expected = reference_select_topk(score, pos, 512, OFFSET)
    for order in (contextlib.nullcontext(), programs_shuffled(0), programs_shuffled(1)):
        with order, count_traffic() as log:
            got = select_topk(score, pos, 512, OFFSET, hist=hist.clone())
        assert torch.equal(got, expected)
        [launch] = log.launches
        assert launch.store_bytes < 8 * (2 * n - 1) // 10, launch


@pytest.mark.parametrize(
    "hist",
    [torch.zeros(2, HIST_WORDS, dtype=torch.int64), torch.zeros(2, FIRST_DIGIT_BINS, dtype=torch.int32)],
    ids=["int64", "short-row"],
)
def test_topk_rejects_a_bad_hist(hist: torch.Tensor) -> None:
    score, pos = _long_rows(2 * CHUNK + 1, seed=2)
    with pytest.raises(ValueError, match="hist"):
        select_topk(score, pos, 512, OFFSET, hist=hist.to(DEVICE))


@pytest.mark.parametrize("hist_given", [False, True], ids=["standalone", "hist"])
def test_topk_candidate_buffer_is_capped(hist_given: bool, monkeypatch) -> None:
    """The long-row plan's candidate buffer stays within ``CANDIDATE_BYTES`` (lowered here to two and a
    half rows' lists): six rows go in three launches of two, with the same indices as one launch."""
    from dsv4.bench.interp_traffic import count_traffic
    from dsv4.kernels import topk
    from dsv4.kernels.workspace import Workspace

    n, topk_k = ROW_IN_REGISTERS + 1, 64
    pos = _positions(3, 2, [4 * n - 2, 4 * n - 40, 4 * n - 9000])  # rows see n, n-9 .. n-2250 keys
    rows_apart = 64.0 * torch.arange(6.0, device=DEVICE).view(3, 2, 1)  # each row's first digits its own
    score = _masked(_random_scores(3, 2, n, seed=21, distinct_values=97) + rows_apart, pos)
    hist = (lambda: _score_kernel_hist(score, pos)) if hist_given else (lambda: None)
    whole = select_topk(score, pos, topk_k, OFFSET, hist=hist())
    monkeypatch.setattr(topk, "CANDIDATE_BYTES", 2 * 8 * n + 8 * n // 2)  # room for 2.5 rows: groups of 2
    ws = Workspace()
    with count_traffic() if interpreted() else contextlib.nullcontext() as log:  # launches counted when interpreted
        got = select_topk(score, pos, topk_k, OFFSET, ws=ws, hist=hist())
    if log is not None:
        assert [launch.kernel for launch in log.launches].count("_select_chunks_kernel") == 3
    candidates = ws._buffers["topk.candidates"]
    assert candidates.shape[0] == 2 and candidates.numel() * 8 <= topk.CANDIDATE_BYTES
    assert torch.equal(got, whole)
    assert torch.equal(got, reference_select_topk(score, pos, topk_k, OFFSET))

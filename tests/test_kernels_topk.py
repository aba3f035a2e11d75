"""The radix-select top-k kernel against the reference ``select_topk`` (spec §5 step 6, §6 rule).

Ties are broken by lower index in both, so beyond the spec's tie-tolerant comparison the indices
are expected to be identical.
"""

from __future__ import annotations

import time

import pytest
import torch

from conftest import DEVICE
from dsv4.harness.golden import tolerance, topk_allclose
from dsv4.kernels.topk import CHUNK, ROW_IN_REGISTERS, select_topk
from dsv4.model.structs import MASKED_SCORE, StepPositions
from dsv4.ops.validate import step_positions
from dsv4.reference.indexer import select_topk as reference_select_topk

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
def test_topk_special_rows(n: int) -> None:
    """Rows that stress the threshold search: all equal, signed zeros, outliers, negatives."""
    g = torch.Generator().manual_seed(n)
    rows = torch.randn(6, n, generator=g)
    rows[0] = 1.0  # every score ties
    rows[1] = torch.where(torch.rand(n, generator=g) < 0.5, -0.0, 0.0)  # -0.0 and +0.0 tie too
    rows[2, torch.randperm(n, generator=g)[:16]] = 1e6 + torch.arange(16.0)  # the top-k in one top digit
    rows[3] = -rows[3].abs() - 1.0  # all negative
    rows[4] = torch.randint(0, 2, (n,), generator=g).float()  # two values: ties across every chunk
    rows[5, : n // 2] = float("-inf")  # -inf scores are real (if useless) candidates
    pos = _positions(1, 6, 4 * n - 6)  # the last row sees all n keys
    _check(_masked(rows.view(1, 6, n).to(DEVICE), pos), pos, 16)


def test_topk_long_context() -> None:
    """262144 keys (1M tokens), topk 1024, distinct and tied scores: the long-context shape."""
    pos = _positions(1, 2, 262144 * 4 - 2)
    score = _random_scores(1, 2, pos.max_cache_len, seed=7)
    score[0, 1] = torch.randint(0, 64, (pos.max_cache_len,)).float()  # ~4096 keys per value
    t0 = time.perf_counter()
    _check(_masked(score, pos), pos, 1024)
    print(f"select_topk, 2 rows x 262144 keys, topk 1024, interpreter: {time.perf_counter() - t0:.1f} s")

"""The indexer score kernel against the reference ``index_scores`` (spec §5 steps 4-5, §6 tolerance)."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
import triton
import triton.language as tl

from conftest import DEVICE, FULL
from dsv4.harness.cases import make_case
from dsv4.harness.golden import bit_identical, ratio_allclose, tolerance
from dsv4.kernels import index_score as index_score_module
from dsv4.kernels.epilogue import quantize_int8_rows
from dsv4.kernels.index_score import index_scores
from dsv4.kernels.topk import FIRST_DIGIT_BINS, HIST_WORDS
from dsv4.model.config import PRESETS
from dsv4.model.quant import quantize_int8_per_row
from dsv4.model.state import IndexerState
from dsv4.model.structs import MASKED_SCORE, StepPositions
from dsv4.model.weights import IndexerWeights
from dsv4.ops.validate import step_positions
from dsv4.reference.indexer import index_scores as reference_index_scores

HEAD_DIM = 128  # index_head_dim of every preset


@triton.jit
def _quantize_kernel(rows_ptr, q_ptr, scale_ptr, M: tl.constexpr, K: tl.constexpr):
    offs = tl.arange(0, M)[:, None] * K + tl.arange(0, K)[None, :]
    q, scale = quantize_int8_rows(tl.load(rows_ptr + offs))
    tl.store(q_ptr + offs, q)
    tl.store(scale_ptr + tl.arange(0, M), scale)


def test_key_quantization_is_bit_exact() -> None:
    """The in-register quantizer equals ``quantize_int8_per_row``, halfway values included."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(16, HEAD_DIM, generator=g) * torch.logspace(-5, 3, 16).unsqueeze(1)
    halves = torch.tensor([2.5, -3.5, 0.5, -0.5, 1.5, 126.5, -126.5, -2.5])
    rows[0].zero_()[: halves.numel() + 1] = torch.cat([torch.tensor([127.0]), halves])  # scale exactly 1
    rows[1].zero_()[:5] = torch.tensor([254.0, 5.0, 7.0, -5.0, -7.0])  # scale 0.5: 2.5, 3.5 ...
    rows[2].zero_()  # amax floor
    rows = rows.to(torch.bfloat16).to(torch.float32).to(DEVICE)  # the kernel quantizes bf16 keys
    q_ref, scale_ref = quantize_int8_per_row(rows)
    scaled = rows * (127.0 / rows.abs().amax(-1, keepdim=True).clamp_min(1e-4))
    assert bool((scaled.frac().abs() == 0.5).any()), "no halfway value reached the rounding"
    q = torch.empty(16, HEAD_DIM, dtype=torch.int8, device=DEVICE)
    scale = torch.empty(16, dtype=torch.float32, device=DEVICE)
    _quantize_kernel[(1,)](rows, q, scale, M=16, K=HEAD_DIM)
    assert torch.equal(q, q_ref)
    assert torch.equal(scale, scale_ref.squeeze(-1))


def test_int8_rows_are_the_spec_rule_bit_for_bit() -> None:
    """Rows of amax from 2^-20 to 2^20 (some below the 1e-4 floor): codes and scales bit for bit
    ``s = fp32(127 / amax)``, ``scale = fp32(1 / s)``, ``q = round_half_even(v * s)`` (spec §2). The ops'
    comparators allow the scales a relative 5e-3, so a scale one ulp off (``amax / 127``) passes them."""
    g = torch.Generator().manual_seed(11)
    ROWS, COLS = 64, 128
    v = torch.randn(ROWS, COLS, generator=g) * 2.0 ** torch.randint(-20, 21, (ROWS, 1), generator=g).float()
    q = torch.empty(ROWS, COLS, dtype=torch.int8, device=DEVICE)
    scale = torch.empty(ROWS, dtype=torch.float32, device=DEVICE)
    _quantize_kernel[(1,)](v.to(DEVICE), q, scale, M=ROWS, K=COLS)

    amax = v.abs().amax(dim=1).clamp_min(1e-4)
    s = torch.full_like(amax, 127.0) / amax  # fp32 divisions, correctly rounded on the CPU
    want_scale = torch.full_like(s, 1.0) / s
    assert not torch.equal(want_scale, amax / 127.0), "rows where amax/127 is not 1/s: the rule shows"
    assert bit_identical(scale.cpu(), want_scale, "scale")
    want_q = torch.round(v * s[:, None]).clamp(-127, 127).to(torch.int8)
    assert torch.equal(q.cpu(), want_q)


def _order_bits(score: torch.Tensor) -> torch.Tensor:
    """The selection's order key of fp32 scores as int64 in ``[0, 2^32)`` (``topk._order_bits``)."""
    bits = (score + 0.0).view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, ~bits & 0xFFFFFFFF, bits | 0x80000000)


def _shuffled_pool(pos: StepPositions, slots: int, g: torch.Generator) -> IndexerState:
    """A pool of ``slots`` rows in blocks of 16 rows in shuffled order, holding each row's keys of ``pos``;
    every pool row the step does not read holds garbage keys and a NaN scale."""
    block_size = 16
    per_slot = -(-(max(pos.max_cache_len, 1) + 3) // block_size)
    table = torch.randperm(slots * per_slot, generator=g).view(slots, per_slot)
    state = IndexerState.paged(slots, slots * per_slot, block_size, HEAD_DIM, table, DEVICE)
    state.keys.copy_(torch.randint(-127, 128, state.keys.shape, generator=g))
    state.key_scale.fill_(float("nan"))
    for b, n in enumerate(pos.cache_lens):
        keys = (torch.randn(n, HEAD_DIM, generator=g) * 0.1).to(torch.bfloat16).to(DEVICE)
        state.write_keys(torch.full((n,), b, device=DEVICE), torch.arange(n, device=DEVICE), keys)
    state.kv_state.copy_(torch.randn(state.kv_state.shape, generator=g))
    state.score_state.copy_(torch.randn(state.score_state.shape, generator=g))
    return state


def _weights(heads: int) -> IndexerWeights:
    """The tiny preset's indexer weights with ``heads`` heads (the kernel reads their shapes only)."""
    cfg = PRESETS["tiny"]
    w = make_case(cfg, "indexer", device=DEVICE, batch=1, seq=1).args["w"]
    return dataclasses.replace(w, weights_proj=torch.empty(heads, cfg.hidden_size, dtype=torch.bfloat16, device=DEVICE))


def _check_scores(batch: int, seq: int, heads: int, start_pos, extra_cache_batch: int = 0, seed: int = 0) -> None:
    """Scores of the kernel and the reference from one key pool: blocks of 16 rows in shuffled
    order; every pool row the step does not read holds garbage keys and a NaN scale, so a read of
    one shows as a NaN score. The launch adds each token's first-digit histogram into ``hist``."""
    g = torch.Generator().manual_seed(seed)
    start = torch.tensor(start_pos) if isinstance(start_pos, list) else start_pos
    pos = step_positions(start, batch, seq, DEVICE)
    state = _shuffled_pool(pos, batch + extra_cache_batch, g)
    w = _weights(heads)
    t = batch * seq
    xp = torch.randn(1, t, 4 * HEAD_DIM + heads, generator=g).to(DEVICE)  # kv | gate | head weights, one K-slice
    q = torch.randn(batch, seq, heads, HEAD_DIM, generator=g).to(DEVICE)
    q8, q_scale = quantize_int8_per_row(q)
    hist = torch.zeros(t, HIST_WORDS, dtype=torch.int32, device=DEVICE)
    pool = state.clone()
    score = index_scores(xp[0], q8.view(t, heads, HEAD_DIM), q_scale.view(t, heads), w, state, pos, hist=hist)
    for name, value in state.tensors().items():
        assert torch.equal(value.view(torch.uint8), pool.tensors()[name].view(torch.uint8)), f"changed {name}"
    weights = (xp[0, :, 4 * HEAD_DIM :] * (HEAD_DIM**-0.5 * heads**-0.5)).view(batch, seq, heads)
    expected = reference_index_scores(q, weights, state, pos)

    assert score.shape == expected.shape == (batch, seq, pos.max_cache_len)
    masked = expected == MASKED_SCORE
    assert torch.equal(score[masked], expected[masked]), "a position past vis(b, s) holds a real score"
    assert not bool((score[~masked] == MASKED_SCORE).any()), "a visible position is masked"
    tol = tolerance("score")
    check = ratio_allclose(score[~masked], expected[~masked], tol.atol, tol.rtol, tol.max_error_ratio, "score")
    assert check, check.detail
    # the histogram of each token's visible scores, from the stored scores' own bits
    visible = ~masked.view(t, -1)
    digits = _order_bits(score.view(t, -1)) >> 24
    counts = torch.stack([torch.bincount(digits[r][visible[r]], minlength=FIRST_DIGIT_BINS) for r in range(t)])
    assert torch.equal(hist[:, :FIRST_DIGIT_BINS].to(torch.int64), counts)
    assert not bool(hist[:, FIRST_DIGIT_BINS:].any()), "the selection's counters are left zero"


@pytest.mark.parametrize(
    "batch,seq,start_pos",
    [
        (1, 1, 3),  # first key closes on the only token: cache_len 1
        (1, 1, 19),  # cache_len 5
        (1, 2, 2),  # cache_len 1; token 0 sees nothing, token 1 sees key 0
        (1, 3, 4093),  # S=3 straddling a block boundary
        (3, 1, [3, 19, 40]),
        (3, 2, [0, 6, 17]),  # row 0: no key at all
        (3, 3, [1, 18, 401]),  # rows of very different lengths in one grid
        (3, 2, 16382),  # cache_len 4096 for every row: 32 key blocks per row
    ],
    ids=lambda v: "-".join(map(str, v)) if isinstance(v, list) else str(v),
)
def test_scores_match_reference(batch: int, seq: int, start_pos) -> None:
    _check_scores(batch, seq, heads=4, start_pos=start_pos, extra_cache_batch=1)


@pytest.mark.parametrize("programs", [1, 5])
def test_histograms_of_programs_that_walk_many_tiles(programs: int, monkeypatch) -> None:
    """Few programs, so that one scores several tiles of a group, or of two, from and to the middle of a
    group: each token's counts take off exactly the unseen scores of the tiles its program counted (rows
    of 0 to 375 visible keys over 3 tiles; a group's second token past S, whose row is never written)."""
    monkeypatch.setattr(index_score_module, "sm_count", lambda device: programs)
    _check_scores(3, 3, heads=4, start_pos=[1, 18, 1500], extra_cache_batch=1)


def test_scores_flash_heads() -> None:
    """64 heads (flash/pro/demo): one dot covers every head of a token."""
    _check_scores(2, 2, heads=64, start_pos=[517, 1030], seed=1)


@FULL  # 65536 keys of a shuffled pool: test_indexer_long_context; the checks here: [3-2-16382] above
def test_scores_long_context() -> None:
    """65536 visible keys for one token (a 256K-token context), keys read in 512 blocks."""
    t0 = time.perf_counter()
    _check_scores(1, 1, heads=4, start_pos=65536 * 4 - 1, seed=2)
    print(f"index_scores, 65536 keys, 4 heads, interpreter: {time.perf_counter() - t0:.1f} s")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (the interpreter) on inf/NaN arithmetic
@pytest.mark.parametrize("programs", [1, 3])
def test_a_folded_weight_past_fp32_scores_in_the_spec_order(programs: int, monkeypatch) -> None:
    """Finite ``w`` and ``qs`` whose product passes fp32's max: a key whose dot is <= 0 scores ``relu(dot * qs)
    * w = 0`` as the reference, not ``0 * inf = NaN``, and the group's NaN cases stay the reference's (an
    infinite or NaN ``qs``, a NaN ``w``). One token per group (``S = 1``); with 1 or 3 programs, a program
    walks groups of both kinds."""
    monkeypatch.setattr(index_score_module, "sm_count", lambda device: programs)
    g = torch.Generator().manual_seed(3)
    batch, heads = 8, 2
    pos = step_positions(torch.tensor([403, 250, 600, 520, 330, 701, 288, 455]), batch, 1, DEVICE)
    state = _shuffled_pool(pos, batch, g)
    huge_w = 1e30 / (HEAD_DIM**-0.5 * heads**-0.5)  # the projection column whose head weight is 1e30
    proj = torch.randn(batch, heads, generator=g)
    q = torch.randn(batch, heads, HEAD_DIM, generator=g)
    big = 1e12 * 127 / q.abs().amax(-1)  # scales each query row to qs = 1e12: w * qs = 1e42 > 3.4e38
    proj[0, 0], q[0, 0] = huge_w, q[0, 0] * big[0, 0]  # head 1 ordinary: inf where dot_0 > 0, else its term
    proj[1], q[1] = torch.tensor([-huge_w, huge_w]), q[1] * big[1, :, None]  # -inf + inf = NaN, one of them, 0
    proj[2, 0], q[2, 0], q[2, 1] = huge_w, q[2, 0] * big[2, 0], float("inf")  # head 1: qs = inf, dot = 0: NaN
    proj[3, 0], q[3, 0], q[3, 1, 5] = huge_w, q[3, 0] * big[3, 0], float("nan")  # head 1: qs = NaN
    proj[4, 0] = float("nan")  # w = NaN: NaN everywhere
    proj[5, 1], q[5, 1] = -huge_w, q[5, 1] * big[5, 1]  # -inf where dot_1 > 0
    q[6, 0] = float("inf")  # w * qs = inf from an infinite qs (dot = 0): NaN in either order
    # row 7: ordinary
    q8, q_scale = quantize_int8_per_row(q)
    xp = torch.cat([torch.randn(batch, 4 * HEAD_DIM, generator=g), proj], 1).to(DEVICE)
    score = index_scores(xp, q8, q_scale.view(batch, heads), _weights(heads), state, pos)
    weights = (xp[:, 4 * HEAD_DIM :] * (HEAD_DIM**-0.5 * heads**-0.5)).view(batch, 1, heads)
    expected = reference_index_scores(q.view(batch, 1, heads, HEAD_DIM).to(DEVICE), weights, state, pos)

    assert torch.isfinite(q_scale[:2]).all() and torch.isfinite(weights[:2]).all(), "every factor of rows 0, 1 finite"
    assert bool(torch.isinf(weights[:2] * q_scale[:2].view(2, 1, heads)).any()), "no folded factor overflowed"
    for b in range(batch):
        got, exp = score[b, 0], expected[b, 0]
        assert torch.equal(got.isnan(), exp.isnan()), (b, "NaN where the reference has none, or not where it has")
        inf = exp.isinf()
        assert torch.equal(got.isinf(), inf) and torch.equal(got[inf], exp[inf]), (b, "infinities differ")
        fin = exp.isfinite()
        tol = tolerance("score")
        check = ratio_allclose(got[fin], exp[fin], tol.atol, tol.rtol, tol.max_error_ratio, f"score row {b}")
        assert check, check.detail
    # what the reference gives the rows, so that each case is reached: infinities next to finite scores (rows 0, 5),
    # NaN, infinities and exact zeros (row 1), NaN at every visible key (rows 2, 3, 4, 6)
    vis = [expected[b, 0, :n] for b, n in enumerate(pos.cache_lens)]
    assert all(v.isinf().any() and v.isfinite().any() and not v.isnan().any() for v in (vis[0], vis[5]))
    assert vis[1].isnan().any() and vis[1].isinf().any() and (vis[1] == 0).any()
    assert all(vis[b].isnan().all() for b in (2, 3, 4, 6)) and vis[7].isfinite().all()

"""Top-k selection of indexer scores (spec §5 step 6) by radix select, not by sorting the row.

Every visible score ``j < vis`` becomes a 32-bit *order key* (the fp32 bit pattern mapped so that
integer order is float order). The k-th largest key is found one 8-bit digit at a time, from the
top: a 256-bin histogram of the digit among the keys that still tie with the k-th on the digits
above tells which digit value the k-th has and how many keys beat it. After four digits the
threshold key ``T`` is exact: every key ``> T`` is selected, and of the keys ``== T`` the lowest
indices fill the rest, so exactly ``k = min(topk, vis)`` distinct indices come out. Only those k
are sorted (a bitonic sort of ``(key << 31) | (2^31 - 1 - j)``, which orders by score and then by
lower index, as the reference's stable sort does), shifted by ``offset``, and padded with -1.

Two launch plans, chosen by the row length ``n``:

- ``n <= ROW_IN_REGISTERS``: one program per (token) row holds the whole row in registers and runs
  all four digit passes there, then compacts the k winners through a small scratch row and sorts
  them. One launch.
- longer rows (long context: 262144 keys at 1M tokens): a row is split into ``CHUNK``-key chunks,
  one program each, so a few rows still fill the GPU. Each digit pass is one launch over all
  chunks; each program advances the threshold found so far (stored by the previous pass) by the
  previous pass's histogram, skips its chunk if that settled it, else histograms the chunk's keys
  that still tie and adds the counts to the row's global histogram with atomics. A gather launch
  writes the winners of each chunk into the row's scratch (a slot range reserved with one atomic
  per program; the last pass's per-chunk histograms give each chunk how many threshold ties lie
  before it, so tie filling is by lowest index and deterministic). A last launch sorts each row's
  k winners. Launches: one memset, four passes, gather, sort.

Atomics are relaxed: every count they produce is read by a later launch only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..model.config import COMPRESS_RATIO
from ..model.structs import StepPositions
from .launch import require
from .workspace import Workspace, scratch

RADIX_BITS = 8  # digit width: tl.histogram costs bins/32 counters per lane per element on a GPU,
# so 256 bins stay cheap; 32-bit keys then need 32/8 = 4 passes.
RADIX_BINS = 1 << RADIX_BITS
RADIX_PASSES = 32 // RADIX_BITS
assert 32 % RADIX_BITS == 0, "digits must tile the 32-bit order key"
ROW_IN_REGISTERS = 4096  # longest row one program selects alone, and the chunk of a longer row:
# 4096 x (4 B score + 8 B key) over 8 warps; ptxas (sm_90, flash topk 512) reports 127 registers
# (Triton 3.9; 170 on 3.6) and no spills for the single-program kernel there. Flash decode rows (2048
# keys) stay one launch.
CHUNK = ROW_IN_REGISTERS  # keys per program on long rows: 16 KB of scores; 262144 keys make 64
# programs per row, so two decode rows (S=2) cover an H100's 132 SMs (one pass moves only 1 MB).
SELECT_WARPS = 8  # 16 keys per thread for the 4096-key programs (4 warps: 220 registers in gather, Triton 3.9)
INDEX_BITS = 31  # low bits of the sort key hold 2^31-1-j: rows up to 2^31 keys, key fits int64

_RATIO = tl.constexpr(COMPRESS_RATIO)
_RADIX_BITS = tl.constexpr(RADIX_BITS)
_RADIX_BINS = tl.constexpr(RADIX_BINS)
_INDEX_MASK = tl.constexpr((1 << INDEX_BITS) - 1)
_INDEX_BITS = tl.constexpr(INDEX_BITS)
_INT32_MAX = tl.constexpr((1 << 31) - 1)  # constants stay int32 literals; sums are int64
_NAN_KEY = tl.constexpr((1 << 32) - 1)  # the largest order key, held by every NaN score


@triton.jit
def _order_key(score):
    """fp32 -> int64 in ``[0, 2^32)`` with the same order as the floats (larger score, larger key).

    ``+ 0.0`` turns -0.0 into +0.0 so that the two zeros tie, as they compare in the reference. Every
    NaN, whatever its sign bit, gets the largest key: torch's descending sort puts NaN first.
    """
    bits = (score + 0.0).to(tl.int32, bitcast=True).to(tl.int64)
    key = tl.where(bits < 0, -1 - bits, bits + _INT32_MAX + 1)
    return tl.where(score != score, tl.full(key.shape, _NAN_KEY, tl.int64), key)


@triton.jit
def _sort_key(key, index):
    """Distinct int64 keys ordering by score, then by lower index."""
    return (key << _INDEX_BITS) | (_INDEX_MASK - index.to(tl.int64))


@triton.jit
def _descend(prefix, need, done, hist, BINS: tl.constexpr):
    """Fix one more digit of the threshold key.

    ``hist [BINS]`` counts this digit among the keys equal to ``prefix`` on the digits above;
    ``need`` of those keys are still to be taken. Returns the prefix extended by the threshold's
    digit, how many keys equal to the new prefix are still to be taken, and whether that is all of
    them (then every later digit is 0 and every key ``>=`` the threshold is taken).
    """
    bins = tl.arange(0, BINS)
    total = tl.sum(hist, 0)
    above = total - tl.cumsum(hist, 0)  # keys whose digit is greater than the bin's
    digit = tl.sum((above + hist >= need).to(tl.int32), 0) - 1  # the need-th largest key's digit
    at_digit = bins == digit
    prefix = prefix * BINS + tl.where(done, 0, digit)
    need_left = need - tl.sum(tl.where(at_digit, above, 0), 0)
    need = tl.where(done, need, need_left)
    done = done | (need_left == tl.sum(tl.where(at_digit, hist, 0), 0))
    return prefix, need, done


@triton.jit
def _first_level(k, visible):
    """``(prefix, need, done)`` before any digit is fixed: all ``k`` to take, done when that is every key."""
    return k * 0, k, k == visible


@triton.jit
def first_digit_histogram(score, valid):
    """Counts of the first radix digit (the order key's top ``RADIX_BITS``) among the ``valid`` scores
    of ``score [N] fp32``: ``[RADIX_BINS] int32``."""
    key = _order_key(score)
    return tl.histogram((key >> (32 - _RADIX_BITS)).to(tl.int32), _RADIX_BINS, mask=valid)


@triton.jit
def _digit_histogram(key, valid, prefix, shift, BITS: tl.constexpr):
    """Counts of the ``BITS``-bit digit at ``shift`` among the valid keys that equal ``prefix`` above it."""
    match = valid & ((key >> (shift + BITS)) == prefix)
    return tl.histogram(((key >> shift) & ((1 << BITS) - 1)).to(tl.int32), 1 << BITS, mask=match)


@triton.jit
def _row_limits(start_ptr, r, seq, topk):
    """Visible keys of token row ``r = b*S + s`` and how many of them to select."""
    visible = (tl.load(start_ptr + r // seq) + r % seq + 1) // _RATIO
    return visible, tl.minimum(visible, topk)


@triton.jit
def _take(key, valid, threshold, need, ties_before):
    """Which keys are selected: all above the threshold, and threshold ties by lowest index."""
    tie = valid & (key == threshold)
    tie_rank = ties_before + tl.cumsum(tie.to(tl.int32), 0) - 1
    return (valid & (key > threshold)) | (tie & (tie_rank < need))


@triton.jit
def _sort_descending(x, LOG_N: tl.constexpr):
    """Bitonic sort of ``x [2^LOG_N]`` into descending order.

    Each compare-exchange step views ``x`` as ``[blocks, 2, half]`` and splits out the partner
    halves (``tl.sort`` builds the same network from reductions, which the interpreter runs
    element by element in Python: 2.8 s for 1024 keys against 0.07 s here).
    """
    N: tl.constexpr = 1 << LOG_N
    for stage in tl.static_range(1, LOG_N + 1):  # merge into sorted runs of 2^stage
        for step in tl.static_range(stage):
            # Compare x[i] with x[i + 2^d], d = stage - 1 - step, as a [N / 2^(d+1), 2, 2^d] view. The
            # shapes are spelled inline: assigned to a name they would stop being compile-time constants.
            pairs = tl.permute(tl.reshape(x, [N >> (stage - step), 2, 1 << (stage - 1 - step)]), (0, 2, 1))
            first, second = tl.split(pairs)
            block = tl.arange(0, N >> (stage - step))[:, None]
            descending = ((block >> step) & 1) == 0  # runs alternate; the last stage is all descending
            swap = (first < second) == descending
            high = tl.where(swap, second, first)
            low = tl.where(swap, first, second)
            x = tl.reshape(tl.permute(tl.join(high, low), (0, 2, 1)), [N])
    return x


@triton.jit
def _sort_and_store(cand_row_ptr, out_row_ptr, k, topk, offset, TOPK_PAD: tl.constexpr, LOG_TOPK_PAD: tl.constexpr):
    """Sort the row's k selected sort keys, store their indices + offset, pad with -1 to topk."""
    slot = tl.arange(0, TOPK_PAD)
    keys = tl.load(cand_row_ptr + slot, mask=slot < k, other=-1, cache_modifier=".cg")
    keys = _sort_descending(keys, LOG_TOPK_PAD)
    index = _INDEX_MASK - (keys & _INDEX_MASK)
    tl.store(out_row_ptr + slot, tl.where(slot < k, index + offset, -1).to(tl.int32), mask=slot < topk)


@triton.jit
def _select_row_kernel(
    score_ptr,  # [R, n] fp32
    start_ptr,  # [B] int64
    cand_ptr,  # [R, TOPK_PAD] int64 scratch
    out_ptr,  # [R, topk] int32
    seq,
    n,
    topk,
    offset,
    ROW: tl.constexpr,
    TOPK_PAD: tl.constexpr,
    LOG_TOPK_PAD: tl.constexpr,
    BITS: tl.constexpr,
    PASSES: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    visible, k = _row_limits(start_ptr, r, seq, topk)
    index = tl.arange(0, ROW)
    valid = index < visible
    key = _order_key(tl.load(score_ptr + r * n + index, mask=valid, other=0.0))

    prefix, need, done = _first_level(k, visible)
    for p in tl.static_range(PASSES):
        hist = _digit_histogram(key, valid, prefix, 32 - (p + 1) * BITS, BITS)
        prefix, need, done = _descend(prefix, need, done, hist, 1 << BITS)

    take = _take(key, valid, prefix, need, 0)
    slot = tl.cumsum(take.to(tl.int32), 0) - 1  # exactly k are taken; the store's bound is a guard
    tl.store(cand_ptr + r * TOPK_PAD + slot, _sort_key(key, index), mask=take & (slot < TOPK_PAD))
    tl.debug_barrier()  # the scratch row is re-read by other threads of this program
    _sort_and_store(cand_ptr + r * TOPK_PAD, out_ptr + r * topk, k, topk, offset, TOPK_PAD, LOG_TOPK_PAD)


@triton.jit
def _threshold_level(level_row_ptr, hist_row_ptr, k, visible, LEVEL: tl.constexpr, BINS: tl.constexpr):
    """``(prefix, need, done)`` once ``LEVEL`` digits are fixed: the previous level as its pass stored
    it (level 0: nothing fixed, all ``k`` to take), advanced by the previous pass's histogram."""
    prefix, need, done = _first_level(k, visible)
    if LEVEL >= 2:
        prefix = tl.load(level_row_ptr + (LEVEL - 1) * 3)
        need = tl.load(level_row_ptr + (LEVEL - 1) * 3 + 1)
        done = tl.load(level_row_ptr + (LEVEL - 1) * 3 + 2) != 0
    if LEVEL >= 1:
        hist = tl.load(hist_row_ptr + (LEVEL - 1) * BINS + tl.arange(0, BINS))
        prefix, need, done = _descend(prefix, need, done, hist, BINS)
    return prefix, need, done


@triton.jit
def _radix_pass_kernel(
    score_ptr,  # [R, n] fp32
    start_ptr,  # [B] int64
    hist_ptr,  # [R, PASSES, BINS] int32, zeroed before pass 0
    level_ptr,  # [R, PASSES, 3] int64: (prefix, need, done) after each pass's digit
    chunk_hist_ptr,  # [R, n_chunks, BINS] int32, written by the last pass
    seq,
    n,
    topk,
    n_chunks,
    PASS: tl.constexpr,
    CHUNK: tl.constexpr,
    BITS: tl.constexpr,
    PASSES: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    BINS: tl.constexpr = 1 << BITS
    visible, k = _row_limits(start_ptr, r, seq, topk)
    prefix, need, done = _threshold_level(
        level_ptr + r * PASSES * 3, hist_ptr + r * PASSES * BINS, k, visible, PASS, BINS
    )
    if PASS >= 1 and chunk == 0:  # one program per row hands the level on to the next pass
        tl.store(level_ptr + (r * PASSES + PASS) * 3, prefix)
        tl.store(level_ptr + (r * PASSES + PASS) * 3 + 1, need)
        tl.store(level_ptr + (r * PASSES + PASS) * 3 + 2, done.to(tl.int64))

    index = chunk * CHUNK + tl.arange(0, CHUNK)
    valid = index < tl.where(done, 0, visible)  # nothing is read once the threshold is settled
    key = _order_key(tl.load(score_ptr + r * n + index, mask=valid, other=0.0))
    hist = _digit_histogram(key, valid, prefix, 32 - (PASS + 1) * BITS, BITS)
    bins = tl.arange(0, BINS)
    tl.atomic_add(hist_ptr + (r * PASSES + PASS) * BINS + bins, hist, mask=hist > 0, sem="relaxed")
    if PASS == PASSES - 1:  # per-chunk counts of the last digit: threshold ties before each chunk
        tl.store(chunk_hist_ptr + (r * n_chunks + chunk) * BINS + bins, hist)


@triton.jit
def _gather_kernel(
    score_ptr,  # [R, n] fp32
    start_ptr,  # [B] int64
    hist_ptr,  # [R, PASSES, BINS] int32
    level_ptr,  # [R, PASSES, 3] int64
    chunk_hist_ptr,  # [R, n_chunks, BINS] int32
    taken_ptr,  # [R] int32, zeroed: scratch slots handed out so far
    cand_ptr,  # [R, TOPK_PAD] int64 scratch
    seq,
    n,
    topk,
    n_chunks,
    CHUNK: tl.constexpr,
    CHUNKS_PAD: tl.constexpr,
    TOPK_PAD: tl.constexpr,
    BITS: tl.constexpr,
    PASSES: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    BINS: tl.constexpr = 1 << BITS
    visible, k = _row_limits(start_ptr, r, seq, topk)
    threshold, need, _ = _threshold_level(
        level_ptr + r * PASSES * 3, hist_ptr + r * PASSES * BINS, k, visible, PASSES, BINS
    )

    earlier = tl.arange(0, CHUNKS_PAD)
    ties_before = tl.sum(
        tl.load(
            chunk_hist_ptr + (r * n_chunks + earlier) * BINS + (threshold & (BINS - 1)),
            mask=earlier < chunk,
            other=0,
        ),
        0,
    )
    index = chunk * CHUNK + tl.arange(0, CHUNK)
    valid = index < visible
    key = _order_key(tl.load(score_ptr + r * n + index, mask=valid, other=0.0))
    take = _take(key, valid, threshold, need, ties_before)
    first = tl.atomic_add(taken_ptr + r, tl.sum(take.to(tl.int32), 0), sem="relaxed")
    slot = first + tl.cumsum(take.to(tl.int32), 0) - 1
    tl.store(cand_ptr + r * TOPK_PAD + slot, _sort_key(key, index), mask=take & (slot < TOPK_PAD))


@triton.jit
def _sort_rows_kernel(
    cand_ptr,  # [R, TOPK_PAD] int64
    start_ptr,  # [B] int64
    out_ptr,  # [R, topk] int32
    seq,
    topk,
    offset,
    TOPK_PAD: tl.constexpr,
    LOG_TOPK_PAD: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    _, k = _row_limits(start_ptr, r, seq, topk)
    _sort_and_store(cand_ptr + r * TOPK_PAD, out_ptr + r * topk, k, topk, offset, TOPK_PAD, LOG_TOPK_PAD)


def select_topk(
    score: torch.Tensor,
    pos: StepPositions,
    topk: int,
    offset: int,
    out: torch.Tensor | None = None,
    ws: Workspace | None = None,
) -> torch.Tensor:
    """Indices of the best visible scores (spec §5 step 6).

    ``score [B, S, N] fp32`` (``N >= max cache_len``; only ``j < vis(b, s) = (start[b]+s+1)//4`` is
    read). Returns ``topk_idxs [B, S, topk] int32``: the ``k = min(topk, vis)`` indices of the
    largest visible scores in descending score order (equal scores: lower index first) plus
    ``offset``, then ``-1`` — written into ``out`` when given; scratch comes from ``ws`` when given.
    """
    b, s, n = score.shape
    require(score.dtype == torch.float32 and score.is_contiguous(), "score", "a contiguous fp32 tensor")
    require(topk >= 1, "topk", "at least 1")
    rows = b * s
    if out is None:
        out = torch.empty(b, s, topk, dtype=torch.int32, device=score.device)
    topk_pad = triton.next_power_of_2(max(topk, 2))
    cand = scratch(ws, "topk.cand", (rows, topk_pad), torch.int64, score.device)
    if n <= ROW_IN_REGISTERS:
        _select_row_kernel[(rows,)](
            score,
            pos.start,
            cand,
            out,
            s,
            n,
            topk,
            offset,
            ROW=triton.next_power_of_2(max(n, 16)),
            TOPK_PAD=topk_pad,
            LOG_TOPK_PAD=topk_pad.bit_length() - 1,
            BITS=RADIX_BITS,
            PASSES=RADIX_PASSES,
            num_warps=SELECT_WARPS,
        )
        return out

    n_chunks = triton.cdiv(n, CHUNK)
    hist_size = rows * RADIX_PASSES * RADIX_BINS
    counters = scratch(ws, "topk.counters", (hist_size + rows,), torch.int32, score.device).zero_()  # the one memset
    hist, taken = counters[:hist_size], counters[hist_size:]
    levels = scratch(ws, "topk.levels", (rows, RADIX_PASSES, 3), torch.int64, score.device)
    chunk_hist = scratch(ws, "topk.chunk_hist", (rows, n_chunks, RADIX_BINS), torch.int32, score.device)
    grid = (rows, n_chunks)
    for p in range(RADIX_PASSES):
        _radix_pass_kernel[grid](
            score, pos.start, hist, levels, chunk_hist, s, n, topk, n_chunks,
            PASS=p, CHUNK=CHUNK, BITS=RADIX_BITS, PASSES=RADIX_PASSES, num_warps=SELECT_WARPS,
        )  # fmt: skip
    _gather_kernel[grid](
        score, pos.start, hist, levels, chunk_hist, taken, cand, s, n, topk, n_chunks,
        CHUNK=CHUNK, CHUNKS_PAD=triton.next_power_of_2(n_chunks), TOPK_PAD=topk_pad,
        BITS=RADIX_BITS, PASSES=RADIX_PASSES, num_warps=SELECT_WARPS,
    )  # fmt: skip
    _sort_rows_kernel[(rows,)](
        cand, pos.start, out, s, topk, offset, TOPK_PAD=topk_pad, LOG_TOPK_PAD=topk_pad.bit_length() - 1
    )
    return out

"""Top-k selection of indexer scores (spec §5 step 6) by radix select, not by sorting the row.

Every visible score ``j < vis`` becomes a 32-bit *order key* (the fp32 bit pattern mapped so that
integer order is float order). The k-th largest key is found one digit at a time, from the top: a
histogram of the digit among the keys that still tie with the k-th on the digits above tells which
digit value the k-th has and how many keys beat it. After the last digit the threshold key ``T`` is
exact: every key ``> T`` is selected, and of the keys ``== T`` the lowest
indices fill the rest, so exactly ``k = min(topk, vis)`` distinct indices come out. Only those k
are sorted (a bitonic sort of the *sort key* ``(key << 31) | (2^31 - 1 - j)``, which orders by
score and then by lower index, as the reference's stable sort does), shifted by ``offset``, and
padded with -1.

Two plans, chosen by the row length ``n``:

- ``n <= ROW_IN_REGISTERS``: one program per (token) row holds the whole row in registers and runs
  every digit pass there (``radix_bits``: four 8-bit digits, or 11+11+10 bits in three passes), then
  compacts the k winners through a small scratch row and sorts them. One launch. A tuning candidate
  (``bin_slots``, ``_select_bin_kernel``) runs one histogram pass over the row and the later digits
  over the threshold's first-digit bin only; the same indices (docs/DESIGN.md has why it is not the default).
- longer rows (long context: 262144 keys at 1M tokens): one launch of ``CHUNK``-key programs,
  ``ceil(n / CHUNK)`` per row, that starts from the row's *first-digit histogram* (the counts of
  the order keys' top 8 bits over the visible keys). The score kernel builds it as it writes the
  scores (``first_digit_histogram`` in its epilogue, added to ``hist`` with integer atomics);
  called alone, ``select_topk`` builds it with one launch more. Each chunk program derives the
  threshold's first digit ``d1`` from it, reads its chunk's scores once, adds the second-digit
  histogram of its tie-bin keys (first digit ``== d1``) to the row's, and from the counts that
  atomic returns (every chunk's so far, its own included: a lower bound on the threshold's second
  digit) appends the certain winners (first digit ``> d1``) and the tie-bin keys that can still be
  taken to the row's candidate list (one atomic reserves its slots); then it takes a ticket from the
  row's arrival counter. The program that draws the last ticket
  finishes the row: it fixes the second digit from the summed histogram, then the remaining
  digits of the threshold's *sort key* (two of the order key, three of the index, so that ties
  go by lowest index) by histograms over the candidate list, which it compacts after every digit;
  it sorts the winners, stores them and clears the row's counters. The list holds
  ``LIST_PER_TOPK x topk`` keys; a row that listed more (heavy ties) is finished from its scores
  instead: the order key's last two digits by histogram passes over the row, then one pass that
  takes the keys above the threshold and the lowest-index keys equal to it.

The selected set is the k largest sort keys, so it depends neither on the order in which
candidates were appended nor on which program finishes; integer atomic sums are order-free too:
the output is the same bit for bit from run to run. Cross-program hand-off: every program's
candidate stores and relaxed atomics come before its arrival ticket (``acq_rel``, after a block
barrier), and the finishing program reads them after its ticket, with ``.cg`` loads (from L2).
No program waits for another, so the same protocol runs under the CPU interpreter, where programs
run one after another and the last of a row is simply the last to run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ..model.config import COMPRESS_RATIO
from ..model.structs import StepPositions
from .launch import pdl_supported, require
from .tuning import Param, Tunable
from .workspace import Workspace, scratch

RADIX_BITS = 8  # digit width of the long-row plan and of the score launch's first-digit histogram:
# tl.histogram's work per element grows with the bins on Triton 3.6 (bins/32 counters per lane), so the
# score kernel's epilogue counts 256 bins; the 32-bit key is then 4 digits.
RADIX_BINS = 1 << RADIX_BITS
assert 32 % RADIX_BITS == 0, "digits must tile the 32-bit order key"
ROW_RADIX_BITS = (8, 11)  # digit widths of the one-program plan (tuning ``radix_bits``): 8+8+8+8 (4 histogram
# passes of 256 bins) or 11+11+10 (3 passes of 2048 / 2048 / 1024 bins, the anchors' digits); the same bits.
FIRST_DIGIT_BINS = RADIX_BINS  # bins of ``first_digit_histogram``: the order key's top digit
ROW_IN_REGISTERS = 4096  # longest row one program selects alone, and the chunk of a longer row:
# 4096 x (4 B score + 8 B key) over 8 warps; ptxas (sm_90, flash topk 512) reports 97 registers
# (Triton 3.9; 165 on 3.6) and no spills for the single-program kernel there. Flash decode rows (2048
# keys) stay one launch.
CHUNK = ROW_IN_REGISTERS  # keys per program on long rows: 16 KB of scores; 262144 keys make 64
# programs per row, so two decode rows (S=2) cover an H100's 132 SMs.
SELECT_WARPS = 8  # 16 keys per thread for the 4096-key programs
LIST_PER_TOPK = 16  # a long row's candidate list holds 16 x topk_pad keys (at least a chunk, at most the row):
# a chunk lists only the tie keys that can still be taken, about need x (1 + ln chunks) a row (2-6 x topk at 64
# chunks); a row that lists more (heavy ties: all scores equal at worst) is finished from its scores instead.
# 8 B a key: 128 decode rows of topk 512 hold 8 MB, where one slot per key of a 262144-key row took 256 MB.
CANDIDATE_BYTES = 256 << 20  # the candidate lists of a launch are at most this: rows are selected in groups of
# CANDIDATE_BYTES // (8 cap), one launch each (a 1024-token prefill at topk 1024 is one group of 128 MB).
INDEX_BITS = 31  # low bits of the sort key hold 2^31-1-j: rows up to 2^31 keys, key fits int64
TIE_INDEX_BITS = 24  # chunked rows hold up to 2^24 keys: ties at the threshold are split by the
# index's low 24 bits, three digits (the sort key's bits 24..30 are then all ones among them)
INDEX_DIGITS = TIE_INDEX_BITS // RADIX_BITS
assert TIE_INDEX_BITS % RADIX_BITS == 0 and TIE_INDEX_BITS < INDEX_BITS
STATE_WORDS = RADIX_BINS + 16  # a row's selection counters (int32): the tie bin's second-digit
# histogram, candidate slots taken, arrivals; padded to 64 B
HIST_WORDS = FIRST_DIGIT_BINS + STATE_WORDS  # a row of ``select_topk``'s ``hist`` argument
HIST_PART_BLOCK = 16  # partial first-digit histograms summed per load when ``select_topk`` builds them
# (one per chunk): [16, 256] int32 is 16 registers a thread at 8 warps

_RATIO = tl.constexpr(COMPRESS_RATIO)
_INDEX_MASK = tl.constexpr((1 << INDEX_BITS) - 1)
_INDEX_BITS = tl.constexpr(INDEX_BITS)
_INT32_MIN = tl.constexpr(-(1 << 31))  # an int32 literal
_INT32_MAX = tl.constexpr((1 << 31) - 1)
_NAN_BITS = tl.constexpr(0x7FFFFFFF)  # the NaN every NaN score is ranked as (above +inf)
_FIRST_SHIFT = tl.constexpr(32 - RADIX_BITS)
_FIRST_BINS = tl.constexpr(FIRST_DIGIT_BINS)
_TIE_ONES = tl.constexpr((1 << INDEX_BITS) - (1 << TIE_INDEX_BITS))  # sort-key bits 24..30 of every tie
_SLOTS = tl.constexpr(RADIX_BINS)  # state word: candidate slots taken
_ARRIVALS = tl.constexpr(RADIX_BINS + 1)  # state word: chunk programs done
_STATE_WORDS = tl.constexpr(STATE_WORDS)
_TIE_BITS = tl.constexpr(16)  # ``_take`` counts ties in a scan's low 16 bits: one-program rows have fewer keys
_TIE_MASK = tl.constexpr((1 << 16) - 1)
assert ROW_IN_REGISTERS < 1 << 16


@triton.jit
def order_bits(score):
    """fp32 -> uint32 with the same order as the floats (larger score, larger key): the order key.

    ``+ 0.0`` turns -0.0 into +0.0 so that the two zeros tie, as they compare in the reference.
    Every NaN, whatever its sign and payload, becomes the largest key (``0x7FFFFFFF``), so NaNs rank
    first and tie with each other, as in torch's descending sort (x86 makes negative NaNs).
    Non-negative floats get the top bit set; negative ones have every bit flipped.
    """
    bits = tl.where(score != score, _NAN_BITS, (score + 0.0).to(tl.int32, bitcast=True))
    return (bits ^ ((bits >> 31) | _INT32_MIN)).to(tl.uint32, bitcast=True)


@triton.jit
def _order_key(score):
    """The order key as an int64 in ``[0, 2^32)``."""
    return order_bits(score).to(tl.int64)


@triton.jit
def first_digit_histogram(score, valid):
    """Counts of the order key's first (top 8-bit) digit among the ``valid`` keys of one row.

    ``score [KEYS] fp32``, ``valid [KEYS] bool`` -> ``[FIRST_DIGIT_BINS] int32``. For a score
    kernel's epilogue: for each token row ``r`` and block of keys it scores, add the counts to the
    row's ``hist`` with relaxed integer atomics (order-free, so deterministic)::

        counts = first_digit_histogram(score_block, key_index < visible)
        tl.atomic_add(hist_ptr + r * HIST_WORDS + tl.arange(0, FIRST_DIGIT_BINS), counts,
                      mask=counts > 0, sem="relaxed")

    ``score`` must be the very fp32 values stored for ``select_topk`` (same bits).
    """
    return tl.histogram((order_bits(score) >> _FIRST_SHIFT).to(tl.int32), _FIRST_BINS, mask=valid)


@triton.jit
def _wait_for_scores(PDL: tl.constexpr):
    """Launched with programmatic dependent launch: let the next launch be scheduled (it waits for
    this grid in turn), then wait for the launch before (the scores and their histograms, or anything
    the caller's stream wrote) before reading anything, the row's ``start`` included: every launch of
    the op releases its successor as it starts, so this one may run while a kernel launched before the
    op (an engine's, which may write the positions) still does."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()


@triton.jit
def _sort_key(key, index):
    """Distinct int64 keys ordering by score, then by lower index."""
    return (key << _INDEX_BITS) | (_INDEX_MASK - index.to(tl.int64))


@triton.jit
def _threshold_bin(hist, need):
    """Where the ``need``-th largest key falls in ``hist [BINS]`` (the counts of one digit; ``need``
    at most their sum): its digit, the keys above its bin, and the keys from its bin up. One scan
    (the keys from each bin up) and three reductions of it, none of which waits for another."""
    from_bin = tl.cumsum(hist, 0, reverse=True)
    reach = from_bin >= need  # bins 0..digit, where digit is the need-th largest key's
    digit = tl.sum(reach.to(tl.int32), 0) - 1
    above = tl.max(tl.where(reach, 0, from_bin), 0)  # from_bin of the next bin
    from_digit = tl.min(tl.where(reach, from_bin, _INT32_MAX), 0)  # from_bin of the digit's bin
    return digit, above, from_digit


@triton.jit
def _threshold_bin_packed(hist, need):
    """``_threshold_bin``'s digit, keys above its bin, and whether its bin is all taken, from one int32
    sum: for at most 256 bins and 8191 keys (9 + 13 + 9 bits): one cross-warp reduction, not three."""
    from_bin = tl.cumsum(hist, 0, reverse=True)
    reach = from_bin >= need
    packed = reach.to(tl.int32) | (tl.where(reach, 0, hist) << 9) | ((from_bin == need).to(tl.int32) << 22)
    total = tl.sum(packed, 0)
    return (total & 511) - 1, (total >> 9) & 8191, (total >> 22) > 0


@triton.jit
def _descend(prefix, need, done, hist, BINS: tl.constexpr, PACKED: tl.constexpr = False):
    """Fix one more digit of the threshold key.

    ``hist [BINS]`` counts this digit among the keys equal to ``prefix`` on the digits above;
    ``need`` of those keys are still to be taken. Returns the prefix extended by the threshold's
    digit, how many keys equal to the new prefix are still to be taken, and whether that is all of
    them (then every later digit is 0 and every key ``>=`` the threshold is taken).
    """
    if PACKED:
        digit, above, all_of_bin = _threshold_bin_packed(hist, need)
    else:
        digit, above, from_digit = _threshold_bin(hist, need)
        all_of_bin = from_digit == need
    prefix = prefix * BINS + tl.where(done, 0, digit)
    need = tl.where(done, need, need - above)
    return prefix, need, done | all_of_bin


@triton.jit
def _first_level(k, visible):
    """``(prefix, need, done)`` before any digit is fixed: all ``k`` to take, done when that is every key."""
    return k * 0, k, k == visible


@triton.jit
def _digit_histogram(key, valid, prefix, shift, BITS: tl.constexpr):
    """Counts of the ``BITS``-bit digit at ``shift`` among the valid keys that equal ``prefix`` above it."""
    match = valid & ((key >> (shift + BITS)) == prefix)
    return tl.histogram(((key >> shift) & ((1 << BITS) - 1)).to(tl.int32), 1 << BITS, mask=match)


@triton.jit
def _visible(start_ptr, r, seq):
    """Visible keys of token row ``r = b*S + s``."""
    return (tl.load(start_ptr + r // seq) + r % seq + 1) // _RATIO


@triton.jit
def _row_limits(start_ptr, r, seq, topk):
    """Visible keys of token row ``r = b*S + s`` and how many of them to select."""
    visible = _visible(start_ptr, r, seq)
    return visible, tl.minimum(visible, topk)


@triton.jit
def _take(key, valid, threshold, need):
    """Which keys are selected (all above the threshold, and threshold ties by lowest index) and each
    selected key's slot among them, in index order, from one scan that counts both kinds."""
    above = valid & (key > threshold)
    tie = valid & (key == threshold)
    counts = tl.cumsum((above.to(tl.int32) << _TIE_BITS) | tie.to(tl.int32), 0)  # up to and including each key
    ties = counts & _TIE_MASK
    take = above | (tie & (ties <= need))
    return take, (counts >> _TIE_BITS) + tl.minimum(ties, need) - 1


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
    BITS: tl.constexpr,  # the digits from the top: 32 // BITS of them, then LAST_BITS (if not 0)
    LAST_BITS: tl.constexpr,
    PDL: tl.constexpr,
):
    _wait_for_scores(PDL)
    r = tl.program_id(0).to(tl.int64)
    visible, k = _row_limits(start_ptr, r, seq, topk)
    index = tl.arange(0, ROW)
    valid = index < visible
    key = _order_key(tl.load(score_ptr + r * n + index, mask=valid, other=0.0))

    prefix, need, done = _first_level(k, visible)
    if visible > k:  # else every visible key is taken (threshold 0, as the digits would leave it): no digit to find
        for p in tl.static_range(32 // BITS):
            hist = _digit_histogram(key, valid, prefix, 32 - (p + 1) * BITS, BITS)
            prefix, need, done = _descend(prefix, need, done, hist, 1 << BITS, BITS <= 8)
        if LAST_BITS > 0:  # the low bits left below the full-width digits (11+11+10)
            hist = _digit_histogram(key, valid, prefix, 0, LAST_BITS)
            prefix, need, done = _descend(prefix, need, done, hist, 1 << LAST_BITS)

    take, slot = _take(key, valid, prefix, need)  # exactly k are taken; the store's bound is a guard
    tl.store(cand_ptr + r * TOPK_PAD + slot, _sort_key(key, index), mask=take & (slot < TOPK_PAD))
    tl.debug_barrier()  # the scratch row is re-read by other threads of this program
    _sort_and_store(cand_ptr + r * TOPK_PAD, out_ptr + r * topk, k, topk, offset, TOPK_PAD, LOG_TOPK_PAD)


@triton.jit
def _bin_keys(score_row_ptr, bin_row_ptr, start, end, from_row, first, FIRST_SHIFT: tl.constexpr, BLOCK: tl.constexpr):
    """Block ``[start, start + BLOCK)`` of the threshold bin's keys, in index order: sort keys and which
    are real. From the bin's list (``bin_row``, its first ``end`` slots) unless it overflowed
    (``from_row``): then from the row's first ``end`` scores, those whose first digit is ``first``."""
    slot = start + tl.arange(0, BLOCK)
    ok = slot < end
    listed = tl.load(bin_row_ptr + slot, mask=slot < tl.where(from_row, 0, end), other=0, cache_modifier=".cg")
    row_key = _order_key(tl.load(score_row_ptr + slot, mask=slot < tl.where(from_row, end, 0), other=0.0))
    sort_key = tl.where(from_row, _sort_key(row_key, slot), listed)
    key = sort_key >> _INDEX_BITS
    return sort_key, key, ok & ((key >> FIRST_SHIFT) == first)


@triton.jit
def _bin_digit(score_row_ptr, bin_row_ptr, hist_end, end, from_row, first, prefix, need, done,
               FIRST_SHIFT: tl.constexpr, SHIFT: tl.constexpr, WIDTH: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """Fix the threshold's digit at ``SHIFT`` from a histogram over the bin's keys (none when ``hist_end`` is 0)."""
    hist = tl.zeros([1 << WIDTH], tl.int32)
    for start in range(0, hist_end, BLOCK):
        _, key, ok = _bin_keys(score_row_ptr, bin_row_ptr, start, end, from_row, first, FIRST_SHIFT, BLOCK)
        match = ok & ((key >> (SHIFT + WIDTH)) == prefix)
        hist += tl.histogram(((key >> SHIFT) & ((1 << WIDTH) - 1)).to(tl.int32), 1 << WIDTH, mask=match)
    return _descend(prefix, need, done, hist, 1 << WIDTH, WIDTH <= 8)


@triton.jit
def _select_bin_kernel(
    score_ptr,  # [R, n] fp32
    start_ptr,  # [B] int64
    bin_ptr,  # [R, BIN_SLOTS] int64 scratch: the threshold bin's sort keys
    wins_ptr,  # [R, TOPK_PAD] int64 scratch: the winners
    out_ptr,  # [R, topk] int32
    seq,
    n,
    topk,
    offset,
    ROW: tl.constexpr,
    TOPK_PAD: tl.constexpr,
    LOG_TOPK_PAD: tl.constexpr,
    BITS: tl.constexpr,  # first digit, over the whole row
    BIN_SLOTS: tl.constexpr,  # the bin's list; a larger bin is re-read from the row
    REFINE_BITS: tl.constexpr,  # the later digits, over the bin only
    PDL: tl.constexpr,
):
    _wait_for_scores(PDL)
    r = tl.program_id(0).to(tl.int64)
    visible, k = _row_limits(start_ptr, r, seq, topk)
    index = tl.arange(0, ROW)
    valid = index < visible
    key = _order_key(tl.load(score_ptr + r * n + index, mask=valid, other=0.0))
    FIRST_SHIFT: tl.constexpr = 32 - BITS
    BINS: tl.constexpr = 1 << BITS
    digit = (key >> FIRST_SHIFT).to(tl.int32)
    hist = tl.histogram(digit, BINS, mask=valid)
    first, won, from_first = _threshold_bin(hist, k)  # won: the keys above the threshold's bin
    prefix = first.to(tl.int64)
    need = k - won
    done = from_first == k  # the whole bin is taken
    # One pass over the row: keys above the threshold's bin are winners (slots from 0), the bin's
    # keys go to its list in index order.
    above = valid & (digit > first)
    in_bin = valid & (digit == first)
    counts = tl.cumsum((above.to(tl.int32) << _TIE_BITS) | in_bin.to(tl.int32), 0)
    wins_row = wins_ptr + r * TOPK_PAD
    bin_row = bin_ptr + r * BIN_SLOTS
    sort_key = _sort_key(key, index)
    tl.store(wins_row + (counts >> _TIE_BITS) - 1, sort_key, mask=above)
    at = (counts & _TIE_MASK) - 1
    tl.store(bin_row + at, sort_key, mask=in_bin & (at < BIN_SLOTS))
    bin_count = from_first - won
    from_row = bin_count > BIN_SLOTS
    end = tl.where(from_row, visible, bin_count)
    tl.debug_barrier()  # the list is re-read by other threads of this program

    # The threshold's later digits, from histograms over the bin only.
    score_row = score_ptr + r * n
    hist_end = tl.where(done, 0, end)
    REST: tl.constexpr = FIRST_SHIFT % REFINE_BITS  # an odd-width digit first (21 bits: 5 + 8 + 8)
    if REST > 0:
        prefix, need, done = _bin_digit(
            score_row, bin_row, hist_end, end, from_row, first, prefix, need, done, FIRST_SHIFT, FIRST_SHIFT - REST,
            REST, BIN_SLOTS,
        )  # fmt: skip
    for d in tl.static_range(FIRST_SHIFT // REFINE_BITS):
        prefix, need, done = _bin_digit(
            score_row, bin_row, hist_end, end, from_row, first, prefix, need, done, FIRST_SHIFT,
            (FIRST_SHIFT // REFINE_BITS - 1 - d) * REFINE_BITS, REFINE_BITS, BIN_SLOTS,
        )  # fmt: skip

    # The bin's winners: keys above the threshold, and ties at it by lowest index.
    above_before = won * 0
    ties_before = won * 0
    for start in range(0, end, BIN_SLOTS):
        bsort, bkey, ok = _bin_keys(score_row, bin_row, start, end, from_row, first, FIRST_SHIFT, BIN_SLOTS)
        over = ok & (bkey > prefix)
        tie = ok & (bkey == prefix)
        c = tl.cumsum((over.to(tl.int32) << _TIE_BITS) | tie.to(tl.int32), 0)
        ties = ties_before + (c & _TIE_MASK)
        take = over | (tie & (ties <= need))
        slot = won + above_before + (c >> _TIE_BITS) + tl.minimum(ties, need) - 1
        tl.store(wins_row + slot, bsort, mask=take & (slot < TOPK_PAD))
        both = tl.sum((over.to(tl.int32) << _TIE_BITS) | tie.to(tl.int32), 0)
        above_before += both >> _TIE_BITS
        ties_before += both & _TIE_MASK
    tl.debug_barrier()  # the winners are re-read by other threads of this program
    _sort_and_store(wins_row, out_ptr + r * topk, k, topk, offset, TOPK_PAD, LOG_TOPK_PAD)


@triton.jit
def _first_digit_kernel(
    score_ptr,  # [R, n] fp32
    start_ptr,  # [B] int64
    hist_ptr,  # [R, row_words] int32: n_chunks partial first-digit histograms, then STATE_WORDS counters
    seq,
    n,
    row_words,
    CHUNK: tl.constexpr,
    STATE_PAD: tl.constexpr,
    PDL: tl.constexpr,
):
    """``select_topk`` called alone: chunk ``c``'s first-digit histogram into part ``c`` of its row;
    chunk 0 also zeroes the row's selection counters."""
    _wait_for_scores(PDL)
    r = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    index = chunk * CHUNK + tl.arange(0, CHUNK)
    valid = index < _visible(start_ptr, r, seq)
    counts = first_digit_histogram(tl.load(score_ptr + r * n + index, mask=valid, other=0.0), valid)
    hist_row = hist_ptr + r * row_words
    tl.store(hist_row + chunk * _FIRST_BINS + tl.arange(0, _FIRST_BINS), counts)
    if chunk == 0:
        word = tl.arange(0, STATE_PAD)
        tl.store(hist_row + tl.num_programs(1) * _FIRST_BINS + word, 0, mask=word < _STATE_WORDS)


@triton.jit
def _first_digits(hist_row_ptr, parts, PART_BLOCK: tl.constexpr):
    """The row's first-digit counts ``[FIRST_DIGIT_BINS]``: the sum of its ``parts`` partial histograms."""
    part = tl.arange(0, PART_BLOCK)[:, None]
    bins = tl.arange(0, _FIRST_BINS)
    counts = tl.zeros([_FIRST_BINS], tl.int32)
    for p in range(0, parts, PART_BLOCK):
        block = tl.load(hist_row_ptr + (p + part) * _FIRST_BINS + bins[None, :], mask=p + part < parts, other=0)
        counts += tl.sum(block, 0)
    return counts


@triton.jit
def _partition(cand_row_ptr, wins_row_ptr, count, won, threshold, SHIFT: tl.constexpr, done, CHUNK: tl.constexpr,
               TOPK_PAD: tl.constexpr):  # fmt: skip
    """Split the candidate list ``cand[:count]`` by the threshold's sort-key bits above ``SHIFT``:
    keys above it (and keys equal to it once ``done``) are appended to the winners ``wins[won:]``;
    keys equal to it (not ``done``) stay, compacted to the front, for the next digit. Returns how
    many stay and the winners so far. In place: a key moves only to a slot at or below its own,
    already read (its slot comes from a scan over the whole block, which waits for every thread's
    load)."""
    prefix = threshold >> SHIFT
    stay_count = count * 0
    for start in range(0, count, CHUNK):
        slot = start + tl.arange(0, CHUNK)
        valid = slot < count
        key = tl.load(cand_row_ptr + slot, mask=valid, other=0, cache_modifier=".cg")
        high = key >> SHIFT
        win = valid & tl.where(done, high >= prefix, high > prefix)
        stay = valid & tl.where(done, False, high == prefix)
        to = won + tl.cumsum(win.to(tl.int32), 0) - 1
        tl.store(wins_row_ptr + to, key, mask=win & (to < TOPK_PAD))
        to = stay_count + tl.cumsum(stay.to(tl.int32), 0) - 1
        tl.store(cand_row_ptr + to, key, mask=stay)
        won += tl.sum(win.to(tl.int32), 0)
        stay_count += tl.sum(stay.to(tl.int32), 0)
    tl.debug_barrier()  # the next pass reads what other threads of this program stored
    return stay_count, won


@triton.jit
def _refine(cand_row_ptr, wins_row_ptr, count, won, threshold, need, done, SHIFT: tl.constexpr,
            CHUNK: tl.constexpr, TOPK_PAD: tl.constexpr, BITS: tl.constexpr):  # fmt: skip
    """Fix the threshold's sort-key digit at ``SHIFT`` from a histogram over the candidate list (all
    of whose keys equal the threshold above it), then partition the list by it."""
    BINS: tl.constexpr = 1 << BITS
    hist = tl.zeros([BINS], tl.int32)
    for start in range(0, count, CHUNK):
        slot = start + tl.arange(0, CHUNK)
        key = tl.load(cand_row_ptr + slot, mask=slot < count, other=0, cache_modifier=".cg")
        hist += tl.histogram(((key >> SHIFT) & (BINS - 1)).to(tl.int32), BINS, mask=slot < count)
    # Below the order key the ties' sort keys are ones down to the index digits: part of the prefix.
    prefix = (threshold | _TIE_ONES) >> (SHIFT + BITS)
    prefix, need, done = _descend(prefix, need, done, hist, BINS)
    threshold = prefix << SHIFT
    count, won = _partition(cand_row_ptr, wins_row_ptr, count, won, threshold, SHIFT, done, CHUNK, TOPK_PAD)
    return count, won, threshold, need, done


@triton.jit
def _finish_from_scores(score_row_ptr, wins_row_ptr, visible, prefix, need, done, BLOCK: tl.constexpr,
                        TOPK_PAD: tl.constexpr, BITS: tl.constexpr):  # fmt: skip
    """A row whose candidates did not fit its list (heavy ties; every visible score equal at worst):
    the threshold's order-key digits below the first two (``prefix``), one histogram pass over the
    row's scores each, then one pass that stores every key above the threshold and, of the keys equal
    to it, the lowest indices, as sort keys in ``wins``. Returns how many: ``k``."""
    BINS: tl.constexpr = 1 << BITS
    for d in tl.static_range(2, 32 // BITS):
        hist = tl.zeros([BINS], tl.int32)
        for start in range(0, tl.where(done, 0, visible), BLOCK):  # no pass once every key left is taken
            index = start + tl.arange(0, BLOCK)
            valid = index < visible
            key = _order_key(tl.load(score_row_ptr + index, mask=valid, other=0.0))
            hist += _digit_histogram(key, valid, prefix, 32 - (d + 1) * BITS, BITS)
        prefix, need, done = _descend(prefix, need, done, hist, BINS)
    won = tl.zeros([], tl.int32)  # as the list's winners count
    ties = tl.zeros([], tl.int32)  # keys equal to the threshold in the blocks before
    for start in range(0, visible, BLOCK):  # the short-row plan's take, block by block in index order
        index = start + tl.arange(0, BLOCK)
        valid = index < visible
        key = _order_key(tl.load(score_row_ptr + index, mask=valid, other=0.0))
        take, slot = _take(key, valid, prefix, tl.maximum(need - ties, 0))
        tl.store(wins_row_ptr + won + slot, _sort_key(key, index), mask=take & (won + slot < TOPK_PAD))
        won += tl.sum(take.to(tl.int32), 0)
        ties += tl.sum((valid & (key == prefix)).to(tl.int32), 0)
    tl.debug_barrier()  # the sort reads what other threads of this program stored
    return won


@triton.jit
def _finish_row(state_ptr, score_row_ptr, cand_row_ptr, wins_row_ptr, out_row_ptr, visible, cap, prefix, need, done,
                topk, offset, BLOCK: tl.constexpr, TOPK_PAD: tl.constexpr, LOG_TOPK_PAD: tl.constexpr,
                BITS: tl.constexpr, INDEX_DIGITS: tl.constexpr):  # fmt: skip
    """The row's last chunk program: every candidate is in and the second-digit counts are summed.
    Finds the sort key ``S`` of the k-th winner digit by digit, takes the candidates ``>= S`` (from
    the row's scores when more than ``cap`` were listed), sorts and stores them, and zeroes the row's
    counters."""
    BINS: tl.constexpr = 1 << BITS
    count = tl.load(state_ptr + _SLOTS, cache_modifier=".cg")
    second = tl.load(state_ptr + tl.arange(0, BINS), cache_modifier=".cg")
    prefix, need, done = _descend(prefix, need, done, second, BINS)
    if count <= cap:
        shift: tl.constexpr = _INDEX_BITS + 32 - 2 * BITS  # sort-key bits below the first two digits
        threshold = prefix.to(tl.int64) << shift
        count, won = _partition(cand_row_ptr, wins_row_ptr, count, count * 0, threshold, shift, done, BLOCK, TOPK_PAD)
        for d in tl.static_range(1, 32 // BITS - 1):  # the order key's remaining digits
            count, won, threshold, need, done = _refine(
                cand_row_ptr, wins_row_ptr, count, won, threshold, need, done, shift - d * BITS, BLOCK, TOPK_PAD,
                BITS,
            )  # fmt: skip
        for d in tl.static_range(INDEX_DIGITS):  # ties at the threshold key: lowest index first
            count, won, threshold, need, done = _refine(
                cand_row_ptr, wins_row_ptr, count, won, threshold, need, done, (INDEX_DIGITS - 1 - d) * BITS,
                BLOCK, TOPK_PAD, BITS,
            )  # fmt: skip
    else:  # in half-chunk blocks: at a whole chunk a block of int64 keys spilled on Triton 3.6 (sm_90)
        won = _finish_from_scores(score_row_ptr, wins_row_ptr, visible, prefix, need, done, BLOCK // 2, TOPK_PAD, BITS)
    _sort_and_store(wins_row_ptr, out_row_ptr, won, topk, offset, TOPK_PAD, LOG_TOPK_PAD)
    word = tl.arange(0, 2 * BINS)
    tl.store(state_ptr + word, 0, mask=word < _STATE_WORDS)  # clean for the next call


# The group's first row is not specialized on: a program's row is it plus the program id, of no known
# divisibility either way, so the later groups of a capped launch run the first group's variant.
@triton.jit(do_not_specialize=["row0"])
def _select_chunks_kernel(
    score_ptr,  # [R, n] fp32
    start_ptr,  # [B] int64
    hist_ptr,  # [R, row_words] int32: `parts` first-digit histograms [FIRST_DIGIT_BINS], then the counters
    cand_ptr,  # [group, cap] int64 scratch: each row's candidate sort keys (rows row0.. of this launch)
    wins_ptr,  # [R, TOPK_PAD] int64 scratch: each row's winners
    out_ptr,  # [R, topk] int32
    seq,
    n,
    topk,
    offset,
    row_words,
    parts,
    cap,  # keys a row's candidate list holds
    row0,  # the group's first row: program (i, c) selects row row0 + i, its candidates in row i of cand_ptr
    CHUNK: tl.constexpr,
    PART_BLOCK: tl.constexpr,
    TOPK_PAD: tl.constexpr,
    LOG_TOPK_PAD: tl.constexpr,
    BITS: tl.constexpr,
    INDEX_DIGITS: tl.constexpr,
    PDL: tl.constexpr,
):
    _wait_for_scores(PDL)
    local = tl.program_id(0).to(tl.int64)
    r = row0 + local
    chunk = tl.program_id(1)
    visible, k = _row_limits(start_ptr, r, seq, topk)
    hist_row = hist_ptr + r * row_words
    state = hist_row + parts * _FIRST_BINS
    prefix, need, done = _first_level(k, visible)
    prefix, need, done = _descend(prefix, need, done, _first_digits(hist_row, parts, PART_BLOCK), 1 << BITS)

    index = chunk * CHUNK + tl.arange(0, CHUNK)
    valid = index < visible
    key = order_bits(tl.load(score_ptr + r * n + index, mask=valid, other=0.0))  # 32-bit: half the registers
    tie_bin = (index < tl.where(done, 0, visible)) & ((key >> _FIRST_SHIFT).to(tl.int32) == prefix)
    second = tl.histogram(((key >> (_FIRST_SHIFT - BITS)) & ((1 << BITS) - 1)).to(tl.int32), 1 << BITS, mask=tie_bin)
    # The row's second-digit counts so far, this chunk's included. A bin's count only grows as chunks
    # arrive, so the threshold's second digit is at least the one these counts give (-1 while they hold
    # fewer than `need` keys): a tie-bin key below it is never taken and is not listed. The i-th chunk to
    # arrive lists about need / i of its tie-bin keys.
    seen = tl.atomic_add(state + tl.arange(0, 1 << BITS), second, sem="relaxed") + second
    least, _, _ = _threshold_bin(seen, need)
    least = tl.where(done, 0, tl.maximum(least, 0))  # done: all of the tie bin is taken
    # Certain winners (first digit > d1) and tie-bin keys from that second digit up, in one compare of
    # the top two digits (only `key` stays live across the atomic).
    cand = valid & ((key >> (_FIRST_SHIFT - BITS)).to(tl.int32) >= prefix * (1 << BITS) + least)
    first = tl.atomic_add(state + _SLOTS, tl.sum(cand.to(tl.int32), 0), sem="relaxed")
    slot = first + tl.cumsum(cand.to(tl.int32), 0) - 1
    tl.store(cand_ptr + local * cap + slot, _sort_key(key.to(tl.int64), index), mask=cand & (slot < cap))
    tl.debug_barrier()  # every thread's stores and atomics come before the ticket that releases them
    ticket = tl.atomic_add(state + _ARRIVALS, 1, sem="acq_rel")
    if ticket == tl.num_programs(1) - 1:
        _finish_row(
            state, score_ptr + r * n, cand_ptr + local * cap, wins_ptr + r * TOPK_PAD, out_ptr + r * topk, visible,
            cap, prefix, need, done, topk, offset, CHUNK, TOPK_PAD, LOG_TOPK_PAD, BITS, INDEX_DIGITS,
        )  # fmt: skip


ROW_TUNING = Tunable(
    "topk.select_row",
    "_select_row_kernel: a whole row per program, its radix digits in registers (rows of <= 4096 keys)",
    dims=("R", "N", "K"),  # K: the top-k padded to a power of two (TOPK_PAD), 512 at flash, 1024 at pro
    pow2_dims=("R", "N"),
    params=(
        Param(
            "radix_bits",
            ROW_RADIX_BITS[0],
            ROW_RADIX_BITS,
            "digit width: 4 passes of 256-bin histograms or 3 of up to 2048 bins; with bin_slots the first digit's",
            exact=True,
        ),
        Param(
            "bin_slots",
            0,
            (0, 256, 512),
            "0: every digit over the row; else one pass over the row, the later digits over the threshold's bin"
            " (listed when it has at most this many keys, else re-read from the row): the same bits",
            exact=True,
        ),
        Param(
            "num_warps",
            SELECT_WARPS,
            (4, 8, 16),
            "warps per row (integer selection: the same bits)",
            exact=True,
            compiled_only=True,
        ),
        Param("pdl", True, (False, True), "programmatic dependent launch (sm_90)", exact=True, compiled_only=True),
    ),
    candidates=(
        {"radix_bits": 11},
        {"bin_slots": 256},
        {"bin_slots": 512, "radix_bits": 11},
        {"num_warps": 4},
        {"num_warps": 16},
        {"pdl": False},
    ),
)
CHUNKS_TUNING = Tunable(
    "topk.select_chunks",
    "_select_chunks_kernel: CHUNK keys per program, the last program of a row finishes it (longer rows)",
    dims=("R", "N", "K"),  # K: the top-k padded to a power of two (TOPK_PAD), 512 at flash, 1024 at pro
    pow2_dims=("R", "N"),
    params=(
        Param("chunk", CHUNK, (1024, 2048, 4096, 8192), "keys per program (the selected set is the same)", exact=True),
        Param("num_warps", SELECT_WARPS, (4, 8, 16), "warps per program", exact=True, compiled_only=True),
        Param("pdl", True, (False, True), "programmatic dependent launch (sm_90)", exact=True, compiled_only=True),
    ),
    candidates=({"chunk": 2048}, {"chunk": 8192}, {"num_warps": 16}, {"pdl": False}),
)


def select_topk(
    score: torch.Tensor,
    pos: StepPositions,
    topk: int,
    offset: int,
    out: torch.Tensor | None = None,
    ws: Workspace | None = None,
    hist: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices of the best visible scores (spec §5 step 6).

    ``score [B, S, N] fp32`` (``N >= max cache_len``; only ``j < vis(b, s) = (start[b]+s+1)//4`` is
    read). Returns ``topk_idxs [B, S, topk] int32``: the ``k = min(topk, vis)`` indices of the
    largest visible scores in descending score order (equal scores: lower index first) plus
    ``offset``, then ``-1`` — written into ``out`` when given; scratch comes from ``ws`` when given.

    Launches: one for rows of ``N <= ROW_IN_REGISTERS`` keys (``hist`` is not read). Longer rows:
    one when ``hist`` is given, else two (``hist`` is built from ``score`` first); and one more for each
    further group of rows when the candidate lists of all ``B*S`` rows would pass ``CANDIDATE_BYTES``.

    ``hist [B*S, HIST_WORDS] int32`` (contiguous), from a score kernel that builds it as it writes
    ``score``: zero everywhere before that kernel runs; then row ``r = b*S + s``'s columns
    ``[0, FIRST_DIGIT_BINS)`` hold ``first_digit_histogram`` summed over every visible key of the
    row, each counted once, computed on the same fp32 values as ``score``; the other columns stay
    zero (the selection's counters). The selection leaves those counters zero again and the counts
    as they were. Counts that do not match ``score`` give wrong indices.
    """
    b, s, n = score.shape
    require(score.dtype == torch.float32 and score.is_contiguous(), "score", "a contiguous fp32 tensor")
    require(topk >= 1, "topk", "at least 1")
    rows = b * s
    if hist is not None:
        require(
            hist.dtype == torch.int32 and hist.is_contiguous() and hist.numel() == rows * HIST_WORDS,
            "hist", f"a contiguous int32 tensor [B*S, {HIST_WORDS}]",
        )  # fmt: skip
    if out is None:
        out = torch.empty(b, s, topk, dtype=torch.int32, device=score.device)
    topk_pad = triton.next_power_of_2(max(topk, 2))
    winners = scratch(ws, "topk.cand", (rows, topk_pad), torch.int64, score.device)
    if n <= ROW_IN_REGISTERS:
        cfg = ROW_TUNING.config(score.device, R=rows, N=n, K=topk_pad)
        pdl = cfg.pdl and pdl_supported(score.device)
        if cfg.bin_slots:
            bin_list = scratch(ws, "topk.bin", (rows, cfg.bin_slots), torch.int64, score.device)
            _select_bin_kernel[(rows,)](
                score, pos.start, bin_list, winners, out, s, n, topk, offset,
                ROW=triton.next_power_of_2(max(n, 16)), TOPK_PAD=topk_pad, LOG_TOPK_PAD=topk_pad.bit_length() - 1,
                BITS=cfg.radix_bits, BIN_SLOTS=cfg.bin_slots, REFINE_BITS=RADIX_BITS, PDL=pdl,
                num_warps=cfg.num_warps, launch_pdl=pdl, enable_fp_fusion=False,
            )  # fmt: skip
            return out
        _select_row_kernel[(rows,)](
            score,
            pos.start,
            winners,
            out,
            s,
            n,
            topk,
            offset,
            ROW=triton.next_power_of_2(max(n, 16)),
            TOPK_PAD=topk_pad,
            LOG_TOPK_PAD=topk_pad.bit_length() - 1,
            BITS=cfg.radix_bits,
            LAST_BITS=32 % cfg.radix_bits,
            PDL=pdl,
            num_warps=cfg.num_warps,
            launch_pdl=pdl,
            enable_fp_fusion=False,
        )
        return out

    require(n <= 1 << TIE_INDEX_BITS, "score", f"rows of at most {1 << TIE_INDEX_BITS} keys")
    cfg = CHUNKS_TUNING.config(score.device, R=rows, N=n, K=topk_pad)
    chunk = cfg.chunk
    pdl = cfg.pdl and pdl_supported(score.device)
    n_chunks = triton.cdiv(n, chunk)
    grid = (rows, n_chunks)
    parts = 1
    if hist is None:  # a partial histogram per chunk: nothing to zero first
        parts = n_chunks
        hist = scratch(ws, "topk.hist", (rows, parts * FIRST_DIGIT_BINS + STATE_WORDS), torch.int32, score.device)
        _first_digit_kernel[grid](
            score, pos.start, hist, s, n, hist.shape[-1], CHUNK=chunk,
            STATE_PAD=triton.next_power_of_2(STATE_WORDS), PDL=pdl, num_warps=cfg.num_warps, launch_pdl=pdl,
            enable_fp_fusion=False,
        )  # fmt: skip
    cap = min(n, max(chunk, LIST_PER_TOPK * topk_pad))  # a row's candidate list
    group = max(1, min(rows, CANDIDATE_BYTES // (8 * cap)))  # rows whose candidates fit the capped buffer
    candidates = scratch(ws, "topk.candidates", (group, cap), torch.int64, score.device)
    for row0 in range(0, rows, group):  # one launch per group, each reusing the buffer (same stream: in order)
        _select_chunks_kernel[(min(group, rows - row0), n_chunks)](
            score, pos.start, hist, candidates, winners, out, s, n, topk, offset,
            parts * FIRST_DIGIT_BINS + STATE_WORDS, parts, cap, row0, CHUNK=chunk,
            PART_BLOCK=min(triton.next_power_of_2(parts), HIST_PART_BLOCK), TOPK_PAD=topk_pad,
            LOG_TOPK_PAD=topk_pad.bit_length() - 1, BITS=RADIX_BITS, INDEX_DIGITS=INDEX_DIGITS,
            PDL=pdl, num_warps=cfg.num_warps, launch_pdl=pdl, enable_fp_fusion=False,
        )  # fmt: skip
    return out

"""The indexer's score launch (spec §5 steps 4-5): INT8 scores of every token against its visible
keys, streamed through a ring of key tiles in flight; nothing else runs in it.

**Layout of the MMA.** A tile is ``KEYS`` (128) cache rows: the keys are the M side of one INT8 x INT8
-> int32 ``tl.dot``, the (token, head) pairs of a *query group* (the row's ``TOKENS`` tokens of a
decode step, 2 x 64 = 128 pairs at flash decode with multi-token prediction) the N side and ``HID`` the
K side. So the head sum of a key runs along N, which the MMA lays out inside a thread and its quad
of lanes: no barrier, no shared memory, a couple of shuffles per key (DeepGEMM's paged MQA logits
puts keys on M for the same reason). The queries are the dot's fixed right operand, loaded once per
group and kept in shared memory across its tiles.

**Numerics** (spec §5 step 5, in its order): ``score = (sum_h w*relu(dot*qs)) * ks``. The head
weight and the query scale are folded once per group, ``wq = w * qs`` (both per pair), so a tile
does ``max(dot, 0)`` on the int32 dot, one multiply-add per pair into the head sum, and the key
scale once per key after the sum. ``relu(dot*qs)*w`` and ``relu(dot)*(w*qs)`` are the same real
number (``qs > 0``: a per-row scale of at least ``1e-4/127``) and differ by the rounding of one
product; non-finite values come out as the reference's (an infinite or NaN ``qs`` belongs to a query
row quantized to zeros, so ``dot = 0`` and both give ``0 * inf``/``0 * NaN`` = NaN; a NaN head weight
makes every term NaN either way). A finite ``w`` and ``qs`` whose product passes fp32's max would
make ``wq`` infinite and a dot ``<= 0`` NaN (``0 * inf``) where the spec's order gives 0, and a ``qs``
past ``3.4e38 / (127^2 HID)`` lets ``dot * qs`` overflow where a ``|w| < 1`` keeps ``dot * wq`` finite:
a group where either can happen (one reduction over its pairs, before its tiles) runs its tiles through a second,
unpipelined loop in the spec's order, ``relu(dot * qs) * w`` (NaN kept by the ReLU, ``w`` and ``qs``
reloaded per tile); the branch is uniform and the common loop is unchanged. Keys a token cannot see
(``j >= (start + s + 1) // 4``) get ``MASKED_SCORE``.

**Work.** The items are (query group, tile) pairs, group-major: batch row ``b``'s groups, each with
``ceil(N / KEYS)`` tiles over the score's width ``N``. Program ``p`` of ``P`` takes the contiguous run
``[p*I/P, (p+1)*I/P)`` of the ``I`` items, computed from the launch's scalars alone (no host value,
no per-item search: a captured graph replays it). So it walks one or two groups; per group it loads
the queries, the folded weights and the row's start once, then runs the **tile loop**: the tile's
pool blocks from the block table, its INT8 key rows and scales (``.cg``: read once, past L1), the
dot, the epilogue, the store. The loop is software-pipelined (``pipeline_stages``): the copies of the
next ``KEYS_AHEAD`` tiles' keys are in flight while one is scored, in a ring of ``KEYS_AHEAD + 1``
shared-memory buffers, and the loop waits for the oldest tile only. Tiles past a group's last
visible key load nothing and store ``MASKED_SCORE``.

**Histograms.** With ``HIST`` (rows longer than ``topk.ROW_IN_REGISTERS``) each token's first radix
digit is counted over its visible scores (``topk.first_digit_histogram``'s digit) in a histogram
that stays on chip across the group's tiles and is added to ``hist`` once per group and program
(relaxed integer atomics: order-free, so deterministic). It counts every score of the tiles; the
unseen ones, all ``MASKED_SCORE``, come off that score's bin before the add (``tl.histogram``'s mask
is not used: see the tile loop).

**Programmatic dependent launch.** Launched with PDL on sm_90, a program computes its work,
(compiled) prefetches its first tiles' keys into L2 — pool rows of earlier steps, written before the
op's first launch — and lets the selection launch be scheduled before it waits for the compressor
step (new keys, the summed head weights) and the front launch (queries).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ..model.config import COMPRESS_RATIO
from ..model.state import IndexerState
from ..model.structs import MASKED_SCORE, StepPositions
from ..model.weights import IndexerWeights
from .l2_prefetch import prefetch_l2_lines
from .launch import pdl_supported, require, sm_count
from .topk import FIRST_DIGIT_BINS, HIST_WORDS, order_bits
from .tuning import Param, Tunable

KEYS = 128  # keys per tile, the MMA's M: 128 x 132 B (an INT8_KEYS row at HID=128) = 16.5 KB in flight per stage
TOKENS_PER_GROUP = 2  # a decode step's two tokens (multi-token prediction) share the tiles: N = 2 x HI pairs
KEYS_AHEAD = 3  # key tiles whose copies are issued before the tile being scored: 3 x 16.5 KB in flight a program
#                (Little's law on an H200: ~4.3 TB/s x ~0.8 us / 132 SMs = 26 KB per SM; one program per SM)
NUM_WARPS = 8  # two warpgroups on M (64 keys each); the [128, 128] int32 accumulator is 64 registers a thread
PROGRAMS_PER_SM = 1  # the persistent grid: one program per SM
MIN_DOT_WIDTH = 16  # tl.dot needs every dimension >= 16: fewer heads are zero-padded up to it
PREFETCH_TILES = 2  # tiles a program prefetches into L2 before it waits for the launches before it

_MASKED = tl.constexpr(MASKED_SCORE)
_RATIO = tl.constexpr(COMPRESS_RATIO)
_KEYS = tl.constexpr(KEYS)
_BINS = tl.constexpr(FIRST_DIGIT_BINS)
_FIRST_SHIFT = tl.constexpr(32 - (FIRST_DIGIT_BINS.bit_length() - 1))
_HIST_ROW = tl.constexpr(HIST_WORDS)
_PREFETCH_TILES = tl.constexpr(PREFETCH_TILES)
_DOT_MAX = tl.constexpr(127.0 * 127.0)  # |q8 . k8| per dim: INT8 codes are within +-127
_FP32_MAX = tl.constexpr(3.4028234663852886e38)


def pipeline_stages(keys_ahead: int) -> int:
    """``num_stages`` of the tile loop that issues each tile's key copies ``keys_ahead`` tiles early.

    A tile's key rows are addressed through its block-table entries, a load chain of two, and
    Triton's software pipeliner splits the stages after the first two evenly between the two loads
    (the sm_90 compile, Triton 3.9: 4 stages copy keys 1 tile ahead and wait for every copy at the
    top of the loop; 8 stages, 3 tiles ahead in a ring of 4 key buffers, waiting for the oldest only).
    ``tests/test_kernels_compile.py`` reads both off the compiled loop."""
    return 2 * keys_ahead + 2


TUNING = Tunable(
    "index.score",
    "_score_kernel: every (query group, key tile) item's scores and histograms (indexer launch 3)",
    dims=("B", "S", "N"),
    pow2_dims=("B", "S", "N"),
    params=(
        Param(
            "programs_per_sm",
            PROGRAMS_PER_SM,
            (1, 2, 3, 4),
            "persistent programs per SM (every tile is scored by one program: the same bits)",
            exact=True,
        ),
        Param(
            "keys_ahead",
            KEYS_AHEAD,
            (1, 2, 3, 4),
            "key tiles in flight while one is scored",
            exact=True,
            compiled_only=True,
        ),
        Param("num_warps", NUM_WARPS, (4, 8), "warps per program", compiled_only=True),
        Param("pdl", True, (False, True), "programmatic dependent launch (sm_90)", exact=True, compiled_only=True),
    ),
    candidates=(
        {"programs_per_sm": 2},
        {"keys_ahead": 2},
        {"keys_ahead": 4},
        {"num_warps": 4},
        {"programs_per_sm": 2, "num_warps": 4},
        {"pdl": False},
    ),
)


@triton.jit
def _tile_slots(table_ptr, b, key, present, max_blocks, BLOCK_SIZE: tl.constexpr):
    """Pool slots of ``key [KEYS]`` of row ``b`` (``present``: rows that exist) through the block table."""
    key = key.to(tl.uint32)  # >= 0: unsigned, so the division and remainder need no sign fix-up
    block = tl.load(table_ptr + b * max_blocks + key // BLOCK_SIZE, mask=present, other=0).to(tl.int64)
    return block * BLOCK_SIZE + key % BLOCK_SIZE


@triton.jit
def _score_tile(
    t, b, keys_ptr, key_scale_ptr, table_ptr, max_blocks, n_keys, q8, wq, qs_at, w_at, live, weights_scale, load_hi,
    visible, tok_live, out_row, counts,
    TOKENS: tl.constexpr, HEADS_PAD: tl.constexpr, HID: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HIST: tl.constexpr, SPEC_ORDER: tl.constexpr,
):  # fmt: skip
    """Key tile ``t`` of a query group: its scores stored through ``out_row [TOKENS]`` (row pointers)
    and, with ``HIST``, their first digits added to ``counts [TOKENS * BINS] int32`` (returned). A pair's
    term is ``max(dot, 0) * wq`` (``wq [PAIRS] fp32``: the folded ``w * qs``) or, with ``SPEC_ORDER``, the
    spec's ``relu(dot * qs) * w`` with ``qs`` and ``w`` loaded here from ``qs_at``/``w_at [PAIRS]``
    (``live``: the pairs that exist; ``w`` is the load times ``weights_scale``), NaN kept by the ReLU."""
    dim = tl.arange(0, HID)
    col_tok = tl.arange(0, TOKENS)
    key = t * _KEYS + tl.arange(0, _KEYS)
    present = key < load_hi
    slot = _tile_slots(table_ptr, b, key, present, max_blocks, BLOCK_SIZE)
    k8 = tl.load(keys_ptr + slot[:, None] * HID + dim[None, :], mask=present[:, None], other=0, cache_modifier=".cg")
    k_scale = tl.load(key_scale_ptr + slot, mask=present, other=0.0, cache_modifier=".cg")
    dots = tl.dot(k8, q8, out_dtype=tl.int32)  # [KEYS, PAIRS]
    if SPEC_ORDER:
        q_scale = tl.load(qs_at, mask=live, other=0.0)
        relu = tl.maximum(dots.to(tl.float32) * q_scale[None, :], 0.0, propagate_nan=tl.PropagateNan.ALL)
        weight = tl.load(w_at, mask=live, other=0.0) * weights_scale
        terms = relu * weight[None, :]
    else:
        terms = tl.maximum(dots, 0).to(tl.float32) * wq[None, :]
    head_sum = tl.sum(tl.reshape(terms, [_KEYS, TOKENS, HEADS_PAD]), 2)  # [KEYS, TOKENS]
    seen = (key[:, None] < visible[None, :]) & tok_live[None, :]
    score = tl.where(seen, head_sum * k_scale[:, None], _MASKED)  # the key scale after the head sum
    tl.store(out_row[None, :] + key[:, None], score, mask=(key < n_keys)[:, None] & tok_live[None, :])
    if HIST:
        # Every entry is counted and the unseen ones (_MASKED) come off after the loop, not masked:
        # compiled, tl.histogram pairs a mask with its input register by register, and the flattens
        # of the two may reorder differently (Triton 3.6 does). Flattened token-major, the digits
        # are computed in the store's key-major layout and share its layout change (Triton 3.6).
        digit = (order_bits(score) >> _FIRST_SHIFT).to(tl.int32) + col_tok[None, :] * _BINS
        counts += tl.histogram(tl.reshape(tl.trans(digit), [_KEYS * TOKENS]), TOKENS * _BINS)
    return counts


# A block table's width is the caller's cache size: not specialized on (== 1, divisible by 16), one variant
# serves every width (its loads are gathers either way).
@triton.jit(do_not_specialize=["max_blocks"])
def _score_kernel(
    q8_ptr,  # [T, HI, HID] int8: the rotated queries (front launch)
    q_scale_ptr,  # [T, HI] fp32
    proj_ptr,  # [T, n_proj] fp32: the x-projection summed (compressor step); head weights at column w_col
    keys_ptr,  # [num_blocks, BLOCK_SIZE, HID] int8 pool
    key_scale_ptr,  # [num_blocks, BLOCK_SIZE] fp32
    table_ptr,  # [Bs, max_blocks] int32 block table
    start_ptr,  # [B] int64
    score_ptr,  # out [B, S, n_keys] fp32
    hist_ptr,  # out [B*S, HIST_WORDS] int32, zero on entry: first-digit histograms of the visible scores (HIST)
    S,
    n_keys,
    tiles,  # tiles per query group (score_items)
    items,  # (query group, tile) items of the launch
    max_blocks,
    HI,
    n_proj,
    w_col,
    weights_scale,
    HEADS_PAD: tl.constexpr,
    TOKENS: tl.constexpr,  # tokens per query group: 2, or 1 when S == 1
    HID: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HIST: tl.constexpr,
    KEY_STAGES: tl.constexpr,
    PDL: tl.constexpr,
):
    PAIRS: tl.constexpr = TOKENS * HEADS_PAD
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    groups = tl.cdiv(S, TOKENS)
    lo = pid.to(tl.int64) * items // programs
    hi = (pid + 1).to(tl.int64) * items // programs
    dim = tl.arange(0, HID)
    if PDL:
        # Keys of rows that existed before the step: the program's first tiles, into L2 while the
        # compressor step (and the front launch before it) finish.
        g0 = lo // tiles
        b0 = g0 // groups
        start0 = tl.load(start_ptr + b0)
        first = (lo - g0 * tiles) * _KEYS + tl.arange(0, _PREFETCH_TILES * _KEYS)
        old = first < start0 // _RATIO
        first_slot = _tile_slots(table_ptr, b0, first, old, max_blocks, BLOCK_SIZE)
        prefetch_l2_lines(keys_ptr + first_slot * HID, old)  # one 128 B line per key row
        prefetch_l2_lines(key_scale_ptr + first_slot, old & (first % 32 == 0))  # a line holds 32 scales
        gdc_launch_dependents()  # the selection may be scheduled: it waits for this grid to complete
        gdc_wait()

    pair = tl.arange(0, PAIRS)
    pair_tok = pair // HEADS_PAD
    pair_head = pair % HEADS_PAD
    col_tok = tl.arange(0, TOKENS)
    digit_bin = tl.arange(0, _BINS)[None, :]  # a token's bins of the first digit
    for g in tl.range(lo // tiles, tl.cdiv(hi, tiles)):
        b = g // groups
        s0 = (g % groups) * TOKENS  # the group's first token in its row
        tok0 = b * S + s0
        start = tl.load(start_ptr + b)
        # The group's queries as the dot's right operand [HID, PAIRS], and w * qs per pair (0 for padding).
        live = (pair_head < HI) & (s0 + pair_tok < S)
        tok = tok0 + pair_tok
        q8 = tl.load(q8_ptr + ((tok * HI + pair_head) * HID)[None, :] + dim[:, None], mask=live[None, :], other=0)
        qs_at = q_scale_ptr + tok * HI + pair_head
        w_at = proj_ptr + tok * n_proj + w_col + pair_head
        q_scale = tl.load(qs_at, mask=live, other=0.0)
        weight = tl.load(w_at, mask=live, other=0.0) * weights_scale
        wq = weight * q_scale
        # A folded factor past fp32's range from finite factors (|w * qs| > 3.4e38): a key whose dot is <= 0
        # would get 0 * inf = NaN where the spec's order gives 0, so such a group (rare) takes that order.
        # So does a group whose dot * qs could pass it (|dot| <= 127^2 HID), which a |w| < 1 would hide.
        finite = (tl.abs(weight) < float("inf")) & (tl.abs(q_scale) < float("inf"))
        past = (tl.abs(wq) == float("inf")) | (tl.abs(q_scale) * (_DOT_MAX * HID) > _FP32_MAX)
        spec_order = tl.max((past & finite).to(tl.int32), 0) != 0
        tok_live = s0 + col_tok < S
        # [TOKENS]; at most n_keys (a valid step's are), so that the tile loop's key arithmetic is int32
        visible = tl.minimum((start + s0 + col_tok + 1) // _RATIO, n_keys).to(tl.int32)
        load_hi = tl.max(tl.where(tok_live, visible, 0), 0)  # keys any token of the group sees
        out_row = score_ptr + (tok0 + col_tok) * n_keys  # [TOKENS]
        counts = tl.zeros([TOKENS * _BINS], dtype=tl.int32)
        t_lo = tl.maximum(lo - g * tiles, 0).to(tl.int32)  # the group's tiles: int32 keys below
        t_hi = tl.minimum(hi - g * tiles, tiles).to(tl.int32)
        if spec_order:  # uniform over the program; w and qs are not live across the common loop
            for t in tl.range(t_lo, t_hi, num_stages=1):
                counts = _score_tile(
                    t, b, keys_ptr, key_scale_ptr, table_ptr, max_blocks, n_keys, q8, wq, qs_at, w_at, live,
                    weights_scale, load_hi, visible, tok_live, out_row, counts,
                    TOKENS, HEADS_PAD, HID, BLOCK_SIZE, HIST, True,
                )  # fmt: skip
        else:
            for t in tl.range(t_lo, t_hi, num_stages=KEY_STAGES):
                counts = _score_tile(
                    t, b, keys_ptr, key_scale_ptr, table_ptr, max_blocks, n_keys, q8, wq, qs_at, w_at, live,
                    weights_scale, load_hi, visible, tok_live, out_row, counts,
                    TOKENS, HEADS_PAD, HID, BLOCK_SIZE, HIST, False,
                )  # fmt: skip
        if HIST:
            # Per token, the entries of tiles [t_lo, t_hi) past its visible keys, all in its bin of _MASKED.
            span = (t_hi - t_lo) * _KEYS
            unseen = span - tl.minimum(tl.maximum(visible - t_lo * _KEYS, 0), span)  # [TOKENS]
            masked_digit = (order_bits(tl.full([], _MASKED, tl.float32)) >> _FIRST_SHIFT).to(tl.int32)  # 0
            counts = tl.reshape(counts, [TOKENS, _BINS]) - tl.where(digit_bin == masked_digit, unseen[:, None], 0)
            row = hist_ptr + (tok0 + col_tok)[:, None] * _HIST_ROW  # dead tokens' rows may lie past hist
            tl.atomic_add(row + digit_bin, counts, mask=tok_live[:, None] & (counts != 0), sem="relaxed")


def score_items(pos: StepPositions, n_keys: int) -> tuple[int, int]:
    """``(tiles per query group, items)`` over a score of ``n_keys`` columns, from host sizes only: a
    step with no key yet still has one (empty) tile per group."""
    tiles = triton.cdiv(max(n_keys, 1), KEYS)
    return tiles, pos.batch * triton.cdiv(pos.seq, tokens_per_group(pos.seq)) * tiles


def score_programs(
    pos: StepPositions, n_keys: int, device: torch.device, programs_per_sm: int = PROGRAMS_PER_SM
) -> int:
    """The persistent grid: ``programs_per_sm`` programs per SM, never more than the items."""
    return max(1, min(sm_count(device) * programs_per_sm, score_items(pos, n_keys)[1]))


def tokens_per_group(seq: int) -> int:
    """Tokens whose (token, head) pairs share one MMA: a step's two tokens, one when there is one."""
    return min(seq, TOKENS_PER_GROUP)


def index_scores(
    proj: torch.Tensor,
    q8: torch.Tensor,
    q_scale: torch.Tensor,
    w: IndexerWeights,
    state: IndexerState,
    pos: StepPositions,
    out: torch.Tensor | None = None,
    hist: torch.Tensor | None = None,
) -> torch.Tensor:
    """The scores (spec §5 steps 4-5) of every token against the keys in the pool; one launch.

    ``proj [B*S, 4*HID + HI] fp32``: the x-projection summed over its K-slices (the compressor step
    leaves it so), whose last ``HI`` columns are ``x @ weights_proj.T``; ``q8 [B*S, HI, HID] int8``,
    ``q_scale [B*S, HI] fp32``: the front launch's queries. The pool of ``state`` holds every key the
    step's tokens see (the compressor step has run). Returns ``score [B, S, pos.max_cache_len] fp32``
    — or fills ``out [B, S, L] fp32`` (``L >= pos.max_cache_len``), all ``L`` columns — with
    ``MASKED_SCORE`` where key ``j >= (start[b]+s+1)//4``. ``hist [B*S, HIST_WORDS] int32`` (zero on
    entry): the first radix digit's histogram of each token's visible scores is added into its first
    ``FIRST_DIGIT_BINS`` columns (``topk.first_digit_histogram``), as ``topk.select_topk`` takes it.
    """
    t, n_proj = proj.shape
    b, s = pos.batch, pos.seq
    hi, hid = w.weights_proj.shape[0], w.compressor.norm_w.shape[0]
    require(q8.shape == (t, hi, hid) and q8.is_contiguous(), "q8", f"a contiguous [{t}, {hi}, {hid}]")
    require(q_scale.shape == (t, hi) and q_scale.is_contiguous(), "q_scale", f"a contiguous [{t}, {hi}]")
    require(proj.is_contiguous() and n_proj >= hi, "proj", f"a contiguous [{t}, >= {hi}] fp32")
    require(
        hid >= MIN_DOT_WIDTH and hid & (hid - 1) == 0, "q8", f"a head dim that is a power of two >= {MIN_DOT_WIDTH}"
    )
    score = torch.empty(b, s, pos.max_cache_len, dtype=torch.float32, device=proj.device) if out is None else out
    heads_pad = max(triton.next_power_of_2(hi), MIN_DOT_WIDTH)
    cfg = TUNING.config(proj.device, B=b, S=s, N=score.shape[2])
    pdl = cfg.pdl and pdl_supported(proj.device)
    _score_kernel[(score_programs(pos, score.shape[2], proj.device, cfg.programs_per_sm),)](
        q8, q_scale, proj, state.keys, state.key_scale, state.block_table, pos.start, score,
        score if hist is None else hist,
        s, score.shape[2], *score_items(pos, score.shape[2]), state.block_table.shape[1], hi, n_proj, n_proj - hi,
        hid**-0.5 * hi**-0.5,
        HEADS_PAD=heads_pad, TOKENS=tokens_per_group(s), HID=hid, BLOCK_SIZE=state.block_size,
        HIST=hist is not None, KEY_STAGES=pipeline_stages(cfg.keys_ahead), PDL=pdl,
        num_warps=cfg.num_warps, enable_fp_fusion=False, launch_pdl=pdl,
    )  # fmt: skip
    return score

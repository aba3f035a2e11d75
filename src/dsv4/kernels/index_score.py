"""The indexer's score launch (spec §4 steps 2-3 and §5 steps 4-5): the compressor's closes and ring
update, then INT8 scores of every token against its visible keys, in one persistent grid.

**Work items.** Each batch row's key columns are cut into items of ``KEYS`` (128) rows, in order:
*old* items cover the rows that existed before the step (``[0, start//4)``), *new* items the rows the
step closes (``[start//4, cache_len)``; a row always has at least one, which also writes its ring),
*tail* items the masked columns up to the score's width. The items of all rows form one list, computed
in every program from ``start`` (no host values: a captured graph replays it), and program ``p`` of
``P`` takes the contiguous run ``[p*N/P, (p+1)*N/P)`` of it — so a program mostly walks consecutive
items of one row, and the row's queries, their scales and head weights are loaded once and stay on
chip across them (a decode step's two tokens — multi-token prediction — are held together; a step of
more tokens per row reloads them two tokens at a time for every item). The item loop is software-
pipelined (two stages): the next item's keys are in flight while this one's are scored.

**New items close first.** A new item computes the keys its rows get this step
(``compressor.close_chunk``: pooling, RMSNorm, RoPE, Hadamard, INT8), stores them in the pool, and
after a barrier scores them like any other rows. It is the only reader of those keys in this launch,
and the only program reading the row's pre-step ring (chunk 0 of the row's new items holds the only
two closes that can), so no program waits for another.

**Scores.** An item looks up its rows' pool blocks in the block table, loads the INT8 keys and their
scales once, and for its tokens runs one INT8 ``tl.dot`` of the keys against every (token, head)
query row (int32 accumulator), dequantizes by ``q_scale``, applies ReLU (NaN kept), reduces over heads
with the head weights, multiplies by the key scale (after the head sum) and stores fp32 scores; keys
a token cannot see (``j >= (start + s + 1) // 4``) get ``MASKED_SCORE``. With ``HIST`` it also adds
the first radix digit's histogram of each token's visible scores into ``hist`` (integer atomics:
order-independent), for the long-row selection.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..model.config import COMPRESS_RATIO
from ..model.rope import RopeTable
from ..model.state import IndexerState
from ..model.structs import MASKED_SCORE, StepPositions
from ..model.weights import IndexerWeights
from .compressor import CLOSE_CHUNK, NUM_WARPS, close_chunk
from .head_rotation import split_head_dims
from .launch import require, sm_count
from .topk import FIRST_DIGIT_BINS, HIST_WORDS, first_digit_histogram
from .tuning import Param, Tunable, pow2_bucket
from .workspace import Workspace, scratch
from .x_proj import head_weights

KEYS_PER_PROGRAM = CLOSE_CHUNK  # rows per item: 128 keys x 132 B (an INT8_KEYS row at HID=128) = 16.5 KB, one
#                                 [128, HID] x [HID, HI] INT8 MMA per token; the compressor's close chunk
PROGRAMS_PER_SM = 1  # the persistent grid: one program per SM
KEY_STAGES = 2  # the item loop's key loads: the next item's 16.5 KB in flight while this one is scored
MIN_DOT_WIDTH = 16  # tl.dot needs every dimension >= 16: fewer heads are zero-padded up to it

_MASKED = tl.constexpr(MASKED_SCORE)
_RATIO = tl.constexpr(COMPRESS_RATIO)
_KEYS = tl.constexpr(KEYS_PER_PROGRAM)
_KEY_STAGES = tl.constexpr(KEY_STAGES)
_BINS = tl.constexpr(FIRST_DIGIT_BINS)
_HIST_ROW = tl.constexpr(HIST_WORDS)


@triton.jit
def _row_plan(start, S):
    """A row's items for a step from ``start``: ``(first_new, n_old, n_new, tail_lo)``: the first row
    the step closes, the old and new item counts, and where the tail items begin."""
    first_new = start // _RATIO
    n_old = tl.cdiv(first_new, _KEYS)
    n_new = tl.maximum(tl.cdiv((start + S) // _RATIO - first_new, _KEYS), 1)
    return first_new, n_old, n_new, first_new + n_new * _KEYS  # the new items cover the columns up to here


@triton.jit
def _row_items(start, S, n_keys, live):
    """Items of each row (``start [B_PAD]``, ``live``: the real rows) over ``n_keys`` columns, int32."""
    first_new, n_old, n_new, tail_lo = _row_plan(start, S)
    n_tail = tl.cdiv(tl.maximum(n_keys - tail_lo, 0), _KEYS)
    return tl.where(live, n_old + n_new + n_tail, 0).to(tl.int32)


@triton.jit
def _locate(i, ends, rows, start_ptr, S):
    """Item ``i`` of the list (``ends``: the rows' cumulative item counts): its row ``b``, its index
    ``c`` in the row, the row's start and ``_row_plan``."""
    b = tl.sum((ends <= i).to(tl.int32), 0)
    c = i - tl.sum(tl.where(rows == b - 1, ends, 0), 0)
    start = tl.load(start_ptr + b)
    first_new, n_old, n_new, tail_lo = _row_plan(start, S)
    return b, c, start, first_new, n_old, n_new, tail_lo


@triton.jit
def _queries(q8_ptr, q_scale_ptr, xp_ptr, tok, tok_end, T, HI, weights_scale, SPLITS: tl.constexpr,
             TWO_HID: tl.constexpr, HID: tl.constexpr, HEADS_PAD: tl.constexpr):  # fmt: skip
    """Token ``tok``'s INT8 query rows ``[HEADS_PAD, HID]`` (the dot's left operand), their scales and
    head weights ``[HEADS_PAD]``; padding heads (and every head when ``tok >= tok_end``) are zero."""
    h = tl.arange(0, HEADS_PAD)
    live = (h < HI) & (tok + h * 0 < tok_end)  # elementwise: the interpreter splats a scalar bool as int32
    d = tl.arange(0, HID)[None, :]
    q8 = tl.load(q8_ptr + ((tok * HI + h) * HID)[:, None] + d, mask=live[:, None], other=0)
    q_scale = tl.load(q_scale_ptr + tok * HI + h, mask=live, other=0.0)
    weight = head_weights(xp_ptr, tok + h * 0, h, live, T, HI, weights_scale, TWO_HID, SPLITS)
    return q8, q_scale, weight


@triton.jit
def _pair_queries(q8_ptr, q_scale_ptr, xp_ptr, tok0, tok_end, T, HI, weights_scale, SPLITS: tl.constexpr,
                  TWO_HID: tl.constexpr, HID: tl.constexpr, HEADS_PAD: tl.constexpr):  # fmt: skip
    """``_queries`` of tokens ``tok0`` and ``tok0 + 1``: ``(q8_0, q_scale_0, weight_0, q8_1, q_scale_1, weight_1)``."""
    q8_0, q_scale_0, weight_0 = _queries(
        q8_ptr, q_scale_ptr, xp_ptr, tok0, tok_end, T, HI, weights_scale, SPLITS, TWO_HID, HID, HEADS_PAD
    )
    q8_1, q_scale_1, weight_1 = _queries(
        q8_ptr, q_scale_ptr, xp_ptr, tok0 + 1, tok_end, T, HI, weights_scale, SPLITS, TWO_HID, HID, HEADS_PAD
    )
    return q8_0, q_scale_0, weight_0, q8_1, q_scale_1, weight_1


@triton.jit
def _score_token(k8, k_scale, key, load_hi, store_hi, q8, q_scale, weight, row_ptr, hist_row_ptr, visible, live,
                 HIST: tl.constexpr):  # fmt: skip
    """One token's scores of an item's keys: INT8 dot over the heads, dequantize, ReLU, head sum, key
    scale; stored at ``row_ptr + key`` below ``store_hi`` (``MASKED_SCORE`` from ``visible`` on)."""
    dots = tl.dot(q8, tl.trans(k8), out_dtype=tl.int32).to(tl.float32)  # [HEADS_PAD, KEYS]
    # ReLU that keeps NaN (torch.relu does; the default maxNum would turn a NaN logit into 0)
    logits = tl.maximum(dots * q_scale[:, None], 0.0, propagate_nan=tl.PropagateNan.ALL) * weight[:, None]
    score = tl.sum(logits, 0) * k_scale  # the key scale after the head sum
    seen = (key < visible) & (key < load_hi) & live  # nothing of a token past the row counts
    score = tl.where(seen, score, _MASKED)
    tl.store(row_ptr + key, score, mask=(key < store_hi) & live)
    if HIST:
        counts = first_digit_histogram(score, seen)
        tl.atomic_add(hist_row_ptr + tl.arange(0, _BINS), counts, mask=counts > 0, sem="relaxed")


@triton.jit
def _score_pair(k8, k_scale, key, load_hi, store_hi, q8_0, q_scale_0, weight_0, q8_1, q_scale_1, weight_1,
                score_ptr, hist_ptr, tok0, tok_end, pos0, n_keys, HIST: tl.constexpr):  # fmt: skip
    """Tokens ``tok0`` (at position ``pos0``) and ``tok0 + 1`` (if below ``tok_end``) against an item."""
    out_row = score_ptr + tok0 * n_keys
    hist_row = hist_ptr + tok0 * _HIST_ROW
    _score_token(
        k8, k_scale, key, load_hi, store_hi, q8_0, q_scale_0, weight_0, out_row, hist_row, (pos0 + 1) // _RATIO,
        key >= 0, HIST,
    )  # fmt: skip
    _score_token(
        k8, k_scale, key, load_hi, store_hi, q8_1, q_scale_1, weight_1, out_row + n_keys, hist_row + _HIST_ROW,
        (pos0 + 2) // _RATIO, tok0 + 1 + key * 0 < tok_end, HIST,
    )  # fmt: skip


@triton.jit
def _score_kernel(
    q8_ptr,  # [T, HI, HID] int8: the rotated queries (front launch)
    q_scale_ptr,  # [T, HI] fp32
    xp_ptr,  # [SPLITS, T, 4*HID + HI] fp32: raw K-slices of the x-projection (front launch)
    kvg_ptr,  # [T, 4*HID + HI] fp32 scratch: a row's kv | gate slices added (SPLITS > 1)
    ape_ptr,  # [4, 2*HID] fp32
    kv_state_ptr,  # [Bs, 8, 2*HID] fp32, updated
    score_state_ptr,  # [Bs, 8, 2*HID] fp32, updated
    keys_ptr,  # [num_blocks, BLOCK_SIZE, HID] int8 pool
    key_scale_ptr,  # [num_blocks, BLOCK_SIZE] fp32
    table_ptr,  # [Bs, max_blocks] int32 block table
    norm_w_ptr,  # [HID] bf16|fp32
    cos_ptr,  # [P, R/2] fp32
    sin_ptr,
    start_ptr,  # [B] int64
    score_ptr,  # out [B, S, n_keys] fp32
    hist_ptr,  # out [B*S, HIST_WORDS] int32, zero on entry: first-digit histograms of the visible scores (HIST)
    B,
    S,
    n_keys,
    max_blocks,
    HI,
    eps,
    hadamard_scale,
    weights_scale,
    HEADS_PAD: tl.constexpr,
    HID: tl.constexpr,
    NOPE: tl.constexpr,
    HALF_R: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    SPLITS: tl.constexpr,
    B_PAD: tl.constexpr,
    HIST: tl.constexpr,
    ONE_PAIR: tl.constexpr,
    KEY_CODE_MAX: tl.constexpr,  # the key pool's format (IndexerState.key_format.constexprs)
    KEY_AMAX_FLOOR: tl.constexpr,
):
    T = B * S
    rows = tl.arange(0, B_PAD)
    ends = tl.cumsum(_row_items(tl.load(start_ptr + rows, mask=rows < B, other=0), S, n_keys, rows < B), 0)
    total = tl.sum(tl.where(rows == B - 1, ends, 0), 0)
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    lo = (pid.to(tl.int64) * total // programs).to(tl.int32)
    hi = ((pid + 1).to(tl.int64) * total // programs).to(tl.int32)

    dim = tl.arange(0, HID)
    # Phase 1: the rows this step closes, in this program's items (no queries on chip yet).
    for i in tl.range(lo, hi, num_stages=1):  # L1 serves the closes' candidates
        b, c, start, first_new, n_old, n_new, tail_lo = _locate(i, ends, rows, start_ptr, S)
        k = c - n_old
        if (k >= 0) & (k < n_new):
            close_chunk(
                k, b.to(tl.int64), start, xp_ptr, kvg_ptr, ape_ptr, kv_state_ptr, score_state_ptr,
                keys_ptr, key_scale_ptr, table_ptr, norm_w_ptr, cos_ptr, sin_ptr, S, T, HI, max_blocks, eps,
                hadamard_scale, HID, NOPE, HALF_R, BLOCK_SIZE, SPLITS, KEY_CODE_MAX, KEY_AMAX_FLOOR,
            )  # fmt: skip
    tl.debug_barrier()  # the new keys are stored before any thread of the program loads them
    q_row = pid * 0 - 1  # the row whose queries are on chip
    q8_0 = tl.zeros([HEADS_PAD, HID], dtype=tl.int8)
    q_scale_0 = tl.zeros([HEADS_PAD], dtype=tl.float32)
    weight_0 = tl.zeros([HEADS_PAD], dtype=tl.float32)
    q8_1, q_scale_1, weight_1 = q8_0, q_scale_0, weight_0
    # Phase 2: the scores of every item.
    for i in tl.range(lo, hi, num_stages=_KEY_STAGES):
        b, c, start, row_first_new, row_n_old, row_n_new, row_tail_lo = _locate(i, ends, rows, start_ptr, S)
        b64 = b.to(tl.int64)
        if c < row_n_old:  # rows of earlier steps
            key_lo = c.to(tl.int64) * _KEYS
            load_hi = row_first_new
            store_hi = row_first_new
        elif c < row_n_old + row_n_new:  # rows this step closed (phase 1)
            key_lo = row_first_new + (c - row_n_old) * _KEYS
            load_hi = (start + S) // _RATIO
            store_hi = row_first_new * 0 + n_keys
        else:  # masked columns past every key
            key_lo = row_tail_lo + (c - row_n_old - row_n_new) * _KEYS
            load_hi = key_lo
            store_hi = row_first_new * 0 + n_keys
        key = key_lo + tl.arange(0, _KEYS)
        present = key < load_hi
        block = tl.load(table_ptr + b64 * max_blocks + key // BLOCK_SIZE, mask=present, other=0).to(tl.int64)
        slot = block * BLOCK_SIZE + key % BLOCK_SIZE
        # Keys are read once: ".cg" keeps them out of L1, where the row's queries stay.
        k8 = tl.load(
            keys_ptr + slot[:, None] * HID + dim[None, :], mask=present[:, None], other=0, cache_modifier=".cg"
        )
        k_scale = tl.load(key_scale_ptr + slot, mask=present, other=0.0)
        tok_end = b64 * S + S
        if ONE_PAIR:  # decode: the row's (at most) two tokens' queries stay on chip across its items
            if b != q_row:
                q8_0, q_scale_0, weight_0, q8_1, q_scale_1, weight_1 = _pair_queries(
                    q8_ptr, q_scale_ptr, xp_ptr, b64 * S, tok_end, T, HI, weights_scale, SPLITS, 2 * HID, HID,
                    HEADS_PAD,
                )  # fmt: skip
                q_row = b
            _score_pair(
                k8, k_scale, key, load_hi, store_hi, q8_0, q_scale_0, weight_0, q8_1, q_scale_1, weight_1,
                score_ptr, hist_ptr, b64 * S, tok_end, start, n_keys, HIST,
            )  # fmt: skip
        else:  # longer steps: tokens two at a time, their queries reloaded for every item
            for p in range(tl.cdiv(S, 2)):
                tok0 = b64 * S + 2 * p
                q8_0, q_scale_0, weight_0, q8_1, q_scale_1, weight_1 = _pair_queries(
                    q8_ptr, q_scale_ptr, xp_ptr, tok0, tok_end, T, HI, weights_scale, SPLITS, 2 * HID, HID, HEADS_PAD
                )
                _score_pair(
                    k8, k_scale, key, load_hi, store_hi, q8_0, q_scale_0, weight_0, q8_1, q_scale_1, weight_1,
                    score_ptr, hist_ptr, tok0, tok_end, start + 2 * p, n_keys, HIST,
                )  # fmt: skip


TUNING = Tunable(
    "index.score",
    "_score_kernel: the step's closes, then every item's scores and histograms (indexer launch 2)",
    dims=("B", "S", "N"),
    params=(
        Param(
            "programs_per_sm",
            PROGRAMS_PER_SM,
            (1, 2, 3, 4),
            "persistent programs per SM (every item is closed and scored by one program: the same bits)",
            exact=True,
        ),
        Param("num_warps", NUM_WARPS, (4, 8), "warps per program", compiled_only=True),
    ),
    # at 8 warps a program takes the whole register file (sm_90 build): a second one per SM needs 4 warps
    candidates=(
        {"programs_per_sm": 2},
        {"programs_per_sm": 3},
        {"num_warps": 4},
        {"programs_per_sm": 2, "num_warps": 4},
    ),
)


def score_programs(
    pos: StepPositions, n_keys: int, device: torch.device, programs_per_sm: int = PROGRAMS_PER_SM
) -> int:
    """The persistent grid: ``programs_per_sm`` programs per SM, never more than the items there can be."""
    most_items = pos.batch * (triton.cdiv(n_keys, KEYS_PER_PROGRAM) + 2)
    return max(1, min(sm_count(device) * programs_per_sm, most_items))


def index_scores(
    xp: torch.Tensor,
    q8: torch.Tensor,
    q_scale: torch.Tensor,
    w: IndexerWeights,
    state: IndexerState,
    pos: StepPositions,
    rope: RopeTable,
    eps: float,
    out: torch.Tensor | None = None,
    hist: torch.Tensor | None = None,
    ws: Workspace | None = None,
) -> torch.Tensor:
    """The compressor step and the scores (spec §4 steps 2-3, §5 steps 4-5); one launch.

    ``xp [SPLITS, B*S, 4*HID + HI] fp32`` and ``q8 [B*S, HI, HID] int8``, ``q_scale [B*S, HI] fp32``:
    the front launch's outputs. Updates rows ``0..B-1`` of ``state`` (ring, the closed blocks' keys in
    the pool) and returns ``score [B, S, pos.max_cache_len] fp32`` — or fills ``out [B, S, L] fp32``
    (``L >= pos.max_cache_len``), all ``L`` columns — with ``MASKED_SCORE`` where key
    ``j >= (start[b]+s+1)//4``. ``hist [B*S, HIST_WORDS] int32`` (zero on entry): the first radix
    digit's histogram of each token's visible scores is added into its first ``FIRST_DIGIT_BINS``
    columns (``topk.first_digit_histogram``), as ``topk.select_topk`` takes it.
    """
    splits, t, _ = xp.shape
    b, s = pos.batch, pos.seq
    hi, hid = w.weights_proj.shape[0], w.compressor.norm_w.shape[0]
    require(q8.shape == (t, hi, hid) and q8.is_contiguous(), "q8", f"a contiguous [{t}, {hi}, {hid}]")
    require(q_scale.shape == (t, hi) and q_scale.is_contiguous(), "q_scale", f"a contiguous [{t}, {hi}]")
    require(
        hid >= MIN_DOT_WIDTH and hid & (hid - 1) == 0, "q8", f"a head dim that is a power of two >= {MIN_DOT_WIDTH}"
    )
    nope, half_r = split_head_dims(hid, rope.rope_dim)
    score = torch.empty(b, s, pos.max_cache_len, dtype=torch.float32, device=xp.device) if out is None else out
    kvg = scratch(ws, "score.kvg", xp.shape[1:], torch.float32, xp.device) if splits > 1 else xp
    heads_pad = max(triton.next_power_of_2(hi), MIN_DOT_WIDTH)
    cfg = TUNING.config(xp.device, B=pow2_bucket(b), S=pow2_bucket(s), N=pow2_bucket(score.shape[2]))
    _score_kernel[(score_programs(pos, score.shape[2], xp.device, cfg.programs_per_sm),)](
        q8, q_scale, xp, kvg, w.compressor.ape, state.kv_state, state.score_state, state.keys, state.key_scale,
        state.block_table, w.compressor.norm_w, rope.cos, rope.sin, pos.start, score, score if hist is None else hist,
        b, s, score.shape[2], state.block_table.shape[1], hi, eps, hid**-0.5, hid**-0.5 * hi**-0.5,
        HEADS_PAD=heads_pad, HID=hid, NOPE=nope, HALF_R=half_r, BLOCK_SIZE=state.block_size, SPLITS=splits,
        B_PAD=triton.next_power_of_2(b), HIST=hist is not None, ONE_PAIR=s <= 2,
        **state.key_format.constexprs("KEY_"), num_warps=cfg.num_warps, num_stages=KEY_STAGES,
        enable_fp_fusion=False,
    )  # fmt: skip
    return score

"""Fused compressor step, one kernel for both compressors (spec §4, attention spec §3): ring-slot
writes and, for every block that closes in the step, softmax pooling, RMSNorm, RoPE and the row's
store through the block table. The indexer's (``indexer_compressor``, ratio 4, overlapping windows,
``HID`` 128) rotates the row (Hadamard) and stores an INT8 key with its scale; the attention's
(``kv_compressor``: ratio ``RC`` 4 with overlapping windows (``COFF`` 2, CSA) or 128 with disjoint
ones (``COFF`` 1, HCA), rows of ``HD``) stores an FP8 KV row (``window_kv_write.store_fp8_rows``).
The ratio, the overlap, the width and the store are constexprs of ``_compressor_step_kernel``.
The description below is the indexer's (ratio 4, ring of 8); the attention's compressor is the same
with ``RC`` and ``COFF*RC`` slots, at the end.

Why it can run in parallel: the ring is addressed by position (spec v3: position ``q`` lives in slot
``q % 8``, nothing shifts), and the block closing at position ``p`` (first position ``f = p - 3``)
pools exactly the tokens ``q = f - 4 + j``, ``j = 0..7`` — columns ``[0, HID)`` of the previous
block's tokens and ``[HID, 2*HID)`` of its own. A token of this step (``q >= start``) comes from
the step's projections; an earlier one (``0 <= q < start``) from the pre-step ring slot ``q % 8``,
which no position of the step before the close can have overwritten (that would be ``q + 8 > p``);
``q < 0`` (block 0's previous block) is kv 0 and score -inf, whatever the ring holds. So every
closing block is computed independently from the projections and the pre-step ring, and the ring's
final state is written once at the end, from the projections alone: slot ``q % 8`` <- token ``q``
for the last (up to 8) positions ``q`` of the step.

Work comes in chunks of ``CLOSE_TILE`` closing blocks of one row (``close_chunk``), pooled
together. Only the first two closing blocks of a row can read the pre-step ring
(``f - 4 < start``); both belong to the row's chunk 0, which also writes the ring, after a barrier —
so no program reads a ring slot after it is overwritten. The projections come as the x-projection's
raw K-slices (``x_proj.py``): chunk 0 adds its row's slices in slice order into a scratch row block
first when there is more than one slice (decode), and reads them once per candidate from there; a
row too long to add in ``SUM_STEPS_MAX`` steps, or long enough to have a chunk 1, has them added by
a launch of its own before the step (``split_k.sum_slices``, the same sums), and every chunk reads
that one slice. One chunk per program (``_compressor_step_kernel``), in a launch of its own for both
ops: ``indexer_compressor`` and the indexer run it between the front launch and, for the indexer,
the score launch, whose tiles are tuned apart from it. Whichever adds the slices adds *every* column
of the row's (the indexer's head weights too), so the score launch reads one summed slice.

With programmatic dependent launch (sm_90) each program lets the next launch be scheduled, then
waits for the front launch before it reads anything the step writes or reads back.

**The attention's compressor** (``FP8_ROWS``). A closing block ``j`` (first position ``f = RC*j``) pools
the tokens ``q = f - (COFF-1)*RC + i``, ``i < COFF*RC`` (COFF 2: the previous block's columns
``[0, HD)``, then its own ``[HD, 2*HD)``; COFF 1: its own), each from the step's projections or the
pre-step ring slot ``q % (COFF*RC)``, by the same argument as above: the step overwrites that slot
only at ``q + COFF*RC > p``. Only the first ``COFF`` closing blocks of a step can read the ring, all in
chunk 0. At 128 candidates (HCA) the candidates cannot be unrolled per block tile as the indexer's 8
are, so a program pools one block at a time, ``CAND_TILE`` candidates x ``HD`` columns per step
(``[16, 512]`` at flash), in the same three passes (max, sum of exps, weighted sum), then RMSNorm,
RoPE of the last ``R`` entries at ``f`` (the row split into its (even, odd) pairs in registers), and
the FP8 row: NOPE quantized per 64 (``fp8_quant.quant_e4m3``), its scale bytes, the bf16 tail. Chunks
are ``COFF`` blocks (the ones that may read the pre-step ring share chunk 0; a prefill's blocks spread
over programs, each a walk over its candidates), one row's ring is written by its
chunk 0 in tiles of ``RING_TOKENS`` tokens x ``RING_COLS`` columns (HCA's ring is 128 x 512). The
x-projection is the front launch without queries (``COFF*HD`` kv and gate rows: 16 column tiles for
CSA, 8 for HCA at flash), its scratch named apart from the indexer's (``kv_compressor.xp``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ..model.attention_state import CompressorState
from ..model.config import COMPRESS_RATIO
from ..model.rope import RopeTable
from ..model.state import STATE_SLOTS, IndexerState
from ..model.structs import StepPositions
from ..model.weights import CompressorWeights
from .epilogue import overflow_scale, quantize_rows, rms_scale, round_bf16
from .head_rotation import hadamard_rows, rope_pairs, split_head_dims
from .index_front import check_dims as check_front_dims
from .index_front import front
from .launch import is_pow2, pdl_supported, require
from .split_k import sum_block, sum_k_slices, sum_slices
from .tuning import Config, Param, Tunable
from .window_kv_write import store_fp8_rows
from .workspace import Workspace, scratch
from .x_proj import kvg_rows

CLOSE_TILE = 16  # closing blocks pooled at once, and per program: the Hadamard tl.dot needs M >= 16 rows; a
#                 prefill's tiles spread over programs (T=1024 of one row: 16), a decode row closes at most 1
assert CLOSE_TILE >= 2, "the (at most two) blocks that read the pre-step ring must share chunk 0's first tile"
NUM_WARPS = 8  # pooling and Hadamard tiles of 16 blocks: no spills on sm_90 (figures in docs/DESIGN.md)
KV_NUM_WARPS = 16  # FP8-row step, one slot a program: no spills at HD 512 with Triton 3.6 (8 warps: 40 B at HCA)
CAND_TILE = 16  # kv_compressor: candidates pooled per step, [16, HD] fp32 (16 values a thread at 16 warps, HD 512):
#                CSA's 8 in one tile, HCA's 128 in 8 (each tile a round of loads in each of 3 passes; 32 spill at sm_90)
CAND_STAGES = 1  # kv_compressor: software-pipeline stages of an HCA close's candidate tiles (2, a tuning candidate:
#                 the next tile's copies in flight, 172 KiB of shared memory at flash; 8 B spilled with Triton 3.6)
RING_TOKENS = tl.constexpr(8)  # ring update: tokens per tile (every token of a decode step at once)
RING_COLS = tl.constexpr(128)  # ring update: columns per tile (x_proj: COFF*W is a multiple of 128)
RATIO = tl.constexpr(COMPRESS_RATIO)  # the indexer's compressor
SLOTS = tl.constexpr(STATE_SLOTS)
_TILE = tl.constexpr(CLOSE_TILE)
SUM_STEPS_MAX = 4  # a step program adds its row's K-slices itself in at most this many steps (each a round trip
#                   before its closes start: 2 for a decode row of either compressor); a longer row (a prefill's:
#                   T=128 of one row was 256 steps) is added by a launch of its own, many programs at once


@triton.jit
def _token_values(
    src_ptr, ape_ptr, state_ptr, b, start, S, q, valid, cols, T, HI, GATE: tl.constexpr, TWO_HID: tl.constexpr,
    RC: tl.constexpr, N_SLOTS: tl.constexpr,
):  # fmt: skip
    """The kv (``GATE`` 0) or gate + ``ape`` (``GATE`` 1) values of row ``b``'s tokens at positions
    ``q [R]`` (``q >= -N_SLOTS``), ring columns ``cols`` (``[1, C]`` or ``[R, C]``): ``[R, C]`` fp32 from
    this step's projections (``src_ptr``: one K-slice) for ``q >= start``, else the pre-step ring
    ``state_ptr`` (slot ``q % N_SLOTS``), or for ``q < 0`` kv 0 / score -inf, whatever the ring holds."""
    from_proj = valid & (q >= start)
    from_ring = valid & (q < start) & (q >= 0)
    proj = kvg_rows(src_ptr, ape_ptr, b * S + (q - start), q, cols, from_proj[:, None], T, HI, GATE, TWO_HID, 1, RC)
    slot = (q + N_SLOTS) % N_SLOTS
    ring = tl.load(state_ptr + (b * N_SLOTS + slot)[:, None] * TWO_HID + cols, mask=from_ring[:, None], other=0.0)
    if GATE:  # q < 0 only for block 0's previous block (overlapping windows), which does not exist
        ring = tl.where((q < 0)[:, None], float("-inf"), ring)
    return tl.where(from_proj[:, None], proj, ring)


@triton.jit
def _candidate(
    src_ptr, ape_ptr, state_ptr, b, start, S, f, valid, cols, T, HI, j: tl.constexpr, GATE: tl.constexpr,
    TWO_HID: tl.constexpr,
):  # fmt: skip
    """Candidate ``j`` (token ``q = f - 4 + j``) of each of the indexer's closing blocks (first
    positions ``f [BLOCKS]``), columns ``cols`` of its half: ``[BLOCKS, len(cols)]`` fp32."""
    half = (j // RATIO) * (TWO_HID // 2)  # the previous block's columns [0, HID), then this block's [HID, 2*HID)
    return _token_values(
        src_ptr, ape_ptr, state_ptr, b, start, S, f - RATIO + j, valid, (half + cols)[None, :], T, HI, GATE, TWO_HID,
        RATIO, SLOTS,
    )  # fmt: skip


@triton.jit
def _pool(src_ptr, ape_ptr, kv_state_ptr, score_state_ptr, b, start, S, f, valid, cols, T, HI, TWO_HID: tl.constexpr):
    """Softmax over the 8 candidates of each column, then the weighted sum: ``[BLOCKS, len(cols)]`` fp32.

    Three passes over the candidates (max; sum of exps; sum of ``kv * exp/sum`` in candidate
    order) so that ``-inf`` gates of never-written slots weigh exactly 0 and the roundings follow
    the reference's softmax-then-sum: fewer pooled values land on the other side of a bf16
    rounding boundary. Repeated candidate loads hit L1.
    """
    m = _candidate(src_ptr, ape_ptr, score_state_ptr, b, start, S, f, valid, cols, T, HI, 0, 1, TWO_HID)
    for j in tl.static_range(1, 2 * RATIO):
        m = tl.maximum(
            m,
            _candidate(src_ptr, ape_ptr, score_state_ptr, b, start, S, f, valid, cols, T, HI, j, 1, TWO_HID),
            propagate_nan=tl.PropagateNan.ALL,  # a NaN gate makes the column's softmax NaN, as in torch
        )
    den = tl.exp(_candidate(src_ptr, ape_ptr, score_state_ptr, b, start, S, f, valid, cols, T, HI, 0, 1, TWO_HID) - m)
    for j in tl.static_range(1, 2 * RATIO):
        den += tl.exp(
            _candidate(src_ptr, ape_ptr, score_state_ptr, b, start, S, f, valid, cols, T, HI, j, 1, TWO_HID) - m
        )
    pooled = tl.zeros(m.shape, tl.float32)
    for j in tl.static_range(0, 2 * RATIO):
        e = tl.exp(_candidate(src_ptr, ape_ptr, score_state_ptr, b, start, S, f, valid, cols, T, HI, j, 1, TWO_HID) - m)
        kv = _candidate(src_ptr, ape_ptr, kv_state_ptr, b, start, S, f, valid, cols, T, HI, j, 0, TWO_HID)
        pooled += kv * tl.math.div_rn(e, den)
    return pooled


@triton.jit
def _close_tile(
    src_ptr, ape_ptr, kv_state_ptr, score_state_ptr, keys_ptr, key_scale_ptr, table_ptr, norm_w_ptr, cos_ptr, sin_ptr,
    b, start, S, k, n_close, T, HI, max_blocks, eps, hadamard_scale,
    HID: tl.constexpr, NOPE: tl.constexpr, HALF_R: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    KEY_CODE_MAX: tl.constexpr, KEY_AMAX_FLOOR: tl.constexpr,
):  # fmt: skip
    """The keys of closing blocks ``k [CLOSE_TILE]`` (``< n_close``) of row ``b``: pooled, RMSNorm,
    RoPE, Hadamard, quantized per row in the pool's format (``KEY_*``: ``IndexerState.key_format``) and
    stored in the pool through the block table."""
    valid = k < n_close
    r = start // RATIO + k  # cache row of each closing block
    f = r * RATIO  # its first position
    c_nope = tl.arange(0, NOPE)
    c_even = NOPE + 2 * tl.arange(0, HALF_R)
    k_nope = round_bf16(
        _pool(src_ptr, ape_ptr, kv_state_ptr, score_state_ptr, b, start, S, f, valid, c_nope, T, HI, 2 * HID)
    )
    k_even = round_bf16(
        _pool(src_ptr, ape_ptr, kv_state_ptr, score_state_ptr, b, start, S, f, valid, c_even, T, HI, 2 * HID)
    )
    k_odd = round_bf16(
        _pool(src_ptr, ape_ptr, kv_state_ptr, score_state_ptr, b, start, S, f, valid, c_even + 1, T, HI, 2 * HID)
    )

    amax = tl.maximum(tl.maximum(tl.max(tl.abs(k_nope), axis=1), tl.max(tl.abs(k_even), axis=1)),
                      tl.max(tl.abs(k_odd), axis=1))  # fmt: skip
    scale = overflow_scale(amax)[:, None]  # 1 unless the squares could overflow (dsv4.model.rms)
    k_nope, k_even, k_odd = k_nope * scale, k_even * scale, k_odd * scale
    sumsq = tl.sum(k_nope * k_nope, axis=1) + tl.sum(k_even * k_even, axis=1) + tl.sum(k_odd * k_odd, axis=1)
    eps_scaled = eps * scale * scale
    inv_rms = tl.math.div_rn(1.0, tl.math.sqrt_rn(sumsq[:, None] * (1.0 / HID) + eps_scaled))
    g_nope = tl.load(norm_w_ptr + c_nope).to(tl.float32)
    g_even = tl.load(norm_w_ptr + c_even).to(tl.float32)
    g_odd = tl.load(norm_w_ptr + c_even + 1).to(tl.float32)
    k_nope = round_bf16(k_nope * inv_rms * g_nope[None, :])
    k_even = round_bf16(k_even * inv_rms * g_even[None, :])
    k_odd = round_bf16(k_odd * inv_rms * g_odd[None, :])

    trig = f[:, None] * HALF_R + tl.arange(0, HALF_R)[None, :]  # RoPE at the block's first position
    cos = tl.load(cos_ptr + trig, mask=valid[:, None], other=0.0)
    sin = tl.load(sin_ptr + trig, mask=valid[:, None], other=0.0)
    k_even, k_odd = rope_pairs(k_even, k_odd, cos, sin)
    key = hadamard_rows(k_nope, round_bf16(k_even), round_bf16(k_odd), hadamard_scale, HID, NOPE, HALF_R)
    k8, k_scale = quantize_rows(round_bf16(key), KEY_CODE_MAX, KEY_AMAX_FLOOR)  # spec §2 of the bf16 key
    block = tl.load(table_ptr + b * max_blocks + r // BLOCK_SIZE, mask=valid, other=-1).to(tl.int64)
    held = valid & (block >= 0)
    slot = block * BLOCK_SIZE + r % BLOCK_SIZE
    k8 = k8.to(keys_ptr.dtype.element_ty)  # the pool's code dtype
    tl.store(keys_ptr + slot[:, None] * HID + tl.arange(0, HID)[None, :], k8, mask=held[:, None])
    tl.store(key_scale_ptr + slot, k_scale, mask=held)


@triton.jit
def _block_candidates(
    src_ptr, ape_ptr, state_ptr, b, start, S, f, j0, cols, T, HI, GATE: tl.constexpr, W: tl.constexpr,
    RC: tl.constexpr, COFF: tl.constexpr, CAND: tl.constexpr,
):  # fmt: skip
    """Candidates ``j0 .. j0 + CAND - 1`` of the block whose first position is ``f`` (a scalar): token
    ``q = f - (COFF-1)*RC + j``, columns ``cols [W]`` of its half (COFF 2: the previous block's
    ``[0, W)`` for ``j < RC``, the block's own ``[W, 2W)`` after) -> ``[CAND, W]`` fp32."""
    j = j0 + tl.arange(0, CAND)
    q = f - (COFF - 1) * RC + j
    valid = j < COFF * RC  # a ratio that is not a power of two leaves the last tile part empty
    v = _token_values(
        src_ptr, ape_ptr, state_ptr, b, start, S, q, valid, (j // RC * W)[:, None] + cols[None, :], T, HI,
        GATE, COFF * W, RC, COFF * RC,
    )  # fmt: skip
    if GATE:  # a candidate that does not exist weighs 0
        v = tl.where(valid[:, None], v, float("-inf"))
    return v


@triton.jit
def _close_fp8_row(
    src_ptr, ape_ptr, kv_state_ptr, score_state_ptr, nope_ptr, scale_ptr, rope_ptr, table_ptr, norm_w_ptr, cos_ptr,
    sin_ptr, b, start, S, k, T, HI, max_blocks, eps,
    W: tl.constexpr, NOPE: tl.constexpr, HALF_R: tl.constexpr, BLOCK_SIZE: tl.constexpr, RC: tl.constexpr,
    COFF: tl.constexpr, CAND: tl.constexpr, CAND_STAGES: tl.constexpr,
):  # fmt: skip
    """The attention compressor's row of closing block ``k`` (a scalar) of row ``b``: the softmax over
    its ``COFF*RC`` candidates per column (``CAND`` at a time: max, sum of exps, then the weighted sum,
    as ``_pool``; ``CAND_STAGES`` pipeline stages of each pass's tiles), RMSNorm, RoPE of the last ``R``
    entries at the block's first position, stored as an FP8 KV row (``store_fp8_rows``) at pool row
    ``r = start // RC + k`` through the block table."""
    r = start // RC + k  # compressed row of the block
    f = r * RC  # its first position
    n: tl.constexpr = COFF * RC
    cols = tl.arange(0, W)
    # what the epilogue reads depends on the block alone: asked for before the candidates, in the same round
    norm_w = tl.load(norm_w_ptr + cols).to(tl.float32)
    i = tl.arange(0, W // 2) - NOPE // 2  # a pair's index in the rope part (< 0: NOPE)
    is_rope = i >= 0
    cos = tl.load(cos_ptr + f * HALF_R + i, mask=is_rope, other=0.0)
    sin = tl.load(sin_ptr + f * HALF_R + i, mask=is_rope, other=0.0)
    block = tl.load(table_ptr + b * max_blocks + r // BLOCK_SIZE).to(tl.int64)
    m = tl.full([W], float("-inf"), tl.float32)
    den = tl.zeros([W], tl.float32)
    pooled = tl.zeros([W], tl.float32)
    if n <= CAND:  # one tile holds every candidate (CSA): loaded once, in one round of loads, for the three passes
        sc = _block_candidates(src_ptr, ape_ptr, score_state_ptr, b, start, S, f, 0, cols, T, HI, 1, W, RC, COFF, CAND)
        kv = _block_candidates(src_ptr, ape_ptr, kv_state_ptr, b, start, S, f, 0, cols, T, HI, 0, W, RC, COFF, CAND)
        m = tl.maximum(m, tl.max(sc, axis=0))
        den += tl.sum(tl.exp(sc - m[None, :]), axis=0)
        pooled += tl.sum(kv * tl.math.div_rn(tl.exp(sc - m[None, :]), den[None, :]), axis=0)
    else:
        for j0 in tl.range(0, n, CAND, num_stages=CAND_STAGES):
            sc = _block_candidates(
                src_ptr, ape_ptr, score_state_ptr, b, start, S, f, j0, cols, T, HI, 1, W, RC, COFF, CAND
            )  # fmt: skip
            m = tl.maximum(m, tl.max(sc, axis=0))  # a NaN or +inf gate makes the sum of exps NaN below, as in torch
        for j0 in tl.range(0, n, CAND, num_stages=CAND_STAGES):
            sc = _block_candidates(
                src_ptr, ape_ptr, score_state_ptr, b, start, S, f, j0, cols, T, HI, 1, W, RC, COFF, CAND
            )  # fmt: skip
            den += tl.sum(tl.exp(sc - m[None, :]), axis=0)
        for j0 in tl.range(0, n, CAND, num_stages=CAND_STAGES):
            sc = _block_candidates(
                src_ptr, ape_ptr, score_state_ptr, b, start, S, f, j0, cols, T, HI, 1, W, RC, COFF, CAND
            )  # fmt: skip
            kv = _block_candidates(src_ptr, ape_ptr, kv_state_ptr, b, start, S, f, j0, cols, T, HI, 0, W, RC, COFF,
                                   CAND)  # fmt: skip
            pooled += tl.sum(kv * tl.math.div_rn(tl.exp(sc - m[None, :]), den[None, :]), axis=0)

    v = round_bf16(pooled)[None, :]  # [1, W]
    c, inv = rms_scale(v, W, eps)
    v = round_bf16((v * c) * inv * norm_w[None, :])
    even, odd = tl.split(tl.reshape(v, [W // 2, 2]))  # the pairs (v[2i], v[2i+1])
    r_even, r_odd = rope_pairs(even, odd, cos, sin)
    even = tl.where(is_rope, round_bf16(r_even), even)
    odd = tl.where(is_rope, round_bf16(r_odd), odd)
    v = tl.reshape(tl.join(even, odd), [1, W])

    one = tl.zeros([1], tl.int64)
    store_fp8_rows(nope_ptr, scale_ptr, rope_ptr, one + block * BLOCK_SIZE + r % BLOCK_SIZE, one + block >= 0, v,
                   NOPE, 2 * HALF_R)  # fmt: skip


@triton.jit
def _update_ring(
    src_ptr, ape_ptr, kv_state_ptr, score_state_ptr, b, start, S, T, HI, TWO_HID: tl.constexpr, RC: tl.constexpr,
    N_SLOTS: tl.constexpr,
):  # fmt: skip
    """Write row ``b``'s ring in its final state: slot ``q % N_SLOTS`` <- token ``q`` for the last (up to
    ``N_SLOTS``) positions of the step, from the projections (other slots keep their values), in tiles
    of ``RING_TOKENS`` tokens x ``RING_COLS`` columns. Called after the row's closes, which may read
    the pre-step values of those slots: a barrier first."""
    tl.debug_barrier()  # every pre-step ring read of this program (the closes) is done before the ring changes
    for t0 in tl.range(tl.maximum(S - N_SLOTS, 0), S, RING_TOKENS, num_stages=1):
        s = t0 + tl.arange(0, RING_TOKENS)
        new = s < S
        q = start + s
        dst = (b * N_SLOTS + q % N_SLOTS)[:, None] * TWO_HID
        for c0 in tl.static_range(0, TWO_HID, RING_COLS):
            cols = c0 + tl.arange(0, RING_COLS)[None, :]
            kv = kvg_rows(src_ptr, ape_ptr, b * S + s, q, cols, new[:, None], T, HI, 0, TWO_HID, 1, RC)
            sc = kvg_rows(src_ptr, ape_ptr, b * S + s, q, cols, new[:, None], T, HI, 1, TWO_HID, 1, RC)
            tl.store(kv_state_ptr + dst + cols, kv, mask=new[:, None])
            tl.store(score_state_ptr + dst + cols, sc, mask=new[:, None])


@triton.jit
def _sum_row_slices(xp_ptr, dst_ptr, b, S, T, HI, TWO_HID: tl.constexpr, SPLITS: tl.constexpr,
                    SUM_BLOCK: tl.constexpr):  # fmt: skip
    """Row ``b``'s tokens (all their columns) of the x-projection's ``SPLITS`` K-slices, added in slice
    order, into ``dst`` (laid out as one slice), ``SUM_BLOCK`` values a step (``split_k.sum_block``). The
    row's tokens are contiguous: summed as one run."""
    n_out = 2 * TWO_HID + HI
    n = S * n_out
    lo = b * n
    for i0 in tl.range(0, n, SUM_BLOCK, num_stages=1):  # the slices' loads are the pipeline
        i = i0 + tl.arange(0, SUM_BLOCK)
        tl.store(dst_ptr + lo + i, sum_k_slices(xp_ptr + lo + i, i < n, T * n_out, SPLITS), mask=i < n)


@triton.jit
def close_chunk(
    c, b, start, src_ptr, ape_ptr, kv_state_ptr, score_state_ptr, keys_ptr, key_scale_ptr, rope_ptr,
    table_ptr, norm_w_ptr, cos_ptr, sin_ptr, S, T, HI, max_blocks, eps, hadamard_scale,
    HID: tl.constexpr, NOPE: tl.constexpr, HALF_R: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    KEY_CODE_MAX: tl.constexpr, KEY_AMAX_FLOOR: tl.constexpr, RC: tl.constexpr, COFF: tl.constexpr,
    CHUNK: tl.constexpr, FP8_ROWS: tl.constexpr, CAND: tl.constexpr, CAND_STAGES: tl.constexpr,
):  # fmt: skip
    """Chunk ``c`` of row ``b``'s closing blocks (``[c, c+1) * CHUNK``); chunk 0 also writes the ring.

    ``src`` holds the step's projections as one slice (the x-projection's, or their K-slices added).
    ``FP8_ROWS``: the attention's compressor (ratio ``RC``, ``COFF`` windows, rows of ``HID``), one
    FP8 KV row per block; else the indexer's (ratio 4, overlapping), INT8 keys ``CLOSE_TILE`` blocks
    at a time."""
    n_close = (start + S) // RC - start // RC
    lo = c * CHUNK
    hi = tl.minimum(lo + CHUNK, n_close)
    if FP8_ROWS:
        for k in tl.range(lo, hi, num_stages=1):  # L1 and L2 serve the candidates
            _close_fp8_row(
                src_ptr, ape_ptr, kv_state_ptr, score_state_ptr, keys_ptr, key_scale_ptr, rope_ptr, table_ptr,
                norm_w_ptr, cos_ptr, sin_ptr, b, start, S, k, T, HI, max_blocks, eps,
                HID, NOPE, HALF_R, BLOCK_SIZE, RC, COFF, CAND, CAND_STAGES,
            )  # fmt: skip
    else:
        for k0 in tl.range(lo, hi, _TILE, num_stages=1):  # L1 serves the candidates
            _close_tile(
                src_ptr, ape_ptr, kv_state_ptr, score_state_ptr, keys_ptr, key_scale_ptr, table_ptr, norm_w_ptr,
                cos_ptr, sin_ptr, b, start, S, k0 + tl.arange(0, _TILE), hi, T, HI,
                max_blocks, eps, hadamard_scale, HID, NOPE, HALF_R, BLOCK_SIZE, KEY_CODE_MAX, KEY_AMAX_FLOOR,
            )  # fmt: skip
    if c == 0:
        _update_ring(src_ptr, ape_ptr, kv_state_ptr, score_state_ptr, b, start, S, T, HI, COFF * HID, RC, COFF * RC)


# A block table's width is the caller's cache size: not specialized on (== 1, divisible by 16), one variant
# serves every width (its loads are gathers either way).
@triton.jit(do_not_specialize=["max_blocks"])
def _compressor_step_kernel(
    xp_ptr,  # [SPLITS, B*S, 2*COFF*HID + HI] fp32: raw K-slices of the kv | gate (| head weight) projections
    kvg_ptr,  # [B*S, 2*COFF*HID + HI] fp32 scratch: the slices added (SPLITS > 1)
    ape_ptr,  # [RC, COFF*HID] fp32
    start_ptr,  # [B] int64
    kv_state_ptr,  # [Bs, COFF*RC, COFF*HID] fp32, updated
    score_state_ptr,  # [Bs, COFF*RC, COFF*HID] fp32, updated
    keys_ptr,  # the pool's codes: [num_blocks, BLOCK_SIZE, HID] int8 keys | [.., NOPE] uint8 (e4m3 bits)
    key_scale_ptr,  # its scales: [num_blocks, BLOCK_SIZE] fp32 | [.., 8] uint8
    rope_ptr,  # FP8_ROWS: the pool's bf16 tail [num_blocks, BLOCK_SIZE, R] (else unused)
    table_ptr,  # [Bs, max_blocks] int32 block table (-1: no block, the row is not written)
    norm_w_ptr,  # [HID] bf16|fp32
    cos_ptr,  # [P, R/2] fp32
    sin_ptr,
    S,
    HI,
    max_blocks,
    eps,
    hadamard_scale,
    HID: tl.constexpr,  # the row width W
    NOPE: tl.constexpr,
    HALF_R: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    SPLITS: tl.constexpr,
    KEY_CODE_MAX: tl.constexpr,  # the key pool's format (IndexerState.key_format.constexprs)
    KEY_AMAX_FLOOR: tl.constexpr,
    RC: tl.constexpr,  # the compress ratio
    COFF: tl.constexpr,  # 2: overlapping windows (ratio 4), 1: disjoint
    CHUNK: tl.constexpr,  # closing blocks per program
    FP8_ROWS: tl.constexpr,  # the attention's compressor (FP8 KV rows), else the indexer's (INT8 keys)
    CAND: tl.constexpr,  # FP8_ROWS: candidates pooled at once
    CAND_STAGES: tl.constexpr,  # FP8_ROWS: pipeline stages of the candidate tiles (more than one tile: HCA)
    SUM_BLOCK: tl.constexpr,  # values a step when chunk 0 adds the K-slices (sum_block)
    PDL: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    if PDL:
        gdc_launch_dependents()  # the next launch may be scheduled: it waits for this grid to complete
        gdc_wait()  # the front launch's K-slices are complete and visible
    # after the wait: this launch may start before the one ahead of the front has finished (the front
    # releases it before its own wait), and that one may have written start (an engine's positions)
    start = tl.load(start_ptr + b)  # in flight while the slices are added: they do not depend on it
    T = tl.num_programs(0) * S
    if SPLITS > 1:  # one chunk a row then (_step): it adds the row's K-slices into kvg first
        _sum_row_slices(xp_ptr, kvg_ptr, b, S, T, HI, COFF * HID, SPLITS, SUM_BLOCK)
        tl.debug_barrier()  # the sums are stored before any thread of the program reads them
        src_ptr = kvg_ptr
    else:
        src_ptr = xp_ptr
    if c * CHUNK < tl.maximum((start + S) // RC - start // RC, 1):
        close_chunk(
            c, b, start, src_ptr, ape_ptr, kv_state_ptr, score_state_ptr, keys_ptr, key_scale_ptr, rope_ptr,
            table_ptr, norm_w_ptr, cos_ptr, sin_ptr, S, T, HI, max_blocks, eps, hadamard_scale,
            HID, NOPE, HALF_R, BLOCK_SIZE, KEY_CODE_MAX, KEY_AMAX_FLOOR, RC, COFF, CHUNK, FP8_ROWS, CAND, CAND_STAGES,
        )  # fmt: skip


STEP_TUNING = Tunable(
    "compressor.step",
    "_compressor_step_kernel: ring update, the closing blocks' keys, the K-slices summed (compressor launch 2, "
    "indexer launch 2)",
    dims=("B", "S", "N", "K"),  # N, K: the projection's columns and K-slices, which differ per caller
    pow2_dims=("B", "S"),
    params=(
        Param("num_warps", NUM_WARPS, (4, 8, 16), "warps per chunk program", compiled_only=True),
        Param("pdl", True, (False, True), "programmatic dependent launch (sm_90)", exact=True, compiled_only=True),
    ),
    candidates=({"num_warps": 4}, {"num_warps": 16}, {"pdl": False}),
)

KV_STEP_TUNING = Tunable(
    "kv_compressor.step",
    "_compressor_step_kernel with FP8 rows: ring update, the closing blocks' FP8 KV rows, the K-slices summed "
    "(kv_compressor launch 2)",
    dims=("B", "S", "RC"),
    pow2_dims=("B", "S"),
    params=(
        Param("cand_tile", CAND_TILE, (4, 8, 16, 32), "candidates pooled per step (at most COFF*RC are used)"),
        Param(
            "cand_stages",
            CAND_STAGES,
            (1, 2),
            "pipeline stages of an HCA close's candidate tiles (the same sums)",
            exact=True,
            compiled_only=True,
        ),
        Param("num_warps", KV_NUM_WARPS, (4, 8, 16), "warps per chunk program", compiled_only=True),
        Param("pdl", True, (False, True), "programmatic dependent launch (sm_90)", exact=True, compiled_only=True),
    ),
    candidates=(
        {"cand_tile": 4},
        {"cand_tile": 8},
        {"cand_stages": 2},
        {"num_warps": 4},
        {"num_warps": 8},
        {"pdl": False},
    ),
)


def _step(
    xp: torch.Tensor, w: CompressorWeights, pos: StepPositions, rope: RopeTable, eps: float, ws: Workspace | None,
    name: str, cfg: Config, ring: tuple[torch.Tensor, torch.Tensor], pool: tuple[torch.Tensor, ...],
    table: torch.Tensor, block_size: int, fp8_rows: bool, **consts: float,
) -> torch.Tensor:  # fmt: skip
    """The step launch of either compressor (``ring``: kv_state, score_state; ``pool``: codes, scales,
    tail), after a launch that adds ``xp``'s K-slices when a row's would take the step program more
    than ``SUM_STEPS_MAX`` steps; returns the summed projection (``name.kvg`` from ``ws``; ``xp[0]``
    with one slice)."""
    hid, ratio = w.norm_w.shape[0], w.ape.shape[0]
    coff = w.wkv.shape[0] // hid
    nope, half_r = hid - rope.rope_dim, rope.rope_dim // 2
    splits = xp.shape[0]
    pdl = cfg.pdl and pdl_supported(xp.device)
    chunk = coff if fp8_rows else CLOSE_TILE  # the blocks that may read the pre-step ring share chunk 0
    grid = (pos.batch, max(1, triton.cdiv(-(-pos.seq // ratio), chunk)))
    block = sum_block(splits, cfg.num_warps)
    if splits == 1:
        kvg = xp[0]
    else:
        kvg = scratch(ws, f"{name}.kvg", xp.shape[1:], torch.float32, xp.device)
        if triton.cdiv(pos.seq * xp.shape[2], block) > SUM_STEPS_MAX or grid[1] > 1:  # a row's one chunk adds its own
            sum_slices(xp, kvg, pdl)  # the same sums, in slice order, spread over the GPU
            xp, splits = kvg[None], 1
    _compressor_step_kernel[grid](
        xp, kvg, w.ape, pos.start, *ring, *pool, table, w.norm_w, rope.cos, rope.sin, pos.seq,
        xp.shape[2] - 2 * coff * hid, table.shape[1], eps, hid**-0.5,
        HID=hid, NOPE=nope, HALF_R=half_r, BLOCK_SIZE=block_size, SPLITS=splits, **consts, RC=ratio, COFF=coff,
        CHUNK=chunk, FP8_ROWS=fp8_rows, CAND=min(cfg.get("cand_tile", CAND_TILE), triton.next_power_of_2(coff * ratio)),
        CAND_STAGES=cfg.get("cand_stages", CAND_STAGES), SUM_BLOCK=block, PDL=pdl,
        num_warps=cfg.num_warps, enable_fp_fusion=False, launch_pdl=pdl,
    )  # fmt: skip
    return kvg


def compressor_step(
    xp: torch.Tensor, w: CompressorWeights, state: IndexerState, pos: StepPositions, rope: RopeTable, eps: float,
    ws: Workspace | None = None,
) -> torch.Tensor:  # fmt: skip
    """Advance the ring of rows ``0..B-1`` of ``state`` over one step and write the closed blocks'
    keys, quantized, into the key pool of ``state`` (spec §4 steps 2-3); one launch.

    ``xp [SPLITS, B*S, 4*HID + HI] fp32``: the raw K-slices of the kv | gate (| head weight)
    projections (``index_front``). Returns the projection summed over its slices in slice order,
    ``[B*S, 4*HID + HI] fp32`` (scratch from ``ws``; ``xp[0]`` when there is one slice).
    """
    split_head_dims(w.norm_w.shape[0], rope.rope_dim)
    cfg = STEP_TUNING.config(xp.device, B=pos.batch, S=pos.seq, N=xp.shape[2], K=xp.shape[0])
    return _step(
        xp, w, pos, rope, eps, ws, "compressor", cfg, (state.kv_state, state.score_state),
        (state.keys, state.key_scale, state.keys), state.block_table, state.block_size, False,
        **state.key_format.constexprs("KEY_"),
    )  # fmt: skip


def indexer_compressor(
    x: torch.Tensor,
    w: CompressorWeights,
    state: IndexerState,
    pos: StepPositions,
    rope: RopeTable,
    eps: float,
    ws: Workspace | None = None,
) -> None:
    """``x [B, S, D] bf16``; updates rows ``0..B-1`` of ``state`` in place (spec §4).

    Two launches: the x-side projection (``wkv``, ``wgate``; the front launch without the query path)
    and the compressor step (which adds the projection's K-slices and ``ape`` as it reads them); three
    where a row is too long for its step program to add its slices in a few steps (``split_k.sum_slices``).
    """
    check_front_dims(x.shape[-1], w)  # the front launch's limits, then the step's, all before the first launch
    split_head_dims(w.norm_w.shape[0], rope.rope_dim)
    xp, _, _ = front(x, w, pos, ws=ws)
    compressor_step(xp, w, state, pos, rope, eps, ws)


def check_kv_dims(d: int, w: CompressorWeights, x: str = "x") -> None:
    """``ValueError`` naming what ``kv_compressor``'s launches cannot take: a row width ``HD``
    (``w.norm_w``) that is not a power of two, or the front launch's dims (``check_front_dims``: the
    hidden size ``d``, which ``x`` names, and ``w.wkv``'s rows)."""
    hd = w.norm_w.shape[0]
    require(is_pow2(hd), "w.norm_w", f"a row width HD that is a power of two, got {hd}")
    check_front_dims(d, w, x=x)


def kv_compressor(
    x: torch.Tensor,
    w: CompressorWeights,
    state: CompressorState,
    pos: StepPositions,
    rope: RopeTable,
    eps: float,
    ws: Workspace | None = None,
) -> None:
    """``x [B, S, D] bf16``; updates slots ``0..B-1`` of ``state`` in place: the ring slot of every
    position of the step and one FP8 KV row per closed block (attention spec §3).

    Two launches: the x-side projection (``front`` without queries: ``wkv``, ``wgate``) and the
    compressor step with FP8 rows, ``(B, ceil(ceil(S / RC) / COFF))`` programs; three where a row is
    long (its K-slices added by ``split_k.sum_slices`` first).
    """
    ratio = w.ape.shape[0]
    check_kv_dims(x.shape[-1], w)
    xp, _, _ = front(x, w, pos, ws=ws, name="kv_compressor")
    cfg = KV_STEP_TUNING.config(x.device, B=pos.batch, S=pos.seq, RC=ratio)
    p = state.pool
    _step(
        xp, w, pos, rope, eps, ws, "kv_compressor", cfg, (state.kv_state, state.score_state),
        (p.nope.view(torch.uint8), p.scale, p.rope), p.block_table, p.block_size, True, KEY_CODE_MAX=0,
        KEY_AMAX_FLOOR=0,
    )  # fmt: skip

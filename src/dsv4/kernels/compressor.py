"""Fused ratio-4 compressor step (spec §4): ring-slot writes and, for every block of 4 positions
that closes in the step, softmax pooling, RMSNorm, RoPE, Hadamard, and the INT8 row (quantized per row,
with its scale) stored in the key pool through the block table.

Why it can run in parallel: the block closing at position ``p`` (first position ``f = p - 3``)
pools exactly the tokens ``q = f - 4 + j``, ``j = 0..7`` — columns ``[0, HID)`` of the previous
block's tokens and ``[HID, 2*HID)`` of its own. A token of this step (``q >= start``) comes from
the step's projections; an earlier token comes from the pre-step ring: slot ``j`` (``j >= 4``,
this block) or, for the previous block, slot ``4 + j`` if that block closed in this step
(``f - 1 >= start``: the shift copied slots 4..7 to 0..3, and slot ``4 + j`` still held it) and
slot ``j`` if it closed before. So every closing block is computed independently from the
projections and the pre-step ring, and the ring's final state is written once at the end:
slot ``4 + i`` holds the last token ``q <= L`` with ``q % 4 == i`` (``L`` the step's last
position) if the step wrote it, and when a block closed, slot ``i`` holds the last closed
block's token ``i`` (this step's projection, or the pre-step slot ``4 + i``).

Grid ``(B, ceil(max closing blocks / BLOCKS_PER_PROGRAM))``: program ``(b, g)`` pools closing
blocks ``g*16 .. g*16+15`` of row ``b``. Only the first two closing blocks of a row can read the
pre-step ring (``f - 4 < start``); both belong to program ``(b, 0)``, which also writes the ring,
after a barrier — so no program reads a ring slot after it is overwritten.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..model.config import COMPRESS_RATIO
from ..model.rope import RopeTable
from ..model.state import STATE_SLOTS, IndexerState
from ..model.structs import StepPositions
from ..model.weights import CompressorWeights
from .epilogue import quantize_int8_rows, round_bf16
from .head_rotation import hadamard_rows, hadamard_signs, rope_pairs, split_head_dims
from .workspace import Workspace
from .x_proj import x_projection

BLOCKS_PER_PROGRAM = 16  # closing blocks pooled per program: the Hadamard tl.dot needs M >= 16 rows
assert BLOCKS_PER_PROGRAM >= 2, "the (at most two) blocks that read the pre-step ring must share program 0"
NUM_WARPS = 8  # pooling and Hadamard tiles of 16 blocks: 221 registers on sm_90 (Triton 3.9), no spills;
#                4 warps: 242, no spills either (which is faster is owed to a GPU measurement)
RATIO = tl.constexpr(COMPRESS_RATIO)
SLOTS = tl.constexpr(STATE_SLOTS)


@triton.jit
def _candidate(
    kvg_ptr, state_ptr, b, start, S, f, valid, cols, j: tl.constexpr, GATE: tl.constexpr, TWO_HID: tl.constexpr
):
    """Candidate ``j`` (token ``f - 4 + j``) of each closing block, columns ``cols`` of its half:
    ``[BLOCKS, len(cols)]`` fp32 from this step's projections or the pre-step ring ``state_ptr``."""
    q = f - 4 + j
    from_proj = valid & (q >= start)
    from_ring = valid & (q < start)
    if j < RATIO:  # previous block, columns [0, HID): slot 4+j if it closed in this step, else slot j
        half = 0
        slot = tl.where(f - 1 >= start, RATIO + j, j)
    else:  # this block, columns [HID, 2*HID)
        half = TWO_HID // 2
        slot = tl.full(f.shape, j, tl.int64)
    proj_row = b * S + (q - start)
    proj = tl.load(
        kvg_ptr + proj_row[:, None] * (2 * TWO_HID) + (GATE * TWO_HID + half) + cols[None, :],
        mask=from_proj[:, None],
        other=0.0,
    )
    ring = tl.load(
        state_ptr + (b * SLOTS + slot)[:, None] * TWO_HID + half + cols[None, :], mask=from_ring[:, None], other=0.0
    )
    return tl.where(from_proj[:, None], proj, ring)


@triton.jit
def _pool(kvg_ptr, kv_state_ptr, score_state_ptr, b, start, S, f, valid, cols, TWO_HID: tl.constexpr):
    """Softmax over the 8 candidates of each column, then the weighted sum: ``[BLOCKS, len(cols)]`` fp32.

    Three passes over the candidates (max; sum of exps; sum of ``kv * exp/sum`` in candidate
    order) so that ``-inf`` gates of never-written slots weigh exactly 0 and the roundings follow
    the reference's softmax-then-sum: fewer pooled values land on the other side of a bf16
    rounding boundary. Repeated candidate loads hit L1.
    """
    m = _candidate(kvg_ptr, score_state_ptr, b, start, S, f, valid, cols, 0, 1, TWO_HID)
    for j in tl.static_range(1, 2 * RATIO):
        m = tl.maximum(
            m,
            _candidate(kvg_ptr, score_state_ptr, b, start, S, f, valid, cols, j, 1, TWO_HID),
            propagate_nan=tl.PropagateNan.ALL,  # a NaN gate makes the column's softmax NaN, as in torch
        )
    den = tl.exp(_candidate(kvg_ptr, score_state_ptr, b, start, S, f, valid, cols, 0, 1, TWO_HID) - m)
    for j in tl.static_range(1, 2 * RATIO):
        den += tl.exp(_candidate(kvg_ptr, score_state_ptr, b, start, S, f, valid, cols, j, 1, TWO_HID) - m)
    pooled = tl.zeros(m.shape, tl.float32)
    for j in tl.static_range(0, 2 * RATIO):
        e = tl.exp(_candidate(kvg_ptr, score_state_ptr, b, start, S, f, valid, cols, j, 1, TWO_HID) - m)
        pooled += _candidate(kvg_ptr, kv_state_ptr, b, start, S, f, valid, cols, j, 0, TWO_HID) * tl.math.div_rn(e, den)
    return pooled


@triton.jit
def _compressor_step_kernel(
    kvg_ptr,  # [B*S, 4*HID] fp32: kv projection | gate + ape, token t = b*S + s
    start_ptr,  # [B] int64
    kv_state_ptr,  # [Bs, 8, 2*HID] fp32, updated
    score_state_ptr,  # [Bs, 8, 2*HID] fp32, updated
    keys_ptr,  # [num_blocks, BLOCK_SIZE, HID] int8 pool, one row per closed block written
    key_scale_ptr,  # [num_blocks, BLOCK_SIZE] fp32
    table_ptr,  # [Bs, max_blocks] int32 block table (-1: no block, the row is not written)
    norm_w_ptr,  # [HID] bf16|fp32
    cos_ptr,  # [P, R/2] fp32
    sin_ptr,
    signs_ptr,  # [HID, HID] fp32 Hadamard signs
    S,
    max_blocks,
    eps,
    hadamard_scale,
    HID: tl.constexpr,
    NOPE: tl.constexpr,
    HALF_R: tl.constexpr,
    BLOCKS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    start = tl.load(start_ptr + b)
    first_block = start // RATIO
    n_close = (start + S) // RATIO - first_block
    if g * BLOCKS < n_close:
        k = g * BLOCKS + tl.arange(0, BLOCKS)
        valid = k < n_close
        r = first_block + k  # cache row of each closing block
        f = r * RATIO  # its first position
        c_nope = tl.arange(0, NOPE)
        c_even = NOPE + 2 * tl.arange(0, HALF_R)
        k_nope = round_bf16(_pool(kvg_ptr, kv_state_ptr, score_state_ptr, b, start, S, f, valid, c_nope, 2 * HID))
        k_even = round_bf16(_pool(kvg_ptr, kv_state_ptr, score_state_ptr, b, start, S, f, valid, c_even, 2 * HID))
        k_odd = round_bf16(_pool(kvg_ptr, kv_state_ptr, score_state_ptr, b, start, S, f, valid, c_even + 1, 2 * HID))

        sumsq = tl.sum(k_nope * k_nope, axis=1) + tl.sum(k_even * k_even, axis=1) + tl.sum(k_odd * k_odd, axis=1)
        inv_rms = tl.math.div_rn(tl.full(sumsq.shape, 1.0, tl.float32), tl.math.sqrt_rn(sumsq * (1.0 / HID) + eps))
        g_nope = tl.load(norm_w_ptr + c_nope).to(tl.float32)
        g_even = tl.load(norm_w_ptr + c_even).to(tl.float32)
        g_odd = tl.load(norm_w_ptr + c_even + 1).to(tl.float32)
        k_nope = round_bf16(k_nope * inv_rms[:, None] * g_nope[None, :])
        k_even = round_bf16(k_even * inv_rms[:, None] * g_even[None, :])
        k_odd = round_bf16(k_odd * inv_rms[:, None] * g_odd[None, :])

        trig = f[:, None] * HALF_R + tl.arange(0, HALF_R)[None, :]  # RoPE at the block's first position
        cos = tl.load(cos_ptr + trig, mask=valid[:, None], other=0.0)
        sin = tl.load(sin_ptr + trig, mask=valid[:, None], other=0.0)
        k_even, k_odd = rope_pairs(k_even, k_odd, cos, sin)
        key = hadamard_rows(k_nope, round_bf16(k_even), round_bf16(k_odd), signs_ptr, hadamard_scale, HID, NOPE, HALF_R)
        k8, k_scale = quantize_int8_rows(round_bf16(key))  # spec §2 of the bf16 key: quantized on write
        block = tl.load(table_ptr + b * max_blocks + r // BLOCK_SIZE, mask=valid, other=-1).to(tl.int64)
        held = valid & (block >= 0)
        slot = block * BLOCK_SIZE + r % BLOCK_SIZE
        tl.store(keys_ptr + slot[:, None] * HID + tl.arange(0, HID)[None, :], k8, mask=held[:, None])
        tl.store(key_scale_ptr + slot, k_scale, mask=held)

    if g == 0:  # the ring's final state
        last = start + S - 1
        i = tl.arange(0, RATIO).to(tl.int64)
        cols = tl.arange(0, 2 * HID)
        # slots 4+i: the last token q <= last with q % 4 == i, if this step wrote it
        q_cur = last - (last - i + RATIO) % RATIO
        cur_new = q_cur >= start
        cur_src = kvg_ptr + (b * S + q_cur - start)[:, None] * (4 * HID) + cols[None, :]
        kv_cur = tl.load(cur_src, mask=cur_new[:, None], other=0.0)
        sc_cur = tl.load(cur_src + 2 * HID, mask=cur_new[:, None], other=0.0)
        # slots 0..3 (when a block closed): token i of the last closed block
        q_prev = RATIO * ((start + S) // RATIO) - RATIO + i
        closed = q_prev - i + (RATIO - 1) >= start  # [4], all equal: the last closed block ends in this step
        prev_new = q_prev >= start  # implies closed
        prev_old = closed & (q_prev < start)
        prev_src = kvg_ptr + (b * S + q_prev - start)[:, None] * (4 * HID) + cols[None, :]
        ring_src = (b * SLOTS + RATIO + i)[:, None] * (2 * HID) + cols[None, :]
        kv_prev = tl.where(
            prev_new[:, None],
            tl.load(prev_src, mask=prev_new[:, None], other=0.0),
            tl.load(kv_state_ptr + ring_src, mask=prev_old[:, None], other=0.0),
        )
        sc_prev = tl.where(
            prev_new[:, None],
            tl.load(prev_src + 2 * HID, mask=prev_new[:, None], other=0.0),
            tl.load(score_state_ptr + ring_src, mask=prev_old[:, None], other=0.0),
        )
        tl.debug_barrier()  # every pre-step ring read of this program is done before the ring is overwritten
        dst_cur = (b * SLOTS + RATIO + i)[:, None] * (2 * HID) + cols[None, :]
        tl.store(kv_state_ptr + dst_cur, kv_cur, mask=cur_new[:, None])
        tl.store(score_state_ptr + dst_cur, sc_cur, mask=cur_new[:, None])
        dst_prev = (b * SLOTS + i)[:, None] * (2 * HID) + cols[None, :]
        tl.store(kv_state_ptr + dst_prev, kv_prev, mask=closed[:, None])
        tl.store(score_state_ptr + dst_prev, sc_prev, mask=closed[:, None])


def compressor_step(
    kvg: torch.Tensor, w: CompressorWeights, state: IndexerState, pos: StepPositions, rope: RopeTable, eps: float
) -> None:
    """Advance the ring of rows ``0..B-1`` of ``state`` over one step and write the closed blocks'
    keys, quantized, into the key pool of ``state`` (spec §4 steps 2-3); one launch.

    ``kvg [B*S, 4*HID] fp32`` from ``x_projection`` (kv projection | gate + ape).
    """
    hid = w.norm_w.shape[0]
    nope, half_r = split_head_dims(hid, rope.rope_dim)
    grid = (pos.batch, max(1, triton.cdiv(pos.max_closing_blocks, BLOCKS_PER_PROGRAM)))
    _compressor_step_kernel[grid](
        kvg, pos.start, state.kv_state, state.score_state, state.keys, state.key_scale, state.block_table, w.norm_w,
        rope.cos, rope.sin, hadamard_signs(hid, kvg.device), pos.seq, state.block_table.shape[1], eps, hid**-0.5,
        HID=hid, NOPE=nope, HALF_R=half_r, BLOCKS=BLOCKS_PER_PROGRAM, BLOCK_SIZE=state.block_size,
        num_warps=NUM_WARPS, enable_fp_fusion=False,
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

    Two launches: the x-side projection (``wkv``, ``wgate`` + ``ape``) and the compressor step.
    """
    b, s, d = x.shape
    kvg, _ = x_projection(x.view(b * s, d), w, pos, ws=ws)
    compressor_step(kvg, w, state, pos, rope, eps)

"""Lightning-indexer scores (spec §5 steps 4-5): INT8 queries against the INT8 key pool.

One program owns one batch row and a block of ``KEYS_PER_PROGRAM`` compressed rows. It looks up
each row's pool block in the block table, reads the block's INT8 keys and their fp32 scales once
(quantized when they were written: nothing is quantized here), and then, for each of the step's S
query tokens, runs one INT8 ``tl.dot`` of the keys against all HI heads of that token (int32
accumulator), dequantizes by ``q_scale``, applies ReLU, reduces over heads with the head weights,
multiplies by the key scale (after the head sum, spec §5) and stores one fp32 score per key. Keys
past a token's causal visible length ``vis = (start + s + 1) // 4`` get ``MASKED_SCORE``; rows past
``cache_len = (start + S) // 4`` are never loaded, nor are their block-table entries.

The keys are the only large read (``cache_len * (HID + 4)`` bytes per batch row: 132 B a key at
HID=128); queries, scales and weights are ``S*HI*(HID + 8)`` bytes per row, re-read from L2 by
every key block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..model.config import COMPRESS_RATIO
from ..model.state import IndexerState
from ..model.structs import MASKED_SCORE, StepPositions
from .launch import is_pow2, require

KEYS_PER_PROGRAM = 128  # 128 keys x 132 B (INT8 row + fp32 scale, HID=128) = 16.5 KB of keys per
# program, the operand of one [128, 128] x [128, HI] INT8 MMA. ptxas (sm_90, 4 warps, HI=64, as
# launched): 128 registers (Triton 3.9 and 3.6), no spills, 40.5 KiB of shared memory, so three programs
# share an SM. Every program re-reads its tokens' query
# rows (S*HI*136 B = 17 KB at S=2, HI=64) from L2, as many bytes as its keys. 262144 keys at B=1 make
# 2048 programs, flash decode (B=64, 2048 keys) 1024: several waves of 132 SMs.
SCORE_WARPS = 4  # one warpgroup runs the INT8 MMA of a [128, 128] x [128, HI] tile
MIN_DOT_WIDTH = 16  # tl.dot needs every dimension >= 16: fewer heads are zero-padded up to it

_MASKED = tl.constexpr(MASKED_SCORE)
_RATIO = tl.constexpr(COMPRESS_RATIO)


@triton.jit
def _index_score_kernel(
    q8_ptr,  # [B, S, HEADS, HEAD_DIM] int8
    q_scale_ptr,  # [B, S, HEADS] fp32
    weights_ptr,  # [B, S, HEADS] fp32
    keys_ptr,  # [num_blocks, BLOCK_SIZE, HEAD_DIM] int8 pool
    key_scale_ptr,  # [num_blocks, BLOCK_SIZE] fp32
    table_ptr,  # [Bs, max_blocks] int32 block table
    start_ptr,  # [B] int64
    score_ptr,  # [B, S, n_keys] fp32
    seq,
    n_keys,
    max_blocks,
    HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    KEYS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    block = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    start = tl.load(start_ptr + b)
    cache_len = (start + seq) // _RATIO

    key = block * KEYS + tl.arange(0, KEYS)
    present = key < cache_len
    pool_block = tl.load(table_ptr + b * max_blocks + key // BLOCK_SIZE, mask=present, other=0).to(tl.int64)
    slot = pool_block * BLOCK_SIZE + key % BLOCK_SIZE
    dim = tl.arange(0, HEAD_DIM)
    # Keys are read once: ".cg" keeps them out of L1, where the queries every key block re-reads stay.
    key_rows = keys_ptr + slot[:, None] * HEAD_DIM + dim[None, :]
    k8 = tl.load(key_rows, mask=present[:, None], other=0, cache_modifier=".cg")
    k_scale = tl.load(key_scale_ptr + slot, mask=present, other=0.0)

    head = tl.arange(0, HEADS_PAD)
    head_ok = head < HEADS
    for s in range(seq):
        tok = b * seq + s
        q8_t = tl.load(  # [HEAD_DIM, HEADS_PAD]: the token's heads as the dot's right operand
            q8_ptr + (tok * HEADS + head[None, :]) * HEAD_DIM + dim[:, None], mask=head_ok[None, :], other=0
        )
        q_scale = tl.load(q_scale_ptr + tok * HEADS + head, mask=head_ok, other=0.0)
        weight = tl.load(weights_ptr + tok * HEADS + head, mask=head_ok, other=0.0)
        dots = tl.dot(k8, q8_t, out_dtype=tl.int32).to(tl.float32)  # [KEYS, HEADS_PAD]
        # ReLU that keeps NaN (torch.relu does; the default maxNum would turn a NaN logit into 0)
        logits = tl.maximum(dots * q_scale[None, :], 0.0, propagate_nan=tl.PropagateNan.ALL)
        score = tl.sum(logits * weight[None, :], axis=1) * k_scale  # the key scale after the head sum
        visible = (start + s + 1) // _RATIO
        score = tl.where(key < visible, score, _MASKED)
        tl.store(score_ptr + tok * n_keys + key, score, mask=key < n_keys)


def index_scores(
    q8: torch.Tensor,
    q_scale: torch.Tensor,
    weights: torch.Tensor,
    state: IndexerState,
    pos: StepPositions,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scores of every visible cache row for every query token (spec §5 steps 4-5).

    ``q8 [B, S, HI, HID] int8`` and ``q_scale [B, S, HI] fp32``: the rotated queries quantized per
    head row; ``weights [B, S, HI] fp32``: head weights, already scaled by ``HID^-0.5 * HI^-0.5``;
    ``state``: the key pool (``keys``, ``key_scale``) and its ``block_table`` (slots ``0..B-1`` are
    used). Returns ``score [B, S, pos.max_cache_len] fp32``, ``MASKED_SCORE`` where key
    ``j >= (start[b]+s+1)//4``; or fills ``out [B, S, L] fp32`` (``L >= pos.max_cache_len``) the same
    way, all ``L`` columns.
    """
    b, s, heads, head_dim = q8.shape
    require(q_scale.shape == (b, s, heads) and q_scale.is_contiguous(), "q_scale", f"a contiguous [{b}, {s}, {heads}]")
    require(weights.shape == (b, s, heads) and weights.is_contiguous(), "weights", f"a contiguous [{b}, {s}, {heads}]")
    require(q8.is_contiguous(), "q8", "a contiguous tensor")
    require(state.keys.shape[2] == head_dim, "state.keys", f"rows of the query head dim {head_dim}")
    require(state.block_table.shape[0] >= b, "state.block_table", f"at least {b} rows")
    pow2_head = head_dim >= MIN_DOT_WIDTH and is_pow2(head_dim)
    require(pow2_head, "q8", f"a head dim that is a power of two >= {MIN_DOT_WIDTH}")
    score = torch.empty(b, s, pos.max_cache_len, dtype=torch.float32, device=q8.device) if out is None else out
    n_keys = score.shape[2]
    if n_keys == 0:
        return score
    grid = (triton.cdiv(n_keys, KEYS_PER_PROGRAM), b)
    _index_score_kernel[grid](
        q8, q_scale, weights, state.keys, state.key_scale, state.block_table, pos.start, score,
        s, n_keys, state.block_table.shape[1],
        HEADS=heads, HEADS_PAD=max(MIN_DOT_WIDTH, triton.next_power_of_2(heads)), HEAD_DIM=head_dim,
        KEYS=KEYS_PER_PROGRAM, BLOCK_SIZE=state.block_size, num_warps=SCORE_WARPS,
    )  # fmt: skip
    return score

"""Lightning-indexer scores (spec §5 steps 4-5): INT8 queries against the compressed key cache.

One program owns one batch row and one block of ``KEYS_PER_PROGRAM`` cache rows. It reads the
block's bf16 keys once, quantizes every key row to INT8 in registers (spec §2, bit-exact with
``dsv4.quant.quantize_int8_per_row``), and then, for each of the step's S query tokens, runs one
INT8 ``tl.dot`` of the keys against all HI heads of that token (int32 accumulator), dequantizes
by ``q_scale * k_scale``, applies ReLU, reduces over heads with the head weights and stores one
fp32 score per key. Keys past a token's causal visible length ``vis = (start + s + 1) // 4`` get
``MASKED_SCORE``; rows past ``cache_len = (start + S) // 4`` are never loaded.

The keys are the only large read (``cache_len * HID * 2`` bytes per batch row); queries, scales
and weights are ``S*HI*(HID + 8)`` bytes per row, re-read from L2 by every key block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..model.config import COMPRESS_RATIO
from ..model.structs import MASKED_SCORE, StepPositions
from .epilogue import quantize_int8_rows
from .launch import is_pow2

KEYS_PER_PROGRAM = 128  # 128 keys x 256 B (bf16, HID=128) = 32 KB of keys per program. ptxas (sm_90,
# 4 warps, HI=64, aligned operands) reports 165 registers, no spills and 41 KB of shared memory, so
# three programs share an SM (96 KB of key loads in flight). Every program re-reads its tokens' query
# rows (S*HI*136 B) from L2: 128 keys keep that at half the key bytes (64 keys: equal to them).
# 262144 keys at B=1 make 2048 programs, flash decode (B=64, 2048 keys) 1024: several waves of 132 SMs.
SCORE_WARPS = 4  # one warpgroup runs the INT8 MMA of a [128, 128] x [128, HI] tile
MIN_DOT_WIDTH = 16  # tl.dot needs every dimension >= 16: fewer heads are zero-padded up to it

_MASKED = tl.constexpr(MASKED_SCORE)
_RATIO = tl.constexpr(COMPRESS_RATIO)


@triton.jit
def _index_score_kernel(
    q8_ptr,  # [B, S, HEADS, HEAD_DIM] int8
    q_scale_ptr,  # [B, S, HEADS] fp32
    weights_ptr,  # [B, S, HEADS] fp32
    cache_ptr,  # [Bs, rows, HEAD_DIM] bf16, rows contiguous
    start_ptr,  # [B] int64
    score_ptr,  # [B, S, n_keys] fp32
    seq,
    n_keys,
    cache_stride_b,
    cache_stride_row,
    HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    KEYS: tl.constexpr,
):
    block = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    start = tl.load(start_ptr + b)
    cache_len = (start + seq) // _RATIO

    key = block * KEYS + tl.arange(0, KEYS)
    dim = tl.arange(0, HEAD_DIM)
    key_ptrs = cache_ptr + b * cache_stride_b + key.to(tl.int64)[:, None] * cache_stride_row + dim[None, :]
    # Keys are read once: ".cg" keeps them out of L1, where the queries every key block re-reads stay.
    keys = tl.load(key_ptrs, mask=(key < cache_len)[:, None], other=0.0, cache_modifier=".cg").to(tl.float32)
    k8, k_scale = quantize_int8_rows(keys)

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
        logits = tl.maximum(dots * q_scale[None, :] * k_scale[:, None], 0.0, propagate_nan=tl.PropagateNan.ALL)
        score = tl.sum(logits * weight[None, :], axis=1)
        visible = (start + s + 1) // _RATIO
        score = tl.where(key < visible, score, _MASKED)
        tl.store(score_ptr + tok * n_keys + key, score, mask=key < n_keys)


def index_scores(
    q8: torch.Tensor,
    q_scale: torch.Tensor,
    weights: torch.Tensor,
    cache: torch.Tensor,
    pos: StepPositions,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scores of every visible cache row for every query token (spec §5 steps 4-5).

    ``q8 [B, S, HI, HID] int8`` and ``q_scale [B, S, HI] fp32``: the rotated queries quantized per
    head row; ``weights [B, S, HI] fp32``: head weights, already scaled by ``HID^-0.5 * HI^-0.5``;
    ``cache [Bs, rows, HID] bf16`` with ``Bs >= B`` (rows ``0..B-1`` are used). Returns
    ``score [B, S, pos.max_cache_len] fp32``, ``MASKED_SCORE`` where key ``j >= (start[b]+s+1)//4``;
    or fills ``out [B, S, L] fp32`` (``L >= pos.max_cache_len``) the same way, all ``L`` columns.
    """
    b, s, heads, head_dim = q8.shape
    assert q_scale.shape == weights.shape == (b, s, heads), "q_scale and weights must be [B, S, HI]"
    assert q8.is_contiguous() and q_scale.is_contiguous() and weights.is_contiguous()
    assert cache.shape[0] >= b and cache.shape[2] == head_dim and cache.stride(2) == 1
    assert head_dim >= MIN_DOT_WIDTH and is_pow2(head_dim), "HID must be a power of two >= 16"
    score = torch.empty(b, s, pos.max_cache_len, dtype=torch.float32, device=q8.device) if out is None else out
    n_keys = score.shape[2]
    if n_keys == 0:
        return score
    grid = (triton.cdiv(n_keys, KEYS_PER_PROGRAM), b)
    _index_score_kernel[grid](
        q8,
        q_scale,
        weights,
        cache,
        pos.start,
        score,
        s,
        n_keys,
        cache.stride(0),
        cache.stride(1),
        HEADS=heads,
        HEADS_PAD=max(MIN_DOT_WIDTH, triton.next_power_of_2(heads)),
        HEAD_DIM=head_dim,
        KEYS=KEYS_PER_PROGRAM,
        num_warps=SCORE_WARPS,
    )
    return score

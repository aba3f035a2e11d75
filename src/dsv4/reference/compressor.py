"""Reference ``indexer_compressor`` (spec §4): the ratio-4 overlapping-window KV compressor.

Projections are computed for the whole step at once; the state ring is then advanced token by
token, in order: position ``p`` is written to ring slot ``p % 8`` (spec v3: a ring addressed by
position, nothing shifts), and a block closes when its last position is written.
"""

from __future__ import annotations

import torch

from ..model.config import COMPRESS_RATIO
from ..model.hadamard import hadamard_matrix
from ..model.rope import RopeTable
from ..model.state import STATE_SLOTS, IndexerState
from ..model.structs import StepPositions
from ..model.weights import CompressorWeights
from .common import apply_rope, linear, rms_norm

RATIO = COMPRESS_RATIO


def pool_block(kv_state: torch.Tensor, score_state: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """Softmax-pool the 8 candidates of each closing block: ``[N, 8, 2*HID]`` -> ``[N, HID]`` fp32.

    ``block [N]``: the index ``j`` of each closing block. Candidates are slots ``4*((j-1)%2) + i``
    columns ``[0:HID)`` (block ``j-1``; for ``j = 0`` kv 0 and score -inf, whatever the ring holds) and
    slots ``4*(j%2) + i`` columns ``[HID:2*HID)`` (block ``j``), ``i = 0..3``.
    """
    hid = kv_state.shape[-1] // 2
    n = torch.arange(block.shape[0], device=block.device)[:, None]
    i = torch.arange(RATIO, device=block.device)
    prev = (RATIO * ((block - 1) % 2))[:, None] + i
    cur = (RATIO * (block % 2))[:, None] + i
    first = (block == 0)[:, None, None]  # no previous block
    kv = torch.cat((kv_state[n, prev, :hid].masked_fill(first, 0.0), kv_state[n, cur, hid:]), dim=1)
    sc = torch.cat((score_state[n, prev, :hid].masked_fill(first, float("-inf")), score_state[n, cur, hid:]), dim=1)
    return (kv * torch.softmax(sc, dim=1)).sum(dim=1)


def finish_key(
    k: torch.Tensor, w: CompressorWeights, first_pos: torch.Tensor, rope: RopeTable, eps: float
) -> torch.Tensor:
    """Pooled ``k [N, HID]`` fp32 -> the model's keys ``[N, HID]`` bf16: RMSNorm, RoPE at the block's
    first position, Hadamard, each rounded to bf16 where the model rounds."""
    hid = k.shape[-1]
    nope = hid - rope.rope_dim
    k = rms_norm(k.to(torch.bfloat16), w.norm_w, eps).to(torch.bfloat16)
    k[:, nope:] = apply_rope(k[:, nope:].to(torch.float32), first_pos, rope).to(torch.bfloat16)
    return (k.to(torch.float32) @ hadamard_matrix(hid, device=k.device)).to(torch.bfloat16)


def indexer_compressor(
    x: torch.Tensor,
    w: CompressorWeights,
    state: IndexerState,
    pos: StepPositions,
    rope: RopeTable,
    eps: float,
) -> None:
    """x ``[B, S, D] bf16``; updates slots ``0..B-1`` of ``state`` in place: their ring, and one
    quantized pool row per block closed."""
    b = x.shape[0]
    rows = torch.arange(b, device=x.device)
    kvp = linear(x, w.wkv)  # [B, S, 2*HID]
    score = linear(x, w.wgate)
    kv_state, score_state = state.kv_state, state.score_state
    for s in range(pos.seq):
        p = pos.start + s  # [B]
        slot = p % STATE_SLOTS
        kv_state[rows, slot] = kvp[:, s]
        score_state[rows, slot] = score[:, s] + w.ape[p % RATIO]
        closing = rows[(p + 1) % RATIO == 0]
        if closing.numel() == 0:
            continue
        block = p[closing] // RATIO
        k = pool_block(kv_state[closing], score_state[closing], block)
        state.write_keys(closing, block, finish_key(k, w, block * RATIO, rope, eps))

"""Reference ``indexer_compressor`` (spec §4): the ratio-4 overlapping-window KV compressor.

Projections are computed for the whole step at once; the state ring is then advanced token by
token, in order, because each token's write depends on the blocks closed before it.
"""

from __future__ import annotations

import torch

from ..model.config import COMPRESS_RATIO
from ..model.hadamard import shared_hadamard
from ..model.rope import RopeTable
from ..model.state import IndexerState
from ..model.structs import StepPositions
from ..model.weights import CompressorWeights
from .common import apply_rope, linear, rms_norm

RATIO = COMPRESS_RATIO


def pool_block(kv_state: torch.Tensor, score_state: torch.Tensor) -> torch.Tensor:
    """Softmax-pool the 8 candidates of each closing block: ``[N, 8, 2*HID]`` -> ``[N, HID]`` fp32.

    Candidates are slots 0..3 columns ``[0:HID)`` (previous block) and slots 4..7 columns
    ``[HID:2*HID)`` (this block).
    """
    hid = kv_state.shape[-1] // 2
    kv = torch.cat((kv_state[:, :RATIO, :hid], kv_state[:, RATIO:, hid:]), dim=1)
    sc = torch.cat((score_state[:, :RATIO, :hid], score_state[:, RATIO:, hid:]), dim=1)
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
    return (k.to(torch.float32) @ shared_hadamard(hid, k.device)).to(torch.bfloat16)


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
        slot = RATIO + p % RATIO
        kv_state[rows, slot] = kvp[:, s]
        score_state[rows, slot] = score[:, s] + w.ape[p % RATIO]
        closing = rows[(p + 1) % RATIO == 0]
        if closing.numel() == 0:
            continue
        k = pool_block(kv_state[closing], score_state[closing])
        kv_state[closing, :RATIO] = kv_state[closing, RATIO:]
        score_state[closing, :RATIO] = score_state[closing, RATIO:]
        pc = p[closing]
        state.write_keys(closing, pc // RATIO, finish_key(k, w, pc + 1 - RATIO, rope, eps))

"""Reference compressors (spec §4, attention spec A3): one computation over a ring addressed by
position, for the indexer's compressor and the attention's own (Decisions A4).

``compress`` is parameterized by its weights' sizes: the ratio ``RC`` (rows of ``ape``), the row
width ``W`` (``norm_w``) and the overlap (``COFF = 2`` overlapping windows at ratio 4: ``wkv`` has
``2*W`` rows; else 1). Position ``p`` is written to ring slot ``p % (COFF*RC)`` (nothing shifts), and
a block closes when its last position is written. What happens to a finished row is the caller's
``store``: ``indexer_compressor`` rotates it (Hadamard) and stores INT8 keys; ``kv_compressor`` stores
an FP8 KV row.

Projections are computed for the whole step at once; the ring is then advanced token by token, in
order, because a block that closes reads the slots its earlier tokens wrote.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..model.attention_state import CompressorState
from ..model.hadamard import shared_hadamard
from ..model.rope import RopeTable
from ..model.state import IndexerState
from ..model.structs import StepPositions
from ..model.weights import CompressorWeights
from .common import apply_rope, linear, rms_norm

Store = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]  # (slots, rows j, finished rows [N, W] bf16)


def pool_closed_blocks(kv: torch.Tensor, score: torch.Tensor, j: torch.Tensor, ratio: int, coff: int) -> torch.Tensor:
    """Softmax-pool the candidates of compressed block ``j[n]`` from ring ``kv``/``score``
    ``[N, COFF*RC, COFF*W]`` -> ``[N, W]`` fp32 (spec §3 step 3).

    COFF 2: slots ``RC*((j-1) % 2) + i`` columns ``[0, W)`` (the previous block; for ``j = 0`` kv 0
    and score -inf whatever the ring holds), then slots ``RC*(j % 2) + i`` columns ``[W, 2W)``.
    COFF 1: every slot (the block's own positions)."""
    if coff == 1:
        return (kv * torch.softmax(score, dim=1)).sum(dim=1)
    w = kv.shape[-1] // 2
    n = torch.arange(kv.shape[0], device=kv.device)[:, None]
    i = torch.arange(ratio, device=kv.device)
    prev = (ratio * ((j - 1) % 2))[:, None] + i
    cur = (ratio * (j % 2))[:, None] + i
    first = (j == 0)[:, None, None]
    kv_prev = torch.where(first, 0.0, kv[n, prev, :w])
    score_prev = torch.where(first, float("-inf"), score[n, prev, :w])
    cand_kv = torch.cat((kv_prev, kv[n, cur, w:]), dim=1)
    cand_score = torch.cat((score_prev, score[n, cur, w:]), dim=1)
    return (cand_kv * torch.softmax(cand_score, dim=1)).sum(dim=1)


def finish_row(
    k: torch.Tensor, norm_w: torch.Tensor, first_pos: torch.Tensor, rope: RopeTable, eps: float
) -> torch.Tensor:
    """Pooled ``k [N, W]`` fp32 -> ``[N, W]`` bf16: ``bf16(rms(bf16(k), norm_w))``, then RoPE of the
    last R entries at the block's first position (fp32, rounded to bf16), as the model rounds."""
    nope = k.shape[-1] - rope.rope_dim
    k = rms_norm(k.to(torch.bfloat16), norm_w, eps).to(torch.bfloat16)
    k[:, nope:] = apply_rope(k[:, nope:].to(torch.float32), first_pos, rope).to(torch.bfloat16)
    return k


def compress(
    x: torch.Tensor,
    w: CompressorWeights,
    kv_state: torch.Tensor,
    score_state: torch.Tensor,
    pos: StepPositions,
    rope: RopeTable,
    eps: float,
    store: Store,
) -> None:
    """Advance the ring of slots ``0..B-1`` over the step's tokens (``x [B, S, D] bf16``) and hand each
    block that closes to ``store(slots, j, row)``.

    For each token, in order, at ``p = start[b] + s``: write ``x @ wkv.T`` and ``x @ wgate.T +
    ape[p % RC]`` (fp32) into slot ``p % (COFF*RC)``; when ``(p + 1) % RC == 0`` block ``j = p // RC``
    closes: pool its candidates, finish the row at position ``RC*j``, store it."""
    width, ratio = w.norm_w.shape[0], w.ape.shape[0]
    coff = w.wkv.shape[0] // width
    rows = torch.arange(x.shape[0], device=x.device)
    kvp = linear(x, w.wkv)  # [B, S, COFF*W]
    score = linear(x, w.wgate)
    for s in range(pos.seq):
        p = pos.start + s  # [B]
        slot = p % (coff * ratio)
        kv_state[rows, slot] = kvp[:, s]
        score_state[rows, slot] = score[:, s] + w.ape[p % ratio]
        closing = rows[(p + 1) % ratio == 0]
        if closing.numel() == 0:
            continue
        j = p[closing] // ratio
        k = pool_closed_blocks(kv_state[closing], score_state[closing], j, ratio, coff)
        store(closing, j, finish_row(k, w.norm_w, j * ratio, rope, eps))


def kv_compressor(
    x: torch.Tensor, w: CompressorWeights, state: CompressorState, pos: StepPositions, rope: RopeTable, eps: float
) -> None:
    """x ``[B, S, D] bf16``; updates slots ``0..B-1`` of ``state`` in place: their ring, and one FP8
    KV row of the compressed pool per block closed (spec §3 step 4)."""
    compress(x, w, state.kv_state, state.score_state, pos, rope, eps, state.pool.write)


def index_key(k: torch.Tensor) -> torch.Tensor:
    """A finished row ``[N, HID] bf16`` -> the indexer's key ``[N, HID] bf16``: rotated by the Hadamard
    matrix in fp32, rounded to bf16 (spec §4), before it is quantized."""
    return (k.to(torch.float32) @ shared_hadamard(k.shape[-1], k.device)).to(torch.bfloat16)


def indexer_compressor(
    x: torch.Tensor,
    w: CompressorWeights,
    state: IndexerState,
    pos: StepPositions,
    rope: RopeTable,
    eps: float,
) -> None:
    """x ``[B, S, D] bf16``; updates slots ``0..B-1`` of ``state`` in place: their ring, and one INT8 key
    row of the pool per block closed: the finished row rotated (Hadamard in fp32, rounded to bf16),
    quantized per row (spec §4)."""

    def store(slots: torch.Tensor, rows: torch.Tensor, k: torch.Tensor) -> None:
        state.write_keys(slots, rows, index_key(k))

    compress(x, w, state.kv_state, state.score_state, pos, rope, eps, store)

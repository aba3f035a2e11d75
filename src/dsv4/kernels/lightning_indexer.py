"""The fused lightning indexer (spec §5) in four launches, each writing only what the next needs, each
after the first launched with programmatic dependent launch on sm_90 (it starts while its predecessor
ends and waits inside the kernel before it reads that one's outputs).

1. ``index_front.front``: the x-side projection (compressor ``wkv``, ``wgate``, ``weights_proj``, as raw
   K-slices) and the INT8 query path (``q8 [T, HI, HID]``, ``q_scale [T, HI]``), two program families.
2. ``compressor.compressor_step``: the compressor's closes and ring update (spec §4), one program per
   row and chunk of closing blocks; each row's K-slices are summed in slice order, once (by a launch
   of their own first where a row is too long for its program to add them in a few steps: a prefill's).
3. ``index_score.index_scores``: the scores of every token against its visible keys, a persistent grid
   streaming key tiles.
4. ``topk.select_topk``: the top-k indices per token (rows longer than ``ROW_IN_REGISTERS`` keys
   start from the first-digit histograms the score launch builds).
"""

from __future__ import annotations

import torch

from ..model.rope import RopeTable
from ..model.state import IndexerState
from ..model.structs import IndexerOut, StepPositions
from ..model.weights import IndexerWeights
from .compressor import compressor_step
from .head_rotation import split_head_dims
from .index_front import check_dims as check_front_dims
from .index_front import front
from .index_score import index_scores
from .launch import require
from .topk import HIST_WORDS, ROW_IN_REGISTERS, TIE_INDEX_BITS, select_topk
from .workspace import Workspace, scratch


def check_dims(d: int, w: IndexerWeights, rope_dim: int, x: str = "x") -> None:
    """``ValueError`` naming what the indexer's launches cannot take whatever the step: the front
    launch's dims (the hidden size ``d``, which ``x`` names; ``w.compressor.wkv``'s rows; the query
    heads' split at ``rope_dim``) and the compressor step's head split."""
    check_front_dims(d, w.compressor, w, rope_dim, x=x)
    split_head_dims(w.compressor.norm_w.shape[0], rope_dim)


def indexer(
    x: torch.Tensor,
    qr: torch.Tensor,
    qr_scale: torch.Tensor,
    w: IndexerWeights,
    state: IndexerState,
    pos: StepPositions,
    offset: int,
    rope: RopeTable,
    topk: int,
    eps: float,
    out: IndexerOut | None = None,
    ws: Workspace | None = None,
) -> IndexerOut:
    """x ``[B, S, D] bf16``, ``qr [B*S, QL] int8``, ``qr_scale [B*S, 1] fp32`` -> ``IndexerOut(score
    [B, S, max cache_len] fp32, topk_idxs [B, S, topk] int32)``; updates rows ``0..B-1`` of ``state``.

    Writes into ``out`` when given and returns ``out`` itself (a wider ``score`` is filled whole, masked
    past each token's visible rows); scratch comes from ``ws`` when given."""
    b, s = pos.batch, pos.seq
    width = pos.max_cache_len if out is None else out.score.shape[2]
    # the selection's limit, checked before the first launch changes the state
    limit = 1 << TIE_INDEX_BITS
    require(width <= limit, "out.score" if out else "state", f"rows of at most {limit} keys, got {width}")
    check_dims(x.shape[-1], w, rope.rope_dim)
    # Rows longer than one program selects alone: the score launch builds the first-digit histograms
    # the selection starts from, in counters the front launch zeroes.
    hist = scratch(ws, "indexer.hist", (b * s, HIST_WORDS), torch.int32, x.device) if width > ROW_IN_REGISTERS else None
    xp, q8, q_scale = front(x, w.compressor, pos, indexer=w, qr=qr, qr_scale=qr_scale, rope=rope, ws=ws, zero=hist)
    assert q8 is not None and q_scale is not None  # the front launch was given the indexer
    proj = compressor_step(xp, w.compressor, state, pos, rope, eps, ws)
    score = index_scores(proj, q8, q_scale, w, state, pos, None if out is None else out.score, hist)
    topk_idxs = select_topk(score, pos, topk, offset, None if out is None else out.topk_idxs, ws, hist)
    return IndexerOut(score, topk_idxs) if out is None else out

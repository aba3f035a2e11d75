"""The fused lightning indexer (spec §5): a chain of kernels, each writing only what the next needs.

1. ``x_projection``: one GEMM of ``x`` against compressor ``wkv``, ``wgate`` (+ ``ape``) and
   ``weights_proj`` (x the weights scale) -> ``kvg [T, 4*HID]``, ``head_weights [T, HI]`` fp32.
2. ``compressor_step``: ring update and this step's closed blocks, quantized, into the key pool.
3. ``index_query``: ``qr`` -> INT8 rotated queries ``q8 [T, HI, HID]`` + ``q_scale [T, HI]``.
4. ``index_scores``: INT8 scores of every token against its visible pool rows.
5. ``select_topk``: the top-k indices per token.
"""

from __future__ import annotations

import torch

from ..model.rope import RopeTable
from ..model.state import IndexerState
from ..model.structs import IndexerOut, StepPositions
from ..model.weights import IndexerWeights
from .compressor import compressor_step
from .index_query import index_query
from .index_score import index_scores
from .topk import select_topk
from .workspace import Workspace
from .x_proj import x_projection


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

    Writes into ``out`` when given (a wider ``score`` is filled whole, masked past each token's
    visible rows); scratch comes from ``ws`` when given."""
    b, s, d = x.shape
    hi, hid = w.weights_proj.shape[0], w.compressor.norm_w.shape[0]
    kvg, head_weights = x_projection(x.view(b * s, d), w.compressor, pos, w.weights_proj, hid**-0.5 * hi**-0.5, ws=ws)
    compressor_step(kvg, w.compressor, state, pos, rope, eps)
    q8, q_scale = index_query(qr, qr_scale, w.wq_b, w.wq_b_scale, pos, rope, hid, ws)
    score = index_scores(
        q8.view(b, s, hi, hid), q_scale.view(b, s, hi), head_weights.view(b, s, hi), state, pos,
        None if out is None else out.score,
    )  # fmt: skip
    topk_idxs = select_topk(score, pos, topk, offset, None if out is None else out.topk_idxs, ws)
    return IndexerOut(score, topk_idxs)

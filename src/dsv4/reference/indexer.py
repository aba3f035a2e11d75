"""Reference ``indexer`` (spec §5): the lightning indexer's query path, scores and top-k."""

from __future__ import annotations

import torch

from ..model.config import COMPRESS_RATIO
from ..model.hadamard import shared_hadamard
from ..model.quant import quantize_int8_per_row
from ..model.rope import RopeTable
from ..model.state import IndexerState
from ..model.structs import MASKED_SCORE, IndexerOut, StepPositions, copy_into
from ..model.weights import IndexerWeights
from .common import EXACT, Gemms, apply_rope, int8_matmul, linear
from .compressor import indexer_compressor


def index_query(
    qr: torch.Tensor,
    qr_scale: torch.Tensor,
    w: IndexerWeights,
    positions: torch.Tensor,
    rope: RopeTable,
    gemms: Gemms = EXACT,
) -> torch.Tensor:
    """``qr [T, QL] int8`` -> Hadamard-rotated queries ``[T, HI, HID]`` fp32 (steps 1-2)."""
    hid = w.compressor.norm_w.shape[0]
    nope = hid - rope.rope_dim
    qh = (gemms.int8(qr, w.wq_b).to(torch.float32) * qr_scale * w.wq_b_scale).view(qr.shape[0], -1, hid)
    qh[..., nope:] = apply_rope(qh[..., nope:], positions, rope)
    return qh.to(torch.bfloat16).to(torch.float32) @ shared_hadamard(hid, qr.device)


def index_scores(q: torch.Tensor, weights: torch.Tensor, state: IndexerState, pos: StepPositions) -> torch.Tensor:
    """Scores ``[B, S, max cache_len]`` fp32 (steps 4-5).

    ``q [B, S, HI, HID]`` fp32 rotated queries, ``weights [B, S, HI]`` fp32 head weights; the keys
    come quantized from the pool of ``state``. Entries a token cannot see hold ``MASKED_SCORE``.
    """
    b, s = q.shape[:2]
    n = pos.max_cache_len
    q8, qs = quantize_int8_per_row(q)  # [B, S, HI, HID], [B, S, HI, 1]
    score = torch.empty(b, s, n, dtype=torch.float32, device=q.device)
    cache_lens = ((pos.start + s) // COMPRESS_RATIO).tolist()  # the reference reads values on the host
    for i in range(b):  # each row has its own keys; heads and tokens go in one GEMM
        rows = cache_lens[i]
        k8, ks = state.dense_keys(i, rows)  # [rows, HID] int8, [rows] fp32
        dots = int8_matmul(q8[i].reshape(-1, q8.shape[-1]), k8).to(torch.float32).view(s, q8.shape[2], rows)
        logits = torch.relu(dots * qs[i])  # [S, HI, rows]
        score[i, :, :rows] = (logits * weights[i].unsqueeze(-1)).sum(dim=1) * ks  # key scale after the head sum
        score[i, :, rows:] = MASKED_SCORE
    vis = (pos.token_positions() + 1) // COMPRESS_RATIO  # [B, S]
    hidden = torch.arange(n, device=q.device).view(1, 1, n) >= vis.unsqueeze(-1)
    return score.masked_fill_(hidden, MASKED_SCORE)


def select_topk(score: torch.Tensor, pos: StepPositions, topk: int, offset: int) -> torch.Tensor:
    """``topk_idxs [B, S, topk] int32`` (step 6): the ``min(topk, vis)`` best visible indices in
    descending score order (NaN first, as torch's descending sort puts it; ties: lower index first),
    plus ``offset``; the rest ``-1``. A column ``j >= vis`` is never selected, whatever ``score``
    holds there (a visible ``-inf`` sorts below the mask value, yet it is visible)."""
    b, s, n = score.shape
    vis = (pos.token_positions() + 1) // COMPRESS_RATIO  # [B, S]
    # The order key is made device-independent first: a CUDA sort ranked a NaN with the sign bit set
    # below -inf (an H200), the CPU sort first; nor is a sort bound to tie -0.0 with +0.0. NaN ranks
    # first (any sign, lower index first among NaNs), then the values descending, -0.0 tying +0.0.
    nan = score.isnan()
    key = torch.where(nan, torch.inf, score) + 0.0  # + 0.0 turns -0.0 into +0.0
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    order = order.gather(-1, torch.sort((~nan).gather(-1, order).to(torch.uint8), dim=-1, stable=True).indices)
    hidden = order >= vis.unsqueeze(-1)  # of each sorted column
    order = order.gather(-1, torch.sort(hidden.to(torch.uint8), dim=-1, stable=True).indices)[..., :topk]
    out = torch.full((b, s, topk), -1, dtype=torch.int32, device=score.device)
    out[..., : order.shape[-1]] = (order + offset).to(torch.int32)
    keep = torch.arange(topk, device=score.device).view(1, 1, topk) < vis.clamp(max=topk).unsqueeze(-1)
    return out.masked_fill_(~keep, -1)


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
) -> IndexerOut:
    """x ``[B, S, D] bf16``, ``qr [B*S, QL] int8``, ``qr_scale [B*S, 1] fp32`` -> ``IndexerOut``;
    runs the compressor first (updates ``state`` in place)."""
    indexer_compressor(x, w.compressor, state, pos, rope, eps)
    return copy_into(indexer_scores(x, qr, qr_scale, w, state, pos, offset, rope, topk), out)


def indexer_scores(
    x: torch.Tensor,
    qr: torch.Tensor,
    qr_scale: torch.Tensor,
    w: IndexerWeights,
    state: IndexerState,
    pos: StepPositions,
    offset: int,
    rope: RopeTable,
    topk: int,
) -> IndexerOut:
    """Steps 2-6 of spec §5 on the key pool as ``state`` holds it (after the step's compressor):
    the queries, the scores and the top-k; ``state`` is only read."""
    b, s = x.shape[:2]
    hi, hid = w.weights_proj.shape[0], w.compressor.norm_w.shape[0]
    q = index_query(qr, qr_scale, w, pos.token_positions().reshape(-1), rope).view(b, s, hi, hid)
    weights = linear(x, w.weights_proj) * hid**-0.5 * hi**-0.5
    score = index_scores(q, weights, state, pos)
    return IndexerOut(score, select_topk(score, pos, topk, offset))

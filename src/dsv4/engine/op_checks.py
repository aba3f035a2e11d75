"""The ops' checks (spec §7) once, for launches that skip them per step: a module's steps and the
captured steps, whose per-step values (positions, block tables) are the host's own."""

from __future__ import annotations

import torch

from ..model.rope import RopeTable
from ..model.state import IndexerState
from ..model.weights import AttnWeights, IndexerWeights
from ..ops.defs import INDEXER, QKV_PROJ_ROPE


def check_front_end_ops(
    attn: AttnWeights,
    indexer: IndexerWeights | None,
    rope: RopeTable,
    state: IndexerState | None,
    topk: int,
    offset: int,
    eps: float,
) -> None:
    """``qkv_proj_rope``'s checks and, with ``indexer`` and ``state``, ``indexer``'s, on a one-token step
    of row 0 at position 0: it reads no pool row and needs no block, so only the operands' shapes,
    dtypes and devices (and ``topk``, ``offset``, ``eps``) are judged."""
    dev = attn.wq_a.device
    x = torch.zeros(1, 1, attn.wq_a.shape[1], dtype=torch.bfloat16, device=dev)
    one = torch.zeros(1, dtype=torch.int64, device=dev)
    QKV_PROJ_ROPE.backend_args({"x": x[0], "w": attn, "positions": one, "rope": rope, "eps": eps})
    if indexer is None:
        return
    qr, qr_scale = torch.zeros(1, attn.wq_a.shape[0], dtype=torch.int8, device=dev), torch.ones(1, 1, device=dev)
    INDEXER.backend_args({"x": x, "qr": qr, "qr_scale": qr_scale, "w": indexer, "state": state, "start_pos": 0,
                          "offset": offset, "rope": rope, "topk": topk, "eps": eps})  # fmt: skip

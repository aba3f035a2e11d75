"""``sparse_attn_write`` (attention spec §7, steps 4 and 5 fused): ``sparse_attn``, and the step's window
rows stored as ``window_kv_write`` stores them, in one call (one launch on Triton)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ...model.attention_state import KVPool
from ...model.config import DeepSeekV4Config
from ...model.rope import RopeTable
from ...model.state import DEFAULT_BLOCK_SIZE
from ...model.structs import AttnOut
from ..costs import INT32, OpCost
from ..registry import OpDescriptor, Output
from ..validate_attention import check_sparse_attn_write
from . import sparse_attn as attn
from . import window_kv_write as write


def sparse_attn_write(
    q: torch.Tensor,
    kv: torch.Tensor,
    start_pos: int | torch.Tensor,
    window_pool: KVPool,
    attn_sink: torch.Tensor,
    rope: RopeTable,
    *,
    kind: str,
    window: int,
    compress_ratio: int = 0,
    compressed_pool: KVPool | None = None,
    topk_idxs: torch.Tensor | None = None,
    topk_offset: int = 0,
    backend: str = "auto",
    out: AttnOut | None = None,
) -> AttnOut:
    """``sparse_attn``, then ``window_kv_write(kv, window_pool, start_pos, window=window)``, as one op: a
    layer's attention for one step and its window rows (attention spec §5, §4; fused as §7 allows).

    The arguments and the result are ``sparse_attn``'s; ``window_pool`` is also written: row ``p`` of
    slot ``b`` becomes ``fp8_row(kv[b, s])`` for the last ``min(S, window)`` tokens of each slot (rows in
    unallocated blocks skipped). The Triton backend does both in the attention's launch, so no pool row
    the step writes may be one it reads (a window block reused within the window, as a ring of W rows
    would): such a table is refused (``ValueError``); call ``sparse_attn``, then ``window_kv_write``.
    Blocks recycled as the spec's §4 allows (all positions ``<= start_pos - W``) are apart.

    Returns:
        ``AttnOut(o [B, S, H, HD] bf16)``.
    """


def validate(args: dict[str, Any], out: AttnOut | None) -> dict[str, Any]:
    return {"start_pos": check_sparse_attn_write(**args, out=out)}


def cost(
    cfg: DeepSeekV4Config,
    start_pos: Sequence[int],
    seq: int,
    kind: str = "csa",
    ratio: int | None = None,
    topk: int | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> OpCost:
    """``sparse_attn``'s bytes and the window rows ``window_kv_write`` writes (its ``kv`` rows are the
    attention's, read once; a window block-table entry that both the rows read and the rows written use is
    read once)."""
    a = attn.cost(cfg, start_pos, seq, kind, ratio, topk, block_size)
    w = write.cost(cfg, start_pos, seq, block_size)
    kept = min(seq, cfg.sliding_window)
    shared = sum(
        max(0, p - cfg.sliding_window + 1) < p and (p - 1) // block_size == (p + seq - kept) // block_size
        for p in start_pos
    )  # the last block read (row p - 1) is the first block written
    entries = w.reads["block_table (written rows)"] - shared * INT32
    reads = {**a.reads, "block_table (rows written, blocks not read)": entries}
    return OpCost("sparse_attn_write", reads, {**a.writes, **w.writes}, a.flops)


SPARSE_ATTN_WRITE = OpDescriptor(
    name="sparse_attn_write",
    signature=sparse_attn_write,
    outputs=(Output("o", attn.O_RULE), Output("window_pool", write.EXACT, "exact")),
    mutates=("window_pool.nope", "window_pool.rope", "window_pool.scale"),
    validate=validate,
    case_args=attn.case_args,
    cost=cost,
    fake_result=attn.fake_result,
    implementations={
        "reference": "dsv4.reference.attention:sparse_attn_write",
        "triton": "dsv4.kernels.sparse_attn:sparse_attn_write",
    },
    cache_bound=True,
    kinds=attn.SPARSE_ATTN.kinds,
)

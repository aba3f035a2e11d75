"""``sparse_attn`` (attention spec §5): attention of each token over its window and the compressed
rows it sees (all of them: HCA; the indexer's top-k: CSA), with the attention sink and the
inverse RoPE of the output."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ...model.attention_state import KVPool
from ...model.config import COMPRESS_RATIO, DeepSeekV4Config
from ...model.fp8_row import row_bytes
from ...model.rope import RopeTable
from ...model.state import DEFAULT_BLOCK_SIZE
from ...model.structs import AttnOut
from ..attention_cases import sparse_attn_args
from ..case_inputs import CaseInputs
from ..costs import BF16, FP32, INT32, INT64, OpCost, rope_row_bytes
from ..registry import INT_OR_TENSOR, OpDescriptor, Output, Param, Tolerance
from ..validate_attention import check_sparse_attn

O_RULE = Tolerance(1e-3, 1 / 128)  # attention spec §8: online-softmax tiling moves o by up to ~1e-3


def validate(
    q: Any, kv: Any, start_pos: Any, window_pool: Any, attn_sink: Any, rope: Any, kind: Any, window: Any,
    compress_ratio: Any = 0, compressed_pool: Any = None, topk_idxs: Any = None, topk_offset: Any = 0, out: Any = None,
) -> dict[str, Any]:  # fmt: skip
    pos = check_sparse_attn(
        q, kv, start_pos, window_pool, attn_sink, rope, kind, window, compress_ratio, compressed_pool, topk_idxs,
        topk_offset, out,
    )  # fmt: skip
    return {
        "q": q, "kv": kv, "pos": pos, "window_pool": window_pool, "attn_sink": attn_sink, "rope": rope, "kind": kind,
        "window": window, "compress_ratio": compress_ratio, "compressed": compressed_pool, "topk_idxs": topk_idxs,
        "topk_offset": topk_offset,
    }  # fmt: skip


def case_args(c: CaseInputs) -> dict[str, Any]:
    return sparse_attn_args(c, "csa")


def key_counts(cfg: DeepSeekV4Config, p: int, start: int, kind: str, ratio: int, topk: int) -> tuple[int, int, int]:
    """``(window rows from the pool, window rows of this call, compressed rows)`` the token at ``p`` sees."""
    lo = max(0, p - cfg.sliding_window + 1)
    old = max(0, start - lo)
    vis = (p + 1) // ratio if ratio else 0
    compressed = 0 if kind == "swa" else vis if kind == "hca" else min(topk, vis)
    return old, p + 1 - lo - old, compressed


def cost(
    cfg: DeepSeekV4Config,
    start_pos: Sequence[int],
    seq: int,
    kind: str = "csa",
    ratio: int | None = None,
    topk: int | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> OpCost:
    """``sparse_attn`` of a ``kind`` layer (default CSA; ``ratio`` default: 4 for CSA, the preset's
    first HCA ratio for HCA) for rows starting at ``start_pos[b]``.

    Each key row is read once per slot (for every head and every token of the step that sees it):
    the window rows below ``start`` (this call's rows come from ``kv``), every compressed row the
    last token sees (HCA), or (CSA) ``min(topk, vis)`` rows per slot: the step's tokens are taken to
    select the same rows, the floor (adjacent tokens pick nearly the same; each distinct row more
    costs one more row)."""
    topk = cfg.index_topk if topk is None else topk
    if ratio is None:
        ratio = 0 if kind == "swa" else COMPRESS_RATIO if kind == "csa" else cfg.layer_ratio(cfg.first_layer("hca"))
    b, t = len(start_pos), len(start_pos) * seq
    h, hd, w = cfg.num_attention_heads, cfg.head_dim, cfg.sliding_window
    row = row_bytes(hd, cfg.qk_rope_head_dim)
    window_rows = sum(p - max(0, p - w + 1) for p in start_pos)  # rows [p - W + 1, p) of the pool
    counts = [[key_counts(cfg, p + s, p, kind, ratio, topk) for s in range(seq)] for p in start_pos]
    compressed_rows = sum(max(c for _, _, c in slot) for slot in counts)
    keys = sum(sum(c) for slot in counts for c in slot)
    tables = sum(-(-(p - max(0, p - w + 1)) // block_size) for p in start_pos)
    if kind != "swa":
        tables += sum(-(-((p + seq) // ratio) // block_size) for p in start_pos)
    reads = {
        "q": t * h * hd * BF16,
        "kv": t * hd * BF16,
        "start_pos": b * INT64,
        "attn_sink": h * FP32,
        "rope rows (tokens)": t * rope_row_bytes(cfg),
        "window rows (FP8, below start)": window_rows * row,
        "compressed rows (FP8)": compressed_rows * row,
        "topk_idxs": t * topk * INT32 if kind == "csa" else 0,
        "block_table (rows read)": tables * INT32,
    }
    writes = {"o": t * h * hd * BF16}
    flops = {"bf16": 2 * 2 * h * hd * keys}  # q.k and p.v per key, head and token
    return OpCost("sparse_attn", reads, writes, flops)


def fake_result(
    q: torch.Tensor, kv: torch.Tensor, start_pos: torch.Tensor, window_pool: KVPool, attn_sink: torch.Tensor,
    rope: RopeTable, kind: str, window: int, compress_ratio: int, compressed_pool: KVPool | None,
    topk_idxs: torch.Tensor | None, topk_offset: int,
) -> AttnOut:  # fmt: skip
    return AttnOut(q.new_empty(q.shape))


SPARSE_ATTN = OpDescriptor(
    name="sparse_attn",
    params=(
        Param("q", torch.Tensor),
        Param("kv", torch.Tensor),
        Param("start_pos", INT_OR_TENSOR),
        Param("window_pool", KVPool),
        Param("attn_sink", torch.Tensor),
        Param("rope", RopeTable),
        Param("kind", str),
        Param("window", int),
        Param("compress_ratio", int),
        Param("compressed_pool", KVPool, optional=True),
        Param("topk_idxs", torch.Tensor, optional=True),
        Param("topk_offset", int),
    ),
    outputs=(Output("o", O_RULE),),
    result=AttnOut,
    mutates=(),
    validate=validate,
    case_args=case_args,
    cost=cost,
    fake_result=fake_result,
    implementations={"reference": "dsv4.reference.attention:sparse_attn"},
    cache_bound=True,
)

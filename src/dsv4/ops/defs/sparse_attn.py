"""``sparse_attn`` (attention spec §5): attention of each token over its window and the compressed
rows it sees (all of them: HCA; the indexer's top-k: CSA), with the attention sink and the
inverse RoPE of the output."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ...model.attention_state import KVPool
from ...model.config import DeepSeekV4Config
from ...model.pool_format import FP8_KV
from ...model.rope import RopeTable
from ...model.state import DEFAULT_BLOCK_SIZE
from ...model.structs import AttnOut
from ..attention_cases import sparse_attn_args
from ..case_inputs import CaseInputs
from ..costs import BF16, FP32, INT32, INT64, OpCost, blocks_spanned, rope_rows_bytes
from ..registry import OpDescriptor, Output, Tolerance
from ..validate_attention import check_sparse_attn

O_RULE = Tolerance(1e-3, 1 / 128)  # attention spec §8: online-softmax tiling moves o by up to ~1e-3


def sparse_attn(
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
    """Sparse attention with sink over FP8 KV rows, for one step (attention spec A5).

    Token ``s`` of slot ``b`` sits at ``p = start_pos[b] + s``; its keys (one MQA head shared by
    all heads, value = key): its window, positions ``max(0, p - window + 1) .. p`` (rows below
    ``start_pos[b]`` from ``window_pool``, the rest from this call's ``kv``); ``kind="hca"``: every
    compressed row ``j < (p + 1) // compress_ratio``; ``kind="csa"``: the row ``e - topk_offset``
    of each entry ``e`` of ``topk_idxs[b, s]`` that is one of those (others ignored, repeats counted).

    Args:
        q: ``[B, S, H, HD] bf16``; kv: ``[B, S, HD] bf16`` (from ``qkv_proj_rope``).
        start_pos: an int, or an int tensor ``[B]``.
        window_pool: the window ``KVPool`` (row = position); only rows below ``start_pos`` are read.
        attn_sink: ``[H] fp32``, one extra logit per head with a zero value row (``-inf``: no sink).
        rope: the layer's ``RopeTable``; the output's last ``R`` entries are rotated back at ``p``.
        kind: ``"swa"``, ``"csa"`` or ``"hca"``; window: the sliding window ``W``.
        compress_ratio: the layer's ratio (0 for SWA); compressed_pool: its compressed ``KVPool``
            (CSA, HCA); topk_idxs: ``[B, S, K] int32`` from ``indexer`` (CSA); topk_offset: the
            ``offset`` the indexer added.
        backend: ``"reference"``, ``"triton"`` or ``"auto"`` (Triton on CUDA, else the reference).
        out: optional preallocated ``AttnOut`` to write into (returned).

    Returns:
        ``AttnOut(o [B, S, H, HD] bf16)``.
    """


def validate(args: dict[str, Any], out: AttnOut | None) -> dict[str, Any]:
    return {"start_pos": check_sparse_attn(**args, out=out)}


def case_args(c: CaseInputs, kind: str = "csa") -> dict[str, Any]:
    return sparse_attn_args(c, kind)


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
        ratio = cfg.kind_ratio(kind)
    b, t = len(start_pos), len(start_pos) * seq
    h, hd, w = cfg.num_attention_heads, cfg.head_dim, cfg.sliding_window
    row = FP8_KV.row_bytes(cfg.qk_nope_head_dim, tail=cfg.qk_rope_head_dim)
    window_rows = sum(p - max(0, p - w + 1) for p in start_pos)  # rows [p - W + 1, p) of the pool
    counts = [[key_counts(cfg, p + s, p, kind, ratio, topk) for s in range(seq)] for p in start_pos]
    compressed_rows = sum(max(c for _, _, c in slot) for slot in counts)
    keys = sum(sum(c) for slot in counts for c in slot)
    tables = sum(blocks_spanned(max(0, p - w + 1), p, block_size) for p in start_pos)  # the window rows read
    # the compressed rows a slot reads, packed from row 0 (HCA: all it sees; CSA: its selection at the floor)
    tables += sum(blocks_spanned(0, max(c for _, _, c in slot), block_size) for slot in counts)
    reads = {
        "q": t * h * hd * BF16,
        "kv": t * hd * BF16,
        "start_pos": b * INT64,
        "attn_sink": h * FP32,
        "rope rows (distinct positions)": rope_rows_bytes(cfg, (p + s for p in start_pos for s in range(seq))),
        "window rows (FP8, below start)": window_rows * row,
        "compressed rows (FP8)": compressed_rows * row,
        "topk_idxs": t * topk * INT32 if kind == "csa" else 0,
        "block_table (rows read)": tables * INT32,
    }
    writes = {"o": t * h * hd * BF16}
    flops = {"bf16": 2 * 2 * h * hd * keys}  # q.k and p.v per key, head and token
    return OpCost("sparse_attn", reads, writes, flops)


def fake_result(args: dict[str, Any]) -> AttnOut:
    return AttnOut(args["q"].new_empty(args["q"].shape))


SPARSE_ATTN = OpDescriptor(
    name="sparse_attn",
    signature=sparse_attn,
    outputs=(Output("o", O_RULE),),
    mutates=(),
    validate=validate,
    case_args=case_args,
    cost=cost,
    fake_result=fake_result,
    implementations={
        "reference": "dsv4.reference.attention:sparse_attn",
        "triton": "dsv4.kernels.sparse_attn:sparse_attn",
    },
    cache_bound=True,
    kinds=("csa", "hca", "swa"),
)

"""``indexer`` (spec §5): the lightning indexer — compressor, INT8 scores against the key cache, top-k."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ...model.config import COMPRESS_RATIO, DeepSeekV4Config
from ...model.quant import quantize_int8_per_row
from ...model.rope import RopeTable
from ...model.state import DEFAULT_BLOCK_SIZE as BLOCK_SIZE
from ...model.state import IndexerState
from ...model.structs import IndexerOut
from ...model.weights import IndexerWeights
from ..case_inputs import CaseInputs
from ..costs import BF16, FP32, INT8, INT32, OpCost, blocks_spanned, closed_rows, rope_rows_bytes
from ..registry import OpDescriptor, Output, Tolerance
from ..validate import check_indexer
from .indexer_compressor import MUTATED_STATE, STATE_OUTPUTS
from .indexer_compressor import case_args as compressor_case_args
from .indexer_compressor import cost as compressor_cost

SCORE = Tolerance(1e-4, 1 / 128)  # spec §6: score, and the scores behind the chosen top-k indices


def indexer(
    x: torch.Tensor,
    qr: torch.Tensor,
    qr_scale: torch.Tensor,
    w: IndexerWeights,
    state: IndexerState,
    start_pos: int | torch.Tensor,
    offset: int,
    rope: RopeTable,
    *,
    topk: int,
    eps: float = 1e-6,
    backend: str = "auto",
    out: IndexerOut | None = None,
) -> IndexerOut:
    """Lightning indexer: compress this step's keys, score the cache, select the top-k (spec §5).

    Args:
        x: ``[B, S, D] bf16`` hidden states.
        qr: ``[B*S, QL] int8`` and ``qr_scale``: ``[B*S, 1] fp32``, from ``qkv_proj_rope``.
        w: ``IndexerWeights``; ``HI`` from ``w.weights_proj``, ``HID`` from ``w.compressor.norm_w``.
        state: ``IndexerState``, updated in place by the compressor first (see ``indexer_compressor``).
        start_pos: an int, or an int tensor ``[B]``; token ``s`` of row ``b`` sits at
            ``start_pos[b] + s`` and sees cache rows ``j < (position + 1) // 4``.
        offset: added to every selected index (the attention passes its window size).
        rope: the compressed-layer ``RopeTable``.
        topk: how many indices to select per token (``index_topk``).
        eps: RMSNorm epsilon of the compressor.
        backend: ``"reference"``, ``"triton"`` or ``"auto"`` (Triton on CUDA, else the reference).
        out: optional preallocated ``IndexerOut`` to write into (returned): ``score [B, S, L] fp32``
            with ``L >= max_b cache_len[b]`` (every entry a token cannot see is written as masked,
            so a fixed ``L`` serves every step) and ``topk_idxs [B, S, topk] int32``. The Triton
            backend takes ``L <= 2^24`` (16777216 keys, its top-k's limit; without ``out`` the same
            holds for ``max_b cache_len[b]``): a wider ``L`` is refused with a ``ValueError`` naming
            ``out.score`` before anything is written; the reference takes any ``L``.

    Returns:
        ``IndexerOut(score [B, S, max_b cache_len[b]] fp32, topk_idxs [B, S, topk] int32)`` with
        ``cache_len[b] = (start_pos[b] + S) // 4``; invisible scores are ``-3.4028235e38`` and
        unused index slots ``-1``.
    """


def validate(args: dict[str, Any], out: IndexerOut | None) -> dict[str, Any]:
    return {"start_pos": check_indexer(**args, out=out)}


def case_args(c: CaseInputs) -> dict[str, Any]:
    args = compressor_case_args(c)
    q = torch.randn(c.batch * c.seq, c.cfg.q_lora_rank, generator=c.generator, dtype=torch.float32)
    qr, qr_scale = quantize_int8_per_row(q)
    args.update(
        w=c.indexer_weights,
        qr=qr.to(c.device),
        qr_scale=qr_scale.to(c.device),
        offset=c.cfg.sliding_window,
        topk=c.cfg.index_topk,
    )
    return args


def cost(
    cfg: DeepSeekV4Config, start_pos: Sequence[int], seq: int, topk: int | None = None, block_size: int = BLOCK_SIZE
) -> OpCost:
    """``indexer`` (compressor included) for batch rows starting at ``start_pos[b]`` (spec §5); the
    keys are read from the pool (a row of ``IndexerState.key_format``: 132 B at HID=128). The
    compressor's RoPE rows and block-table entries are counted with the scoring's, once: one RoPE
    row per distinct position (the tokens' and the new keys' blocks'), one entry per block of a
    batch row's ``cache_len`` rows (those read and those the step writes)."""
    topk = cfg.index_topk if topk is None else topk
    comp = compressor_cost(cfg, start_pos, seq, block_size)
    shared = ("rope rows (blocks)", "block_table (written rows)")  # counted below, with the scoring's
    b, t = len(start_pos), len(start_pos) * seq
    d, ql, hi, hid = cfg.hidden_size, cfg.q_lora_rank, cfg.index_n_heads, cfg.index_head_dim
    cache_len = [(p + seq) // COMPRESS_RATIO for p in start_pos]
    old_rows = sum(p // COMPRESS_RATIO for p in start_pos)  # rows this step did not write
    visible = sum((p + s + 1) // COMPRESS_RATIO for p in start_pos for s in range(seq))
    positions = {p + s for p in start_pos for s in range(seq)}
    positions |= {COMPRESS_RATIO * j for p in start_pos for j in closed_rows(p, seq, COMPRESS_RATIO)}
    reads = {
        **{k: v for k, v in comp.reads.items() if k not in shared},
        "qr": t * ql * INT8,
        "qr_scale": t * FP32,
        "wq_b": hi * hid * ql * INT8,
        "wq_b_scale": hi * hid * FP32,
        "weights_proj": hi * d * BF16,
        "rope rows (tokens and new keys)": rope_rows_bytes(cfg, positions),
        "keys + key_scale (old rows)": old_rows * IndexerState.key_format.row_bytes(hid),
        "block_table (rows read or written)": sum(blocks_spanned(0, n, block_size) for n in cache_len) * INT32,
    }
    writes = {**comp.writes, "score": b * seq * max(cache_len) * FP32, "topk_idxs": t * topk * INT32}
    flops = {
        "bf16": comp.flops["bf16"] + 2 * t * d * hi,
        "int8": 2 * t * ql * hi * hid + 2 * hi * hid * visible,
        "fp32": comp.flops["fp32"] + 2 * t * hi * hid * hid,
    }
    return OpCost("indexer", reads, writes, flops)


def fake_result(args: dict[str, Any]) -> IndexerOut:
    x = args["x"]
    b, s = x.shape[:2]
    cache_len = torch.library.get_ctx().new_dynamic_size()  # (start_pos + S) // 4: known at run time only
    return IndexerOut(
        x.new_empty((b, s, cache_len), dtype=torch.float32),
        x.new_empty((b, s, args["topk"]), dtype=torch.int32),
    )


INDEXER = OpDescriptor(
    name="indexer",
    signature=indexer,
    outputs=(Output("score", SCORE, "score"), Output("topk_idxs", SCORE, "topk"), *STATE_OUTPUTS),
    mutates=MUTATED_STATE,
    validate=validate,
    case_args=case_args,
    cost=cost,
    fake_result=fake_result,
    implementations={
        "reference": "dsv4.reference.indexer:indexer",
        "triton": "dsv4.kernels.lightning_indexer:indexer",
    },
    cache_bound=True,
)

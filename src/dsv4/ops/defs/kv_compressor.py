"""``kv_compressor`` (attention spec §3): the main compressor of CSA (ratio 4, overlapping windows)
and HCA (disjoint windows) layers, writing one FP8 KV row per closed block."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ...model.attention_state import CompressorState, compressor_dims
from ...model.config import DeepSeekV4Config
from ...model.pool_format import FP8_KV
from ...model.rope import RopeTable
from ...model.state import DEFAULT_BLOCK_SIZE
from ...model.weights import CompressorWeights
from ..attention_cases import kv_compressor_args
from ..case_inputs import CaseInputs
from ..costs import BF16, FP32, INT32, INT64, OpCost, blocks_spanned, closed_rows, ring_traffic, rope_rows_bytes
from ..registry import OpDescriptor, Output, Tolerance
from ..validate_attention import check_kv_compressor

STATE = Tolerance(1e-4, 1e-4, 0.0)  # attention spec §8: kv_state, score_state (every element)
ROWS = Tolerance(1e-4, 1 / 128)  # §8: dequantized compressed rows written (the rest within one e4m3 step)
EXACT = Tolerance(0.0, 0.0, 0.0)
MUTATED = ("state.kv_state", "state.score_state", "state.pool.nope", "state.pool.rope", "state.pool.scale")


def kv_compressor(
    x: torch.Tensor,
    w: CompressorWeights,
    state: CompressorState,
    start_pos: int | torch.Tensor,
    rope: RopeTable,
    *,
    eps: float = 1e-6,
    backend: str = "auto",
) -> None:
    """Advance a CSA or HCA layer's compressor over one step of ``S`` tokens per sequence (attention spec A3).

    Args:
        x: ``[B, S, D] bf16`` hidden states of the step's tokens (the ``x`` of ``qkv_proj_rope``), in order.
        w: the layer's ``CompressorWeights``: ``wkv``, ``wgate [COFF*HD, D] bf16``, ``ape [RC, COFF*HD]
            fp32``, ``norm_w [HD]``; the ratio ``RC`` is the rows of ``ape`` (4: overlapping windows,
            ``COFF = 2``; else disjoint, ``COFF = 1``).
        state: ``CompressorState`` with at least ``B`` slots; slots ``0..B-1`` are updated in place:
            the ring slot ``p % (COFF*RC)`` of every position, and one FP8 KV row ``j`` of
            ``state.pool`` (through its block table; ``-1`` entries skipped) per block
            ``[RC*j, RC*j + RC)`` this step closes. Nothing else changes.
        start_pos: position of each slot's first token: an int, or an int tensor ``[B]``.
        rope: the layer's ``RopeTable`` (the compressed rows are rotated at their block's first position).
        eps: RMSNorm epsilon.
        backend: ``"reference"``, ``"triton"`` or ``"auto"`` (Triton on CUDA, else the reference).
    """


def validate(args: dict[str, Any], out: None) -> dict[str, Any]:
    return {"start_pos": check_kv_compressor(**args)}


def case_args(c: CaseInputs, kind: str = "csa") -> dict[str, Any]:
    return kv_compressor_args(c, c.cfg.kind_ratio(kind))


def cost(
    cfg: DeepSeekV4Config,
    start_pos: Sequence[int],
    seq: int,
    kind: str = "csa",
    ratio: int | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> OpCost:
    """``kv_compressor`` of a ``kind`` layer (default CSA; ``ratio`` default: the preset's first layer of
    that kind's) for rows starting at ``start_pos[b]``."""
    ratio = cfg.kind_ratio(kind) if ratio is None else ratio
    b, d, hd = len(start_pos), cfg.hidden_size, cfg.head_dim
    coff, _ = compressor_dims(ratio, hd)
    ring = [ring_traffic(p, seq, ratio, coff) for p in start_pos]
    halves_read, halves_written = sum(r for r, _, _ in ring), sum(w for _, w, _ in ring)
    closed = sum(c for _, _, c in ring)
    half = hd * FP32  # one slot half of one state tensor
    written = [closed_rows(p, seq, ratio) for p in start_pos]  # each slot's new compressed rows
    reads = {
        "x": b * seq * d * BF16,
        "start_pos": b * INT64,
        "w.wkv + w.wgate": 2 * coff * hd * d * BF16,
        "w.ape (rows used)": len({(p + s) % ratio for p in start_pos for s in range(seq)}) * coff * hd * FP32,
        "w.norm_w": hd * BF16 if closed else 0,
        "rope rows (blocks)": rope_rows_bytes(cfg, (ratio * j for r in written for j in r)),
        "kv_state + score_state": 2 * halves_read * half,
        "block_table (written rows)": sum(blocks_spanned(r.start, r.stop, block_size) for r in written) * INT32,
    }
    writes = {
        "kv_state + score_state": 2 * halves_written * half,
        "compressed rows (FP8)": closed * FP8_KV.row_bytes(cfg.qk_nope_head_dim, tail=cfg.qk_rope_head_dim),
    }
    flops = {"bf16": 2 * 2 * b * seq * d * coff * hd}
    return OpCost("kv_compressor", reads, writes, flops)


KV_COMPRESSOR = OpDescriptor(
    name="kv_compressor",
    signature=kv_compressor,
    outputs=(
        Output("kv_state", STATE),
        Output("score_state", STATE),
        Output("pool", ROWS, "fp8_rows"),
        Output("pool.block_table", EXACT),  # the ops never change it
    ),
    mutates=MUTATED,
    validate=validate,
    case_args=case_args,
    cost=cost,
    kinds=("csa", "hca"),
    implementations={
        "reference": "dsv4.reference.compressor:kv_compressor",
        "triton": "dsv4.kernels.compressor:kv_compressor",
    },
)

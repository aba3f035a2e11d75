"""``indexer_compressor`` (spec §4): the ratio-4 compressor that appends one key per closed block."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ...model.config import COMPRESS_RATIO, DeepSeekV4Config
from ...model.rope import RopeTable
from ...model.state import DEFAULT_BLOCK_SIZE, IndexerState
from ...model.weights import CompressorWeights
from ..case_inputs import CaseInputs
from ..costs import BF16, FP32, INT32, INT64, OpCost, blocks_spanned, closed_rows, ring_traffic, rope_rows_bytes
from ..registry import OpDescriptor, Output, Tolerance
from ..validate import check_compressor

STATE = Tolerance(1e-4, 1e-4)  # spec §6: kv_state, score_state
# spec §6: the key rows a step writes: ks within rtol 1/128, at most 10% of a row's k8 differing (each within ±1)
KEYS = Tolerance(0.0, 1 / 128, 0.10)
STATE_OUTPUTS = (
    Output("kv_state", STATE),
    Output("score_state", STATE),
    Output("keys", KEYS, "cache"),  # with key_scale
    Output("block_table", Tolerance(0.0, 0.0, 0.0)),  # the ops never change it
)
MUTATED_STATE = ("state.kv_state", "state.score_state", "state.keys", "state.key_scale")


def indexer_compressor(
    x: torch.Tensor,
    w: CompressorWeights,
    state: IndexerState,
    start_pos: int | torch.Tensor,
    rope: RopeTable,
    *,
    eps: float = 1e-6,
    backend: str = "auto",
) -> None:
    """Advance the ratio-4 compressor over one step of ``S`` tokens per sequence (spec §4).

    Args:
        x: ``[B, S, D] bf16`` hidden states of the step's tokens, in order.
        w: ``CompressorWeights``; ``HID`` comes from ``w.norm_w``.
        state: ``IndexerState`` with at least ``B`` rows; rows ``0..B-1`` are updated in place:
            ``kv_state``/``score_state`` ring slots, and one quantized key row in the pool (through
            ``state.block_table``) per block of 4 positions that this step closes. Nothing else changes.
        start_pos: position of each row's first token: an int, or an int tensor ``[B]``.
        rope: the compressed-key ``RopeTable``.
        eps: RMSNorm epsilon.
        backend: ``"reference"``, ``"triton"`` or ``"auto"`` (Triton on CUDA, else the reference).
    """


def validate(args: dict[str, Any], out: None) -> dict[str, Any]:
    return {"start_pos": check_compressor(**args)}


def case_args(c: CaseInputs) -> dict[str, Any]:
    return {
        "x": c.x,
        "w": c.indexer_weights.compressor,
        "state": c.prefilled_state(),
        "start_pos": c.start.to(c.device),
        "rope": c.rope,
    }


def cost(cfg: DeepSeekV4Config, start_pos: Sequence[int], seq: int, block_size: int = DEFAULT_BLOCK_SIZE) -> OpCost:
    """``indexer_compressor`` for batch rows starting at ``start_pos[b]`` with ``seq`` new tokens each (spec §4)."""
    b, d, hid = len(start_pos), cfg.hidden_size, cfg.index_head_dim
    half_bytes = hid * FP32  # one slot half of one state tensor
    ring = [ring_traffic(p, seq) for p in start_pos]
    halves_read = sum(r for r, _, _ in ring)
    halves_written = sum(w for _, w, _ in ring)
    closed = sum(c for _, _, c in ring)
    ape_rows = len({(p + s) % COMPRESS_RATIO for p in start_pos for s in range(seq)})
    written = [closed_rows(p, seq, COMPRESS_RATIO) for p in start_pos]  # each batch row's new key rows
    reads = {
        "x": b * seq * d * BF16,
        "start_pos": b * INT64,
        "compressor.wkv": 2 * hid * d * BF16,
        "compressor.wgate": 2 * hid * d * BF16,
        "compressor.ape": ape_rows * 2 * hid * FP32,
        "compressor.norm_w": hid * BF16 if closed else 0,
        "rope rows (blocks)": rope_rows_bytes(cfg, (COMPRESS_RATIO * j for r in written for j in r)),
        "kv_state + score_state": 2 * halves_read * half_bytes,
        "block_table (written rows)": sum(blocks_spanned(r.start, r.stop, block_size) for r in written) * INT32,
    }
    writes = {
        "kv_state + score_state": 2 * halves_written * half_bytes,
        "keys + key_scale (new rows)": closed * IndexerState.key_format.row_bytes(hid),
    }
    flops = {"bf16": 2 * b * seq * d * 2 * hid * 2, "fp32": closed * 2 * hid * hid}
    return OpCost("indexer_compressor", reads, writes, flops)


INDEXER_COMPRESSOR = OpDescriptor(
    name="indexer_compressor",
    signature=indexer_compressor,
    outputs=STATE_OUTPUTS,
    mutates=MUTATED_STATE,
    validate=validate,
    case_args=case_args,
    cost=cost,
    implementations={
        "reference": "dsv4.reference.compressor:indexer_compressor",
        "triton": "dsv4.kernels.compressor:indexer_compressor",
    },
)

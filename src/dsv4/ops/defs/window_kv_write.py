"""``window_kv_write`` (attention spec §4): the step's last ``min(S, W)`` KV rows into the window pool."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ...model.attention_state import KVPool
from ...model.config import DeepSeekV4Config
from ...model.pool_format import FP8_KV
from ...model.state import DEFAULT_BLOCK_SIZE
from ..attention_cases import unit_rows, window_pool
from ..case_inputs import CaseInputs
from ..costs import BF16, INT32, INT64, OpCost, blocks_spanned
from ..registry import OpDescriptor, Output, Tolerance
from ..validate_attention import check_window_kv_write

EXACT = Tolerance(0.0, 0.0, 0.0)  # attention spec §8: rows bit-identical, nothing else touched


def window_kv_write(
    kv: torch.Tensor, pool: KVPool, start_pos: int | torch.Tensor, *, window: int, backend: str = "auto"
) -> None:
    """Store the step's KV rows in the window pool (attention spec A4).

    Args:
        kv: ``[B, S, HD] bf16`` (the ``kv`` of ``qkv_proj_rope``).
        pool: the window ``KVPool``; row ``p`` of slot ``b`` (``p = start_pos[b] + s``) becomes
            ``fp8_row(kv[b, s])`` for the last ``min(S, window)`` tokens of each slot (the rows later
            tokens may see); rows in unallocated (``-1``) blocks are skipped. Nothing else changes.
        start_pos: an int, or an int tensor ``[B]``.
        window: the sliding window ``W``.
        backend: ``"reference"``, ``"triton"`` or ``"auto"`` (Triton on CUDA, else the reference).
    """


def validate(args: dict[str, Any], out: None) -> dict[str, Any]:
    return {"start_pos": check_window_kv_write(**args)}


def case_args(c: CaseInputs) -> dict[str, Any]:
    return {
        "kv": unit_rows(c, c.batch, c.seq, c.cfg.head_dim),
        "pool": window_pool(c),
        "start_pos": c.start.to(c.device),
        "window": c.cfg.sliding_window,
    }


def cost(cfg: DeepSeekV4Config, start_pos: Sequence[int], seq: int, block_size: int = DEFAULT_BLOCK_SIZE) -> OpCost:
    """``window_kv_write`` for rows starting at ``start_pos[b]``: ``min(S, W)`` rows per slot, the
    positions ``[start + S - min(S, W), start + S)``, and one block-table entry per block they span."""
    kept = min(seq, cfg.sliding_window)
    rows = len(start_pos) * kept
    blocks = sum(blocks_spanned(p + seq - kept, p + seq, block_size) for p in start_pos)
    reads = {
        "kv (rows written)": rows * cfg.head_dim * BF16,
        "start_pos": len(start_pos) * INT64,
        "block_table (written rows)": blocks * INT32,
    }
    writes = {"window rows (FP8)": rows * FP8_KV.row_bytes(cfg.qk_nope_head_dim, tail=cfg.qk_rope_head_dim)}
    return OpCost("window_kv_write", reads, writes, {})


WINDOW_KV_WRITE = OpDescriptor(
    name="window_kv_write",
    signature=window_kv_write,
    outputs=(Output("pool", EXACT, "exact"),),
    mutates=("pool.nope", "pool.rope", "pool.scale"),
    validate=validate,
    case_args=case_args,
    cost=cost,
    implementations={
        "reference": "dsv4.reference.attention:window_kv_write",
        "triton": "dsv4.kernels.window_kv_write:window_kv_write",
    },
)

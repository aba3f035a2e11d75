"""``window_kv_write`` (attention spec §4): the step's last ``min(S, W)`` KV rows into the window pool."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ...model.attention_state import KVPool
from ...model.config import DeepSeekV4Config
from ...model.fp8_row import row_bytes
from ..attention_cases import unit_rows, window_pool
from ..case_inputs import CaseInputs
from ..costs import BF16, INT32, INT64, OpCost
from ..registry import INT_OR_TENSOR, OpDescriptor, Output, Param, Tolerance
from ..validate_attention import check_window_kv_write

EXACT = Tolerance(0.0, 0.0, 0.0)  # attention spec §8: rows bit-identical, nothing else touched


def validate(kv: Any, pool: Any, start_pos: Any, window: Any, out: Any = None) -> dict[str, Any]:
    pos = check_window_kv_write(kv, pool, start_pos, window)
    return {"kv": kv, "pool": pool, "pos": pos, "window": window}


def case_args(c: CaseInputs) -> dict[str, Any]:
    return {
        "kv": unit_rows(c, c.batch, c.seq, c.cfg.head_dim),
        "pool": window_pool(c),
        "start_pos": c.start.to(c.device),
        "window": c.cfg.sliding_window,
    }


def cost(cfg: DeepSeekV4Config, start_pos: Sequence[int], seq: int) -> OpCost:
    """``window_kv_write`` for rows starting at ``start_pos[b]``: ``min(S, W)`` rows per slot."""
    rows = len(start_pos) * min(seq, cfg.sliding_window)
    reads = {
        "kv (rows written)": rows * cfg.head_dim * BF16,
        "start_pos": len(start_pos) * INT64,
        "block_table (written rows)": rows * INT32,
    }
    writes = {"window rows (FP8)": rows * row_bytes(cfg.head_dim, cfg.qk_rope_head_dim)}
    return OpCost("window_kv_write", reads, writes, {})


WINDOW_KV_WRITE = OpDescriptor(
    name="window_kv_write",
    params=(
        Param("kv", torch.Tensor),
        Param("pool", KVPool),
        Param("start_pos", INT_OR_TENSOR),
        Param("window", int),
    ),
    outputs=(Output("pool", EXACT, "exact"),),
    result=None,
    mutates=("pool.nope", "pool.rope", "pool.scale"),
    validate=validate,
    case_args=case_args,
    cost=cost,
    implementations={"reference": "dsv4.reference.attention:window_kv_write"},
)

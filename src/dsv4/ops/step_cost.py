"""The bytes and FLOPs of one attention step of a layer (attention spec A7): its ops' costs summed."""

from __future__ import annotations

from collections.abc import Sequence

from ..model.config import DeepSeekV4Config
from ..model.state import DEFAULT_BLOCK_SIZE
from .costs import OpCost
from .registry import get_op


def step_costs(
    cfg: DeepSeekV4Config, layer: int, start_pos: Sequence[int], seq: int, block_size: int = DEFAULT_BLOCK_SIZE
) -> list[OpCost]:
    """The cost of each op a step of layer ``layer`` runs (``DecodeAttention``'s order) for slots
    starting at ``start_pos[b]`` with ``seq`` tokens each, the pools in blocks of ``block_size`` rows."""
    kind, ratio = cfg.layer_kind(layer), cfg.layer_ratio(layer)
    costs = [get_op("qkv_proj_rope").cost(cfg, start_pos, seq)]
    if ratio:
        costs.append(get_op("kv_compressor").cost(cfg, start_pos, seq, kind, ratio, block_size=block_size))
    if kind == "csa":
        costs.append(get_op("indexer").cost(cfg, start_pos, seq, block_size=block_size))
    costs.append(get_op("sparse_attn_write").cost(cfg, start_pos, seq, kind, ratio or None, block_size=block_size))
    costs.append(get_op("o_proj").cost(cfg, start_pos, seq))
    return costs


def step_bytes(
    cfg: DeepSeekV4Config, layer: int, start_pos: Sequence[int], seq: int, block_size: int = DEFAULT_BLOCK_SIZE
) -> int:
    """The minimal bytes of a step of layer ``layer`` (every input read once, every output written once)."""
    return sum(c.bytes for c in step_costs(cfg, layer, start_pos, seq, block_size))

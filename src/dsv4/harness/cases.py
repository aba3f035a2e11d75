"""Seeded inputs for one call of an op, and how to run a backend on them.

A ``Case`` is what the golden files, ``dsv4 run``, the tests and the benchmark share: the op's
arguments (weights, state, positions included) for a preset, a mode and a seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import ops
from ..model.config import COMPRESS_RATIO, DeepSeekV4Config, mode_shape
from ..model.quant import quantize_int8_per_row
from ..model.rope import RopeTable, rope_table
from ..model.state import IndexerState
from ..model.weights import synthetic_activations, synthetic_weights
from .golden import step_inputs

OPS = ("qkv_proj_rope", "indexer_compressor", "indexer")
DEFAULT_MAX_POSITION = 8192  # positions a case spans unless told otherwise (keeps flash tables small)


@dataclass
class Case:
    """One op call: ``op``, its keyword ``args`` and where they came from (``meta``)."""

    op: str
    args: dict[str, Any]
    meta: dict[str, Any]

    def state(self) -> IndexerState | None:
        return self.args.get("state")

    def compare_inputs(self) -> dict[str, Any]:
        """What ``golden.compare`` needs of the inputs (offset, start_pos, seq, pre-step cache)."""
        if self.op == "qkv_proj_rope":
            return {}
        a = self.args
        return step_inputs(a["x"], a["start_pos"], a["state"].idx_kv_cache, a.get("offset", 0))


def prefilled_state(
    cfg: DeepSeekV4Config,
    batch: int,
    max_position: int,
    start_pos: torch.Tensor,
    seed: int,
    device: torch.device | str | None = None,
) -> IndexerState:
    """State as if each row had already seen ``start_pos[b]`` tokens: cache rows of those blocks
    hold unit-RMS bf16 keys; the compressor ring holds projection-sized values (score_state -inf
    where a row has not written yet)."""
    g = torch.Generator().manual_seed(seed + 7919)
    state = IndexerState.empty(cfg, batch, max_position)
    width = 2 * cfg.index_head_dim
    for b, p in enumerate(start_pos.tolist()):
        done, r = divmod(p, COMPRESS_RATIO)
        state.idx_kv_cache[b, :done] = torch.randn(done, cfg.index_head_dim, generator=g).to(torch.bfloat16)
        ring = [state.kv_state[b], state.score_state[b]]
        for t in ring:
            if done:  # slots 0..3: the last closed block; 4+r..7 still hold its copy after the shift
                t[:COMPRESS_RATIO] = torch.randn(COMPRESS_RATIO, width, generator=g)
                t[COMPRESS_RATIO + r :] = t[r:COMPRESS_RATIO]
            t[COMPRESS_RATIO : COMPRESS_RATIO + r] = torch.randn(r, width, generator=g)
    return state if device is None else state.to(device)


def make_case(
    cfg: DeepSeekV4Config,
    op: str,
    mode: str = "decode",
    seed: int = 0,
    device: torch.device | str | None = None,
    max_position: int | None = None,
    batch: int | None = None,
    seq: int | None = None,
    start_pos: int | list[int] | None = None,
) -> Case:
    """Seeded arguments of ``op`` for preset ``cfg`` in ``mode`` (``decode`` or ``prefill``).

    Decode rows start at different random positions (a per-row ``start_pos`` tensor) with a
    prefilled state; prefill starts every row at 0 with an empty state. ``batch``/``seq``
    override the mode's shape; ``start_pos`` puts every row at that position, or row ``b`` at
    ``start_pos[b]`` (state prefilled either way).
    """
    if op not in OPS:
        raise ValueError(f"op: expected one of {OPS}, got {op!r}")
    shape = mode_shape(cfg, mode)
    b, s = batch or shape.batch, seq or shape.seq
    n = min(cfg.max_position_embeddings, max_position or DEFAULT_MAX_POSITION)
    n -= n % COMPRESS_RATIO
    if n < s + COMPRESS_RATIO:
        raise ValueError(f"max_position {n} too small for S={s}")
    g = torch.Generator().manual_seed(seed)
    if mode == "prefill":
        start = torch.zeros(b, dtype=torch.int64)
    else:
        start = torch.randint(0, n - s + 1, (b,), generator=g)  # drawn either way: same qr for any start_pos
    if start_pos is not None:
        rows = start_pos if isinstance(start_pos, list) else [start_pos] * b
        if len(rows) != b or not all(0 <= p <= n - s for p in rows):
            raise ValueError(
                f"start_pos: expected {b} values in [0, {n - s}] (max_position {n}, S={s}), got {start_pos}"
            )
        start = torch.tensor(rows, dtype=torch.int64)
    weights = synthetic_weights(cfg, seed=seed, device=device)
    rope: RopeTable = rope_table(cfg, "compressed", max_position=n, device=device)
    x = synthetic_activations((b, s, cfg.hidden_size), seed=seed + 1, device=device)
    meta = {"op": op, "preset": cfg.name, "mode": mode, "seed": seed, "batch": b, "seq": s, "max_position": n}
    if op == "qkv_proj_rope":
        positions = (start[:, None] + torch.arange(s)).reshape(-1).to(device)
        args = {"x": x.reshape(b * s, -1), "w": weights.attn, "positions": positions, "rope": rope}
        return Case(op, args, meta)
    state = prefilled_state(cfg, b, n, start, seed, device)
    args = {"x": x, "w": weights.indexer, "state": state, "start_pos": start.to(device), "rope": rope}
    if op == "indexer_compressor":
        args["w"] = weights.indexer.compressor
        return Case(op, args, meta)
    qr, qr_scale = quantize_int8_per_row(torch.randn(b * s, cfg.q_lora_rank, generator=g))
    args.update(qr=qr.to(device), qr_scale=qr_scale.to(device), offset=cfg.sliding_window, topk=cfg.index_topk)
    return Case(op, args, meta)


def clone_args(args: dict[str, Any]) -> dict[str, Any]:
    """The arguments with the caller-owned state copied, so a run leaves ``args`` as they were."""
    out = dict(args)
    if "state" in out:
        out["state"] = out["state"].clone()
    return out


def run_case(case: Case, backend: str) -> dict[str, torch.Tensor]:
    """Run ``case`` on ``backend`` (on a copy of its state) -> every output by name, the state after included."""
    args = clone_args(case.args)
    result = getattr(ops, case.op)(**args, backend=backend)
    out: dict[str, torch.Tensor] = {}
    if result is not None:
        out.update(result._asdict())
    if "state" in args:
        out.update(args["state"].tensors())
    return out

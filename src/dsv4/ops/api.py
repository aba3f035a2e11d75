"""The public ops: validate every argument, pick the backend, run it.

Validation (spec §7) happens before anything is computed, so a call that raises leaves the
caller's state and caches untouched. ``call_op`` does this for any registered op; the functions
below are its typed, documented faces for the built-in ones.
"""

from __future__ import annotations

from typing import Any

import torch

from ..model.rope import RopeTable
from ..model.state import IndexerState
from ..model.structs import QKV, IndexerOut
from ..model.weights import AttnWeights, CompressorWeights, IndexerWeights
from . import defs  # noqa: F401  (registers the built-in ops)
from .backends import implementation
from .registry import get_op


def call_op(name: str, backend: str = "auto", out: Any = None, **args: Any) -> Any:
    """Run op ``name`` on its public ``args``: check them (and ``out``), then call ``backend``'s
    implementation on the device of the first tensor argument. Returns the op's result."""
    desc = get_op(name)
    if out is not None and desc.result is None:
        raise TypeError(f"out: {name} takes no out= (it updates its state in place)")
    kwargs = desc.validate(**args, out=out)
    if out is not None:
        kwargs["out"] = out
    device = next(v.device for v in kwargs.values() if isinstance(v, torch.Tensor))
    return implementation(desc, backend, device)(**kwargs)


def qkv_proj_rope(
    x: torch.Tensor,
    w: AttnWeights,
    positions: torch.Tensor,
    rope: RopeTable,
    *,
    eps: float = 1e-6,
    backend: str = "auto",
    out: QKV | None = None,
) -> QKV:
    """Attention Q/KV projection with RMSNorm and interleaved RoPE (spec §3).

    Args:
        x: ``[T, D] bf16`` attention-normed hidden states, any ``T >= 1``.
        w: ``AttnWeights``; ``H`` and ``HD`` come from ``w.wq_b`` and ``w.wkv``.
        positions: ``[T] int32|int64`` position of every token, inside the rope table.
        rope: the layer's ``RopeTable`` (``R`` = twice its width).
        eps: RMSNorm epsilon.
        backend: ``"reference"``, ``"triton"`` or ``"auto"`` (Triton on CUDA, else the reference).
        out: optional preallocated ``QKV`` to write into (returned).

    Returns:
        ``QKV(q [T, H, HD] bf16, kv [T, HD] bf16, qr [T, QL] int8, qr_scale [T, 1] fp32)``.
    """
    return call_op("qkv_proj_rope", backend, out, x=x, w=w, positions=positions, rope=rope, eps=eps)


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
    """
    call_op("indexer_compressor", backend, x=x, w=w, state=state, start_pos=start_pos, rope=rope, eps=eps)


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
        out: optional preallocated ``IndexerOut`` to write into (returned): ``score [B, S, L] fp32``
            with ``L >= max_b cache_len[b]`` (every entry a token cannot see is written as masked,
            so a fixed ``L`` serves every step) and ``topk_idxs [B, S, topk] int32``.

    Returns:
        ``IndexerOut(score [B, S, max_b cache_len[b]] fp32, topk_idxs [B, S, topk] int32)`` with
        ``cache_len[b] = (start_pos[b] + S) // 4``; invisible scores are ``-3.4028235e38`` and
        unused index slots ``-1``.
    """
    return call_op(
        "indexer", backend, out, x=x, qr=qr, qr_scale=qr_scale, w=w, state=state, start_pos=start_pos,
        offset=offset, rope=rope, topk=topk, eps=eps,
    )  # fmt: skip

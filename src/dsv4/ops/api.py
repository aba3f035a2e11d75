"""The public ops: validate every argument, pick the backend, run it.

Validation (spec §7) happens before anything is computed, so a call that raises leaves the
caller's state and caches untouched. ``call_op`` does this for any registered op; the functions
below are its typed, documented faces for the built-in ones.
"""

from __future__ import annotations

from typing import Any

import torch

from ..model.attention_state import CompressorState, KVPool
from ..model.rope import RopeTable
from ..model.state import IndexerState
from ..model.structs import QKV, AttnOut, IndexerOut, OProjOut
from ..model.weights import AttnWeights, CompressorWeights, IndexerWeights, OProjWeights
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
    """Advance a CSA or HCA layer's compressor over one step of ``S`` tokens per sequence (attention spec §3).

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
    """
    call_op("kv_compressor", backend, x=x, w=w, state=state, start_pos=start_pos, rope=rope, eps=eps)


def window_kv_write(
    kv: torch.Tensor, pool: KVPool, start_pos: int | torch.Tensor, *, window: int, backend: str = "auto"
) -> None:
    """Store the step's KV rows in the window pool (attention spec §4).

    Args:
        kv: ``[B, S, HD] bf16`` (the ``kv`` of ``qkv_proj_rope``).
        pool: the window ``KVPool``; row ``p`` of slot ``b`` (``p = start_pos[b] + s``) becomes
            ``fp8_row(kv[b, s])`` for the last ``min(S, window)`` tokens of each slot (the rows later
            tokens may see); rows in unallocated (``-1``) blocks are skipped. Nothing else changes.
        start_pos: an int, or an int tensor ``[B]``.
        window: the sliding window ``W``.
    """
    call_op("window_kv_write", backend, kv=kv, pool=pool, start_pos=start_pos, window=window)


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
    """Sparse attention with sink over FP8 KV rows, for one step (attention spec §5).

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
        out: optional preallocated ``AttnOut`` to write into (returned).

    Returns:
        ``AttnOut(o [B, S, H, HD] bf16)``.
    """
    return call_op(
        "sparse_attn", backend, out, q=q, kv=kv, start_pos=start_pos, window_pool=window_pool, attn_sink=attn_sink,
        rope=rope, kind=kind, window=window, compress_ratio=compress_ratio, compressed_pool=compressed_pool,
        topk_idxs=topk_idxs, topk_offset=topk_offset,
    )  # fmt: skip


def o_proj(o: torch.Tensor, w: OProjWeights, *, backend: str = "auto", out: OProjOut | None = None) -> OProjOut:
    """Grouped FP8 output projection (attention spec §6).

    Args:
        o: ``[T, H, HD] bf16`` (``sparse_attn``'s output, tokens flattened).
        w: ``OProjWeights``: ``wo_a [G*OL, HG*HD]`` and ``wo_b [D, G*OL]`` float8_e4m3fn with their
            128x128 block scales (fp32), as the checkpoint stores them; ``G = H*HD / (HG*HD)``.
        out: optional preallocated ``OProjOut`` to write into (returned).

    Returns:
        ``OProjOut(y [T, D] bf16)``: ``r = bf16(o_group @ wo_a[g].T)`` per group, FP8-quantized per
        128, times ``wo_b`` with both block scales.
    """
    return call_op("o_proj", backend, out, o=o, w=w)

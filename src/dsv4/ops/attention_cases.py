"""Seeded arguments of the attention ops (``kv_compressor``, ``window_kv_write``, ``sparse_attn``,
``o_proj``) for one step of a ``CaseInputs``: pools paged as an engine pages them, holding stale,
well-formed FP8 rows wherever the step does not write, and a compressor ring that holds what the
sequence's history wrote.

Every draw comes from the case's generator, in a fixed order, so a case depends on its seed only.
"""

from __future__ import annotations

import torch

from ..model.attention_state import CompressorState, KVPool, compressor_dims, kv_row_tables
from ..model.fp8_row import NAN_CODE, SCALE_BIAS
from ..model.state import DEFAULT_BLOCK_SIZE, UNALLOCATED
from ..model.weights import synthetic_compressor
from .case_inputs import CaseInputs


def fill_stale_rows(pool: KVPool, g: torch.Generator) -> None:
    """Every row of ``pool`` a random well-formed FP8 row: codes of any finite e4m3 value, scale
    bytes near ``2^0`` (``e`` in ``[-4, 3]``), rope values unit normal."""
    codes = torch.randint(0, 256, tuple(pool.nope.shape), generator=g, dtype=torch.uint8)
    codes[(codes & 0x7F) == NAN_CODE] = 0  # no NaN codes
    used = pool.nope.shape[-1] // 64
    scale = torch.zeros(tuple(pool.scale.shape), dtype=torch.uint8)
    scale[..., :used] = torch.randint(SCALE_BIAS - 4, SCALE_BIAS + 4, (*pool.scale.shape[:-1], used), generator=g)
    rope = torch.randn(tuple(pool.rope.shape), generator=g, dtype=torch.float32).to(torch.bfloat16)
    device = pool.nope.device
    pool.nope.view(torch.uint8).copy_(codes.to(device))
    pool.scale.copy_(scale.to(device))
    pool.rope.copy_(rope.to(device))


def window_pool(c: CaseInputs, block_size: int = DEFAULT_BLOCK_SIZE) -> KVPool:
    """The window pool of an engine that recycles blocks: slot ``b`` holds blocks (shuffled) for the
    rows ``[max(0, start - W + 1), start + S)`` only, every other table entry ``-1``."""
    cfg, w = c.cfg, c.cfg.sliding_window
    width = -(-c.max_position // block_size)
    spans = [(max(0, p - w + 1) // block_size, (p + c.seq - 1) // block_size + 1) for p in c.start.tolist()]
    total = sum(hi - lo for lo, hi in spans)
    order = torch.randperm(total, generator=c.generator).to(torch.int32)
    table = torch.full((c.batch, width), UNALLOCATED, dtype=torch.int32)
    used = 0
    for b, (lo, hi) in enumerate(spans):
        table[b, lo:hi] = order[used : used + hi - lo]
        used += hi - lo
    pool = KVPool.paged(total, block_size, cfg.head_dim, cfg.qk_rope_head_dim, table, c.device)
    fill_stale_rows(pool, c.generator)
    return pool


def compressed_pool(c: CaseInputs, ratio: int, block_size: int = DEFAULT_BLOCK_SIZE) -> KVPool:
    """A compressed pool in the dense layout with room for ``max_position // ratio`` rows per slot, stale rows."""
    num_blocks, table = kv_row_tables(c.batch, c.max_position // ratio, block_size)
    pool = KVPool.paged(num_blocks, block_size, c.cfg.head_dim, c.cfg.qk_rope_head_dim, table, c.device)
    fill_stale_rows(pool, c.generator)
    return pool


def compressor_state(c: CaseInputs, ratio: int) -> CompressorState:
    """The main compressor's state as if each slot had seen ``start[b]`` tokens: the ring slots of
    its last ``COFF*RC`` positions hold projection-sized values (the rest are empty), stale pool rows."""
    hd = c.cfg.head_dim
    coff, slots = compressor_dims(ratio, hd)
    pool = compressed_pool(c, ratio)
    kv = torch.zeros(c.batch, slots, coff * hd, dtype=torch.float32)
    score = torch.full((c.batch, slots, coff * hd), float("-inf"), dtype=torch.float32)
    for b, p in enumerate(c.start.tolist()):
        for q in range(max(0, p - slots), p):
            kv[b, q % slots] = torch.randn(coff * hd, generator=c.generator, dtype=torch.float32)
            score[b, q % slots] = torch.randn(coff * hd, generator=c.generator, dtype=torch.float32)
    return CompressorState(kv.to(c.device), score.to(c.device), pool)


def kv_compressor_args(c: CaseInputs, ratio: int = 4) -> dict:
    """``kv_compressor`` of a CSA layer (``ratio`` 4) or an HCA layer."""
    return {
        "x": c.x,
        "w": synthetic_compressor(c.cfg, ratio, c.seed).to(c.device),
        "state": compressor_state(c, ratio),
        "start_pos": c.start.to(c.device),
        "rope": c.rope,
    }


def unit_rows(c: CaseInputs, *shape: int) -> torch.Tensor:
    """bf16 ``[*shape]`` with unit-RMS rows (as RMS-normed q and kv heads are)."""
    return torch.randn(shape, generator=c.generator, dtype=torch.float32).to(torch.bfloat16).to(c.device)


def topk_rows(c: CaseInputs, ratio: int, topk: int, offset: int) -> torch.Tensor:
    """``[B, S, topk] int32`` as the indexer returns them: per slot one random set of the rows its last
    token sees (``+ offset``), shared by the step's tokens (adjacent tokens pick nearly the same rows),
    padded with -1; rows a token does not see yet are ignored by ``sparse_attn``."""
    out = torch.full((c.batch, c.seq, topk), -1, dtype=torch.int32)
    for b, p in enumerate(c.start.tolist()):
        vis = (p + c.seq) // ratio
        rows = torch.randperm(vis, generator=c.generator)[:topk].to(torch.int32)
        for s in range(c.seq):
            out[b, s, : rows.numel()] = rows[torch.randperm(rows.numel(), generator=c.generator)] + offset
    return out.to(c.device)


def sparse_attn_args(c: CaseInputs, kind: str = "csa") -> dict:
    """``sparse_attn`` of a ``kind`` layer (ratio 4 for CSA, the first HCA layer's ratio for HCA)."""
    cfg = c.cfg
    ratio = cfg.kind_ratio(kind)
    args = {
        "q": unit_rows(c, c.batch, c.seq, cfg.num_attention_heads, cfg.head_dim),
        "kv": unit_rows(c, c.batch, c.seq, cfg.head_dim),
        "start_pos": c.start.to(c.device),
        "window_pool": window_pool(c),
        "attn_sink": torch.randn(cfg.num_attention_heads, generator=c.generator, dtype=torch.float32).to(c.device),
        "rope": c.rope,
        "kind": kind,
        "window": cfg.sliding_window,
        "compress_ratio": ratio,
        "topk_offset": 0,
    }
    if kind != "swa":
        args["compressed_pool"] = compressed_pool(c, ratio)
    if kind == "csa":
        args["topk_idxs"] = topk_rows(c, ratio, cfg.index_topk, cfg.sliding_window)
        args["topk_offset"] = cfg.sliding_window
    return args

"""Independent expectations for the attention ops (attention spec §3-§6), for the tests' matrices.

Written from the spec, not from the reference: dense per-slot key lists instead of pool gathers,
float64 arithmetic rounded only where the spec rounds, the compressor's rows pooled straight from
the projections of the block's positions (no ring). The FP8 row format itself (``dsv4.fp8_rows``)
is tested on its own (``test_fp8_rows``).
"""

from __future__ import annotations

import torch

import dsv4
from dsv4.ops.attention_cases import fill_stale_rows

BF16, F64 = torch.bfloat16, torch.float64


def bf16(t: torch.Tensor) -> torch.Tensor:
    """Round to bf16 and back to float64."""
    return t.to(BF16).to(F64)


def rope64(u: torch.Tensor, p: int, rope: dsv4.RopeTable, inverse: bool = False) -> torch.Tensor:
    """Interleaved RoPE (or its inverse) of ``u [..., R]`` at position ``p``, float64."""
    c, s = rope.cos[p].to(F64), rope.sin[p].to(F64)
    s = -s if inverse else s
    u0, u1 = u[..., 0::2], u[..., 1::2]
    return torch.stack((u0 * c - u1 * s, u0 * s + u1 * c), dim=-1).flatten(-2)


def paged_pool(
    g: torch.Generator, spans: list[tuple[int, int]], width: int, cfg: dsv4.DeepSeekV4Config, bs: int
) -> dsv4.KVPool:
    """A pool whose slot ``b`` holds blocks (in shuffled order) for its rows ``[lo, hi)`` of ``spans[b]``,
    every other table entry -1, every row a stale well-formed FP8 row."""
    cols = [(lo // bs, -(-hi // bs)) for lo, hi in spans]
    total = max(1, sum(max(0, c1 - c0) for c0, c1 in cols))
    order = torch.randperm(total, generator=g).to(torch.int32)
    table = torch.full((len(spans), width), -1, dtype=torch.int32)
    used = 0
    for b, (c0, c1) in enumerate(cols):
        if c1 > c0:
            table[b, c0:c1] = order[used : used + c1 - c0]
            used += c1 - c0
    pool = dsv4.KVPool.paged(total, bs, cfg.head_dim, cfg.qk_rope_head_dim, table)
    fill_stale_rows(pool, g)
    return pool


def stored(v: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """A bf16 row as a pool stores it, decoded (float64)."""
    return dsv4.dequantize_fp8_rows(*dsv4.fp8_rows(v.to(BF16), rope_dim)).to(F64)


def compressed_row(
    xs: dict[int, torch.Tensor], j: int, w: dsv4.CompressorWeights, rope: dsv4.RopeTable, eps: float = 1e-6
) -> torch.Tensor:
    """Compressed row ``j`` (bf16 ``[HD]``) from the hidden states ``xs[p]`` of its positions (spec §3):
    candidates are block ``j``'s positions (columns ``[HD:2HD)`` when overlapping) and, when
    overlapping and ``j > 0``, block ``j-1``'s (columns ``[0:HD)``); softmax per column, then
    ``bf16(rms(bf16(k)))`` and RoPE at ``RC*j`` rounded to bf16."""
    hd, ratio = w.norm_w.shape[0], w.ape.shape[0]
    coff = w.wkv.shape[0] // hd
    wkv, wgate, ape = w.wkv.to(F64), w.wgate.to(F64), w.ape.to(F64)

    def proj(p: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = xs[p].to(F64)
        return x @ wkv.T, x @ wgate.T + ape[p % ratio]

    kvs, scores = [], []
    if coff == 2 and j > 0:
        for p in range(ratio * (j - 1), ratio * j):
            kv, sc = proj(p)
            kvs.append(kv[:hd])
            scores.append(sc[:hd])
    for p in range(ratio * j, ratio * j + ratio):
        kv, sc = proj(p)
        kvs.append(kv[hd:] if coff == 2 else kv)
        scores.append(sc[hd:] if coff == 2 else sc)
    k = (torch.stack(kvs) * torch.softmax(torch.stack(scores), dim=0)).sum(0)
    k = bf16(k)
    k = bf16(k / torch.sqrt(k.pow(2).mean() + eps) * w.norm_w.to(F64))
    nope = hd - rope.rope_dim
    k[nope:] = bf16(rope64(k[nope:], ratio * j, rope))
    return k.to(BF16)


class Decoded:
    """Every row of a pool decoded once (float64 ``[NB, bs, HD]``), read by slot and row through its table."""

    def __init__(self, pool: dsv4.KVPool) -> None:
        self.values = dsv4.dequantize_fp8_rows(pool.nope, pool.scale, pool.rope).to(F64)
        self.table = pool.block_table.long()
        self.bs = pool.nope.shape[1]

    def rows(self, b: int, rows: list[int]) -> torch.Tensor:
        r = torch.tensor(rows, dtype=torch.long)
        block = self.table[b, r // self.bs]
        assert bool((block >= 0).all()), (b, rows)
        return self.values[block, r % self.bs]


def token_keys(
    b: int, p: int, start: int, own: torch.Tensor, win: Decoded, window: int, kind: str, ratio: int,
    cmp: Decoded | None, topk: torch.Tensor | None, offset: int,
) -> torch.Tensor:  # fmt: skip
    """Every key row (float64 ``[n, HD]``) the token at ``p`` of slot ``b`` attends to (spec §5):
    its window (pool rows below ``start``, this call's stored rows ``own [S, HD]`` from there on),
    then the compressed rows it sees."""
    lo = max(0, p - window + 1)
    parts = [win.rows(b, list(range(lo, start)))] if lo < start else []
    parts.append(own[max(lo, start) - start : p + 1 - start])
    vis = (p + 1) // ratio if ratio else 0
    if kind == "hca":
        chosen = list(range(vis))
    elif kind == "csa":
        assert topk is not None
        chosen = [e - offset for e in topk.tolist() if e >= 0 and 0 <= e - offset < vis]
    else:
        chosen = []
    if chosen:
        assert cmp is not None
        parts.append(cmp.rows(b, chosen))
    return torch.cat(parts)


def attention(q: torch.Tensor, keys: torch.Tensor, sink: torch.Tensor, p: int, rope: dsv4.RopeTable) -> torch.Tensor:
    """``o [H, HD] bf16`` of one token (spec §5 steps 1-5) in float64, rounded where the spec rounds."""
    hd = q.shape[-1]
    z = (q.to(F64) @ keys.T) * hd**-0.5  # [H, n]
    m = z.max(dim=-1, keepdim=True).values
    e = torch.exp(z - m)
    den = e.sum(-1) + torch.exp(sink.to(F64) - m[:, 0])
    o1 = bf16((bf16(e) @ keys) / den[:, None])
    nope = hd - rope.rope_dim
    o1[:, nope:] = bf16(rope64(o1[:, nope:], p, rope, inverse=True))
    return o1.to(BF16)


def put_row(pool: dsv4.KVPool, b: int, r: int, v: torch.Tensor) -> bool:
    """Store ``fp8_row(v)`` at row ``r`` of slot ``b`` by hand (through the table); False when the
    row's block is not allocated (nothing stored)."""
    bs = pool.nope.shape[1]
    block = int(pool.block_table[b, r // bs])
    if block < 0:
        return False
    q = dsv4.fp8_rows(v.to(BF16)[None], pool.rope.shape[-1])
    pool.nope[block, r % bs], pool.scale[block, r % bs], pool.rope[block, r % bs] = q.nope[0], q.scale[0], q.rope[0]
    return True

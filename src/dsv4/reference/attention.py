"""Reference ``window_kv_write`` (attention spec §4) and ``sparse_attn`` (§5), literally, in fp32.

``sparse_attn`` gathers each token's keys (its window, and the compressed rows it sees), then takes
one softmax pass with the global maximum; the sink adds one logit whose value row is zero.
"""

from __future__ import annotations

import torch

from ..model.attention_state import KVPool
from ..model.fp8_row import fp8_round_trip
from ..model.rope import RopeTable
from ..model.structs import AttnOut, StepPositions
from .common import inverse_rope


def window_kv_write(kv: torch.Tensor, pool: KVPool, pos: StepPositions, window: int) -> None:
    """``kv [B, S, HD] bf16``: store ``fp8_row(kv[b, s])`` at window row ``p = start[b] + s`` for the
    last ``min(S, window)`` tokens of each slot (rows in unallocated blocks are skipped)."""
    b, s = kv.shape[:2]
    first = max(0, s - window)
    slots = torch.arange(b, device=kv.device).repeat_interleave(s - first)
    steps = torch.arange(first, s, device=kv.device).repeat(b)
    pool.write(slots, pos.start[slots] + steps, kv[slots, steps])


def _host_starts(pos: StepPositions) -> list[int]:
    return list(pos.start_host) if pos.start_host is not None else pos.start.tolist()


def token_keys(
    b: int,
    p: int,
    start: int,
    own: torch.Tensor,
    window_pool: KVPool,
    window: int,
    kind: str,
    ratio: int,
    compressed: KVPool | None,
    topk: torch.Tensor | None,
    topk_offset: int,
) -> torch.Tensor:
    """The keys of the token at position ``p`` of slot ``b`` (``[n, HD] bf16``, spec §5): its window
    (pool rows below ``start``, this call's rows ``own [S, HD]`` from ``start`` on), then the
    compressed rows it sees (HCA: every row ``j < vis(p)``; CSA: each valid top-k entry, repeats
    counted)."""
    device = own.device
    lo = max(0, p - window + 1)
    parts = []
    if lo < start:
        rows = torch.arange(lo, min(start, p + 1), device=device)
        parts.append(window_pool.read(torch.full_like(rows, b), rows))
    parts.append(own[max(lo, start) - start : p + 1 - start])
    if kind != "swa":
        vis = (p + 1) // ratio
        if kind == "hca":
            rows = torch.arange(vis, device=device)
        else:
            j = topk.long() - topk_offset
            rows = j[(topk >= 0) & (j >= 0) & (j < vis)]
        if rows.numel():
            parts.append(compressed.read(torch.full_like(rows, b), rows))
    return torch.cat(parts)


def sparse_attn(
    q: torch.Tensor,
    kv: torch.Tensor,
    pos: StepPositions,
    window_pool: KVPool,
    attn_sink: torch.Tensor,
    rope: RopeTable,
    kind: str,
    window: int,
    compress_ratio: int,
    compressed: KVPool | None,
    topk_idxs: torch.Tensor | None,
    topk_offset: int,
    out: AttnOut | None = None,
) -> AttnOut:
    """``q [B, S, H, HD] bf16``, ``kv [B, S, HD] bf16`` -> ``AttnOut(o [B, S, H, HD] bf16)``.

    Per token and head: ``z = (q . k) * HD^-0.5`` over its keys, ``m = max z``, ``e = exp(z - m)``,
    ``o1 = bf16(sum(bf16(e) * k) / (sum(e) + exp(sink - m)))`` (fp32), then the inverse RoPE of
    ``o1``'s last R entries at the token's position (K = V: one MQA head for all H)."""
    b_, s_, h, hd = q.shape
    nope = hd - rope.rope_dim
    own = fp8_round_trip(kv, rope.rope_dim)  # this call's rows as the pool will hold them
    o = torch.empty(q.shape, dtype=torch.bfloat16, device=q.device) if out is None else out.o
    sink = attn_sink.to(torch.float32)
    for b, start in enumerate(_host_starts(pos)):
        for s in range(s_):
            p = start + s
            topk = None if topk_idxs is None else topk_idxs[b, s]
            keys = token_keys(
                b, p, start, own[b], window_pool, window, kind, compress_ratio, compressed, topk, topk_offset
            )
            k = keys.to(torch.float32)  # [n, HD]
            z = (q[b, s].to(torch.float32) @ k.T) * hd**-0.5  # [H, n]
            m = z.amax(dim=-1, keepdim=True)
            e = torch.exp(z - m)
            den = e.sum(dim=-1) + torch.exp(sink - m[:, 0])
            o1 = ((e.to(torch.bfloat16).to(torch.float32) @ k) / den[:, None]).to(torch.bfloat16)
            at = torch.full((h,), p, dtype=torch.long, device=q.device)
            o[b, s, :, :nope] = o1[:, :nope]
            o[b, s, :, nope:] = inverse_rope(o1[:, nope:].to(torch.float32), at, rope).to(torch.bfloat16)
    return AttnOut(o) if out is None else out

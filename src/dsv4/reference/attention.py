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


def _slot_rows(pool: KVPool, b: int, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` of slot ``b`` decoded (``[n, HD] bf16``)."""
    return pool.read(torch.full_like(rows, b), rows)


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

    Keys of the token at ``p`` of slot ``b`` (one MQA head for all H, value = key): the window,
    positions ``max(0, p - W + 1) .. p`` (rows below ``start[b]`` from the window pool, the rest this
    call's ``kv`` as the pool will store it); HCA: every compressed row ``j < (p + 1) // RC``; CSA:
    the row ``e - topk_offset`` of each entry ``e`` of ``topk_idxs[b, s]`` that is one of those
    (repeats counted). Each slot's rows are decoded once. Per token and head: ``z = (q . k) * HD^-0.5``,
    ``m = max z``, ``e = exp(z - m)``, ``o1 = bf16(sum(bf16(e) * k) / (sum(e) + exp(sink - m)))``
    (fp32), then the inverse RoPE of ``o1``'s last R entries at ``p``."""
    seq, h, hd = q.shape[1:]
    nope = hd - rope.rope_dim
    own = fp8_round_trip(kv, rope.rope_dim)  # this call's rows as the pool will hold them
    o = torch.empty(q.shape, dtype=torch.bfloat16, device=q.device) if out is None else out.o
    sink = attn_sink.to(torch.float32)
    device = q.device
    for b, start in enumerate(_host_starts(pos)):
        first = max(0, start - window + 1)  # the slot's window keys: positions first .. start + S - 1
        win_keys = torch.cat((_slot_rows(window_pool, b, torch.arange(first, start, device=device)), own[b]))
        vis_last = (start + seq) // compress_ratio if compress_ratio else 0
        if kind == "csa":
            assert topk_idxs is not None  # a CSA layer's call holds its list (checked)
            j = topk_idxs[b].long() - topk_offset  # [S, K]
            valid = (topk_idxs[b] >= 0) & (j >= 0) & (j < vis_last)
            cmp_rows = torch.unique(j[valid])  # every row a token of the slot selects, decoded once
        else:
            cmp_rows = torch.arange(vis_last, device=device)
        cmp_keys = _slot_rows(compressed, b, cmp_rows) if compressed is not None and cmp_rows.numel() else None
        for s in range(seq):
            p = start + s
            vis = (p + 1) // compress_ratio if compress_ratio else 0
            keys = [win_keys[max(0, p - window + 1) - first : p + 1 - first]]
            if kind == "hca" and vis:
                assert cmp_keys is not None  # vis > 0: the slot has compressed rows
                keys.append(cmp_keys[:vis])
            elif kind == "csa":
                js = j[s][valid[s] & (j[s] < vis)]  # in the list's order, repeats kept
                if js.numel():
                    assert cmp_keys is not None  # a selected row: the slot has compressed rows
                    keys.append(cmp_keys[torch.searchsorted(cmp_rows, js)])
            k = torch.cat(keys).to(torch.float32)  # [n, HD]
            z = (q[b, s].to(torch.float32) @ k.T) * hd**-0.5  # [H, n]
            m = z.amax(dim=-1, keepdim=True)
            e = torch.exp(z - m)
            den = e.sum(dim=-1) + torch.exp(sink - m[:, 0])
            o1 = ((e.to(torch.bfloat16).to(torch.float32) @ k) / den[:, None]).to(torch.bfloat16)
            at = torch.full((h,), p, dtype=torch.long, device=device)
            o[b, s, :, :nope] = o1[:, :nope]
            o[b, s, :, nope:] = inverse_rope(o1[:, nope:].to(torch.float32), at, rope).to(torch.bfloat16)
    return AttnOut(o) if out is None else out


def sparse_attn_write(
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
    """``sparse_attn``, then ``window_kv_write(kv, window_pool, pos, window)``: a layer's attention and
    its window rows in one step (attention spec §7, steps 4 and 5)."""
    result = sparse_attn(
        q, kv, pos, window_pool, attn_sink, rope, kind, window, compress_ratio, compressed, topk_idxs, topk_offset,
        out,
    )  # fmt: skip
    window_kv_write(kv, window_pool, pos, window)
    return result

"""The library baseline (``dsv4 bench --backends library``): each op as the composition of library
calls a user could write in an afternoon, within the spec §6 tolerances of the reference.

- GEMMs go to cuBLAS: ``torch.mm`` of the bf16 operands with an fp32 result (``out_dtype``), and
  ``torch._int_mm`` for INT8 x INT8 -> int32; the indexer's scores are one batched product of the
  INT8 queries and keys held as bf16 (integers up to 127 are exact in bf16 and their sums of at
  most 128 products stay below 2^24, so the fp32 result is exact), top-k is ``torch.topk``.
- No Python loop over tokens or rows, and no host read: the step can be captured in a CUDA graph.
  The compressor lays each row's ring and new tokens out by position and pools every block that can
  close in the step at once (``_compress``).
- Where a library call has no kernel (``torch.mm(out_dtype=)`` and ``torch._int_mm`` on a CPU or
  an older torch, shapes cuBLAS refuses), a fallback computes the same products: an fp32 product
  of the bf16 operands, the reference's float64 INT8 product.

The rest is the reference's own math (``reference.common``: RMSNorm, RoPE; ``reference.compressor``:
pooling, the row's finish, the indexer key's rotation; ``reference.indexer.index_query`` with these GEMMs).

The attention ops: ``sparse_attn`` gathers every token's keys (its window, its compressed rows) from
the pools into one dense ``[B*S, keys, HD]`` bf16 tensor, decoded, and takes the softmax with the
sink through two batched GEMMs; ``o_proj`` dequantizes its FP8 weights to bf16 on each call (exact:
power-of-two block scales) and runs both projections on cuBLAS; ``window_kv_write`` is the
reference's rows written with no host read. ``kv_compressor`` has no composition here.
"""

from __future__ import annotations

import torch

from ..model.attention_state import KVPool
from ..model.config import COMPRESS_RATIO
from ..model.fp8_row import (
    ACT_BLOCK,
    dequantize_fp8_rows,
    dequantize_fp8_weight,
    fp8_act_quant,
    fp8_round_trip,
    fp8_rows,
)
from ..model.quant import quantize_int8_per_row
from ..model.rope import RopeTable
from ..model.state import STATE_SLOTS, IndexerState
from ..model.structs import MASKED_SCORE, QKV, AttnOut, IndexerOut, OProjOut, StepPositions, copy_into
from ..model.weights import AttnWeights, CompressorWeights, IndexerWeights, OProjWeights
from ..reference.common import Gemms, int8_matmul, inverse_rope
from ..reference.compressor import finish_row, index_key
from ..reference.indexer import index_query
from ..reference.qkv_proj_rope import qkv_proj_rope as reference_qkv_proj_rope

RATIO = COMPRESS_RATIO
SLOTS = STATE_SLOTS  # the compressor ring: position p in slot p % 8
INT_MM_MIN_ROWS = 32  # torch._int_mm on CUDA wants more than 16 rows (and K, N multiples of 8): pad M
_WORKS: dict[tuple[str, str], bool] = {}  # (call, device) -> whether the library call ran there


def _works(call: str, device: torch.device, probe) -> bool:
    """Whether ``probe()`` (a small instance of a library call) runs on ``device``; asked once per device."""
    key = (call, str(device))
    if key not in _WORKS:
        try:
            probe()
            _WORKS[key] = True
        except (RuntimeError, TypeError, NotImplementedError):  # no such kernel for this device or torch:
            _WORKS[key] = False  # the caller takes its exact generic path instead (int8_matmul, fp32 matmul)
    return _WORKS[key]


def _bf16_f32_ok(device: torch.device) -> bool:
    if device.type != "cuda":  # no CPU kernel for the bf16 -> fp32 overloads
        return False

    def probe() -> None:
        a = torch.ones(16, 16, dtype=torch.bfloat16, device=device)
        torch.mm(a, a, out_dtype=torch.float32)
        torch.bmm(a[None], a[None], out_dtype=torch.float32)

    return _works("mm.dtype", device, probe)


def mm_f32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` as fp32: ``x [..., K]``, ``w [N, K]`` (bf16: cuBLAS with an fp32 result)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.dtype == w.dtype == torch.bfloat16 and _bf16_f32_ok(x2.device):
        out = torch.mm(x2, w.t(), out_dtype=torch.float32)
    else:
        out = x2.to(torch.float32) @ w.to(torch.float32).t()
    return out.view(*x.shape[:-1], w.shape[0])


def int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b.T`` of INT8 matrices: ``a [M, K]``, ``b [N, K]`` -> ``[M, N]`` int32 (``torch._int_mm``)."""
    m, k = a.shape
    if k % 8 or b.shape[0] % 8 or not hasattr(torch, "_int_mm"):
        return int8_matmul(a, b)
    rows = max(INT_MM_MIN_ROWS, -(-m // 8) * 8) if a.is_cuda else m

    def probe() -> None:
        ones = torch.ones(INT_MM_MIN_ROWS, 8, dtype=torch.int8, device=a.device)
        torch._int_mm(ones, ones[:8].t())

    if not _works("_int_mm", a.device, probe):
        return int8_matmul(a, b)
    if rows != m:
        a = torch.cat((a, a.new_zeros(rows - m, k)))
    return torch._int_mm(a, b.t())[:m]


def _int8_dots(q8: torch.Tensor, k8: torch.Tensor) -> torch.Tensor:
    """Exact ``q8 @ k8.T`` per batch row as fp32: ``q8 [B, M, K]``, ``k8 [B, N, K]`` int8, ``K <= 1024``
    (every partial sum of products of integers up to 127 stays below 2^24, exact in fp32)."""
    if _bf16_f32_ok(q8.device):
        return torch.bmm(q8.to(torch.bfloat16), k8.to(torch.bfloat16).transpose(1, 2), out_dtype=torch.float32)
    return torch.bmm(q8.to(torch.float32), k8.to(torch.float32).transpose(1, 2))


LIBRARY = Gemms(mm_f32, int8_mm)


def qkv_proj_rope(
    x: torch.Tensor, w: AttnWeights, positions: torch.Tensor, rope: RopeTable, eps: float, out: QKV | None = None
) -> QKV:
    """The reference's ``qkv_proj_rope`` on cuBLAS GEMMs (same arguments and result)."""
    return reference_qkv_proj_rope(x, w, positions, rope, eps, out, gemms=LIBRARY)


def _gather_rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t [B, L, C]`` at ``index [B, M]`` along L -> ``[B, M, C]``."""
    return torch.gather(t, 1, index[..., None].expand(*index.shape, t.shape[2]))


def _write_rows(dst: torch.Tensor, target: torch.Tensor, write: torch.Tensor, rows: torch.Tensor) -> None:
    """``dst[target[i]] = rows[i]`` where ``write[i]`` (``dst [N, C]``, ``rows [M, C]``), with no host read:
    the rows not written rewrite the first written one's row with its new value (or, when none is
    written, a row with its own value), so a duplicate index never carries two values."""
    lead = torch.argmax(write.to(torch.int32)).view(1)  # the first written row (0 when none is); a 0-dim
    # index would be read on the host (``.item()``), a one-element one stays on the device
    lead_row = torch.where(write[lead, None], rows[lead], dst[target[lead]])  # [1, C]
    dst.index_copy_(0, torch.where(write, target, target[lead]), torch.where(write[:, None], rows, lead_row))


def _compress(
    x: torch.Tensor, w: CompressorWeights, state: IndexerState, pos: StepPositions, rope: RopeTable, eps: float
) -> None:
    """Spec §4 for the whole step at once (``indexer_compressor``).

    Row ``b``'s positions from ``f0 - 4`` (``f0``: the first position of the block being filled) to its
    last are laid out at index ``q - f0 + 4``: positions before the step from ring slot ``q % 8`` (kv 0
    and score -inf before position 0), then the step's projections. A block starting at ``f0 + 4w``
    pools window ``[4w, 4w + 8)``: columns ``[0, HID)`` of its first four tokens, ``[HID, 2*HID)`` of
    the last four. Every window that can close is pooled, and only the blocks that close are written.
    The pool writes stay capturable (``_write_rows``).
    """
    b, s = x.shape[:2]
    hid = w.norm_w.shape[0]
    dev = x.device
    start = pos.start
    f0 = start - start % RATIO
    steps = torch.arange(s, device=dev)
    kvp = mm_f32(x, w.wkv)  # [B, S, 2*HID]
    score = mm_f32(x, w.wgate) + w.ape[(start[:, None] + steps) % RATIO]
    length = -(-(s + 2 * RATIO - 1) // RATIO) * RATIO  # every token of the step, whole windows
    new = (start - f0 + RATIO)[:, None] + steps  # [B, S] where the step's tokens go
    before = (f0 - RATIO)[:, None] + torch.arange(SLOTS, device=dev)  # [B, 8] positions of layout 0..7
    laid_out = []
    for ring, values, empty in ((state.kv_state, kvp, 0.0), (state.score_state, score, float("-inf"))):
        seq = ring.new_zeros(b, length, 2 * hid)
        seq[:, :SLOTS] = _gather_rows(ring[:b], before % SLOTS).masked_fill((before < 0)[..., None], empty)
        laid_out.append(seq.scatter(1, new[..., None].expand(b, s, 2 * hid), values))
    kv_seq, score_seq = laid_out

    windows = pos.max_closing_blocks
    first = f0[:, None] + RATIO * torch.arange(windows, device=dev)  # [B, W] each window's first position
    closes = (first + RATIO - 1 <= (start + s - 1)[:, None]).reshape(-1)

    def win(seq: torch.Tensor) -> torch.Tensor:
        w8 = seq.unfold(1, 2 * RATIO, RATIO)[:, :windows].transpose(2, 3).reshape(-1, 2 * RATIO, 2 * hid)
        return torch.cat((w8[:, :RATIO, :hid], w8[:, RATIO:, hid:]), dim=1)  # [B*W, 8, HID] candidates

    pooled = (win(kv_seq) * torch.softmax(win(score_seq), dim=1)).sum(dim=1)
    keys = index_key(finish_row(pooled, w.norm_w, torch.where(closes, first.reshape(-1), 0), rope, eps))
    k8, k_scale = quantize_int8_per_row(keys)

    rows = first.reshape(-1) // RATIO
    table = state.block_table
    slot_block = rows // state.block_size
    block = table[torch.arange(b, device=dev).repeat_interleave(windows), slot_block.clamp(max=table.shape[1] - 1)]
    write = closes & (slot_block < table.shape[1]) & (block >= 0)
    target = block.long().clamp(min=0) * state.block_size + rows % state.block_size
    _write_rows(state.keys.view(-1, hid), target, write, k8)
    _write_rows(state.key_scale.view(-1, 1), target, write, k_scale)

    # the ring after the step: slot i holds the last position q <= last with q % 8 == i when the step
    # wrote it, else what it held
    last = (start + s - 1)[:, None]
    q = last - (last - torch.arange(SLOTS, device=dev)) % SLOTS  # [B, 8]
    wrote = (q >= start[:, None])[..., None]
    at = (q - f0[:, None] + RATIO).clamp(min=0)
    for ring, seq in ((state.kv_state, kv_seq), (state.score_state, score_seq)):
        ring[:b] = torch.where(wrote, _gather_rows(seq, at), ring[:b])


def indexer_compressor(
    x: torch.Tensor, w: CompressorWeights, state: IndexerState, pos: StepPositions, rope: RopeTable, eps: float
) -> None:
    """``x [B, S, D] bf16``; updates rows ``0..B-1`` of ``state`` in place (spec §4), as the reference does."""
    _compress(x, w, state, pos, rope, eps)


def indexer(
    x: torch.Tensor,
    qr: torch.Tensor,
    qr_scale: torch.Tensor,
    w: IndexerWeights,
    state: IndexerState,
    pos: StepPositions,
    offset: int,
    rope: RopeTable,
    topk: int,
    eps: float,
    out: IndexerOut | None = None,
) -> IndexerOut:
    """Spec §5 (the compressor first), same arguments and result as the reference's ``indexer``."""
    _compress(x, w.compressor, state, pos, rope, eps)
    b, s = x.shape[:2]
    hi, hid = w.weights_proj.shape[0], w.compressor.norm_w.shape[0]
    dev = x.device
    positions = pos.token_positions()
    q = index_query(qr, qr_scale, w, positions.reshape(-1), rope, LIBRARY)
    q8, q_scale = quantize_int8_per_row(q.view(b, s, hi, hid))  # [B, S, HI, HID], [B, S, HI, 1]
    weights = mm_f32(x, w.weights_proj) * hid**-0.5 * hi**-0.5  # [B, S, HI]

    n = pos.max_cache_len
    j = torch.arange(n, device=dev)
    table = state.block_table[:b, j // state.block_size].long().clamp(min=0)  # rows past a row's cache: masked
    k8 = state.keys[table, j % state.block_size]  # [B, n, HID]
    k_scale = state.key_scale[table, j % state.block_size]  # [B, n]
    dots = _int8_dots(q8.view(b, s * hi, hid), k8).view(b, s, hi, n)
    logits = torch.relu(dots * q_scale) * weights[..., None]
    score = logits.sum(dim=2) * k_scale[:, None, :]  # the key scale after the head sum
    visible = (positions + 1) // RATIO
    score = score.masked_fill(j >= visible[..., None], MASKED_SCORE)

    k = min(topk, n)
    chosen = torch.topk(score, k, dim=-1).indices
    rank = torch.arange(topk, device=dev)
    idx = torch.full((b, s, topk), -1, dtype=torch.int32, device=dev)
    idx[..., :k] = (chosen + offset).to(torch.int32)
    idx = idx.masked_fill(rank >= visible.clamp(max=topk)[..., None], -1)
    return copy_into(IndexerOut(score, idx), out)


def _bmm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` per batch as fp32: ``a [N, M, K]``, ``b [N, P, K]`` bf16 (cuBLAS with an fp32 result)."""
    if a.dtype == b.dtype == torch.bfloat16 and _bf16_f32_ok(a.device):
        return torch.bmm(a, b.transpose(1, 2), out_dtype=torch.float32)
    return torch.bmm(a.to(torch.float32), b.to(torch.float32).transpose(1, 2))


def _pool_rows(
    pool: KVPool, slots: torch.Tensor, rows: torch.Tensor, ok: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(deq rows [..., HD] bf16, ok)``: row ``rows`` of slot ``slots`` where ``ok`` and its block is
    allocated, zeros elsewhere (so a stale row's NaN never reaches the products); no host read."""
    rows = torch.where(ok, rows, 0)
    block, offset = pool.locate(slots.expand_as(rows), rows)
    ok = ok & (block >= 0)
    block = torch.where(ok, block, 0)
    deq = dequantize_fp8_rows(pool.nope[block, offset], pool.scale[block, offset], pool.rope[block, offset])
    return torch.where(ok[..., None], deq, 0), ok


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
    """Attention spec §5 with the reference's arguments and result: each token's ``W`` window keys and
    its compressed keys (CSA: one per top-k entry, repeats kept; HCA: every row the pool's table can
    hold, the invisible masked) gathered densely, then ``z = q k^T / sqrt(HD)`` and ``e = exp(z - m)``
    in fp32, ``o = bf16(e) k / (sum e + exp(sink - m))`` and the inverse RoPE, batched over tokens."""
    b, s, h, hd = q.shape
    dev = q.device
    start = pos.start.to(dev).long()
    p = start[:, None] + torch.arange(s, device=dev)  # [B, S] token positions
    slot = torch.arange(b, device=dev)[:, None, None]
    # the window: positions p-W+1 .. p, rows below start from the pool, the rest this call's kv as stored
    wpos = p[..., None] - window + 1 + torch.arange(window, device=dev)  # [B, S, W]
    pooled, from_pool = _pool_rows(window_pool, slot, wpos, (wpos >= 0) & (wpos < start[:, None, None]))
    own = fp8_round_trip(kv, rope.rope_dim)  # [B, S, HD]
    in_call = wpos >= start[:, None, None]
    own_rows = own[slot, (wpos - start[:, None, None]).clamp(0, s - 1)]
    keys, valid = [torch.where(in_call[..., None], own_rows, pooled)], [in_call | from_pool]
    if compress_ratio:
        assert compressed is not None  # a compressed layer's call holds its pool (checked)
        vis = (p + 1) // compress_ratio  # [B, S] compressed rows each token sees
        if kind == "csa":
            assert topk_idxs is not None  # and a CSA call its list
            j = topk_idxs.long() - topk_offset
            ok = (topk_idxs >= 0) & (j >= 0) & (j < vis[..., None])
        else:
            j = torch.arange(compressed.block_table.shape[1] * compressed.block_size, device=dev).expand(b, s, -1)
            ok = j < vis[..., None]
        rows, ok = _pool_rows(compressed, slot, j, ok)
        keys.append(rows)
        valid.append(ok)
    k = torch.cat(keys, dim=2).view(b * s, -1, hd)  # [B*S, L, HD] bf16
    bias = torch.where(torch.cat(valid, dim=2), 0.0, float("-inf")).view(b * s, 1, -1)
    z = _bmm_f32(q.reshape(b * s, h, hd), k) * hd**-0.5 + bias  # [B*S, H, L]
    m = z.amax(dim=-1, keepdim=True)
    e = torch.exp(z - m)
    den = e.sum(dim=-1, keepdim=True) + torch.exp(attn_sink.to(torch.float32)[:, None] - m)
    o1 = (_bmm_f32(e.to(torch.bfloat16), k.transpose(1, 2)) / den).to(torch.bfloat16).view(b, s, h, hd)
    nope = hd - rope.rope_dim
    rot = inverse_rope(o1[..., nope:].to(torch.float32), p, rope).to(torch.bfloat16)
    return copy_into(AttnOut(torch.cat((o1[..., :nope], rot), dim=-1)), out)


def window_kv_write(kv: torch.Tensor, pool: KVPool, pos: StepPositions, window: int) -> None:
    """The reference's ``window_kv_write`` (the FP8 rows of each slot's last ``min(S, W)`` tokens at their
    positions; rows in unallocated blocks skipped), written with no host read (``_write_rows``)."""
    b, s = kv.shape[:2]
    first = max(0, s - window)
    dev = kv.device
    slots = torch.arange(b, device=dev).repeat_interleave(s - first)
    steps = torch.arange(first, s, device=dev).repeat(b)
    block, offset = pool.locate(slots, pos.start.to(dev).long()[slots] + steps)
    target = block.clamp(min=0) * pool.block_size + offset
    rows = fp8_rows(kv[slots, steps], pool.rope_dim)
    for dst, new in ((pool.nope, rows.nope), (pool.scale, rows.scale), (pool.rope, rows.rope)):
        bits = torch.uint8 if dst.element_size() == 1 else dst.dtype  # float8 as its bytes
        _write_rows(dst.view(bits).view(-1, dst.shape[-1]), target, block >= 0, new.view(bits).view(-1, dst.shape[-1]))


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
    """``sparse_attn``, then ``window_kv_write``."""
    result = sparse_attn(
        q, kv, pos, window_pool, attn_sink, rope, kind, window, compress_ratio, compressed, topk_idxs, topk_offset,
        out,
    )  # fmt: skip
    window_kv_write(kv, window_pool, pos, window)
    return result


def o_proj(o: torch.Tensor, w: OProjWeights, out: OProjOut | None = None) -> OProjOut:
    """Attention spec §6 with the reference's arguments and result: ``wo_a`` and ``wo_b`` dequantized to
    bf16 (exact), the grouped projection as one batched GEMM, the FP8 activation quant, the second GEMM."""
    t = o.shape[0]
    rows, cols = w.wo_a.shape  # G*OL, HG*HD
    groups = o.shape[1] * o.shape[2] // cols
    wo_a = dequantize_fp8_weight(w.wo_a, w.wo_a_scale).view(groups, rows // groups, cols)
    r = _bmm_f32(o.reshape(t, groups, cols).transpose(0, 1), wo_a).transpose(0, 1).to(torch.bfloat16)  # [T, G, OL]
    a8, sa = fp8_act_quant(r.reshape(t, rows))
    a = (a8.to(torch.float32) * sa.repeat_interleave(ACT_BLOCK, dim=-1)).to(torch.bfloat16)  # exact
    y = mm_f32(a, dequantize_fp8_weight(w.wo_b, w.wo_b_scale)).to(torch.bfloat16)
    return copy_into(OProjOut(y), out)

"""Argument checks of the attention ops (attention spec §9, adding to spec §7), run before anything
is computed, so a call that raises leaves the caller's pools and rings bit-identical.

As in ``validate``: ``TypeError`` for a wrong kind or dtype, ``ValueError`` for shapes, devices,
ranges and overlapping memory, each naming the argument. Values of tensors on the host are read
there; tensors on a GPU (``start_pos``, block tables) are checked on their device with
``torch._assert_async``, never read back.
"""

from __future__ import annotations

from typing import Any

import torch

from ..model.attention_state import CompressorState, KVPool, compressor_dims
from ..model.config import LAYER_KINDS
from ..model.fp8_row import ACT_BLOCK, check_row_dims
from ..model.structs import AttnOut, OProjOut, StepPositions
from ..model.weights import CompressorWeights, OProjWeights
from .validate import (
    FLOATS,
    INDEX_LIMIT,
    MAX_TOPK,
    _assert_on_device,
    _check_eps,
    _check_instance,
    check_int,
    check_no_overlap,
    check_rope,
    check_table_rows,
    check_tensor,
    last_start,
    on_host,
    pool_rows,
    step_positions,
    tensors_of,
)


def check_step_input(name: str, t: Any, trailing: int) -> torch.Tensor:
    """``t``: a contiguous bf16 tensor ``[B, S, ...]`` (``trailing`` more dims) with ``B, S >= 1``."""
    check_tensor(name, t, torch.bfloat16, (None,) * (2 + trailing), t.device if isinstance(t, torch.Tensor) else None)
    if t.shape[0] < 1 or t.shape[1] < 1:
        raise ValueError(f"{name}: expected B >= 1 and S >= 1, got shape {list(t.shape)}")
    return t


def check_kv_pool(name: str, pool: Any, batch: int, head_dim: int, rope_dim: int, device: torch.device) -> KVPool:
    """``pool``: a ``KVPool`` of rows ``[head_dim]`` (``rope_dim`` bf16) on ``device`` whose parts agree
    on ``NB`` and ``bs`` (a power of two >= 16), with a block table of at least ``batch`` rows."""
    _check_instance(name, pool, KVPool)
    try:
        check_row_dims(head_dim, rope_dim)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    fmt, nope = KVPool.row_format, head_dim - rope_dim
    check_tensor(f"{name}.nope", pool.nope, fmt.code_dtype, (None, None, *fmt.codes_shape(nope)), device)
    blocks, bs = pool.nope.shape[:2]
    if bs < 16 or bs & (bs - 1):
        raise ValueError(f"{name}.nope: expected a block size (dim 1) that is a power of two >= 16, got {bs}")
    check_tensor(f"{name}.rope", pool.rope, fmt.tail_dtype or (), (blocks, bs, rope_dim), device)
    check_tensor(f"{name}.scale", pool.scale, fmt.scale_dtype, (blocks, bs, *fmt.scale_shape(nope)), device)
    check_tensor(f"{name}.block_table", pool.block_table, torch.int32, (None, None), device)
    rows, width = pool.block_table.shape
    if rows < batch or width < 1:
        raise ValueError(f"{name}.block_table: expected [>= {batch}, >= 1] (a row per slot), got {[rows, width]}")
    return pool


def check_row_rope(rope: Any, device: torch.device, head_dim: int, what: str) -> None:
    """``check_rope``, and the FP8 KV rows' rule on ``HD - R`` for the table's ``R`` with ``head_dim``
    (``what``): the pools' rows follow from both, so the table is named before any pool."""
    check_rope(rope, device, head_dim, what)
    try:
        check_row_dims(head_dim, rope.rope_dim)
    except ValueError as e:
        raise ValueError(f"rope: with {what} {head_dim}, {str(e).split(': ', 1)[1]}") from None


def check_positions(
    start_pos: Any, batch: int, seq: int, device: torch.device, limits: list[tuple[int, int, str]]
) -> StepPositions:
    """``start_pos`` (int or int tensor ``[B]``) with every ``start >= 0`` and, for each
    ``(ratio, bound, what)`` of ``limits``, ``(start + S) // ratio <= bound`` (``what`` names it)."""
    pos = step_positions(start_pos, batch, seq, device, bound=0)
    if pos.start_host is None:
        ok = pos.start >= 0
        for ratio, bound, _ in limits:
            ok = ok & (pos.start <= last_start(ratio, bound, seq))
        wants = "; ".join(f"(p + S) // {r} <= {b} ({what})" for r, b, what in limits)
        _assert_on_device(ok, f"start_pos: expected every row's start p >= 0 with {wants}, S={seq}")
        return pos
    for i, p in enumerate(pos.start_host):
        for ratio, bound, what in limits:
            if (p + seq) // ratio > bound:
                raise ValueError(
                    f"start_pos: row {i} at {p} with S={seq} needs (p + S) // {ratio} = {(p + seq) // ratio} "
                    f"<= {bound} ({what})"
                )
    return pos


def check_writes_apart_from_reads(name: str, pool: KVPool, pos: StepPositions, window: int) -> None:
    """``sparse_attn_write``: no pool row the step writes (each slot's last ``min(S, W)`` rows) is a row
    it reads (the window rows below each slot's start, any slot's): in one launch the write would race
    with the read (attention spec §7). On the host when the table is there, else on the device."""
    table, bs, s = pool.block_table[: pos.batch], pool.block_size, int(pos.seq)
    start = pos.start.to(table.device)
    if window < 2:  # a window of one row reads no pool row
        return
    span = min(window - 1, pool.rows)  # the rows below a start, which is at most the rows the table addresses
    read = pool_rows(table, bs, (start - window + 1).clamp_min(0), start, span, 0)
    written = pool_rows(table, bs, start + max(0, s - window), start + s, min(s, window), read.numel())
    apart = ~torch.isin(written, read).any()
    message = (
        f"{name}.block_table: a row this step writes is a pool row it reads (the window's blocks reused within "
        "the window, as by a ring of W rows); run sparse_attn, then window_kv_write"
    )
    if on_host(table):
        if not bool(apart):
            raise ValueError(message)
    else:
        _assert_on_device(apart, message)


def check_pool_rows(
    name: str, pool: KVPool, pos: StepPositions, lo: torch.Tensor, hi: torch.Tensor, writes: bool
) -> None:
    """``validate.check_table_rows`` of the rows ``[lo[b], hi[b])`` of each slot in ``pool``."""
    check_table_rows(name, pool.block_table[: pos.batch], pool.nope.shape[0], pool.block_size, pos, lo, hi, writes)


def check_compressor_weights(w: Any, d: int, device: torch.device) -> tuple[int, int, int]:
    """``w``: the main compressor's ``CompressorWeights`` for inputs of width ``d``; returns ``(HD, RC, COFF)``."""
    _check_instance("w", w, CompressorWeights)
    check_tensor("w.norm_w", w.norm_w, FLOATS, (None,), device)
    hd = w.norm_w.shape[0]
    check_tensor("w.ape", w.ape, torch.float32, (None, None), device)
    ratio = w.ape.shape[0]
    if ratio < 1:
        raise ValueError("w.ape: expected a compress ratio (rows) >= 1, got 0")
    coff, _ = compressor_dims(ratio, hd)
    check_tensor("w.ape", w.ape, torch.float32, (ratio, coff * hd), device)
    check_tensor("w.wkv", w.wkv, torch.bfloat16, (coff * hd, d), device)
    check_tensor("w.wgate", w.wgate, torch.bfloat16, (coff * hd, d), device)
    return hd, ratio, coff


def check_kv_compressor(x: Any, w: Any, state: Any, start_pos: Any, rope: Any, eps: Any) -> StepPositions:
    """Checks of ``kv_compressor``'s arguments; returns the step's positions."""
    check_step_input("x", x, 1)
    b, s, d = x.shape
    dev = x.device
    hd, ratio, coff = check_compressor_weights(w, d, dev)
    check_row_rope(rope, dev, hd, "head dim (w.norm_w)")
    _check_instance("state", state, CompressorState)
    check_tensor("state.kv_state", state.kv_state, torch.float32, (None, coff * ratio, coff * hd), dev)
    check_tensor("state.score_state", state.score_state, torch.float32, tuple(state.kv_state.shape), dev)
    if b > state.kv_state.shape[0]:
        raise ValueError(f"x: batch {b} exceeds the state's batch {state.kv_state.shape[0]} (state.kv_state)")
    pool = check_kv_pool("state.pool", state.pool, b, hd, rope.rope_dim, dev)
    pos = check_positions(
        start_pos, b, s, dev,
        [(1, rope.max_position, "the rope table"), (ratio, pool.rows, "the rows state.pool.block_table addresses")],
    )  # fmt: skip
    _check_eps(eps)
    check_pool_rows("state.pool", pool, pos, pos.start // ratio, (pos.start + s) // ratio, writes=True)
    start_t = {"start_pos": start_pos} if isinstance(start_pos, torch.Tensor) else {}
    check_no_overlap(tensors_of("state", state), {"x": x, **tensors_of("w", w), **start_t, **tensors_of("rope", rope)})
    return pos


def check_window(window: Any) -> int:
    return check_int("window", window, 1, INDEX_LIMIT - 1)  # int32 in the kernels


def check_window_kv_write(kv: Any, pool: Any, start_pos: Any, window: Any) -> StepPositions:
    """Checks of ``window_kv_write``'s arguments; returns the step's positions."""
    check_step_input("kv", kv, 1)
    b, s, hd = kv.shape
    dev = kv.device
    check_window(window)
    _check_instance("pool", pool, KVPool)
    check_tensor("pool.rope", pool.rope, torch.bfloat16, (None, None, None), dev)
    check_kv_pool("pool", pool, b, hd, pool.rope.shape[2], dev)
    pos = check_positions(start_pos, b, s, dev, [(1, pool.rows, "the rows pool.block_table addresses")])
    first = pos.start + max(0, s - window)
    check_pool_rows("pool", pool, pos, first, pos.start + s, writes=True)
    start_t = {"start_pos": start_pos} if isinstance(start_pos, torch.Tensor) else {}
    check_no_overlap(tensors_of("pool", pool), {"kv": kv, **start_t})
    return pos


def check_sparse_attn(
    q: Any,
    kv: Any,
    start_pos: Any,
    window_pool: Any,
    attn_sink: Any,
    rope: Any,
    kind: Any,
    window: Any,
    compress_ratio: Any,
    compressed_pool: Any,
    topk_idxs: Any,
    topk_offset: Any,
    out: Any = None,
) -> StepPositions:
    """Checks of ``sparse_attn``'s arguments (``out`` included); returns the step's positions."""
    check_step_input("q", q, 2)
    b, s, h, hd = q.shape
    if h < 1:
        raise ValueError(f"q: expected at least one head (H >= 1), got shape {list(q.shape)}")
    dev = q.device
    check_tensor("kv", kv, torch.bfloat16, (b, s, hd), dev)
    check_tensor("attn_sink", attn_sink, torch.float32, (h,), dev)
    check_row_rope(rope, dev, hd, "head dim (q)")
    if kind not in LAYER_KINDS:
        raise ValueError(f"kind: expected one of {', '.join(LAYER_KINDS)}, got {kind!r}")
    check_window(window)
    ratio = check_int("compress_ratio", compress_ratio, 0, INDEX_LIMIT - 1)  # int32 in the kernels
    check_int("topk_offset", topk_offset, 0, INDEX_LIMIT - 1)  # indices (+ offset) are int32
    if (ratio == 0) != (kind == "swa"):
        raise ValueError(
            f"compress_ratio: a {kind} layer needs {'0' if kind == 'swa' else 'a ratio >= 1'}, got {ratio}"
        )
    if (compressed_pool is None) != (kind == "swa"):
        raise ValueError(
            f"compressed_pool: a {kind} layer {'takes no' if kind == 'swa' else 'needs the'} compressed pool"
        )
    if (topk_idxs is None) != (kind != "csa"):
        raise ValueError(f"topk_idxs: a {kind} layer {'needs' if kind == 'csa' else 'takes no'} top-k indices")
    pool = check_kv_pool("window_pool", window_pool, b, hd, rope.rope_dim, dev)
    limits = [(1, rope.max_position, "the rope table"), (1, pool.rows, "the rows window_pool.block_table addresses")]
    if compressed_pool is not None:
        check_kv_pool("compressed_pool", compressed_pool, b, hd, rope.rope_dim, dev)
        limits.append((ratio, compressed_pool.rows, "the rows compressed_pool.block_table addresses"))
    if topk_idxs is not None:
        check_tensor("topk_idxs", topk_idxs, torch.int32, (b, s, None), dev)
        check_int("topk_idxs.shape[2]", topk_idxs.shape[2], 1, MAX_TOPK)
    pos = check_positions(start_pos, b, s, dev, limits)
    check_pool_rows("window_pool", pool, pos, (pos.start - window + 1).clamp_min(0), pos.start, writes=False)
    if compressed_pool is not None:
        check_pool_rows("compressed_pool", compressed_pool, pos, pos.start * 0, (pos.start + s) // ratio, writes=False)
    start_t = {"start_pos": start_pos} if isinstance(start_pos, torch.Tensor) else {}
    reads = {
        "q": q, "kv": kv, "attn_sink": attn_sink, **start_t, **tensors_of("rope", rope),
        **tensors_of("window_pool", window_pool), **tensors_of("compressed_pool", compressed_pool),
        **({"topk_idxs": topk_idxs} if topk_idxs is not None else {}),
    }  # fmt: skip
    if out is not None:
        _check_instance("out", out, AttnOut)
        check_tensor("out.o", out.o, torch.bfloat16, (b, s, h, hd), dev)
        check_no_overlap(tensors_of("out", out), reads)
    return pos


def check_sparse_attn_write(out: Any = None, **args: Any) -> StepPositions:
    """Checks of ``sparse_attn_write``'s arguments (``sparse_attn``'s, by name): ``sparse_attn``'s, then
    those of the window rows it writes (``window_kv_write``'s, and apart from every row it reads);
    returns the step's positions."""
    pos = check_sparse_attn(**args, out=out)
    s, window_pool, window, start_pos = pos.seq, args["window_pool"], args["window"], args["start_pos"]
    check_pool_rows("window_pool", window_pool, pos, pos.start + max(0, s - window), pos.start + s, writes=True)
    check_writes_apart_from_reads("window_pool", window_pool, pos, window)
    start_t = {"start_pos": start_pos} if isinstance(start_pos, torch.Tensor) else {}
    topk_idxs = args["topk_idxs"]
    reads = {
        "q": args["q"], "kv": args["kv"], "attn_sink": args["attn_sink"], **start_t, **tensors_of("rope", args["rope"]),
        **tensors_of("compressed_pool", args["compressed_pool"]),
        **({"topk_idxs": topk_idxs} if topk_idxs is not None else {}),
        **(tensors_of("out", out) if out is not None else {}),
    }  # fmt: skip
    check_no_overlap(tensors_of("window_pool", window_pool), reads)
    return pos


def check_o_proj(o: Any, w: Any, out: Any = None) -> None:
    """Checks of ``o_proj``'s arguments (``out`` included)."""
    check_tensor("o", o, torch.bfloat16, (None, None, None), o.device if isinstance(o, torch.Tensor) else None)
    t, h, hd = o.shape
    if t < 1 or h < 1 or hd < 1:
        raise ValueError(
            f"o: expected at least one token, head and element of a head (T, H, HD >= 1), got {[t, h, hd]}"
        )
    dev = o.device
    _check_instance("w", w, OProjWeights)
    check_tensor("w.wo_a", w.wo_a, torch.float8_e4m3fn, (None, None), dev)
    rows, cols = w.wo_a.shape
    if cols < 1 or (h * hd) % cols or rows % ((h * hd) // cols):
        raise ValueError(
            f"w.wo_a: expected [G*OL, HG*HD] with HG*HD dividing H*HD = {h * hd} and G = H*HD/(HG*HD) dividing "
            f"the rows, got {[rows, cols]}"
        )
    if rows < 1 or rows % ACT_BLOCK:
        raise ValueError(
            f"w.wo_a: expected G*OL rows a positive multiple of {ACT_BLOCK} (the FP8 activation blocks), got {rows}"
        )
    grid = -(-cols // 128)
    check_tensor("w.wo_a_scale", w.wo_a_scale, torch.float32, (rows // 128, grid), dev)
    check_tensor("w.wo_b", w.wo_b, torch.float8_e4m3fn, (None, rows), dev)
    d = w.wo_b.shape[0]
    if d < 1:
        raise ValueError("w.wo_b: expected at least one output row (D >= 1), got 0")
    check_tensor("w.wo_b_scale", w.wo_b_scale, torch.float32, (-(-d // 128), rows // ACT_BLOCK), dev)
    if out is not None:
        _check_instance("out", out, OProjOut)
        check_tensor("out.y", out.y, torch.bfloat16, (t, d), dev)
        check_no_overlap(tensors_of("out", out), {"o": o, **tensors_of("w", w)})

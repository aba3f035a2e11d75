"""Argument checks of spec §7, shared by every backend and run before anything is computed.

Each check raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (shape, device, layout,
range) naming the argument, what was expected and what came.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..model.config import COMPRESS_RATIO
from ..model.rope import RopeTable
from ..model.state import STATE_SLOTS, IndexerState
from ..model.structs import QKV, IndexerOut, StepPositions
from ..model.weights import AttnWeights, CompressorWeights, IndexerWeights

FLOATS = (torch.float32, torch.bfloat16)  # accepted for norm gains
INTS = (torch.int32, torch.int64)


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return " or ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_tensor(
    name: str,
    t: object,
    dtypes: torch.dtype | Sequence[torch.dtype],
    shape: Sequence[int | None],
    device: torch.device,
) -> torch.Tensor:
    """``t`` must be a contiguous tensor of one of ``dtypes`` on ``device`` with ``shape``
    (``None`` matches any size). Returns ``t``."""
    dtypes = (dtypes,) if isinstance(dtypes, torch.dtype) else tuple(dtypes)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {_dtype_names(dtypes)}, got {str(t.dtype).removeprefix('torch.')}")
    if t.dim() != len(shape) or any(e is not None and e != a for e, a in zip(shape, t.shape, strict=True)):
        want = "[" + ", ".join("*" if e is None else str(e) for e in shape) + "]"
        raise ValueError(f"{name}: expected shape {want}, got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device}, got {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.stride()}")
    return t


def _check_instance(name: str, value: object, cls: type) -> None:
    if not isinstance(value, cls):
        raise TypeError(f"{name}: expected {cls.__name__}, got {type(value).__name__}")


def _check_int(name: str, value: object, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected >= {minimum}, got {value}")
    return value


def _check_eps(eps: object) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps: expected a positive float, got {eps!r}")


def check_rope(rope: object, device: torch.device, max_rope_dim: int, what: str) -> RopeTable:
    """The table must be fp32 ``[P, R/2]`` pairs on ``device`` with ``R <= max_rope_dim`` (``what``)."""
    _check_instance("rope", rope, RopeTable)
    check_tensor("rope.cos", rope.cos, torch.float32, (None, None), device)
    check_tensor("rope.sin", rope.sin, torch.float32, tuple(rope.cos.shape), device)
    if rope.cos.shape[0] < 1 or rope.cos.shape[1] < 1:
        raise ValueError(f"rope: expected a non-empty table, got shape {list(rope.cos.shape)}")
    if rope.rope_dim > max_rope_dim:
        raise ValueError(f"rope: rope dim {rope.rope_dim} exceeds {what} {max_rope_dim}")
    return rope


def check_qkv_proj_rope(x: object, w: object, positions: object, rope: object, eps: object) -> None:
    """Checks of ``qkv_proj_rope``'s arguments (see its docstring for the contract)."""
    check_tensor("x", x, torch.bfloat16, (None, None), x.device if isinstance(x, torch.Tensor) else None)
    t, d = x.shape
    if t < 1:
        raise ValueError("x: expected at least one token (T >= 1), got T=0")
    dev = x.device
    _check_instance("w", w, AttnWeights)
    check_tensor("w.wkv", w.wkv, torch.bfloat16, (None, d), dev)
    hd = w.wkv.shape[0]
    check_tensor("w.wq_a", w.wq_a, torch.bfloat16, (None, d), dev)
    ql = w.wq_a.shape[0]
    check_tensor("w.gamma_cq", w.gamma_cq, FLOATS, (ql,), dev)
    check_tensor("w.gamma_ckv", w.gamma_ckv, FLOATS, (hd,), dev)
    check_tensor("w.wq_b", w.wq_b, torch.int8, (None, ql), dev)
    if w.wq_b.shape[0] == 0 or w.wq_b.shape[0] % hd:
        raise ValueError(f"w.wq_b: expected H*{hd} rows (head dim from w.wkv), got {w.wq_b.shape[0]}")
    check_tensor("w.wq_b_scale", w.wq_b_scale, torch.float32, (w.wq_b.shape[0],), dev)
    check_rope(rope, dev, hd, "head dim (w.wkv rows)")
    check_tensor("positions", positions, INTS, (t,), dev)
    lo, hi = int(positions.min()), int(positions.max())
    if lo < 0 or hi >= rope.max_position:
        raise ValueError(f"positions: expected values in [0, {rope.max_position}) (the rope table), got [{lo}, {hi}]")
    _check_eps(eps)


def check_compressor(
    x: object, w: object, state: object, start_pos: object, rope: object, eps: object, wname: str = "w"
) -> StepPositions:
    """Checks of ``indexer_compressor``'s arguments (weights named ``wname``); returns the step's positions."""
    check_tensor("x", x, torch.bfloat16, (None, None, None), x.device if isinstance(x, torch.Tensor) else None)
    b, s, d = x.shape
    if b < 1 or s < 1:
        raise ValueError(f"x: expected B >= 1 and S >= 1, got shape {list(x.shape)}")
    dev = x.device
    _check_instance(wname, w, CompressorWeights)
    check_tensor(f"{wname}.norm_w", w.norm_w, FLOATS, (None,), dev)
    hid = w.norm_w.shape[0]
    if hid < 2 or hid & (hid - 1):
        raise ValueError(f"{wname}.norm_w: indexer head dim must be a power of two (Hadamard), got {hid}")
    check_tensor(f"{wname}.wkv", w.wkv, torch.bfloat16, (2 * hid, d), dev)
    check_tensor(f"{wname}.wgate", w.wgate, torch.bfloat16, (2 * hid, d), dev)
    check_tensor(f"{wname}.ape", w.ape, torch.float32, (COMPRESS_RATIO, 2 * hid), dev)
    check_rope(rope, dev, hid, f"indexer head dim ({wname}.norm_w)")
    _check_instance("state", state, IndexerState)
    check_tensor("state.kv_state", state.kv_state, torch.float32, (None, STATE_SLOTS, 2 * hid), dev)
    rows_b = state.kv_state.shape[0]
    check_tensor("state.score_state", state.score_state, torch.float32, (rows_b, STATE_SLOTS, 2 * hid), dev)
    check_key_pool(state, rows_b, hid, dev)
    if b > rows_b:
        raise ValueError(f"x: batch {b} exceeds the state's batch {rows_b} (state.kv_state)")
    pos = step_positions(start_pos, b, s, dev)
    rows = state.cache_rows
    for i, p in enumerate(pos.start_host):
        if (p + s) // COMPRESS_RATIO > rows:
            raise ValueError(
                f"start_pos: row {i} at {p} with S={s} needs {(p + s) // COMPRESS_RATIO} cache rows, "
                f"state.block_table addresses {rows} ({state.block_table.shape[1]} blocks of {state.block_size})"
            )
        if p + s > rope.max_position:
            raise ValueError(
                f"start_pos: row {i} at {p} with S={s} reaches position {p + s - 1}, "
                f"beyond the rope table ({rope.max_position} positions)"
            )
    _check_eps(eps)
    check_block_entries(state, pos, reads=False)
    return pos


def check_indexer(
    x: object,
    qr: object,
    qr_scale: object,
    w: object,
    state: object,
    start_pos: object,
    offset: object,
    rope: object,
    topk: object,
    eps: object,
) -> StepPositions:
    """Checks of ``indexer``'s arguments (the compressor's included); returns the step's positions."""
    _check_instance("w", w, IndexerWeights)
    pos = check_compressor(x, w.compressor, state, start_pos, rope, eps, wname="w.compressor")
    b, s, d = x.shape
    dev = x.device
    hid = w.compressor.norm_w.shape[0]
    check_tensor("w.weights_proj", w.weights_proj, torch.bfloat16, (None, d), dev)
    hi = w.weights_proj.shape[0]
    if hi < 1:
        raise ValueError("w.weights_proj: expected at least one indexer head, got 0 rows")
    check_tensor("qr", qr, torch.int8, (b * s, None), dev)
    ql = qr.shape[1]
    check_tensor("qr_scale", qr_scale, torch.float32, (b * s, 1), dev)
    check_tensor("w.wq_b", w.wq_b, torch.int8, (hi * hid, ql), dev)
    check_tensor("w.wq_b_scale", w.wq_b_scale, torch.float32, (hi * hid,), dev)
    _check_int("offset", offset)
    _check_int("topk", topk, minimum=1)
    check_block_entries(state, pos, reads=True)
    return pos


def check_key_pool(state: IndexerState, batch: int, hid: int, device: torch.device) -> None:
    """The key pool and block table of ``state``: shapes, dtypes, devices, a power-of-two block size."""
    check_tensor("state.keys", state.keys, torch.int8, (None, None, hid), device)
    blocks, block_size = state.keys.shape[:2]
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"state.keys: expected a block size (dim 1) that is a power of two >= 16, got {block_size}")
    check_tensor("state.key_scale", state.key_scale, torch.float32, (blocks, block_size), device)
    check_tensor("state.block_table", state.block_table, torch.int32, (batch, None), device)


def check_block_entries(state: IndexerState, pos: StepPositions, reads: bool) -> None:
    """The block-table entries a step uses: every row it writes (``[start//4, cache_len)``) in a
    block of the pool or unallocated (``-1``: the write is skipped), no pool row written by two
    slots; with ``reads``, every row ``< cache_len`` in a block of the pool.

    Checked on the host when the table is there; on a GPU the range check runs on the device
    (``torch._assert_async``: no host round trip) and the two-writers check is the engine's."""
    table, blocks, bs = state.block_table[: pos.batch], state.keys.shape[0], state.block_size
    if table.is_cuda:
        first_row = torch.arange(table.shape[1], device=table.device) * bs  # of each table column
        lo = torch.zeros_like(pos.start) if reads else pos.start // COMPRESS_RATIO
        used = (first_row + bs > lo[:, None]) & (first_row < ((pos.start + pos.seq) // COMPRESS_RATIO)[:, None])
        ok = ((table >= 0) & (table < blocks)) | ((table == -1) & (not reads))
        torch._assert_async(torch.all(ok | ~used), "state.block_table: an entry the step uses is outside the pool")
        return
    written: list[torch.Tensor] = []
    for i, (start, end) in enumerate(zip(pos.start_host, pos.cache_lens, strict=True)):
        first = start // COMPRESS_RATIO  # rows [first, end) are written, [0, end) read
        lo = 0 if reads else first // bs
        entries = table[i, lo : -(-end // bs)]
        bad = ~((entries >= 0) & (entries < blocks)) & ~((entries == -1) & (not reads))
        if bool(bad.any()):
            column = lo + int(bad.nonzero()[0])
            need = f"a pool block in [0, {blocks})" + ("" if reads else " or -1")
            raise ValueError(
                f"state.block_table: slot {i} column {column} (rows {column * bs}..{column * bs + bs - 1}) "
                f"needs {need}, got {int(table[i, column])}"
            )
        rows = torch.arange(first, end)
        block = table[i, rows // bs].long()
        written.append((block * bs + rows % bs)[block >= 0])
    flat = torch.cat(written) if written else torch.empty(0, dtype=torch.long)
    if flat.numel() != torch.unique(flat).numel():
        raise ValueError("state.block_table: two slots write the same pool row in this step (share read-only blocks)")


def step_positions(start_pos: object, batch: int, seq: int, device: torch.device) -> StepPositions:
    """``start_pos`` (int, or int tensor ``[B]``) as a ``StepPositions`` on ``device``."""
    if isinstance(start_pos, torch.Tensor):
        if start_pos.dtype not in INTS:
            raise TypeError(f"start_pos: expected dtype {_dtype_names(INTS)}, got {start_pos.dtype}")
        if start_pos.shape != (batch,):
            raise ValueError(f"start_pos: expected shape [{batch}] (one per batch row), got {list(start_pos.shape)}")
        host = tuple(int(v) for v in start_pos.tolist())
        start = start_pos.to(device=device, dtype=torch.int64)
    else:
        p = _check_int("start_pos", start_pos)
        host = (p,) * batch
        start = torch.full((batch,), p, dtype=torch.int64, device=device)
    if min(host) < 0:
        raise ValueError(f"start_pos: expected values >= 0, got {min(host)}")
    return StepPositions.from_host(start, host, seq)


def check_qkv_out(out: object, x: torch.Tensor, w: AttnWeights) -> None:
    """``out`` for ``qkv_proj_rope``: a ``QKV`` of preallocated tensors matching the op's outputs."""
    _check_instance("out", out, QKV)
    t, hd, ql = x.shape[0], w.wkv.shape[0], w.wq_a.shape[0]
    check_tensor("out.q", out.q, torch.bfloat16, (t, w.wq_b.shape[0] // hd, hd), x.device)
    check_tensor("out.kv", out.kv, torch.bfloat16, (t, hd), x.device)
    check_tensor("out.qr", out.qr, torch.int8, (t, ql), x.device)
    check_tensor("out.qr_scale", out.qr_scale, torch.float32, (t, 1), x.device)


def check_indexer_out(out: object, x: torch.Tensor, pos: StepPositions, topk: int) -> None:
    """``out`` for ``indexer``: ``score [B, S, L] fp32`` with ``L >= max cache_len`` (entries a token
    cannot see are written as masked) and ``topk_idxs [B, S, topk] int32``."""
    _check_instance("out", out, IndexerOut)
    b, s = x.shape[:2]
    check_tensor("out.score", out.score, torch.float32, (b, s, None), x.device)
    if out.score.shape[2] < pos.max_cache_len:
        raise ValueError(
            f"out.score: expected at least {pos.max_cache_len} columns (the cache rows after this step), "
            f"got {out.score.shape[2]}"
        )
    check_tensor("out.topk_idxs", out.topk_idxs, torch.int32, (b, s, topk), x.device)

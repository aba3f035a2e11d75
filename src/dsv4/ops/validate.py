"""Argument checks of spec §7, shared by every backend and run before anything is computed.

Each check raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (shape, device, layout,
range, overlapping memory) naming the argument, what was expected and what came.

Checks of tensor *values* (``positions``, ``start_pos``) never synchronize a GPU stream: a tensor
on the host (``HOST_DEVICE_TYPES``) is read there; a tensor on a GPU is checked on its device with
``torch._assert_async`` (no host round trip: a violation surfaces as a device-side assert, which
stops the stream before any kernel of the op runs). The one exception is the score width of an
eager ``indexer`` call without ``out=``: it depends on ``start_pos`` (``max cache_len``), so a
device ``start_pos`` is read on the host then; pass ``out=`` (or ``start_pos`` on the host) to avoid it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from ..model.config import COMPRESS_RATIO, check_eps_value
from ..model.rope import RopeTable
from ..model.state import STATE_SLOTS, UNALLOCATED, IndexerState
from ..model.structs import QKV, IndexerOut, StepPositions
from ..model.weights import AttnWeights, CompressorWeights, IndexerWeights

FLOATS = (torch.float32, torch.bfloat16)  # accepted for norm gains
INTS = (torch.int32, torch.int64)
HOST_DEVICE_TYPES = ("cpu",)  # tensors whose values validation reads directly (no device to synchronize)
MAX_TOPK = 4096  # 4x the largest preset index_topk (pro: 1024); the Triton top-k sorts a row's k winners in
# one program's registers, like the 4096-key rows it selects from in registers (topk.ROW_IN_REGISTERS)
_TWO_WRITERS = "{}.block_table: two slots write the same pool row in this step (share read-only blocks)"
TWO_WRITERS = _TWO_WRITERS.format("state")
READ_AS_ANOTHER_ROW = (
    "state.block_table: a pool row this step writes is also read by the step as another row (two table entries "
    "map one block: share only blocks no step writes)"
)
INDEX_LIMIT = 2**31  # selected indices (+ offset) are int32
INT64_LIMIT = 2**63  # start positions are int64 on the device


def same_device(a: torch.device | str, b: torch.device | str) -> bool:
    """Whether ``a`` and ``b`` name one device; a GPU named without an index is the current one."""

    def canonical(d: torch.device | str) -> torch.device:
        d = torch.device(d)
        if d.index is None and d.type == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return d

    return canonical(a) == canonical(b)


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return " or ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_tensor(
    name: str,
    t: Any,
    dtypes: torch.dtype | Sequence[torch.dtype],
    shape: Sequence[int | None],
    device: torch.device | None,
) -> torch.Tensor:
    """``t`` must be a contiguous tensor of one of ``dtypes`` on ``device`` (``None``: any) with
    ``shape`` (``None`` matches any size). Returns ``t``."""
    dtypes = (dtypes,) if isinstance(dtypes, torch.dtype) else tuple(dtypes)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {_dtype_names(dtypes)}, got {str(t.dtype).removeprefix('torch.')}")
    if t.dim() != len(shape) or any(e is not None and e != a for e, a in zip(shape, t.shape, strict=True)):
        want = "[" + ", ".join("*" if e is None else str(e) for e in shape) + "]"
        raise ValueError(f"{name}: expected shape {want}, got {list(t.shape)}")
    if device is not None and not same_device(t.device, device):
        raise ValueError(f"{name}: expected device {device}, got {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.stride()}")
    return t


def _check_instance(name: str, value: Any, cls: type) -> None:
    if not isinstance(value, cls):
        raise TypeError(f"{name}: expected {cls.__name__}, got {type(value).__name__}")


def _check_int(name: str, value: Any, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected >= {minimum}, got {value}")
    return value


def _check_eps(eps: Any) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):  # as torch.ops.dsv4's schema refuses it
        raise TypeError(f"eps: expected a float, got {type(eps).__name__}")
    check_eps_value("eps", eps)


def check_eps(eps: Any) -> float:
    """``eps``: a positive finite number (a ``TypeError`` for a bool or a non-number), also once rounded to
    fp32 (a smaller one would be 0 there)."""
    _check_eps(eps)
    return eps


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` must be a Python int (not a bool, float or tensor) in ``[minimum, maximum]``."""
    _check_int(name, value, minimum)
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}: expected <= {maximum}, got {value}")
    return value


def check_topk(topk: Any) -> int:
    """``topk``: an int in ``[1, MAX_TOPK]``."""
    return check_int("topk", topk, 1, MAX_TOPK)


def check_offset(offset: Any, cache_rows: int) -> int:
    """``offset``: an int >= 0 with ``offset + cache_rows < 2^31`` (every selected index + offset fits int32)."""
    check_int("offset", offset, 0)
    if offset + cache_rows >= INDEX_LIMIT:
        raise ValueError(f"offset: expected offset + {cache_rows} cache rows < 2^31 (int32 indices), got {offset}")
    return offset


def on_host(t: torch.Tensor) -> bool:
    """Whether validation may read ``t``'s values directly (no device stream to synchronize)."""
    return t.device.type in HOST_DEVICE_TYPES


def _assert_on_device(ok: torch.Tensor, message: str) -> None:
    """Fail with ``message`` unless the bool tensor ``ok`` is all true, without a host round trip: on a
    GPU a device-side assert queued ahead of the op's kernels (on the host it raises at once)."""
    torch._assert_async(ok.all(), message)


def _byte_range(t: torch.Tensor) -> tuple[int, int] | None:
    """``[first, last)`` byte addresses ``t`` spans, or None when it holds no memory."""
    if t.numel() == 0 or t.device.type == "meta":
        return None
    span = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True))
    return t.data_ptr(), t.data_ptr() + span * t.element_size()


def tensors_of(name: str, value: Any) -> dict[str, torch.Tensor]:
    """Every tensor field of a record (weights, state, outputs; nested records included), by its
    argument path (``w.compressor.wkv``); a plain tensor as itself."""
    if isinstance(value, torch.Tensor):
        return {name: value}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # QKV, IndexerOut
        return {f"{name}.{f}": t for f, t in zip(value._fields, value, strict=True)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, torch.Tensor] = {}
        for f in dataclasses.fields(value):
            out.update(tensors_of(f"{name}.{f.name}", getattr(value, f.name)))
        return out
    return {}


def check_no_overlap(written: dict[str, torch.Tensor], read: dict[str, torch.Tensor]) -> None:
    """No tensor in ``written`` (outputs, state: what the op writes) may share a byte with another tensor
    of ``written`` or with one of ``read`` (its inputs), the rule of torch's ``out=`` ops: an op reading
    memory it also writes would compute from values it already overwrote, differently on each backend."""
    spans = [(name, t.device, _byte_range(t)) for name, t in {**written, **read}.items()]
    for i, (name, device, span) in enumerate(spans[: len(written)]):
        if span is None:
            continue
        for other, other_device, other_span in spans[i + 1 :]:
            if (
                other_span is not None
                and device == other_device
                and span[0] < other_span[1]
                and other_span[0] < span[1]
            ):
                raise ValueError(
                    f"{name}: shares memory with {other} (bytes {max(span[0], other_span[0]):#x}.."
                    f"{min(span[1], other_span[1]):#x}); an op's outputs and state must not overlap each other "
                    "or its inputs"
                )


def check_rope(rope: Any, device: torch.device, max_rope_dim: int, what: str) -> RopeTable:
    """The table must be fp32 ``[P, R/2]`` pairs on ``device`` with ``R <= max_rope_dim`` (``what``)."""
    _check_instance("rope", rope, RopeTable)
    check_tensor("rope.cos", rope.cos, torch.float32, (None, None), device)
    check_tensor("rope.sin", rope.sin, torch.float32, tuple(rope.cos.shape), device)
    if rope.cos.shape[0] < 1 or rope.cos.shape[1] < 1:
        raise ValueError(f"rope: expected a non-empty table, got shape {list(rope.cos.shape)}")
    if rope.rope_dim > max_rope_dim:
        raise ValueError(f"rope: rope dim {rope.rope_dim} exceeds {what} {max_rope_dim}")
    return rope


def check_qkv_proj_rope(x: Any, w: Any, positions: Any, rope: Any, eps: Any, out: Any = None) -> None:
    """Checks of ``qkv_proj_rope``'s arguments (see its docstring for the contract), ``out`` included."""
    check_tensor("x", x, torch.bfloat16, (None, None), x.device if isinstance(x, torch.Tensor) else None)
    t, d = x.shape
    if t < 1:
        raise ValueError("x: expected at least one token (T >= 1), got T=0")
    dev = x.device
    _check_instance("w", w, AttnWeights)
    check_tensor("w.wkv", w.wkv, torch.bfloat16, (None, d), dev)
    hd = w.wkv.shape[0]
    if hd < 1:
        raise ValueError("w.wkv: expected at least one row (the head dim HD), got 0")
    check_tensor("w.wq_a", w.wq_a, torch.bfloat16, (None, d), dev)
    ql = w.wq_a.shape[0]
    if ql < 1:
        raise ValueError("w.wq_a: expected at least one row (the q LoRA rank QL), got 0")
    check_tensor("w.gamma_cq", w.gamma_cq, FLOATS, (ql,), dev)
    check_tensor("w.gamma_ckv", w.gamma_ckv, FLOATS, (hd,), dev)
    check_tensor("w.wq_b", w.wq_b, torch.int8, (None, ql), dev)
    if w.wq_b.shape[0] == 0 or w.wq_b.shape[0] % hd:
        raise ValueError(f"w.wq_b: expected H*{hd} rows (head dim from w.wkv), got {w.wq_b.shape[0]}")
    check_tensor("w.wq_b_scale", w.wq_b_scale, torch.float32, (w.wq_b.shape[0],), dev)
    check_rope(rope, dev, hd, "head dim (w.wkv rows)")
    check_tensor("positions", positions, INTS, (t,), dev)
    expected = f"positions: expected values in [0, {rope.max_position}) (the rope table)"
    if on_host(positions):
        lo, hi = int(positions.min()), int(positions.max())
        if lo < 0 or hi >= rope.max_position:
            raise ValueError(f"{expected}, got [{lo}, {hi}]")
    else:
        _assert_on_device((positions >= 0) & (positions < rope.max_position), expected)
    _check_eps(eps)
    reads = {"x": x, **tensors_of("w", w), "positions": positions, **tensors_of("rope", rope)}
    if out is not None:
        check_qkv_out(out, x, w)
        check_no_overlap(tensors_of("out", out), reads)


def check_compressor(
    x: Any,
    w: Any,
    state: Any,
    start_pos: Any,
    rope: Any,
    eps: Any,
    wname: str = "w",
    need_host: bool = False,
    pool_reads: bool = False,
) -> StepPositions:
    """Checks of ``indexer_compressor``'s arguments (weights named ``wname``); returns the step's positions.

    ``need_host``: the caller needs ``start_pos`` on the host (an exact ``max_cache_len``) even when it
    is a device tensor; otherwise a device ``start_pos`` is checked on its device and the positions'
    ``max_cache_len`` is the cache's row count (a bound). ``pool_reads``: the step also reads every
    pool row below the cache length (the indexer), so those block-table entries must hold blocks."""
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
    rows = state.cache_rows
    pos = step_positions(start_pos, b, s, dev, None if need_host else rows)
    if pos.start_host is None:
        start = pos.start
        _assert_on_device(  # p + S <= n as p <= n - S: p + S could wrap int64
            (start >= 0) & (start <= last_start(COMPRESS_RATIO, rows, s)) & (start <= rope.max_position - s),
            f"start_pos: expected every row's start p >= 0 with (p + S) // {COMPRESS_RATIO} <= {rows} "
            f"(the rows state.block_table addresses) and p + S <= {rope.max_position} (the rope table), S={s}",
        )
    for i, p in enumerate(pos.start_host or ()):
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
    start_t = {"start_pos": start_pos} if isinstance(start_pos, torch.Tensor) else {}
    reads = {"x": x, **tensors_of(wname, w), **start_t, **tensors_of("rope", rope)}
    check_no_overlap(tensors_of("state", state), reads)
    check_block_entries(state, pos, reads=pool_reads)
    return pos


def check_indexer(
    x: Any,
    qr: Any,
    qr_scale: Any,
    w: Any,
    state: Any,
    start_pos: Any,
    offset: Any,
    rope: Any,
    topk: Any,
    eps: Any,
    out: Any = None,
) -> StepPositions:
    """Checks of ``indexer``'s arguments (the compressor's and ``out`` included); returns the step's positions."""
    _check_instance("w", w, IndexerWeights)
    pos = check_compressor(
        x, w.compressor, state, start_pos, rope, eps, wname="w.compressor", need_host=out is None, pool_reads=True
    )
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
    check_offset(offset, state.cache_rows)
    check_topk(topk)
    written = tensors_of("state", state)
    if out is not None:
        pos = check_indexer_out(out, x, pos, topk, state.cache_rows)
        written.update(tensors_of("out", out))
    start_t = {"start_pos": start_pos} if isinstance(start_pos, torch.Tensor) else {}
    reads = {"x": x, "qr": qr, "qr_scale": qr_scale, **tensors_of("w", w), **start_t, **tensors_of("rope", rope)}
    check_no_overlap(written, reads)
    return pos


def check_key_pool(state: IndexerState, batch: int, hid: int, device: torch.device) -> None:
    """The key pool and block table of ``state``: shapes and dtypes of its ``key_format``, devices, a
    power-of-two block size."""
    fmt = state.key_format
    check_tensor("state.keys", state.keys, fmt.code_dtype, (None, None, *fmt.codes_shape(hid)), device)
    blocks, block_size = state.keys.shape[:2]
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"state.keys: expected a block size (dim 1) that is a power of two >= 16, got {block_size}")
    scale_shape = (blocks, block_size, *fmt.scale_shape(hid))
    check_tensor("state.key_scale", state.key_scale, fmt.scale_dtype, scale_shape, device)
    check_tensor("state.block_table", state.block_table, torch.int32, (batch, None), device)


def check_block_entries(state: IndexerState, pos: StepPositions, reads: bool) -> None:
    """The block-table entries a step uses: every row it writes (``[start//4, cache_len)``) in a
    block of the pool or unallocated (``-1``: the write is skipped), no pool row written by two
    slots; with ``reads``, every row ``< cache_len`` in a block of the pool, and no pool row the step
    writes read by the step as another row (a slot's two columns, or two slots, mapping one block: the
    step would overwrite a key it scores, in an order each backend takes differently)."""
    table, blocks, bs = state.block_table[: pos.batch], state.keys.shape[0], state.block_size
    first, end = pos.start // COMPRESS_RATIO, (pos.start + pos.seq) // COMPRESS_RATIO
    if not reads:
        check_table_rows("state", table, blocks, bs, pos, first, end, writes=True)
        return
    check_table_rows("state", table, blocks, bs, pos, torch.zeros_like(first), end, writes=False)
    check_one_writer("state", table, bs, pos, first, end)
    if not table.shape[1]:  # no columns: no row to read (a step that closes a block is refused by the cache-rows check)
        return
    clash = _read_as_another_row(table, pos, bs, blocks)
    if not on_host(table) or pos.start_host is None:
        _assert_on_device(~clash, READ_AS_ANOTHER_ROW)
        return
    if bool(clash.any()):
        b, k = (int(v) for v in clash.nonzero()[0])
        row = pos.start_host[b] // COMPRESS_RATIO + k
        block = int(table[b, row // bs])
        ends = torch.tensor(pos.cache_lens, device=table.device)[:, None]
        columns = torch.arange(table.shape[1], device=table.device)
        readers = ((table == block) & (columns * bs + row % bs < ends)).nonzero().tolist()
        other_b, column = next(e for e in readers if e != [b, row // bs])
        raise ValueError(
            f"{READ_AS_ANOTHER_ROW}: slot {b} writes its row {row} (column {row // bs}) to block {block} "
            f"offset {row % bs}, which slot {other_b} reads as its row {column * bs + row % bs} (column {column})"
        )


def pool_rows(table: torch.Tensor, bs: int, lo: torch.Tensor, hi: torch.Tensor, span: int, skip: int) -> torch.Tensor:
    """``[B, span]`` int64: the pool row (``block * bs + offset``) of each slot's rows ``lo[b] + i`` below
    ``hi[b]``; a row past ``hi`` or in an unallocated block gets a distinct negative value, below
    ``-skip`` (two calls with ``skip`` apart share none)."""
    rows = lo[:, None] + torch.arange(span, device=table.device)
    block = table.gather(1, (rows // bs).clamp(max=table.shape[1] - 1)).long()
    held = (rows < hi[:, None]) & (block >= 0)
    distinct = -1 - skip - torch.arange(rows.numel(), device=table.device).view_as(rows)
    return torch.where(held, block * bs + rows % bs, distinct)


def one_writer_per_row(table: torch.Tensor, bs: int, lo: torch.Tensor, hi: torch.Tensor, span: int) -> torch.Tensor:
    """On ``table``'s device: a bool, whether no pool row is written by two slots when each slot writes
    its rows ``[lo[b], hi[b])`` (at most ``span`` of them; unallocated rows are skipped)."""
    written = pool_rows(table, bs, lo, hi, span, 0).flatten().sort().values
    return (written[1:] != written[:-1]).all()


def check_table_rows(
    name: str,
    table: torch.Tensor,
    blocks: int,
    bs: int,
    pos: StepPositions,
    lo: torch.Tensor,
    hi: torch.Tensor,
    writes: bool,
) -> None:
    """Entries of the rows ``[lo[b], hi[b])`` of each slot (int64 ``[B]`` on the table's device) in
    ``table`` (the first ``B`` slots of ``{name}.block_table``, blocks of ``bs`` rows in a pool of
    ``blocks``): rows read must be in blocks of the pool; rows written (``writes``) in a block or
    unallocated (``-1``: the write is skipped), and no pool row written by two slots. Read on the host
    when the table and the positions are there, else checked on the device."""
    allowed = ((table >= 0) & (table < blocks)) | ((table == UNALLOCATED) & writes)
    first_row = torch.arange(table.shape[1], device=table.device) * bs
    used = (first_row + bs > lo[:, None]) & (first_row < hi[:, None])
    need = f"a pool block in [0, {blocks})" + (" or -1" if writes else "")
    what = "writes" if writes else "reads"
    if on_host(table) and pos.start_host is not None:
        bad = (used & ~allowed).nonzero()
        if len(bad):
            b, c = (int(v) for v in bad[0])
            raise ValueError(
                f"{name}.block_table: slot {b} column {c} (rows {c * bs}..{c * bs + bs - 1}, which the step {what}) "
                f"needs {need}, got {int(table[b, c])}"
            )
    else:
        _assert_on_device(allowed | ~used, f"{name}.block_table: an entry of a row the step {what} needs {need}")
    if writes:
        check_one_writer(name, table, bs, pos, lo, hi)


def check_one_writer(
    name: str, table: torch.Tensor, bs: int, pos: StepPositions, lo: torch.Tensor, hi: torch.Tensor
) -> None:
    """No pool row written by two slots, each writing its rows ``[lo[b], hi[b])`` (at most ``S`` of them)."""
    if not table.shape[1]:  # a table with no columns holds no row (the callers' row checks refuse its use)
        return
    span = int((hi - lo).clamp_min(0).max()) if on_host(lo) else None
    if span == 0:
        return
    one_writer = one_writer_per_row(table, bs, lo, hi, span or int(pos.seq))
    message = _TWO_WRITERS.format(name)
    if on_host(table):
        if not bool(one_writer):
            raise ValueError(message)
    else:
        _assert_on_device(one_writer, message)


def _read_as_another_row(table: torch.Tensor, pos: StepPositions, bs: int, blocks: int) -> torch.Tensor:
    """On ``table``'s device, ``[B, S // 4 + 1]`` bool: whether the ``k``-th row a slot writes this step
    (row ``start // 4 + k``, if below its cache length) is a pool row that the step also reads as another
    row: another table entry (of any slot) maps the same block and covers the same offset among the rows
    it reads (``[0, cache_len)``). No host read: per block, the largest and second largest coverage
    among the entries that map it, by scatter; entries outside the pool are skipped (another check
    refuses them)."""
    batch, cols = table.shape
    dev = table.device
    end = (pos.start + pos.seq) // COMPRESS_RATIO  # each slot reads its rows [0, end)
    cover = (end[:, None] - torch.arange(cols, device=dev) * bs).clamp(0, bs)  # an entry reads offsets [0, cover)
    valid = (cover > 0) & (table >= 0) & (table < blocks)
    block = torch.where(valid, table, 0).long().flatten()
    cover = torch.where(valid, cover, 0).flatten()
    zeros = torch.zeros(max(blocks, 1), dtype=torch.long, device=dev)
    best = zeros.scatter_reduce(0, block, cover, "amax")
    n_best = zeros.scatter_add(0, block, (valid.flatten() & (cover == best[block])).long())
    second = zeros.scatter_reduce(0, block, torch.where(cover < best[block], cover, 0), "amax")
    rows = (pos.start // COMPRESS_RATIO)[:, None] + torch.arange(pos.seq // COMPRESS_RATIO + 1, device=dev)
    entry = torch.arange(batch, device=dev)[:, None] * cols + (rows // bs).clamp(max=cols - 1)
    own, b = cover[entry], block[entry]
    other = torch.where((own < best[b]) | (n_best[b] > 1), best[b], second[b])  # the best other entry's cover
    return (rows < end[:, None]) & valid.flatten()[entry] & (other > rows % bs)


def last_start(ratio: int, bound: int, seq: int) -> int:
    """The largest start ``p`` with ``(p + seq) // ratio <= bound``, at most ``2^63 - 1``: a device check
    compares ``p`` with it rather than computing ``p + seq``, which wraps for a start near ``2^63``."""
    return min(ratio * (bound + 1) - 1 - seq, INT64_LIMIT - 1)


def step_positions(
    start_pos: Any, batch: int, seq: int, device: torch.device, bound: int | None = None
) -> StepPositions:
    """``start_pos`` (int, or int tensor ``[B]`` on ``device`` or the host) as a ``StepPositions`` on ``device``.

    Values of an int or a host tensor are checked here and kept on the host. A tensor on another device
    is read on the host only when ``bound`` is None; otherwise it stays there (no host round trip) and
    ``bound`` becomes ``max_cache_len``: the caller checks its values on the device."""
    if isinstance(start_pos, torch.Tensor):
        if start_pos.dtype not in INTS:
            raise TypeError(f"start_pos: expected dtype {_dtype_names(INTS)}, got {start_pos.dtype}")
        if start_pos.shape != (batch,):
            raise ValueError(f"start_pos: expected shape [{batch}] (one per batch row), got {list(start_pos.shape)}")
        if not same_device(start_pos.device, device) and not on_host(start_pos):
            raise ValueError(f"start_pos: expected a tensor on {device} or the CPU, got {start_pos.device}")
        start = start_pos.to(device=device, dtype=torch.int64).contiguous()  # the kernels index it densely
        if not on_host(start_pos) and bound is not None:
            return StepPositions(start, seq, bound)
        host = tuple(int(v) for v in start_pos.tolist())
    else:
        p = _check_int("start_pos", start_pos)
        if not -INT64_LIMIT <= p < INT64_LIMIT:
            raise ValueError(f"start_pos: expected a value that fits int64 (|p| < 2^63), got {p}")
        host = (p,) * batch
        start = torch.full((batch,), p, dtype=torch.int64, device=device)
    if min(host) < 0:
        raise ValueError(f"start_pos: expected values >= 0, got {min(host)}")
    return StepPositions.from_host(start, host, seq)


def check_qkv_out(out: Any, x: torch.Tensor, w: AttnWeights) -> None:
    """``out`` for ``qkv_proj_rope``: a ``QKV`` of preallocated tensors matching the op's outputs."""
    _check_instance("out", out, QKV)
    t, hd, ql = x.shape[0], w.wkv.shape[0], w.wq_a.shape[0]
    check_tensor("out.q", out.q, torch.bfloat16, (t, w.wq_b.shape[0] // hd, hd), x.device)
    check_tensor("out.kv", out.kv, torch.bfloat16, (t, hd), x.device)
    check_tensor("out.qr", out.qr, torch.int8, (t, ql), x.device)
    check_tensor("out.qr_scale", out.qr_scale, torch.float32, (t, 1), x.device)


def check_indexer_out(
    out: Any, x: torch.Tensor, pos: StepPositions, topk: int, cache_rows: int | None = None
) -> StepPositions:
    """``out`` for ``indexer``: ``score [B, S, L] fp32`` with ``L >= max cache_len`` (entries a token
    cannot see are written as masked) and ``topk_idxs [B, S, topk] int32``. Returns ``pos``; for
    positions that stay on the device, with ``max_cache_len = min(L, cache_rows)`` and ``L`` checked there."""
    _check_instance("out", out, IndexerOut)
    b, s = x.shape[:2]
    check_tensor("out.score", out.score, torch.float32, (b, s, None), x.device)
    check_tensor("out.topk_idxs", out.topk_idxs, torch.int32, (b, s, topk), x.device)
    width = out.score.shape[2]
    if pos.start_host is None:
        _assert_on_device(
            pos.start <= last_start(COMPRESS_RATIO, width, s),
            f"out.score: expected at least (start_pos + S) // {COMPRESS_RATIO} columns (the cache rows after "
            f"this step) for every row, got {width}",
        )
        return dataclasses.replace(
            pos, max_cache_len=min(width, pos.max_cache_len if cache_rows is None else cache_rows)
        )
    if width < pos.max_cache_len:
        raise ValueError(
            f"out.score: expected at least {pos.max_cache_len} columns (the cache rows after this step), got {width}"
        )
    return pos

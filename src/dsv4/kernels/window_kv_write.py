"""``window_kv_write`` (attention spec §4): the step's last ``min(S, W)`` KV rows, as FP8 KV rows
(``dsv4.model.fp8_row``), into the window pool through its block table; one launch.

Each program owns ``BLOCK_T`` consecutive tokens of one slot: it loads their ``[BLOCK_T, HD]`` bf16
rows, quantizes the NOPE part per 64 with ``fp8_quant.quant_e4m3`` (bit for bit the model's rows)
and stores codes, scale bytes and the bf16 rope tail at pool row ``block_table[b, p // bs]``,
offset ``p % bs``; a token whose block is ``-1`` stores nothing. The grid is ``(B, ceil(min(S, W) /
BLOCK_T))``, from shapes only; ``start_pos`` is read on the device (the launch can be captured in a
CUDA graph). On sm_90 it takes part in programmatic dependent launch: it lets the next launch be
scheduled, then waits for its predecessor before it reads ``kv`` or ``start_pos``.

``store_fp8_rows`` (the row store) is shared with the attention's compressor (``compressor.py``),
which stores its finished rows in the same format.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ..model.attention_state import KVPool
from ..model.fp8_row import ROW_BLOCK as _ROW_BLOCK
from ..model.fp8_row import SCALE_BYTES as _SCALE_BYTES
from ..model.structs import StepPositions
from .epilogue import from_bf16, to_bf16
from .fp8_quant import quant_e4m3, scale_byte
from .launch import pdl_supported
from .tuning import Param, Tunable
from .workspace import Workspace

ROW_BLOCK = tl.constexpr(_ROW_BLOCK)  # NOPE entries per scale byte
SCALE_BYTES = tl.constexpr(_SCALE_BYTES)  # scale bytes per row (those past NOPE/64 are 0)
BLOCK_T = 4  # tokens per program: a [4, 512] fp32 tile is 16 values a thread at 4 warps (flash HD 512)
NUM_WARPS = 4  # one [BLOCK_T, HD] tile per program, no reduction longer than 64

TUNING = Tunable(
    "window_kv_write",
    "_window_kv_write_kernel: the step's last min(S, W) KV rows quantized into the window pool",
    dims=("B", "S"),
    pow2_dims=("B", "S"),
    params=(
        Param("block_t", BLOCK_T, (1, 2, 4, 8, 16), "tokens per program", exact=True),
        Param("num_warps", NUM_WARPS, (2, 4, 8), "warps per program", compiled_only=True),
        Param("pdl", True, (False, True), "programmatic dependent launch (sm_90)", exact=True, compiled_only=True),
    ),
    candidates=({"block_t": 1}, {"block_t": 16}, {"num_warps": 8}, {"pdl": False}),
)


@triton.jit
def store_fp8_rows(nope_ptr, scale_ptr, rope_ptr, slot, held, v, NOPE: tl.constexpr, R: tl.constexpr):
    """Store rows ``v [M, HDP]`` fp32 (columns ``[0, NOPE + R)`` used; the rope tail's values already
    bf16) as FP8 KV rows at pool row ``slot [M]`` (int64: block * bs + offset) where ``held [M]``:
    codes (``nope_ptr``: the pool's codes as uint8, ``[rows, NOPE]``), the 8 scale bytes ``[rows, 8]``
    (``e + 127`` per 64 of NOPE, then zeros) and the bf16 tail ``[rows, R]``."""
    M: tl.constexpr = v.shape[0]
    HDP: tl.constexpr = v.shape[1]
    NB: tl.constexpr = HDP // ROW_BLOCK
    codes, e = quant_e4m3(tl.reshape(v, [M * NB, ROW_BLOCK]))  # the tail's blocks are quantized, never stored
    codes = tl.reshape(codes, [M, HDP])
    e = tl.reshape(e, [M, NB])
    cols = tl.arange(0, HDP)[None, :]
    tl.store(nope_ptr + slot[:, None] * NOPE + cols, codes, mask=held[:, None] & (cols < NOPE))
    blk = tl.arange(0, NB)[None, :]
    tl.store(scale_ptr + slot[:, None] * SCALE_BYTES + blk, scale_byte(e), mask=held[:, None] & (blk < NOPE // 64))
    pad = tl.arange(0, SCALE_BYTES)[None, :]
    zero = tl.zeros([M, SCALE_BYTES], tl.uint8)
    tl.store(scale_ptr + slot[:, None] * SCALE_BYTES + pad, zero, mask=held[:, None] & (pad >= NOPE // 64))
    tail = held[:, None] & (cols >= NOPE) & (cols < NOPE + R)
    tl.store(rope_ptr + slot[:, None] * R + (cols - NOPE), to_bf16(v), mask=tail)


@triton.jit
def store_window_rows(kv_ptr, b, s, S, start, table_ptr, max_blocks, nope_ptr, scale_ptr, rope_ptr,
                      NOPE: tl.constexpr, R: tl.constexpr, HDP: tl.constexpr, BLOCK_SIZE: tl.constexpr):  # fmt: skip
    """``fp8_row(kv[b, s])`` of the tokens ``s [M]`` of slot ``b`` (those ``< S``) at window rows ``start +
    s`` through the block table (``[>= B, max_blocks]``; a row in a ``-1`` block is skipped)."""
    ok = s < S
    p = start + s
    block = tl.load(table_ptr + b * max_blocks + p // BLOCK_SIZE, mask=ok, other=-1).to(tl.int64)
    held = ok & (block >= 0)
    cols = tl.arange(0, HDP)[None, :]
    hd = NOPE + R
    row = (b * S + s).to(tl.int64) * hd
    # the rows are read whether their block is held or not: their load need not wait for the table's
    v = tl.load(kv_ptr + row[:, None] + cols, mask=ok[:, None] & (cols < hd), other=0.0)
    store_fp8_rows(nope_ptr, scale_ptr, rope_ptr, block * BLOCK_SIZE + p % BLOCK_SIZE, held, from_bf16(v), NOPE, R)


# A block table's width is the caller's cache size: not specialized on (== 1, divisible by 16), one variant
# serves every width (its loads are gathers either way).
@triton.jit(do_not_specialize=["max_blocks"])
def _window_kv_write_kernel(
    kv_ptr,  # [B, S, HD] bf16, contiguous
    start_ptr,  # [B] int64
    table_ptr,  # [>= B, max_blocks] int32 block table (-1: not allocated, the row is skipped)
    nope_ptr,  # [NB, bs, NOPE] uint8 (the pool's e4m3 codes)
    scale_ptr,  # [NB, bs, 8] uint8
    rope_ptr,  # [NB, bs, R] bf16
    S,
    first,  # the first token written: max(0, S - W)
    max_blocks,
    NOPE: tl.constexpr,
    R: tl.constexpr,
    HDP: tl.constexpr,  # HD rounded up to a power of two
    BLOCK_SIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:
        gdc_launch_dependents()  # the next launch may be scheduled; it waits for this grid to complete
        gdc_wait()  # kv and start, written by earlier launches, are complete and visible
    b = tl.program_id(0).to(tl.int64)
    s = first + tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    store_window_rows(kv_ptr, b, s, S, tl.load(start_ptr + b), table_ptr, max_blocks, nope_ptr, scale_ptr, rope_ptr,
                      NOPE, R, HDP, BLOCK_SIZE)  # fmt: skip


def window_kv_write(
    kv: torch.Tensor, pool: KVPool, pos: StepPositions, window: int, ws: Workspace | None = None
) -> None:
    """``kv [B, S, HD] bf16``: store ``fp8_row(kv[b, s])`` at window row ``start[b] + s`` of ``pool``
    for the last ``min(S, window)`` tokens of each slot; rows in unallocated blocks are skipped
    (attention spec §4). One launch, no host read."""
    b, s, hd = kv.shape
    first = max(0, s - window)
    cfg = TUNING.config(kv.device, B=b, S=s - first)
    grid = (b, triton.cdiv(s - first, cfg.block_t))
    pdl = cfg.pdl and pdl_supported(kv.device)
    _window_kv_write_kernel[grid](
        kv, pos.start, pool.block_table, pool.nope.view(torch.uint8), pool.scale, pool.rope, s, first,
        pool.block_table.shape[1], NOPE=hd - pool.rope_dim, R=pool.rope_dim, HDP=triton.next_power_of_2(hd),
        BLOCK_SIZE=pool.block_size, BLOCK_T=cfg.block_t, PDL=pdl, num_warps=cfg.num_warps, enable_fp_fusion=False,
        launch_pdl=pdl,
    )  # fmt: skip

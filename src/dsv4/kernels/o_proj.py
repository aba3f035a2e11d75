"""The grouped FP8 output projection (attention spec §6): ``wo_a`` per group, the FP8 activation quant
per 128, then ``wo_b``, in three launches.

Decode is memory-bound: at flash dims ``wo_a`` (8 groups x 1024 x 4096) and ``wo_b`` (4096 x 8192)
are 32 MiB of FP8 each, and a step has T = B*S = 2..128 tokens. Both GEMMs stream their weights
once, as FP8 bytes, over enough programs to fill the SMs: the output columns are tiled and the
reduction axis split into K-slices (``split_k.py``'s policy: one wave of programs), and the slices
are added in slice order (deterministic; no float atomics).

1. ``_wo_a_kernel``, grid ``(G*OL / BLOCK_N, T tiles, SPLITS_A)``: a column tile of ``r`` lies in one
   group (``BLOCK_N`` divides ``OL``) and in one 128-row block of ``wo_a``'s scales; each ``BLOCK_K``
   = 128 step of the reduction axis reads one scale. The codes are dequantized on chip as
   ``bf16(code x scale)``, as ``dequantize_fp8_weight`` rounds them (exact for a power-of-two scale
   whose products stay in bf16's normal range) and multiplied with the group's bf16 ``o``
   (exact products, fp32 sums). Each program writes the fp32 sums of its K-slice to
   ``r_part [SPLITS_A, T, G*OL]``.
2. ``_act_quant_kernel``, grid ``(G*OL / 128, T tiles)``: one 128-block of ``r`` per program; adds
   the slices in slice order, rounds to bf16 (``r`` of the reference) and quantizes the block to e4m3
   with its power-of-two scale (``fp8_quant.quant_e4m3``, bit for bit ``fp8_act_quant``): codes
   ``a8 [T, G*OL] uint8`` and exponents ``a_exp [T, G*OL/128] int32``. It also zeroes the split
   counters of launch 3.
3. ``_wo_b_kernel``, grid ``(ceil(D / BLOCK_N), T tiles, SPLITS_B)``: each 128-block of the reduction
   axis is an FP8 x FP8 dot (exact products: e4m3 x e4m3 fits fp32; an fp8 ``tl.dot`` on sm_90)
   times the activation's and the weight's block scales, added in block order (each block's dot
   starts from zero and is promoted to the fp32 accumulator on the CUDA cores, as DeepGEMM does: the
   tensor cores' reduced-precision fp8 accumulation never spans more than 128 products). With one slice the
   program stores ``y`` (bf16); with more, each stores its fp32 slice, and the program that
   completes a column tile last (an atomic counter per tile) adds the slices in slice order and stores
   ``y``: the same sum whichever program it is.

With one K-slice of ``wo_a`` and 128-column tiles (the ``splits`` 1 tuning candidate, ``OL`` a multiple
of 128) a launch-1 tile is a whole activation block: its program rounds and quantizes it in its
epilogue, as launch 2 would, and zeroes launch 3's counters; launch 2 is skipped (two launches, no
``r_part``).

A NaN in ``o`` makes its token's ``r`` blocks of the group NaN; their activation blocks get NaN codes
and the NaN exponent, which makes the whole ``y`` row of that token NaN, as in the reference.

With programmatic dependent launch (sm_90) each program lets the next launch be scheduled, then
waits for its predecessor before it reads anything that one writes. No launch reads a host value;
the grids come from the shapes alone (a CUDA graph can capture the three launches).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ..model.fp8_row import ACT_BLOCK
from ..model.structs import OProjOut
from ..model.weights import OProjWeights
from .epilogue import round_bf16, to_bf16
from .fp8_quant import NAN_EXP, pow2, quant_e4m3
from .interpreter import interpreted
from .launch import INTERPRETED, pdl_supported, pow2_divisor, require, sm_count
from .split_k import BF16_DOT_DTYPE, SPLIT_CHOICES
from .tuning import Param, Tunable
from .workspace import Workspace, scratch

BLOCK_K = 128  # reduction step: one 128-B line of an FP8 weight row and exactly one 128x128 weight scale block
BLOCK_M_MAX = 128  # tokens per tile: every decode token (T <= 128) in one tile, so each weight byte is read once
BLOCK_M_MIN = 16  # smallest tl.dot M
BLOCK_N_MAX = 128  # output columns per tile: a power of two <= 128 keeps a tile inside one 128-row scale block
BLOCK_N_MIN = 16  # smallest tl.dot N
QUANT_ROWS = 32  # tokens per activation-quant program: a [32, 128] fp32 tile, 4 decode programs per block at T=128
COUNTER_BLOCK = 1024  # split counters zeroed per step by the quant launch
NUM_WARPS = 8  # [128, 128] fp32 accumulator plus the dequantized [128, 128] weight tile: 128 registers a thread
NUM_STAGES = 3  # K steps in flight: 2 x 16 KiB of FP8 weights (and the activations) per stage
WO_B_WARPS = 16  # [128, 128] fp32 accumulator plus the [128, 128] fp32 block sum: 8 warps spill (255 registers)
QUANT_WARPS = 4  # one [32, 128] tile per program

# The interpreter's tl.dot cannot take fp8 operands: there the codes are widened to fp32 (exact; the
# interpreter sums in fp32); compiled, they stay e4m3 for the sm_90 tensor cores (exact products, fp32 sums).
FP8_DOT_DTYPE = tl.constexpr(tl.float32 if interpreted() else tl.float8e4nv)
_BLOCK_K = tl.constexpr(BLOCK_K)
_ACT_BLOCK = tl.constexpr(ACT_BLOCK)
_COUNTER_BLOCK = tl.constexpr(COUNTER_BLOCK)


def _gemm_candidates(bucket: dict[str, int]) -> list[dict]:
    """Narrower tiles, other K splits (1: no partials; 4, 8: more programs), warps and stages."""
    return [{"block_n": 64}, {"splits": 1}, {"splits": 4}, {"splits": 8}, {"num_warps": 4}, {"num_stages": 4}]


def _gemm_params(what: str, num_warps: int) -> tuple[Param, ...]:
    return (
        Param("block_n", BLOCK_N_MAX, (16, 32, 64, 128), f"output columns per tile ({what})"),
        Param("splits", None, SPLIT_CHOICES, "K-slices per output tile; null: one wave of SMs"),
        Param("num_warps", num_warps, (4, 8, 16), "warps per program", compiled_only=True),
        Param("num_stages", NUM_STAGES, (2, 3, 4), "software-pipelined K steps", exact=True, compiled_only=True),
    )


WO_A_TUNING = Tunable(
    "o_proj.wo_a",
    "_wo_a_kernel: the grouped FP8 wo_a GEMM as fp32 K-slice partials (o_proj launch 1)",
    dims=("T", "K", "N"),
    pow2_dims=("T",),
    params=_gemm_params("a divisor of OL", NUM_WARPS),
    candidates=_gemm_candidates,
)
QUANT_TUNING = Tunable(
    "o_proj.quant",
    "_act_quant_kernel: wo_a's slices summed, bf16, FP8 activation quant per 128 (o_proj launch 2)",
    dims=("T", "N"),
    pow2_dims=("T",),
    params=(Param("num_warps", QUANT_WARPS, (2, 4, 8), "warps per program", compiled_only=True),),
    candidates=({"num_warps": 2}, {"num_warps": 8}),
)
WO_B_TUNING = Tunable(
    "o_proj.wo_b",
    "_wo_b_kernel: the FP8 x FP8 wo_b GEMM with block scales, slices added by the last program (o_proj launch 3)",
    dims=("T", "K", "N"),
    pow2_dims=("T",),
    params=_gemm_params("masked at the edge of D", WO_B_WARPS),
    candidates=_gemm_candidates,
)


@dataclass(frozen=True)
class GemmTiles:
    """Tile sizes and K split of one of the two GEMM launches."""

    block_m: int
    block_n: int
    n_tiles: int
    m_tiles: int
    splits: int

    @property
    def grid(self) -> tuple[int, int, int]:
        """(column tiles, token tiles, K-slices): column tiles vary fastest, so the programs that run
        together share one token tile of the activations."""
        return (self.n_tiles, self.m_tiles, self.splits)


def gemm_tiles(t: int, k: int, n: int, block_n: int, sms: int, splits: int | None) -> GemmTiles:
    """Tiles of ``[T, K] @ [N, K].T`` (``K`` a multiple of ``BLOCK_K``) in columns of ``block_n``
    (the last tile masked when it does not divide ``N``): ``splits`` K-slices (at most one per
    ``BLOCK_K`` step) or, when None, as many as fill one wave of ``sms`` programs."""
    block_m = min(BLOCK_M_MAX, max(BLOCK_M_MIN, triton.next_power_of_2(t)))
    n_tiles, m_tiles = triton.cdiv(n, block_n), triton.cdiv(t, block_m)
    steps = k // BLOCK_K
    if splits is None:
        splits = sms // (n_tiles * m_tiles)
    return GemmTiles(block_m, block_n, n_tiles, m_tiles, max(1, min(splits, steps)))


@triton.jit
def _wo_a_kernel(
    o_ptr,  # [T, G*INNER] bf16 (o [T, H, HD] viewed by group)
    w_ptr,  # [N, INNER] uint8: wo_a's e4m3 codes, N = G*OL
    w_scale_ptr,  # [N / 128, INNER / 128] fp32
    part_ptr,  # out [SPLITS, T, N] fp32: this K-slice's sums (not QUANT)
    a8_ptr,  # out [T, N] uint8 (QUANT)
    a_exp_ptr,  # out [T, N / 128] int32 (QUANT)
    counter_ptr,  # out [COUNTERS] int32: the wo_b launch's split counters, zeroed (QUANT)
    T,
    COUNTERS,
    INNER: tl.constexpr,
    N: tl.constexpr,
    OL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr,
    QUANT: tl.constexpr,  # one slice and 128 columns a tile: the tile is a whole activation block, quantized here
    PDL: tl.constexpr,
):
    if PDL:
        gdc_launch_dependents()  # the next launch may be scheduled: it waits for this grid to complete
        gdc_wait()  # o, written by the previous launch in the stream, is complete and visible
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)
    col0 = pid_n * BLOCK_N
    g = col0 // OL  # the tile's group: BLOCK_N divides OL
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    cols = col0 + tl.arange(0, BLOCK_N)
    a_rows = o_ptr + rows[:, None] * (N // OL * INNER) + g * INNER
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * INNER
    scales = w_scale_ptr + (col0 // _BLOCK_K) * (INNER // _BLOCK_K)  # the tile's row of weight scale blocks
    steps: tl.constexpr = INNER // _BLOCK_K
    ks = tl.arange(0, _BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(split * steps // SPLITS, (split + 1) * steps // SPLITS):
        k = kb * _BLOCK_K + ks
        a = tl.load(a_rows + k[None, :], mask=row_ok[:, None], other=0.0)
        # [BLOCK_K, BLOCK_N], K contiguous in memory: bf16(code x scale), as dequantize_fp8_weight rounds it
        # (exact for a power-of-two scale). The interpreter's dot takes fp32 operands: rounded there on the bits.
        w = tl.load(w_cols + k[:, None]).to(tl.float8e4nv, bitcast=True).to(tl.float32) * tl.load(scales + kb)
        if INTERPRETED:
            w = round_bf16(w)
        acc = tl.dot(a.to(BF16_DOT_DTYPE), w.to(BF16_DOT_DTYPE), acc)
    if QUANT:
        _quant_store(acc, a8_ptr, a_exp_ptr, rows, row_ok, cols, pid_n, N)
        if (pid_n == 0) & (pid_m == 0):
            _zero(counter_ptr, COUNTERS)
    else:
        tl.store(part_ptr + (split * T + rows)[:, None] * N + cols[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _quant_store(r, a8_ptr, a_exp_ptr, rows, row_ok, cols, kb, N: tl.constexpr):
    """Rows ``rows`` of the 128-block ``kb`` of ``r`` (``[BM, 128]`` fp32, at columns ``cols``), rounded
    to bf16 (the reference's ``r``) and quantized to e4m3 with its power-of-two scale (bit for bit
    ``fp8_act_quant``): codes into ``a8 [T, N]``, exponents into ``a_exp [T, N / 128]``."""
    codes, e = quant_e4m3(round_bf16(r))
    tl.store(a8_ptr + rows[:, None] * N + cols[None, :], codes, mask=row_ok[:, None])
    tl.store(a_exp_ptr + rows * (N // _ACT_BLOCK) + kb, e, mask=row_ok)


@triton.jit
def _zero(counter_ptr, COUNTERS):
    """``counter [COUNTERS]`` int32 = 0."""
    for c0 in range(0, COUNTERS, _COUNTER_BLOCK):
        c = c0 + tl.arange(0, _COUNTER_BLOCK)
        tl.store(counter_ptr + c, tl.zeros((_COUNTER_BLOCK,), tl.int32), mask=c < COUNTERS)


@triton.jit
def _act_quant_kernel(
    part_ptr,  # [SPLITS, T, N] fp32: wo_a's K-slices
    a8_ptr,  # out [T, N] uint8: e4m3 codes of bf16(r)
    a_exp_ptr,  # out [T, N / 128] int32: their block exponents (128: a block holding NaN or an infinity)
    counter_ptr,  # out [COUNTERS] int32: launch 3's split counters, zeroed
    T,
    COUNTERS,
    N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    SPLITS: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:
        gdc_launch_dependents()  # the wo_b launch may be scheduled: it waits for this grid to complete
        gdc_wait()  # wo_a's slices are complete and visible
    kb = tl.program_id(0)
    pid_m = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    cols = kb * _ACT_BLOCK + tl.arange(0, _ACT_BLOCK)
    ptrs = part_ptr + rows[:, None] * N + cols[None, :]
    r = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    for s in tl.static_range(1, SPLITS):  # slice order: the same sum on every run
        r += tl.load(ptrs + s * T * N, mask=row_ok[:, None], other=0.0)
    _quant_store(r, a8_ptr, a_exp_ptr, rows, row_ok, cols, kb, N)
    if (kb == 0) & (pid_m == 0):
        _zero(counter_ptr, COUNTERS)


@triton.jit
def _wo_b_kernel(
    a8_ptr,  # [T, K] uint8 e4m3 codes
    a_exp_ptr,  # [T, K / 128] int32
    w_ptr,  # [D, K] uint8: wo_b's e4m3 codes
    w_scale_ptr,  # [ceil(D / 128), K / 128] fp32
    part_ptr,  # scratch [SPLITS, T, D] fp32 (SPLITS > 1)
    counter_ptr,  # [m tiles x n tiles] int32, zero on entry (SPLITS > 1)
    y_ptr,  # out [T, D] bf16
    T,
    D,
    K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:
        gdc_launch_dependents()  # the next op's launch may be scheduled; it waits for this grid to complete
        gdc_wait()  # the activation codes and the zeroed counters are complete and visible
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    col0 = pid_n * BLOCK_N
    cols = col0 + tl.arange(0, BLOCK_N)
    col_ok = cols < D
    steps: tl.constexpr = K // _BLOCK_K
    scales = w_scale_ptr + (col0 // _BLOCK_K) * steps  # the tile's row of weight scale blocks
    ks = tl.arange(0, _BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(split * steps // SPLITS, (split + 1) * steps // SPLITS):
        k = kb * _BLOCK_K + ks
        a = tl.load(a8_ptr + rows[:, None] * K + k[None, :], mask=row_ok[:, None], other=0)
        w = tl.load(w_ptr + cols.to(tl.int64)[None, :] * K + k[:, None], mask=col_ok[None, :], other=0)
        a = a.to(tl.float8e4nv, bitcast=True).to(FP8_DOT_DTYPE)
        w = w.to(tl.float8e4nv, bitcast=True).to(FP8_DOT_DTYPE)
        block = tl.dot(a, w, out_dtype=tl.float32)  # one 128-block's sum of exact products
        e = tl.load(a_exp_ptr + rows * steps + kb, mask=row_ok, other=0)
        # A NaN block is made NaN here (the interpreter decodes the e4m3 NaN code as an infinity).
        sa = tl.where(e == NAN_EXP, float("nan"), pow2(tl.minimum(e, 127)))
        acc += block * sa[:, None] * tl.load(scales + kb)
    y = y_ptr + rows[:, None] * D + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    if SPLITS == 1:
        tl.store(y, to_bf16(acc), mask=mask)
    else:
        part = part_ptr + (split * T + rows)[:, None] * D + cols[None, :]
        tl.store(part, acc, mask=mask)
        tl.debug_barrier()  # every thread's slice is stored before the counter says so
        done = tl.atomic_add(counter_ptr + pid_m * tl.num_programs(0) + pid_n, 1, sem="acq_rel", scope="gpu")
        if done == SPLITS - 1:  # the tile's last slice: add them all, in slice order
            total = tl.load(part_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0, cache_modifier=".cg")
            for s in tl.static_range(1, SPLITS):
                total += tl.load(
                    part_ptr + (s * T + rows)[:, None] * D + cols[None, :], mask=mask, other=0.0, cache_modifier=".cg"
                )
            tl.store(y, to_bf16(total), mask=mask)


def check_dims(heads: int, hd: int, w: OProjWeights) -> None:
    """``ValueError`` naming ``w.wo_a`` where its dims do not fit the kernels' tiles, for ``o`` of
    ``heads`` heads of ``hd``: its columns ``HG*HD`` a multiple of ``BLOCK_K``, ``OL`` a multiple of
    ``BLOCK_N_MIN``."""
    n, inner = w.wo_a.shape
    ol = n // (heads * hd // inner)
    require(inner % BLOCK_K == 0, "w.wo_a", f"HG*HD (its columns) a multiple of {BLOCK_K}, got {inner}")
    require(pow2_divisor(ol, BLOCK_N_MAX) >= BLOCK_N_MIN, "w.wo_a", f"OL a multiple of {BLOCK_N_MIN}, got {ol}")


def o_proj(o: torch.Tensor, w: OProjWeights, out: OProjOut | None = None, ws: Workspace | None = None) -> OProjOut:
    """Fused attention spec §6 on validated arguments, in three launches or two (module docstring).

    ``o``: ``[T, H, HD] bf16``; ``w``: ``OProjWeights`` (``wo_a [G*OL, HG*HD]``, ``wo_b [D, G*OL]``
    float8_e4m3fn with fp32 128x128 block scales). Returns ``OProjOut(y [T, D] bf16)``, written
    into ``out`` when given; scratch comes from ``ws`` when given.
    """
    t, h, hd = o.shape
    n, inner = w.wo_a.shape
    groups = h * hd // inner
    ol = n // groups
    d = w.wo_b.shape[0]
    check_dims(h, hd, w)
    dev = o.device
    sms, pdl = sm_count(dev), pdl_supported(dev)
    cfg_a = WO_A_TUNING.config(dev, T=t, K=inner, N=n)
    tiles_a = gemm_tiles(t, inner, n, max(BLOCK_N_MIN, pow2_divisor(ol, cfg_a.block_n)), sms, cfg_a.splits)
    cfg_b = WO_B_TUNING.config(dev, T=t, K=n, N=d)
    block_n_b = max(BLOCK_N_MIN, min(cfg_b.block_n, triton.next_power_of_2(d)))
    tiles_b = gemm_tiles(t, n, d, block_n_b, sms, cfg_b.splits)
    cfg_q = QUANT_TUNING.config(dev, T=t, N=n)

    quant_a = tiles_a.splits == 1 and tiles_a.block_n == ACT_BLOCK  # wo_a's tiles are whole activation blocks
    r_part = scratch(ws, "o_proj.r_part", (1,) if quant_a else (tiles_a.splits, t, n), torch.float32, dev)
    a8 = scratch(ws, "o_proj.a8", (t, n), torch.uint8, dev)
    a_exp = scratch(ws, "o_proj.a_exp", (t, n // ACT_BLOCK), torch.int32, dev)
    counters = tiles_b.n_tiles * tiles_b.m_tiles if tiles_b.splits > 1 else 0
    counter = scratch(ws, "o_proj.counter", (max(counters, 1),), torch.int32, dev)
    y_part = scratch(ws, "o_proj.y_part", (tiles_b.splits, t, d) if counters else (1,), torch.float32, dev)
    y = out.y if out is not None else torch.empty((t, d), dtype=torch.bfloat16, device=dev)

    _wo_a_kernel[tiles_a.grid](
        o, w.wo_a.view(torch.uint8), w.wo_a_scale, r_part, a8, a_exp, counter, t, counters, INNER=inner, N=n,
        OL=ol, BLOCK_M=tiles_a.block_m, BLOCK_N=tiles_a.block_n, SPLITS=tiles_a.splits, QUANT=quant_a, PDL=pdl,
        num_warps=cfg_a.num_warps, num_stages=cfg_a.num_stages, launch_pdl=pdl, enable_fp_fusion=False,
    )  # fmt: skip
    if not quant_a:
        _act_quant_kernel[(n // ACT_BLOCK, triton.cdiv(t, QUANT_ROWS))](
            r_part, a8, a_exp, counter, t, counters, N=n, BLOCK_M=QUANT_ROWS, SPLITS=tiles_a.splits, PDL=pdl,
            num_warps=cfg_q.num_warps, launch_pdl=pdl, enable_fp_fusion=False,
        )  # fmt: skip
    _wo_b_kernel[tiles_b.grid](
        a8, a_exp, w.wo_b.view(torch.uint8), w.wo_b_scale, y_part, counter, y, t, d, K=n, BLOCK_M=tiles_b.block_m,
        BLOCK_N=tiles_b.block_n, SPLITS=tiles_b.splits, PDL=pdl, num_warps=cfg_b.num_warps,
        num_stages=cfg_b.num_stages, launch_pdl=pdl, enable_fp_fusion=False,
    )  # fmt: skip
    return out if out is not None else OProjOut(y)

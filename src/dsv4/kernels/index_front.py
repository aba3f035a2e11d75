"""The indexer's front launch: the x-side projection and the INT8 query path as one grid of two
program families (spec §4 step 1, §5 steps 1-4 for the queries), plus the zeroing of the scratch
counters the later launches add into.

- x-projection programs (``x_proj.x_proj_tile``): ``x @ [wkv; wgate; weights_proj].T`` as raw fp32
  K-slices ``xp [SPLITS, T, 4*HID + HI]``; every decode token in one M-tile, so each weight byte is
  read once, and ``D`` split so that the launch's programs fill the SMs (``x_proj.fill_splits``).
- query programs (``index_query.query_tile``): one per head (and token tile), ``q8 [T, HI, HID]``
  int8 and ``q_scale [T, HI]`` fp32; ``wq_b`` read once.

The two families share nothing but the launch: no program waits for another, so the order in which
they run (the interpreter's one at a time, or a GPU's all at once) does not matter. Their outputs are
read by the next launch (the compressor step; the queries by the score launch after it).

Compiled for sm_90 the launch takes part in programmatic dependent launch on both sides: it may be
scheduled while the previous launch in the stream (another op's) still runs; each program first asks
L2 for its share of the weights (``[wkv; wgate; weights_proj]`` and the indexer's ``wq_b``, which no
earlier launch writes: ``l2_prefetch.prefetch_l2_share``), lets the next launch be scheduled
(``gdc_launch_dependents``; it waits for this grid to complete), then waits for its predecessor
(``gdc_wait``) before it reads ``x``, ``qr`` or ``start`` or zeroes the counters.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ..model.rope import RopeTable
from ..model.structs import StepPositions
from ..model.weights import CompressorWeights, IndexerWeights
from .head_rotation import split_head_dims
from .index_query import BLOCK_K as Q_BLOCK_K
from .index_query import query_block_m, query_tile
from .l2_prefetch import can_prefetch, prefetch_l2_share
from .launch import pdl_supported, require, sm_count
from .split_k import BLOCK_K, SPLIT_CHOICES
from .tuning import Param, Tunable
from .workspace import Workspace, scratch
from .x_proj import BLOCK_N, check_rows, x_proj_tile, x_proj_tiles

NUM_WARPS = 8  # both families' tiles: [128, 128] fp32 accumulators (x-projection), three int32 and one fp32
#                [128, <=128] tiles (query head); registers and spills in docs/DESIGN.md
ZERO_BLOCK = tl.constexpr(1024)  # int32 counters zeroed per step of the loop in program 0
NUM_STAGES = 3  # Triton's default: the x-projection's K steps and the query programs' QL steps in flight

TUNING = Tunable(
    "index.front",
    "_front_kernel: the x-projection K-slices and the INT8 query programs (indexer and compressor launch 1)",
    dims=("T", "D", "N", "HI"),  # N: the x-projection's columns, so each compressor's launch is its own bucket
    pow2_dims=("T",),
    params=(
        Param("block_n", BLOCK_N, (64, 128), "x-projection output columns per tile (a divisor of 2*HID)"),
        Param("splits", None, SPLIT_CHOICES, "x-projection K-slices; null: split_k.k_splits"),
        Param("num_warps", NUM_WARPS, (4, 8), "warps per program", compiled_only=True),
        Param("num_stages", NUM_STAGES, (2, 3, 4), "pipelined K steps", exact=True, compiled_only=True),
        Param(
            "pdl", True, (False, True), "let the next launch be scheduled early (sm_90)", exact=True, compiled_only=True
        ),
    ),
    candidates=(
        {"splits": 4},
        {"splits": 8},
        {"splits": 16},
        {"block_n": 64},
        {"num_warps": 4},
        {"num_stages": 4},
        {"pdl": False},
    ),
)


@triton.jit
def _front_kernel(
    x_ptr,  # [T, D] bf16
    wkv_ptr,  # [2*HID, D] bf16
    wgate_ptr,  # [2*HID, D] bf16
    wproj_ptr,  # [HI, D] bf16
    xp_ptr,  # out [SPLITS, T, 4*HID + HI] fp32
    qr_ptr,  # [T, QL] int8
    qr_scale_ptr,  # [T] fp32
    wq_b_ptr,  # [HI*HID, QL] int8
    wq_b_scale_ptr,  # [HI*HID] fp32
    start_ptr,  # [B] int64
    cos_ptr,  # [P, R/2] fp32
    sin_ptr,
    q8_ptr,  # out [T, HI, HID] int8
    q_scale_ptr,  # out [T, HI] fp32
    zero_ptr,  # out [n_zero] int32, zeroed
    T,
    D,
    S,
    QL,
    HI,
    n_zero,
    hadamard_scale,
    TWO_HID: tl.constexpr,
    XP_BLOCK_M: tl.constexpr,
    XP_BLOCK_N: tl.constexpr,
    XP_N_TILES: tl.constexpr,
    XP_M_TILES: tl.constexpr,
    SPLITS: tl.constexpr,
    XP_PROGRAMS: tl.constexpr,
    HID: tl.constexpr,
    NOPE: tl.constexpr,
    HALF_R: tl.constexpr,
    Q_BLOCK_M: tl.constexpr,
    Q_BLOCK_K: tl.constexpr,
    QUERY: tl.constexpr,
    PDL: tl.constexpr,
    PREFETCH: tl.constexpr,  # ask L2 for the weights before the wait (sm_90, 16-byte aligned weights)
):
    pid = tl.program_id(0)
    if PREFETCH:  # no earlier launch writes the weights: they stream while the predecessor ends
        programs = tl.num_programs(0)
        row_bytes = tl.cast(D, tl.int64) * 2  # bf16
        prefetch_l2_share(wkv_ptr.to(tl.pointer_type(tl.int8)), TWO_HID * row_bytes, pid, programs)
        prefetch_l2_share(wgate_ptr.to(tl.pointer_type(tl.int8)), TWO_HID * row_bytes, pid, programs)
        if QUERY:
            prefetch_l2_share(wproj_ptr.to(tl.pointer_type(tl.int8)), HI * row_bytes, pid, programs)
            prefetch_l2_share(wq_b_ptr.to(tl.pointer_type(tl.int8)), tl.cast(HI, tl.int64) * HID * QL, pid, programs)
    if PDL:
        gdc_launch_dependents()  # the compressor step may be scheduled now; it waits for this grid to complete
        gdc_wait()  # x, qr, qr_scale and start are written by earlier launches
    if pid < XP_PROGRAMS:
        x_proj_tile(
            pid, x_ptr, wkv_ptr, wgate_ptr, wproj_ptr, xp_ptr, T, D, HI,
            TWO_HID, XP_BLOCK_M, XP_BLOCK_N, XP_N_TILES, XP_M_TILES, SPLITS,
        )  # fmt: skip
    elif QUERY:
        query_tile(
            pid - XP_PROGRAMS, qr_ptr, qr_scale_ptr, wq_b_ptr, wq_b_scale_ptr, start_ptr, cos_ptr, sin_ptr, q8_ptr,
            q_scale_ptr, T, S, QL, HI, hadamard_scale, HID, NOPE, HALF_R, Q_BLOCK_M, Q_BLOCK_K,
        )  # fmt: skip
    if pid == 0:
        for z0 in range(0, n_zero, ZERO_BLOCK):
            offs = z0 + tl.arange(0, ZERO_BLOCK)
            tl.store(zero_ptr + offs, tl.zeros([ZERO_BLOCK], dtype=tl.int32), mask=offs < n_zero)


def check_dims(d: int, w: CompressorWeights, indexer: IndexerWeights | None = None, rope_dim: int = 0,
               x: str = "x") -> None:  # fmt: skip
    """``ValueError`` naming what the front launch cannot take: the hidden size ``d`` (``x``'s last dim;
    ``x`` names it), ``w.wkv``'s rows and, with ``indexer``, its query heads' split at ``rope_dim``."""
    require(d % 16 == 0, x, f"a hidden size D that is a multiple of 16 (the K-slices' {BLOCK_K}-wide steps)")
    if indexer is not None:
        split_head_dims(w.wkv.shape[0] // 2, rope_dim)
    check_rows(w.wkv.shape[0])


def front(
    x: torch.Tensor,
    w: CompressorWeights,
    pos: StepPositions,
    indexer: IndexerWeights | None = None,
    qr: torch.Tensor | None = None,
    qr_scale: torch.Tensor | None = None,
    rope: RopeTable | None = None,
    ws: Workspace | None = None,
    zero: torch.Tensor | None = None,
    name: str = "front",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One launch: ``x [B, S, D] bf16`` -> ``xp [SPLITS, B*S, 4*HID + HI] fp32`` (raw K-slices of
    ``x @ [wkv; wgate; weights_proj].T``; ``HI`` 0 without ``indexer``) and, with ``indexer`` (and
    ``qr [B*S, QL] int8``, ``qr_scale [B*S, 1] fp32``, ``rope``), the INT8 queries ``q8 [B*S, HI, HID]``
    and ``q_scale [B*S, HI] fp32``. ``zero``: an int32 tensor zeroed by the same launch. ``name``
    prefixes the names of its scratch in ``ws``."""
    b, s, d = x.shape
    t = b * s
    two_hid = w.wkv.shape[0]
    hid = two_hid // 2
    hi = 0 if indexer is None else indexer.weights_proj.shape[0]
    cfg = TUNING.config(x.device, T=t, D=d, N=2 * two_hid + hi, HI=hi)
    check_dims(d, w, indexer, 0 if rope is None else rope.rope_dim)
    q8 = q_scale = None
    if indexer is None:
        q_programs, q_block_m, ql = 0, 16, 0
        q_args: tuple[torch.Tensor, ...] = (x,) * 4
        nope, half_r, cos, sin = 16, 16, x, x
    else:
        assert qr is not None and qr_scale is not None and rope is not None, "the queries need qr, qr_scale, rope"
        ql = qr.shape[1]
        nope, half_r = split_head_dims(hid, rope.rope_dim)
        q_block_m = query_block_m(t)
        q_programs = triton.cdiv(t, q_block_m) * hi
        q8 = scratch(ws, "front.q8", (t, hi, hid), torch.int8, x.device)
        q_scale = scratch(ws, "front.q_scale", (t, hi), torch.float32, x.device)
        q_args = (qr, qr_scale, indexer.wq_b, indexer.wq_b_scale)
        cos, sin = rope.cos, rope.sin
    tiles = x_proj_tiles(t, d, two_hid, hi, sm_count(x.device), cfg.block_n, cfg.splits, q_programs)
    splits = tiles.splits
    xp = scratch(ws, f"{name}.xp", (splits, t, 2 * two_hid + hi), torch.float32, x.device)
    xp_programs = tiles.n_tiles * tiles.m_tiles * splits
    pdl = cfg.pdl and pdl_supported(x.device)
    weights = (w.wkv, w.wgate) + (() if indexer is None else (indexer.weights_proj, indexer.wq_b))
    prefetch = pdl and all(can_prefetch(t.view(torch.int8)) for t in weights)
    zero = torch.empty(0, dtype=torch.int32, device=x.device) if zero is None else zero
    _front_kernel[(xp_programs + q_programs,)](
        x, w.wkv, w.wgate, w.wkv if indexer is None else indexer.weights_proj, xp,
        *q_args, pos.start, cos, sin, x if q8 is None else q8, x if q_scale is None else q_scale, zero,
        t, d, s, ql, hi, zero.numel(), hid**-0.5,
        TWO_HID=two_hid, XP_BLOCK_M=tiles.block_m, XP_BLOCK_N=cfg.block_n, XP_N_TILES=tiles.n_tiles,
        XP_M_TILES=tiles.m_tiles, SPLITS=splits, XP_PROGRAMS=xp_programs,
        HID=hid, NOPE=nope, HALF_R=half_r, Q_BLOCK_M=q_block_m, Q_BLOCK_K=Q_BLOCK_K, QUERY=indexer is not None,
        PDL=pdl, PREFETCH=prefetch, num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False,
        launch_pdl=pdl,
    )  # fmt: skip
    return xp, q8, q_scale

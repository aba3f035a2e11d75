"""``qkv_proj_rope``'s q heads with QL split over programs (the ``qkv.q_heads`` parameter ``splits``).

A launch of few heads at a few tokens (a tensor-parallel rank's decode step: 8 heads at flash with 8 ranks)
gives the other plans 16 programs, each walking all of QL for its half head's 256 KiB of ``wq_b`` while
the other SMs idle. Here the K-slices are programs too:

1. ``_q_slices_kernel``, grid ``(M-tiles, 2H, splits)``: INT8 ``qr @ wq_b.T`` over one slice of QL for one
   column half of a head, stored as int32 ``[splits, T, H*HD]``. Integer sums: the slices add up to the
   one-pass sum exactly, in any order.
2. ``_q_finish_kernel``, grid ``(M-tiles, H)``: a head's slices added, then the one-program-per-head
   plan's epilogue on the same int32 values (``dequant_half`` of each half, then ``store_q_head``:
   ``head_rms``, RoPE, bf16).

The partials cost ``2 x splits x T x 4`` bytes a column (written, read back) beside its QL bytes of
``wq_b``, so the plan is a candidate at a few tokens only (``qkv_proj_rope._q_heads_candidates``).
Both launches take part in programmatic dependent launch as the op's others do: the slices let the
finish start, then wait for the rows kernel; the finish waits for the slices before it reads anything.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ..model.rope import RopeTable
from ..model.weights import AttnWeights
from .l2_prefetch import can_prefetch, prefetch_l2
from .launch import pdl_supported
from .q_head_epilogue import dequant_half, store_q_head
from .tuning import Config
from .workspace import Workspace, scratch

FINISH_WARPS = 8  # two [64, 256] int32 half-head sums, as the one-program-per-head plan's accumulators


@triton.jit
def _q_slices_kernel(
    qr_ptr,  # [T, QL] int8
    wq_b_ptr,  # [H*HD, QL] int8
    part_ptr,  # [SPLITS, T, H*HD] int32 out
    T,
    QL: tl.constexpr,
    N: tl.constexpr,  # H*HD
    HALF: tl.constexpr,  # HD/2 columns a program
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLITS: tl.constexpr,
    PDL: tl.constexpr,
    PREFETCH: tl.constexpr,  # ask L2 for the half's wq_b rows before the wait (slice 0 of the first M-tile)
):
    mtile = tl.program_id(0).to(tl.int64)
    col0 = tl.program_id(1).to(tl.int64) * HALF
    split = tl.program_id(2)
    rows = mtile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    if PREFETCH:  # noqa: SIM102 (wq_b depends on no earlier launch)
        if (mtile == 0) & (split == 0):
            prefetch_l2(wq_b_ptr, col0 * QL, (col0 + HALF) * QL)
    if PDL:
        gdc_launch_dependents()  # the finish may be scheduled: it waits for this grid before reading
        gdc_wait()  # qr is complete and visible
    k_blocks = QL // BLOCK_K
    kb_lo = split * k_blocks // SPLITS
    kb_hi = (split + 1) * k_blocks // SPLITS
    ks = tl.arange(0, BLOCK_K)
    cols = col0 + tl.arange(0, HALF)
    qr_rows = qr_ptr + rows[:, None] * QL
    w_cols = wq_b_ptr + cols[None, :] * QL  # [BLOCK_K, HALF] tiles, K contiguous in memory
    acc = tl.zeros((BLOCK_M, HALF), dtype=tl.int32)  # exact: |sum| <= 127^2 * QL < 2^31
    for kb in range(kb_lo, kb_hi):
        k = kb * BLOCK_K + ks
        a = tl.load(qr_rows + k[None, :], mask=row_ok[:, None], other=0)
        w = tl.load(w_cols + k[:, None])
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)
    out = part_ptr + (split * T + rows[:, None]) * N + cols[None, :]
    tl.store(out, acc, mask=row_ok[:, None])


@triton.jit
def _slice_sum(part_ptr, rows, row_ok, cols, T, N: tl.constexpr, SPLITS: tl.constexpr):
    """``[BM, HALF]`` int32: columns ``cols`` of ``rows``, their ``SPLITS`` K-slices added (exact)."""
    at = part_ptr + rows[:, None] * N + cols[None, :]
    acc = tl.load(at, mask=row_ok[:, None], other=0)
    for s in tl.static_range(1, SPLITS):  # unrolled: every slice's load is issued before the adds
        acc += tl.load(at + s * tl.cast(T, tl.int64) * N, mask=row_ok[:, None], other=0)
    return acc


@triton.jit
def _q_finish_kernel(
    part_ptr,  # [SPLITS, T, H*HD] int32
    qr_scale_ptr,  # [T, 1] fp32
    wq_b_scale_ptr,  # [H*HD] fp32
    positions_ptr,  # [T] int32|int64
    cos_ptr,  # [P, R/2] fp32
    sin_ptr,  # [P, R/2] fp32
    q_ptr,  # [T, H, HD] bf16 out
    T,
    eps,
    H: tl.constexpr,
    HD: tl.constexpr,
    R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    SPLITS: tl.constexpr,
    PDL: tl.constexpr,
):
    HALF: tl.constexpr = HD // 2
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    col0 = tl.program_id(1).to(tl.int64) * HD
    if PDL:
        gdc_wait()  # every slice is complete and visible (and, before them, qr_scale)
    qr_scale = tl.load(qr_scale_ptr + rows, mask=row_ok, other=0.0)[:, None]
    cols0 = col0 + tl.arange(0, HALF)
    cols1 = cols0 + HALF
    acc0 = _slice_sum(part_ptr, rows, row_ok, cols0, T, H * HD, SPLITS)
    acc1 = _slice_sum(part_ptr, rows, row_ok, cols1, T, H * HD, SPLITS)
    qp0, c0, sumsq0 = dequant_half(acc0, qr_scale, wq_b_scale_ptr, cols0)
    qp1, c1, sumsq1 = dequant_half(acc1, qr_scale, wq_b_scale_ptr, cols1)
    store_q_head(q_ptr, qp0, c0, sumsq0, qp1, c1, sumsq1, rows, row_ok, col0, positions_ptr, cos_ptr, sin_ptr, eps,
                 H, HD, R)  # fmt: skip


def launch_q_heads_split(
    qr: torch.Tensor,
    qr_scale: torch.Tensor,
    w: AttnWeights,
    positions: torch.Tensor,
    rope: RopeTable,
    eps: float,
    q: torch.Tensor,
    block_m: int,
    block_k: int,
    cfg: Config,
    ws: Workspace | None = None,
) -> None:
    """The q heads into ``q [T, H, HD] bf16`` in two launches, QL in ``cfg.splits`` slices (at most one
    ``block_k`` step each) of ``block_m``-token tiles; ``cfg``: the ``qkv.q_heads`` parameters. Scratch:
    ``[splits, T, H*HD]`` int32 from ``ws`` when given."""
    t, ql = qr.shape
    h, hd = q.shape[1], q.shape[2]
    splits = min(cfg.splits, ql // block_k)
    pdl = cfg.pdl and pdl_supported(q.device)
    part = scratch(ws, "qkv.q_part", (splits, t, h * hd), torch.int32, q.device)
    m_tiles = triton.cdiv(t, block_m)
    prefetch = pdl and cfg.wq_b_prefetch == "q_heads" and can_prefetch(w.wq_b)
    _q_slices_kernel[(m_tiles, 2 * h, splits)](
        qr, w.wq_b, part, t,
        QL=ql, N=h * hd, HALF=hd // 2, BLOCK_M=block_m, BLOCK_K=block_k, SPLITS=splits, PDL=pdl, PREFETCH=prefetch,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, launch_pdl=pdl, enable_fp_fusion=False,
    )  # fmt: skip
    _q_finish_kernel[(m_tiles, h)](
        part, qr_scale, w.wq_b_scale, positions, rope.cos, rope.sin, q, t, eps,
        H=h, HD=hd, R=rope.rope_dim, BLOCK_M=block_m, SPLITS=splits, PDL=pdl,
        num_warps=FINISH_WARPS, launch_pdl=pdl, enable_fp_fusion=False,
    )  # fmt: skip

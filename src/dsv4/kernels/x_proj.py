"""The indexer's x-side projection: one GEMM of ``x`` against the stacked compressor ``wkv``,
compressor ``wgate`` and (for the indexer) ``weights_proj`` — they share ``x``, so ``x`` is read
once per M-tile and every weight row once per M-tile.

The three weights are not concatenated: each N-tile picks its weight from its tile index.
Epilogues: the gate tiles add ``ape[p % 4]`` (spec §4 step 1), the head-weight tiles multiply by
``HID^-0.5 * HI^-0.5`` (spec §5 step 3). Decode has few tokens, so ``D`` is split over enough
programs to fill the SMs (``split_k.py``: the K-slice dot, the split policy and the slice sum
are shared with qkv's projection); each K-slice writes its own fp32 partial tile and a second
kernel adds them in slice order and applies the epilogues. That costs the same two launches as
zero-fill + atomic adds, and the result is the same bit for bit on every run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..model.config import COMPRESS_RATIO
from ..model.structs import StepPositions
from ..model.weights import CompressorWeights
from .launch import sm_count
from .split_k import BLOCK_K, dot_k_slice, k_splits, sum_k_slices
from .workspace import Workspace, scratch

BLOCK_M = 64  # tokens per tile: a decode step (T=128) is two tiles; fp32 acc [64, 64] = 16 regs/thread at 8 warps
BLOCK_N = 64  # output columns per tile: divides 2*HID, so no tile straddles two weights
NUM_WARPS = 8  # 64x64 fp32 tiles: no spills on sm_90 as launched (registers in docs/DESIGN.md)
RATIO = tl.constexpr(COMPRESS_RATIO)


@triton.jit
def _tile_columns(pid_n, HI, TWO_HID: tl.constexpr, BLOCK_N: tl.constexpr):
    """N-tile ``pid_n`` -> (weight: 0 ``wkv``, 1 ``wgate``, 2 ``weights_proj``; its columns of that
    weight ``[BLOCK_N]``; that weight's row count)."""
    tiles_per_weight: tl.constexpr = TWO_HID // BLOCK_N
    segment = tl.minimum(pid_n // tiles_per_weight, 2)
    cols = (pid_n - segment * tiles_per_weight) * BLOCK_N + tl.arange(0, BLOCK_N)
    return segment, cols, tl.where(segment == 2, HI, TWO_HID)


@triton.jit
def _finish_tile(
    acc, segment, rows, row_ok, cols, mask, ape_ptr, start_ptr, kvg_ptr, weights_ptr, S, HI, weights_scale,
    TWO_HID: tl.constexpr,
):  # fmt: skip
    """Epilogue of a summed ``[BLOCK_M, BLOCK_N]`` tile: ``+ ape[p % 4]`` on the gate, ``* weights_scale``
    on the head weights; store into ``kvg [T, 4*HID]`` (kv | gate) or ``weights [T, HI]``."""
    if segment == 2:
        tl.store(weights_ptr + rows[:, None] * HI + cols[None, :], acc * weights_scale, mask=mask)
    else:
        if segment == 1:
            pos = tl.load(start_ptr + rows // S, mask=row_ok, other=0) + rows % S
            acc += tl.load(ape_ptr + (pos % RATIO)[:, None] * TWO_HID + cols[None, :], mask=mask, other=0.0)
        tl.store(kvg_ptr + rows[:, None] * (2 * TWO_HID) + segment * TWO_HID + cols[None, :], acc, mask=mask)


@triton.jit
def _x_proj_kernel(
    x_ptr,  # [T, D] bf16
    wkv_ptr,  # [2*HID, D] bf16
    wgate_ptr,  # [2*HID, D] bf16
    wproj_ptr,  # [HI, D] bf16 (unused when there are no head-weight tiles)
    ape_ptr,  # [4, 2*HID] fp32
    start_ptr,  # [B] int64; token t = b*S + s sits at start[b] + s
    kvg_ptr,  # out [T, 4*HID] fp32: kv projection | gate + ape (SPLIT_K == 1)
    weights_ptr,  # out [T, HI] fp32 (SPLIT_K == 1)
    partial_ptr,  # out [SPLIT_K, T, 4*HID + HI] fp32: this K-slice's sums (SPLIT_K > 1)
    T,
    D,
    S,
    HI,
    weights_scale,
    TWO_HID: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    segment, cols, n_rows = _tile_columns(pid_n, HI, TWO_HID, BLOCK_N)
    if segment == 0:
        w_ptr = wkv_ptr
    elif segment == 1:
        w_ptr = wgate_ptr
    else:
        w_ptr = wproj_ptr
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    col_ok = cols < n_rows
    acc = dot_k_slice(x_ptr + rows[:, None] * D, w_ptr + cols[None, :] * D, row_ok, col_ok, pid_k, D, SPLIT_K, BLOCK_K)

    mask = row_ok[:, None] & col_ok[None, :]
    if SPLIT_K == 1:
        _finish_tile(
            acc, segment, rows, row_ok, cols, mask, ape_ptr, start_ptr, kvg_ptr, weights_ptr, S, HI, weights_scale,
            TWO_HID,
        )  # fmt: skip
    else:
        n_out = 2 * TWO_HID + HI
        out = partial_ptr + (pid_k * T + rows)[:, None] * n_out + segment * TWO_HID + cols[None, :]
        tl.store(out, acc, mask=mask)


@triton.jit
def _sum_splits_kernel(
    partial_ptr,  # [SPLIT_K, T, 4*HID + HI] fp32
    ape_ptr,
    start_ptr,
    kvg_ptr,  # out [T, 4*HID] fp32
    weights_ptr,  # out [T, HI] fp32
    T,
    S,
    HI,
    weights_scale,
    TWO_HID: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """Adds the K-slices of one output tile in slice order (deterministic), then the epilogue."""
    segment, cols, n_rows = _tile_columns(tl.program_id(0), HI, TWO_HID, BLOCK_N)
    rows = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    mask = row_ok[:, None] & (cols < n_rows)[None, :]
    n_out = 2 * TWO_HID + HI
    offsets = rows[:, None] * n_out + segment * TWO_HID + cols[None, :]
    acc = sum_k_slices(partial_ptr + offsets, mask, T * n_out, SPLIT_K)
    _finish_tile(
        acc, segment, rows, row_ok, cols, mask, ape_ptr, start_ptr, kvg_ptr, weights_ptr, S, HI, weights_scale, TWO_HID
    )


def x_projection(
    x: torch.Tensor,
    w: CompressorWeights,
    pos: StepPositions,
    weights_proj: torch.Tensor | None = None,
    weights_scale: float = 1.0,
    split_k: int | None = None,
    ws: Workspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x [T, D] bf16`` (token ``t = b*S + s``) -> ``kvg [T, 4*HID] fp32`` and ``weights [T, HI] fp32``.

    ``kvg[:, :2*HID] = x @ w.wkv.T``; ``kvg[:, 2*HID:] = x @ w.wgate.T + w.ape[p % 4]`` at each
    token's position ``p``; ``weights = (x @ weights_proj.T) * weights_scale`` when
    ``weights_proj [HI, D] bf16`` is given (else None). ``split_k`` overrides the number of
    K-slices (at most one per ``BLOCK_K`` step of D; default: ``split_k.k_splits``). One launch, two
    when split over K (the slices are summed by a second kernel).
    """
    t, d = x.shape
    two_hid = w.wkv.shape[0]
    if two_hid % BLOCK_N:
        raise ValueError(f"w.wkv: the Triton backend needs 2*HID rows that are a multiple of {BLOCK_N}, got {two_hid}")
    hi = 0 if weights_proj is None else weights_proj.shape[0]
    grid_nm = (2 * (two_hid // BLOCK_N) + triton.cdiv(hi, BLOCK_N), triton.cdiv(t, BLOCK_M))
    if split_k:
        split = min(split_k, triton.cdiv(d, BLOCK_K))
    else:
        split = k_splits(grid_nm[0] * grid_nm[1], t, d, sm_count(x.device))
    out = scratch(ws, "x_proj.out", (t * (2 * two_hid + hi),), torch.float32, x.device)
    kvg = out[: t * 2 * two_hid].view(t, 2 * two_hid)
    weights = out[t * 2 * two_hid :].view(t, hi)
    partial = scratch(ws, "x_proj.partial", (split, t, 2 * two_hid + hi), torch.float32, x.device) if split > 1 else out
    common = dict(TWO_HID=two_hid, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, SPLIT_K=split, num_warps=NUM_WARPS)
    _x_proj_kernel[(*grid_nm, split)](
        x, w.wkv, w.wgate, w.wkv if weights_proj is None else weights_proj, w.ape, pos.start, kvg, weights, partial,
        t, d, pos.seq, hi, weights_scale, BLOCK_K=BLOCK_K, **common,
    )  # fmt: skip
    if split > 1:
        _sum_splits_kernel[grid_nm](
            partial, w.ape, pos.start, kvg, weights, t, pos.seq, hi, weights_scale, **common
        )  # fmt: skip
    return kvg, (weights if weights_proj is not None else None)

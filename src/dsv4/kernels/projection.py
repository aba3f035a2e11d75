"""Split-K projection of shared activations through two stacked weights: ``x @ [w0; w1].T``.

At decode the activations are skinny (T=128 rows) and the weights wide along the reduction axis
(``wq_a`` 1024x4096, ``wkv`` 512x4096 for flash): the 12 output tiles of 128 columns alone would
leave 120 of an H100's 132 SMs idle. So the reduction axis D is split as well, into as many slices
as fill one wave of SMs, and each program writes its fp32 partial sums to its own slice of a
``[splits, T, N0+N1]`` buffer. The consumer adds the slices in a fixed order: a deterministic
two-stage reduction, with no zero-fill launch and no float atomics (whose order, and so whose
rounding, would change from run to run).

Both weights share ``x``, so one launch serves both; they are read through two pointers, never
concatenated (which would copy 12 MiB per call at flash dims).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .launch import BF16_DOT_DTYPE, pow2_divisor, sm_count
from .workspace import Workspace, scratch

BLOCK_M_MAX = 128  # rows of x per tile: all T=128 decode tokens in one M-tile, so each weight byte is read once
BLOCK_M_MIN = 16  # smallest tl.dot M
BLOCK_N_MAX = 128  # output columns per tile: 1536/128 = 12 tiles at flash, 11 K-slices each fill 132 SMs
BLOCK_K_MAX = 64  # 64 bf16 = 128 B: every weight row read per step fills exactly one 128-B line
BLOCK_MIN = 16  # smallest tl.dot N and K for bf16 operands
NUM_WARPS = 8  # 128x128 fp32 accumulator = 64 registers per thread at 256 threads
NUM_STAGES = 3  # (128 + 128) rows x 64 bf16 = 32 KiB of shared memory per stage, 96 KiB for 3


@dataclass(frozen=True)
class ProjectionTiles:
    """Tile sizes and the K split of one projection launch."""

    block_m: int
    block_n: int
    block_k: int
    splits: int  # slices of the reduction axis, each summed by its own program

    def grid(self, t: int, n: int) -> tuple[int, int, int]:
        """(column tiles, row tiles, K slices): column tiles vary fastest, so the programs that run
        together share one M-tile of ``x`` (in L2) and sweep all weight columns once."""
        return (n // self.block_n, triton.cdiv(t, self.block_m), self.splits)


def projection_tiles(t: int, d: int, n0: int, n1: int, sms: int) -> ProjectionTiles:
    """Tiles for ``[T, D] @ [N0 + N1, D].T``: as many K slices as fit one wave of ``sms`` programs (all
    SMs busy, no ragged second wave), never more slices than K blocks; one slice once the output
    tiles alone fill the SMs (prefill)."""
    block_m = min(BLOCK_M_MAX, max(BLOCK_M_MIN, triton.next_power_of_2(t)))
    block_n = min(pow2_divisor(n0, BLOCK_N_MAX), pow2_divisor(n1, BLOCK_N_MAX))
    block_k = pow2_divisor(d, BLOCK_K_MAX)
    if block_n < BLOCK_MIN:
        raise ValueError(
            f"w: the Triton backend needs projection widths that are multiples of {BLOCK_MIN}, got {n0}, {n1}"
        )
    if block_k < BLOCK_MIN:
        raise ValueError(f"x: the Triton backend needs a hidden size D that is a multiple of {BLOCK_MIN}, got {d}")
    tiles = triton.cdiv(t, block_m) * (n0 + n1) // block_n
    splits = max(1, min(d // block_k, sms // tiles))
    return ProjectionTiles(block_m, block_n, block_k, splits)


@triton.jit
def _split_k_projection_kernel(
    x_ptr,  # [T, D] bf16
    w0_ptr,  # [N0, D] bf16
    w1_ptr,  # [N1, D] bf16
    partial_ptr,  # [SPLITS, T, N0 + N1] fp32
    T,
    SPLITS,
    D: tl.constexpr,
    N0: tl.constexpr,
    N1: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    col0 = pid_n * BLOCK_N  # a tile lies inside one weight: BLOCK_N divides N0
    cols = tl.arange(0, BLOCK_N)
    # Weight tiles are loaded as [BLOCK_K, BLOCK_N] (K contiguous in memory), the operand tl.dot takes.
    if col0 < N0:
        w_cols = w0_ptr + (col0 + cols).to(tl.int64)[None, :] * D
    else:
        w_cols = w1_ptr + (col0 - N0 + cols).to(tl.int64)[None, :] * D
    x_rows = x_ptr + rows[:, None] * D

    # K blocks spread over the slices as evenly as integers allow (sizes differ by at most one).
    k_blocks = D // BLOCK_K
    kb_lo = split * k_blocks // SPLITS
    kb_hi = (split + 1) * k_blocks // SPLITS
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(kb_lo, kb_hi):
        k = kb * BLOCK_K + ks
        a = tl.load(x_rows + k[None, :], mask=row_ok[:, None], other=0.0)
        w = tl.load(w_cols + k[:, None])
        acc = tl.dot(a.to(DOT_DTYPE), w.to(DOT_DTYPE), acc)

    out = partial_ptr + (split * T + rows)[:, None] * (N0 + N1) + (col0 + cols)[None, :]
    tl.store(out, acc, mask=row_ok[:, None])


def split_k_projection(
    x: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor, ws: Workspace | None = None
) -> torch.Tensor:
    """Partial sums of ``x @ [w0; w1].T`` over slices of the reduction axis, in one launch.

    ``x``: ``[T, D]`` bf16; ``w0``: ``[N0, D]``, ``w1``: ``[N1, D]`` bf16, all contiguous. Returns
    ``[splits, T, N0 + N1]`` fp32 whose sum over axis 0 (in index order) is the product; each slice is
    an exact-operand, fp32-accumulated partial dot product.
    """
    t, d = x.shape
    n0, n1 = w0.shape[0], w1.shape[0]
    tiles = projection_tiles(t, d, n0, n1, sm_count(x.device))
    partial = scratch(ws, "projection.partial", (tiles.splits, t, n0 + n1), torch.float32, x.device)
    _split_k_projection_kernel[tiles.grid(t, n0 + n1)](
        x, w0, w1, partial, t, tiles.splits,
        D=d, N0=n0, N1=n1, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        DOT_DTYPE=BF16_DOT_DTYPE, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )  # fmt: skip
    return partial

"""Split-K projection of shared activations through two stacked weights: ``x @ [w0; w1].T``.

At decode the activations are skinny (T=128 rows) and the weights wide along the reduction axis
(``wq_a`` 1024x4096, ``wkv`` 512x4096 for flash). The K-slice dot, the split policy and the slice
sum are ``split_k.py``'s: at flash decode the 12 output tiles of 128 columns are each split into 11
K-slices, so that the 132 programs fill one wave of an H100's or H200's SMs; their fp32 partial sums
land in a ``[splits, T, N0+N1]`` buffer that the consumer adds in slice order (a deterministic fix-up,
no float atomics). The partials' bytes are not bounded as the indexer's x-projection bounds them
(``split_k.SLICE_PER_TOKEN_MIN``): at T=128 the 11 slices write 8.65 MB that the rows kernel reads
back right away, from L2, while 48 programs (4 slices) streamed the 12.6 MB of weights at 0.84 TB/s
on an H100. The slice count is a tuning candidate (``TUNING``).

Both weights share ``x``, so one launch serves both; they are read through two pointers, never
concatenated (which would copy 12 MiB per call at flash dims).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .l2_prefetch import can_prefetch, prefetch_l2_share
from .launch import pow2_divisor, sm_count
from .split_k import BLOCK_K, SPLIT_CHOICES, dot_k_slice, k_splits
from .tuning import Param, Tunable
from .workspace import Workspace, scratch

BLOCK_M_MAX = 128  # rows of x per tile: all T=128 decode tokens in one M-tile, so each weight byte is read once
BLOCK_M_MIN = 16  # smallest tl.dot M
BLOCK_N_MAX = 128  # output columns per tile: every column tile re-reads x (1 MiB at T=128), so 64 would double that
BLOCK_N_MIN = 16  # smallest tl.dot N for bf16 operands
NUM_WARPS = 8  # 128x128 fp32 accumulator = 64 registers per thread at 256 threads
NUM_STAGES = 5  # (128 + 128) rows x 64 bf16 = 32 KiB of shared memory per stage, 160 KiB for 5: 4 steps in flight,
#                64 KiB of weights (HBM) per SM, as Little's law asks (~4.3 TB/s x ~0.8 us / 132 SMs ~ 60 KB)


def _candidates(bucket: dict[str, int]) -> list[dict]:
    """Decode (T <= 128): narrower tiles and other K splits (4: the 48 programs before, with the fewest
    partial bytes; 8, or 64-column tiles at 6 slices: 96 and 144 programs); prefill: the output tiles
    fill the SMs, so tiles, warps and stages only."""
    tiles = [{"block_n": 64}, {"num_stages": 3}, {"num_stages": 4}, {"num_warps": 4}]
    if bucket["T"] > BLOCK_M_MAX:
        return tiles
    return [*tiles, {"splits": 4}, {"splits": 8}, {"block_n": 64, "splits": 6}]


TUNING = Tunable(
    "qkv.projection",
    "_split_k_projection_kernel: x @ [wq_a; wkv].T as fp32 K-slice partials (qkv_proj_rope launch 1)",
    dims=("T", "D", "N"),
    pow2_dims=("T",),
    params=(
        Param("block_n", BLOCK_N_MAX, (16, 32, 64, 128), "output columns per tile (a divisor of both widths)"),
        Param("splits", None, SPLIT_CHOICES, "K-slices per output tile; null: one wave of SMs (split_k.k_splits)"),
        Param("num_warps", NUM_WARPS, (4, 8), "warps per program", compiled_only=True),
        Param("num_stages", NUM_STAGES, (2, 3, 4, 5), "software-pipelined K steps", exact=True, compiled_only=True),
    ),
    candidates=_candidates,
)


@dataclass(frozen=True)
class ProjectionTiles:
    """Tile sizes and the K split of one projection launch."""

    block_m: int
    block_n: int
    splits: int  # slices of the reduction axis, each summed by its own program

    def grid(self, t: int, n: int) -> tuple[int, int, int]:
        """(column tiles, row tiles, K slices): column tiles vary fastest, so the programs that run
        together share one M-tile of ``x`` (in L2) and sweep all weight columns once."""
        return (n // self.block_n, triton.cdiv(t, self.block_m), self.splits)


def check_widths(n0: int, n1: int, names: tuple[str, str] = ("w.wq_a", "w.wkv")) -> None:
    """``ValueError`` naming the weight (``names``: those of ``n0``, ``n1``) whose projection width is
    not a multiple of ``BLOCK_N_MIN``."""
    for name, n in zip(names, (n0, n1), strict=True):
        if pow2_divisor(n, BLOCK_N_MAX) < BLOCK_N_MIN:
            raise ValueError(
                f"{name}: the Triton backend needs projection widths (rows) that are multiples of {BLOCK_N_MIN}, "
                f"got {n}"
            )


def projection_tiles(
    t: int, d: int, n0: int, n1: int, sms: int, block_n_max: int = BLOCK_N_MAX, splits: int | None = None
) -> ProjectionTiles:
    """Tiles for ``[T, D] @ [N0 + N1, D].T`` on ``sms`` SMs: column tiles of at most ``block_n_max``,
    ``splits`` K-slices (at most one per ``BLOCK_K`` step of D) or, when None, as many as fill one wave
    of ``sms`` programs (``split_k.k_splits`` without its bound on the partials' bytes)."""
    block_m = min(BLOCK_M_MAX, max(BLOCK_M_MIN, triton.next_power_of_2(t)))
    check_widths(n0, n1)
    block_n = max(BLOCK_N_MIN, min(pow2_divisor(n0, block_n_max), pow2_divisor(n1, block_n_max)))
    tiles = triton.cdiv(t, block_m) * (n0 + n1) // block_n
    if splits is None:
        splits = k_splits(tiles, t, d, sms, bound_partials=False)
    return ProjectionTiles(block_m, block_n, max(1, min(splits, triton.cdiv(d, BLOCK_K))))


@triton.jit
def _split_k_projection_kernel(
    x_ptr,  # [T, D] bf16
    w0_ptr,  # [N0, D] bf16
    w1_ptr,  # [N1, D] bf16
    partial_ptr,  # [SPLITS, T, N0 + N1] fp32
    prefetch_ptr,  # int8: bytes the next launches read, brought into L2 by these programs (PREFETCH)
    prefetch_bytes,
    T,
    D: tl.constexpr,
    N0: tl.constexpr,
    N1: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLITS: tl.constexpr,
    PDL: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    if PDL:
        gdc_launch_dependents()  # the consumer may be scheduled now; it waits for this grid to complete
    if PREFETCH:  # independent of every earlier launch: streams before the wait
        pid = (tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(0) + tl.program_id(0)
        prefetch_l2_share(prefetch_ptr, prefetch_bytes, pid, tl.num_programs(0) * tl.num_programs(1) * SPLITS)
    if PDL:
        gdc_wait()  # x, written by the previous launch in the stream, is complete and visible
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    col0 = pid_n * BLOCK_N  # a tile lies inside one weight: BLOCK_N divides N0
    cols = tl.arange(0, BLOCK_N)
    if col0 < N0:
        w_cols = w0_ptr + (col0 + cols).to(tl.int64)[None, :] * D
    else:
        w_cols = w1_ptr + (col0 - N0 + cols).to(tl.int64)[None, :] * D
    acc = dot_k_slice(x_ptr + rows[:, None] * D, w_cols, row_ok, cols < BLOCK_N, split, D, SPLITS, BLOCK_K)

    out = partial_ptr + (split * T + rows)[:, None] * (N0 + N1) + (col0 + cols)[None, :]
    tl.store(out, acc, mask=row_ok[:, None])


def split_k_projection(
    x: torch.Tensor,
    w0: torch.Tensor,
    w1: torch.Tensor,
    ws: Workspace | None = None,
    pdl: bool = False,
    prefetch: torch.Tensor | None = None,
) -> torch.Tensor:
    """Partial sums of ``x @ [w0; w1].T`` over slices of the reduction axis, in one launch.

    ``x``: ``[T, D]`` bf16; ``w0``: ``[N0, D]``, ``w1``: ``[N1, D]`` bf16, all contiguous. Returns
    ``[splits, T, N0 + N1]`` fp32 whose sum over axis 0 (in index order, ``split_k.sum_k_slices``) is
    the product; each slice is an exact-operand, fp32-accumulated partial dot product. ``pdl``:
    programmatic dependent launch (``launch.pdl_supported``): this launch waits for its predecessor in
    the kernel and lets its consumer start early. ``prefetch``: a contiguous int8 tensor the next
    launches read (``wq_b``), spread over the programs and asked of L2 before the wait (with ``pdl``
    only: sm_90; ignored when ``l2_prefetch.can_prefetch`` refuses it).
    """
    t, d = x.shape
    n0, n1 = w0.shape[0], w1.shape[0]
    cfg = TUNING.config(x.device, T=t, D=d, N=n0 + n1)
    tiles = projection_tiles(t, d, n0, n1, sm_count(x.device), cfg.block_n, cfg.splits)
    partial = scratch(ws, "projection.partial", (tiles.splits, t, n0 + n1), torch.float32, x.device)
    prefetch = prefetch if pdl and prefetch is not None and can_prefetch(prefetch) else None
    _split_k_projection_kernel[tiles.grid(t, n0 + n1)](
        x, w0, w1, partial, x if prefetch is None else prefetch, 0 if prefetch is None else prefetch.numel(), t,
        D=d, N0=n0, N1=n1, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=BLOCK_K, SPLITS=tiles.splits,
        PDL=pdl, PREFETCH=prefetch is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages, launch_pdl=pdl,
        enable_fp_fusion=False,
    )  # fmt: skip
    return partial

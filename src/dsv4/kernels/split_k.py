"""Split-K GEMM of decode activations against bf16 weights: the K-slice dot, the split policy and
the slice sum, shared by the projections of ``x`` (``projection.py`` for ``qkv_proj_rope``,
``x_proj.py`` for the indexer).

At decode the activations are skinny (T=128 rows) and the weights wide along the reduction axis
``D``, so the output tiles alone leave most SMs idle: ``D`` is split too, and each program writes
the fp32 partial sums of its K-slice to its own slice of a ``[splits, T, N]`` buffer. The consumer
adds the slices in slice order (``sum_k_slices``): a deterministic two-stage reduction, with no
zero-fill launch and no float atomics (whose order, and so whose rounding, would change from run
to run). The partials cost traffic (written once, read back once), which bounds the split.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .interpreter import interpreted

BLOCK_K = 64  # D per step: 64 bf16 = 128 B, so every weight row read per step fills exactly one 128-B line
SPLIT_CHOICES = (None, 1, 2, 3, 4, 6, 8, 12, 16)  # K-slice counts a kernel config may fix (None: k_splits)
SUM_IN_FLIGHT = 64  # fp32 values a thread holds in flight when it adds K-slices (SPLITS x its share of a step)
SUM_WARPS = 4  # the slice-sum launch: many small programs, one step of ``sum_block`` values each
SLICE_PER_TOKEN_MIN = 8  # K-slice length >= 8 x T: the fp32 partials (T x N x 4 B per slice, written and read
#                          back) then cost at most half the bytes of the bf16 weights (N x D x 2 B)

# The interpreter stores bf16 as raw uint16 and its tl.dot multiplies those bits (triton-lang/triton#11584):
# there bf16 dot operands are widened to fp32 first (exact: products of bf16 values fit fp32's mantissa, and
# the interpreter's dot sums in fp32 as the tensor cores do); compiled, they stay bf16 for the tensor cores.
BF16_DOT_DTYPE = tl.constexpr(tl.float32 if interpreted() else tl.bfloat16)


def k_splits(tiles: int, t: int, d: int, sms: int, bound_partials: bool = True) -> int:
    """K-slices per output tile of ``[T, D] @ [N, D].T`` computed as ``tiles`` output tiles.

    As many as fill one wave of ``sms`` programs (all SMs streaming weights, no ragged second wave),
    but none empty and, when ``bound_partials``, no slice shorter than ``SLICE_PER_TOKEN_MIN * T``
    (the partials stay under half the weight bytes); one when the output tiles alone fill the SMs (prefill).
    """
    per_token = d // (SLICE_PER_TOKEN_MIN * t) if bound_partials else d
    return max(1, min(sms // tiles, per_token, triton.cdiv(d, BLOCK_K)))


@triton.jit
def dot_k_slice(x_rows, w_cols, row_ok, col_ok, split, D, SPLITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 ``x[rows] @ w[cols].T`` over K-slice ``split`` of ``SPLITS`` of the reduction axis ``D``.

    ``x_rows``: ``[BM, 1]`` pointers to bf16 rows of ``x``; ``w_cols``: ``[1, BN]`` pointers to bf16 weight
    rows (one per output column); each row holds ``D`` contiguous values. ``row_ok [BM]``, ``col_ok [BN]``:
    masks. The ``ceil(D / BLOCK_K)`` K blocks are spread over the slices as evenly as integers allow (sizes
    differ by at most one). Returns ``[BM, BN]`` fp32: exact products, fp32 sums.
    """
    k_blocks = tl.cdiv(D, BLOCK_K)
    kb_lo = split * k_blocks // SPLITS
    kb_hi = (split + 1) * k_blocks // SPLITS
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((x_rows.shape[0], w_cols.shape[1]), dtype=tl.float32)
    for kb in range(kb_lo, kb_hi):
        k = kb * BLOCK_K + ks
        k_ok = k < D
        a = tl.load(x_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        # [BLOCK_K, BN] with K contiguous in memory: the operand tl.dot takes
        w = tl.load(w_cols + k[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(a.to(BF16_DOT_DTYPE), w.to(BF16_DOT_DTYPE), acc)
    return acc


@triton.jit
def sum_k_slices(ptrs, mask, slice_stride, SPLITS: tl.constexpr):
    """Sum of the ``SPLITS`` fp32 partial tiles at ``ptrs + s * slice_stride``, added in slice order (the
    same sum on every run). Unrolled at compile time, so all slices' loads are in flight together."""
    acc = tl.load(ptrs, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLITS):
        acc += tl.load(ptrs + s * slice_stride, mask=mask, other=0.0)
    return acc


def sum_block(splits: int, num_warps: int) -> int:
    """Values a program of ``num_warps`` adds per step of a K-slice sum: ``SUM_IN_FLIGHT`` loads a thread
    over all slices (a power of two, 1 to 4 values a slice: at most one 16-byte load each)."""
    per_slice = max(1, min(4, SUM_IN_FLIGHT // max(splits, 1)))
    return 32 * num_warps * (1 << (per_slice.bit_length() - 1))


@triton.jit
def _sum_slices_kernel(xp_ptr, out_ptr, n, SPLITS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()  # the next launch may be scheduled: it waits for this grid to complete
        gdc_wait()  # the slices are complete and visible
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + i, sum_k_slices(xp_ptr + i, i < n, n, SPLITS), mask=i < n)


def sum_slices(xp: torch.Tensor, out: torch.Tensor, pdl: bool) -> None:
    """``out [...]`` fp32 <- ``xp [SPLITS, ...]`` fp32 added over its slices in slice order (the same
    sums as ``sum_k_slices``), one launch of ``sum_block``-value programs; ``pdl``: launched as a
    dependent launch (sm_90), waiting for its predecessor before it reads ``xp``."""
    n = out.numel()
    block = sum_block(xp.shape[0], SUM_WARPS)
    _sum_slices_kernel[(triton.cdiv(n, block),)](
        xp, out, n, SPLITS=xp.shape[0], BLOCK=block, PDL=pdl, num_warps=SUM_WARPS, launch_pdl=pdl,
        enable_fp_fusion=False,
    )  # fmt: skip

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

import triton
import triton.language as tl

from .interpreter import interpreted

BLOCK_K = 64  # D per step: 64 bf16 = 128 B, so every weight row read per step fills exactly one 128-B line
SPLIT_CHOICES = (None, 1, 2, 3, 4, 6, 8, 12, 16)  # K-slice counts a kernel config may fix (None: k_splits)
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

"""The q heads' epilogue on register tiles, shared by every plan of ``qkv_proj_rope``'s q heads (the paired
halves, one program per head, the K-sliced plan): a half head's int32 sums dequantized with its scale and
sum of squares, a head's RMSNorm from its two halves, the positions' cos/sin rows, a half's bf16 store
(the half holding the head's last ``R`` columns with RoPE)."""

from __future__ import annotations

import triton
import triton.language as tl

from .epilogue import overflow_scale, rms_inv_of_sumsq, store_rope_bf16, to_bf16


@triton.jit
def dequant_half(acc, qr_scale, wq_b_scale_ptr, cols):
    """``acc [BM, HALF]`` int32, columns ``cols [HALF]`` of ``qr @ wq_b.T``, dequantized: ``qp [BM, HALF]``
    fp32, then per row the half's ``overflow_scale`` ``c [BM]`` and the sum of squares of ``qp * c``
    ``[BM]``. ``qr_scale``: ``[BM, 1]`` fp32."""
    qp = acc.to(tl.float32) * qr_scale * tl.load(wq_b_scale_ptr + cols)[None, :]
    c = overflow_scale(tl.max(tl.abs(qp), axis=1))
    u = qp * c[:, None]
    return qp, c, tl.sum(u * u, axis=1)


@triton.jit
def head_rms(c0, sumsq0, c1, sumsq1, HD: tl.constexpr, eps):
    """A head's RMSNorm from its halves (half 0's values first, so every program adds in one order):
    ``(c, inv)``, each ``[BM, 1]``, with ``rms(qp) = (qp * c) * inv``. The head takes the smaller half
    scale (its amax's); the other half's sum is rescaled by ``(c/c_h)^2``, a power of two — 1 when no
    half was scaled, so ``inv`` is then ``1/sqrt((sumsq0 + sumsq1)/HD + eps)``, as without scaling."""
    c = tl.minimum(c0, c1)
    r0 = tl.div_rn(c, c0)
    r1 = tl.div_rn(c, c1)
    return c[:, None], rms_inv_of_sumsq(sumsq0 * r0 * r0 + sumsq1 * r1 * r1, HD, eps * c * c)


@triton.jit
def rope_rows(positions_ptr, cos_ptr, sin_ptr, rows, ok, R: tl.constexpr):
    """cos and sin ``[BM, R/2]`` fp32 at each row's token position (rows not ``ok``: cos 1, sin 0)."""
    pos = tl.load(positions_ptr + rows, mask=ok, other=0).to(tl.int64)
    pairs = tl.arange(0, R // 2)[None, :]
    cos = tl.load(cos_ptr + pos[:, None] * (R // 2) + pairs, mask=ok[:, None], other=1.0)
    sin = tl.load(sin_ptr + pos[:, None] * (R // 2) + pairs, mask=ok[:, None], other=0.0)
    return cos, sin


@triton.jit
def store_q_half(q_ptr, qn, rows, row_ok, col0, cos, sin, H: tl.constexpr, HD: tl.constexpr, R: tl.constexpr,
                 ROPE: tl.constexpr):  # fmt: skip
    """Store ``qn [BM, HALF]`` (normalized) as bf16 at columns ``[col0, col0 + HALF)`` of ``q [T, H*HD]``;
    ``ROPE``: the half that holds a head's last R columns, rotated at each token's position by ``cos``
    and ``sin`` ``[BM, R/2]`` (``rope_rows``; unused otherwise)."""
    HALF: tl.constexpr = qn.shape[1]
    out = q_ptr + rows[:, None] * (H * HD) + col0 + tl.arange(0, HALF)[None, :]
    if ROPE:
        store_rope_bf16(out, qn, cos, sin, row_ok[:, None], HALF, R)
    else:
        tl.store(out, to_bf16(qn), mask=row_ok[:, None])


@triton.jit
def store_q_head(q_ptr, qp0, c0, sumsq0, qp1, c1, sumsq1, rows, row_ok, col0, positions_ptr, cos_ptr, sin_ptr, eps,
                 H: tl.constexpr, HD: tl.constexpr, R: tl.constexpr):  # fmt: skip
    """A whole head from its two halves as ``dequant_half`` gives them: ``head_rms``, then both halves
    stored, half 1 with the RoPE of the head's last ``R`` columns (at ``col0``: the head's first column)."""
    scale, inv = head_rms(c0, sumsq0, c1, sumsq1, HD, eps)
    store_q_half(q_ptr, (qp0 * scale) * inv, rows, row_ok, col0, 0.0, 0.0, H, HD, R, False)
    cos, sin = rope_rows(positions_ptr, cos_ptr, sin_ptr, rows, row_ok, R)
    store_q_half(q_ptr, (qp1 * scale) * inv, rows, row_ok, col0 + HD // 2, cos, sin, H, HD, R, True)

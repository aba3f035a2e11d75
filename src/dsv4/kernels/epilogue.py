"""Register-tile numerics shared by the kernels: bf16 rounding, RMSNorm, per-row INT8, interleaved RoPE.

Each acts on fp32 tiles ``[BM, BN]`` (one row per token) that a kernel already holds, so nothing here
touches global memory except the final store of ``store_rope_bf16``. The math is spec §2.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..model.quant import AMAX_FLOOR as _AMAX_FLOOR
from ..model.quant import INT8_MAX as _INT8_MAX
from ..model.rms import FP32_EXP_INF as _FP32_EXP_INF
from ..model.rms import RMS_SCALE_BITS as _RMS_SCALE_BITS
from ..model.rms import RMS_SCALE_MIN_EXP as _RMS_SCALE_MIN_EXP
from .launch import INTERPRETED

# 1.5 * 2^23: adding it to |v| < 2^22 leaves no fraction bits, so fp32's own round-to-nearest-even
# rounds v to an integer; subtracting it back is exact. Works alike compiled and in the interpreter
# (which has no libdevice rint).
ROUND_MAGIC = tl.constexpr(12582912.0)
INT8_MAX = tl.constexpr(_INT8_MAX)
AMAX_FLOOR = tl.constexpr(_AMAX_FLOOR)  # spec §2: rows smaller than this quantize as if their amax were 1e-4
RMS_SCALE_MIN_EXP = tl.constexpr(_RMS_SCALE_MIN_EXP)  # a row is scaled before squaring from amax >= 2^48 on
RMS_SCALE_BITS = tl.constexpr(_RMS_SCALE_BITS)  # its scale's biased exponent is this minus amax's
FP32_EXP_INF = tl.constexpr(_FP32_EXP_INF)  # rows holding an infinity or NaN are not scaled


@triton.jit
def round_bf16(v):
    """fp32 -> the nearest bf16 value (ties to even), still as fp32; infinities stay, NaN stays NaN.

    Done on the bits because the interpreter's ``.to(tl.bfloat16)`` truncates toward zero while
    the GPU rounds to nearest even; a value that is already bf16 converts exactly on both, so
    ``round_bf16(v).to(tl.bfloat16)`` stores the same bits everywhere.
    """
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
    # A NaN stays NaN: rounding its bits would carry a full payload (0x7FFFFFFF, the NaN NVIDIA GPUs
    # produce) into the sign bit and give -0.0.
    return tl.where(v != v, v, bits.to(tl.float32, bitcast=True))


@triton.jit
def to_bf16(v):
    """fp32 -> bf16, rounded to nearest even (as torch and the GPU's ``cvt.rn`` do), subnormals included.

    The interpreter's own fp32 -> bf16 cast truncates (Triton 3.6-3.9 pass it no rounding mode) and
    gets subnormals wrong even when they are already bf16 values (``0x00790000`` becomes ``0x0072``),
    so there the rounding is done on the bits and the bf16 is their high half. A NaN stays a NaN (its
    quiet bit set: the high half of a NaN whose payload lies in the low half alone is an infinity's).
    """
    if INTERPRETED:
        bits = round_bf16(v).to(tl.uint32, bitcast=True)
        bits = tl.where(v != v, bits | 0x400000, bits)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(tl.bfloat16)


@triton.jit
def from_bf16(v):
    """bf16 -> fp32, exact (as torch and the GPU widen), subnormals included.

    The interpreter's own bf16 -> fp32 cast (Triton 3.9) gets bf16 subnormals wrong (``0x0001``, 9.2e-41,
    becomes 0), so there the value is widened through its bits: a bf16 is the top half of its fp32.
    """
    if INTERPRETED:
        return (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return v.to(tl.float32)


@triton.jit
def overflow_scale(amax):
    """The power of two a row is scaled by before its squares are summed (``dsv4.model.rms``):
    ``amax [BM]`` fp32 (each row's ``max|v|``) -> ``[BM]``: 1 where it is below ``2^48`` or not finite,
    else ``2^(143 - E)`` (``E`` its biased exponent)."""
    e = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF
    big = (e >= RMS_SCALE_MIN_EXP) & (e < FP32_EXP_INF)
    return tl.where(big, ((e * -1 + RMS_SCALE_BITS) << 23).to(tl.float32, bitcast=True), 1.0)


@triton.jit
def rms_scale(v, n: tl.constexpr, eps):
    """RMSNorm of the rows of ``v [BM, BN]`` fp32 (padding 0, ``n`` real columns) as two factors
    ``(c, inv)``, each ``[BM, 1]``: ``rms(v) = (v * c) * inv`` with ``c`` the row's ``overflow_scale``
    (1 for every row whose squares cannot overflow: then ``inv = 1/sqrt(mean(v^2) + eps)``)."""
    c = overflow_scale(tl.max(tl.abs(v), axis=1))
    u = v * c[:, None]
    return c[:, None], rms_inv_of_sumsq(tl.sum(u * u, axis=1), n, eps * c * c)


@triton.jit
def rms_inv_of_sumsq(sumsq, n: tl.constexpr, eps):
    """``1/sqrt(sumsq/n + eps)``: ``sumsq [BM]`` fp32, the sum of squares of ``n`` values per row (``eps``
    a scalar or ``[BM]``) -> ``[BM, 1]``.

    Correctly rounded square root and divisions, as the reference computes them on the CPU.
    """
    return tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(sumsq, n * 1.0) + eps))[:, None]


@triton.jit
def _max_keeping_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _row_amax(v):
    """``max|v|`` per row of ``v [BM, BN]``, NaN when the row holds one (as torch's ``amax``).

    ``tl.max`` drops NaN (IEEE maxNum); a reduction whose combine keeps NaN compiles to the same
    shuffle tree with ``max.NaN`` (no extra registers: 165 for the score kernel at sm_90, as without
    it). The interpreter runs such a custom reduction element by element in Python, so there a
    row's NaN count, a numpy reduction, marks the row instead: the same result.
    """
    if INTERPRETED:
        has_nan = tl.max((v != v).to(tl.int32), axis=1) > 0
        return tl.where(has_nan, float("nan"), tl.max(tl.abs(v), axis=1))
    else:
        return tl.reduce(tl.abs(v), 1, _max_keeping_nan)


@triton.jit
def quantize_rows(v, CODE_MAX: tl.constexpr, FLOOR: tl.constexpr):
    """Spec §2 per-row symmetric quantization to integer codes in ``[-CODE_MAX, CODE_MAX]``:
    ``v [BM, BN]`` fp32 (padding 0) -> ``(q [BM, BN] fp32 integers, scale [BM] fp32)``.

    ``amax = max(max|v|, FLOOR)``, ``s = CODE_MAX/amax``, ``q = round_half_even(v*s)``, ``scale = 1/s``,
    with correctly rounded divisions (a plain ``/`` compiles to an approximate one on NVIDIA GPUs): bit
    for bit ``dsv4.quantize_int8_per_row`` at ``CODE_MAX=127``, ``FLOOR=1e-4`` (``PoolFormat.constexprs``),
    non-finite rows included: a NaN in the row makes ``amax`` and the scale NaN, an infinity makes the
    scale infinite, and such a row's ``q`` is 0 (``v*s`` is 0 or NaN there, and torch turns NaN into
    int8 0). ``tl.max``/``tl.maximum``/``tl.minimum`` drop NaN (IEEE maxNum, on GPUs and in the
    interpreter), so the NaN is carried explicitly.
    """
    amax = tl.maximum(_row_amax(v), FLOOR, propagate_nan=tl.PropagateNan.ALL)
    s = tl.div_rn(CODE_MAX, amax)
    # The clamp also keeps the multiply from fusing into the rounding add (an FMA would round v*s only once).
    scaled = tl.minimum(tl.maximum(v * s[:, None], -CODE_MAX), CODE_MAX)
    finite_row = (s > 0)[:, None]  # s is NaN (a NaN in the row) or 0 (an infinity) otherwise
    q = tl.where(finite_row, (scaled + ROUND_MAGIC) - ROUND_MAGIC, 0.0)
    return q, tl.div_rn(1.0, s)


@triton.jit
def quantize_int8_rows(v):
    """Spec §2 per-row INT8 (``quantize_rows`` at 127 and 1e-4): ``v [BM, BN]`` fp32 (padding 0) ->
    ``(q [BM, BN] int8, scale [BM] fp32)``; bit for bit ``dsv4.quantize_int8_per_row``."""
    q, scale = quantize_rows(v, INT8_MAX, AMAX_FLOOR)
    return q.to(tl.int8), scale


@triton.jit
def store_rope_bf16(out_ptrs, v, cos, sin, mask, HD: tl.constexpr, R: tl.constexpr):
    """Store ``bf16(v)`` with interleaved RoPE applied to the last ``R`` entries of every row.

    ``v``, ``out_ptrs``, ``mask``: ``[BM, HD]``; ``cos``, ``sin``: ``[BM, R/2]`` fp32, each row at its
    token's position. The row is viewed as ``[HD/R, R/2, 2]`` pairs: the last ``R``-chunk rotates, the
    others are selected as they are, so an infinity or NaN there stays in its own entry (rotating them
    with cos=1, sin=0 would make its pair partner ``w*0``, NaN).
    """
    BM: tl.constexpr = v.shape[0]
    CHUNKS: tl.constexpr = HD // R
    even, odd = tl.split(tl.reshape(v, (BM, CHUNKS, R // 2, 2)))
    is_rope = (tl.arange(0, CHUNKS) == CHUNKS - 1)[None, :, None]
    c = cos[:, None, :]
    s = sin[:, None, :]
    rotated = tl.join(tl.where(is_rope, even * c - odd * s, even), tl.where(is_rope, even * s + odd * c, odd))
    tl.store(out_ptrs, to_bf16(tl.reshape(rotated, (BM, HD))), mask=mask)

"""FP8 e4m3 codes with power-of-two block scales on register tiles (attention spec §2, §6): the KV
row of the attention's pools (blocks of 64) and the activation quant of its output projection
(blocks of 128), bit for bit ``dsv4.model.fp8_row``.

Each function takes a tile ``v [M, BLOCK]`` fp32 whose rows are the blocks. Everything is exact:

- the block exponent ``e = ceil(log2(max(amax, 1e-4) / 448))`` is read from ``amax``'s bits
  (``amax = m * 2^k``, ``1 <= m < 2``: ``e = k - 8``, plus one when ``m > 1.75``, since 448 = 1.75 * 2^8);
- ``2^e`` is built from its bits (``tl.exp2`` is approximate on GPUs);
- the rounding to e4m3 (ties to even) is fp32's own: adding ``2^(k + 20)`` (``k`` the value's binade,
  at least -6, e4m3's smallest normal) leaves three fraction bits, subtracting it back is exact. The
  cast of the rounded value to ``float8e4nv`` is then exact everywhere (the interpreter's own cast
  drops the carry when rounding up to a power of two, so it is never asked to round).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..model.fp8_row import AMAX_FLOOR as _AMAX_FLOOR
from ..model.fp8_row import NAN_CODE as _NAN_CODE
from ..model.fp8_row import NAN_SCALE as _NAN_SCALE
from ..model.fp8_row import SCALE_BIAS as _SCALE_BIAS

AMAX_FLOOR = tl.constexpr(_AMAX_FLOOR)  # a block smaller than this is scaled as if its amax were 1e-4
NAN_CODE = tl.constexpr(_NAN_CODE)  # the e4m3 code of a block holding NaN or an infinity
NAN_EXP = tl.constexpr(_NAN_SCALE - _SCALE_BIAS)  # its exponent (UE8M0 byte 255)
SCALE_BIAS = tl.constexpr(_SCALE_BIAS)  # UE8M0: byte b is 2^(b - 127)
E4M3_MIN_NORMAL_EXP = tl.constexpr(-6)  # below 2^-6 e4m3 steps are 2^-9 (subnormals)
MANT_1_75 = tl.constexpr(0x600000)  # fp32 fraction bits of 1.75 (448 = 1.75 * 2^8)


@triton.jit
def pow2(e):
    """``2^e`` fp32, exact, for int32 ``e`` in ``[-126, 127]``."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _binade(v):
    """``floor(log2|v|)`` of finite nonzero normal fp32 ``v`` (int32)."""
    return ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127


@triton.jit
def block_exponent(amax):
    """``amax [M]`` fp32 (finite, >= 0) -> ``e [M]`` int32: the smallest ``e`` with
    ``max(amax, 1e-4) <= 448 * 2^e``."""
    a = tl.maximum(amax, AMAX_FLOOR)
    bits = a.to(tl.int32, bitcast=True)
    return _binade(a) - 8 + ((bits & 0x7FFFFF) > MANT_1_75).to(tl.int32)


@triton.jit
def round_e4m3(v):
    """fp32 ``v`` with ``|v| <= 448`` -> the nearest e4m3 value (ties to even), as fp32; signs of
    zeros kept as torch's cast keeps them."""
    k = tl.maximum(_binade(tl.abs(v)), E4M3_MIN_NORMAL_EXP)
    magic = pow2(k + 20)
    magic = tl.where(v < 0, -magic, magic)
    r = (v + magic) - magic
    return tl.where(r == 0, v * 0.0, r)


@triton.jit
def quant_e4m3(v):
    """``v [M, BLOCK]`` fp32 (one block per row) -> ``(codes [M, BLOCK] uint8, e [M] int32)``:
    ``v ≈ e4m3(codes) * 2^e``; a block holding NaN or an infinity gets ``e = 128`` and NaN codes."""
    finite = tl.sum((tl.abs(v) == float("inf")).to(tl.int32) + (v != v).to(tl.int32), axis=1) == 0
    v = tl.where(finite[:, None], v, 0.0)
    e = block_exponent(tl.max(tl.abs(v), axis=1))
    scaled = round_e4m3(v * pow2(-e)[:, None])
    codes = scaled.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    codes = tl.where(finite[:, None], codes, NAN_CODE)
    return codes, tl.where(finite, e, NAN_EXP)


@triton.jit
def dequant_e4m3(codes, e):
    """``codes [M, BLOCK]`` uint8 e4m3 bits, ``e [M]`` int32 -> ``[M, BLOCK]`` fp32 ``codes * 2^e``
    (exact; NaN for a block whose ``e`` is 128)."""
    c = codes.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    # A NaN block is made NaN here: the interpreter decodes the e4m3 NaN code 0x7F as 480 (a GPU as NaN).
    scale = tl.where(e == NAN_EXP, float("nan"), pow2(tl.minimum(e, 127)))
    return c * scale[:, None]


@triton.jit
def scale_byte(e):
    """``e`` int32 -> its UE8M0 byte ``e + 127`` (uint8; 255 for a NaN block)."""
    return (e + SCALE_BIAS).to(tl.uint8)


@triton.jit
def byte_exponent(b):
    """A UE8M0 byte (uint8) -> ``e`` int32."""
    return b.to(tl.int32) - SCALE_BIAS

"""A head row in registers as three tiles, and its RoPE and Hadamard rotation (compressor and indexer query).

A head row of ``HID`` entries is carried as three tiles: ``nope`` (entries ``[0, NOPE)``),
``even`` and ``odd`` (entries ``NOPE + 2i`` and ``NOPE + 2i + 1``, ``i < R/2``). Loading the
rotary pairs already split turns interleaved RoPE into plain elementwise math, and the Hadamard
rotation of the whole row into three dots against the matching rows of the sign matrix, with no
reshape, split or concatenation of register tiles. The signs are computed in registers from the
bit parity of ``i & j`` (Sylvester's construction), so no program loads a sign matrix.

Every dot here multiplies bf16-exact values (and the ``±1`` signs) held as fp32 with
``input_precision="tf32"``: tf32 represents bf16 values exactly, so the products are exact and the
sum is fp32 — the same numbers as a bf16 MMA — and the interpreter, whose ``tl.dot`` mishandles
bf16 operands, computes the same result (the tests run every interpreted dot under
``dsv4.bench.interp_traffic.dots_checked``, which refuses an operand tf32 would round).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .launch import is_pow2


def split_head_dims(hid: int, rope_dim: int) -> tuple[int, int]:
    """``(NOPE, R/2)`` for a head of ``hid`` entries whose last ``rope_dim`` rotate; both must be
    powers of two >= 16 (``tl.arange`` extents and ``tl.dot`` K dims)."""
    nope, half_r = hid - rope_dim, rope_dim // 2
    for name, v in (("HID - R", nope), ("R/2", half_r)):
        if v < 16 or not is_pow2(v):
            raise ValueError(
                f"w, rope: {name} = {v}: the fused kernels need a power of two >= 16 "
                f"(HID={hid} from w, R={rope_dim} from rope)"
            )
    return nope, half_r


@triton.jit
def rope_pairs(even, odd, cos, sin):
    """Interleaved RoPE on de-interleaved pairs: ``(u[2i], u[2i+1]) -> (y[2i], y[2i+1])`` (spec §2)."""
    return even * cos - odd * sin, even * sin + odd * cos


@triton.jit
def _signs(rows, cols):
    """Sylvester Hadamard signs ``(-1)^popcount(i & j)`` as fp32 ``±1``, ``rows [R, 1]`` x ``cols [1, C]``
    int32 indices below 2^16: computed in registers from the parity of ``i & j``, nothing loaded."""
    v = rows & cols
    v ^= v >> 8
    v ^= v >> 4
    v ^= v >> 2
    v ^= v >> 1
    return 1.0 - 2.0 * (v & 1).to(tl.float32)


@triton.jit
def hadamard_rows(nope, even, odd, scale, HID: tl.constexpr, NOPE: tl.constexpr, HALF_R: tl.constexpr):
    """``[nope | interleave(even, odd)] @ (signs * scale)``: ``[M, NOPE]``, ``[M, HALF_R]`` x2 fp32
    holding bf16-exact values -> ``[M, HID]`` fp32. The signs are exact in tf32, so the products are
    exact and the sums fp32, as the reference's fp32 matmul."""
    cols = tl.arange(0, HID)[None, :]
    rows_even = NOPE + 2 * tl.arange(0, HALF_R)
    h_nope = _signs(tl.arange(0, NOPE)[:, None], cols)
    h_even = _signs(rows_even[:, None], cols)
    h_odd = _signs((rows_even + 1)[:, None], cols)
    acc = tl.dot(nope, h_nope, input_precision="tf32")
    acc = tl.dot(even, h_even, acc, input_precision="tf32")
    acc = tl.dot(odd, h_odd, acc, input_precision="tf32")
    return acc * scale

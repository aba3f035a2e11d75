"""The indexer's query path as one program per head (spec §5 steps 1, 2 and the query half of 4):
INT8 ``qr @ wq_b.T`` (int32 accumulate) -> dequant -> interleaved RoPE at each token's position
-> bf16 -> Hadamard -> per-row INT8 with its scale. Nothing but ``q8`` and ``q_scale`` is written.

``query_tile`` runs inside the indexer's front launch (``index_front.py``). A program owns one head
and a tile of ``BLOCK_M`` tokens — every token of a decode step (T <= 128) — so each ``wq_b`` byte is
read once. The head's ``HID`` weight rows are loaded split into the no-RoPE rows and the even and
odd rotary rows (see ``head_rotation.py``), so the accumulators come out already de-interleaved and
RoPE and the Hadamard need no register shuffles.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .epilogue import quantize_int8_rows, round_bf16
from .head_rotation import hadamard_rows, rope_pairs

BLOCK_M_MAX = 128  # tokens per program: a whole decode step (T=128), so every wq_b byte is read once
BLOCK_M_MIN = 16  # smallest tl.dot M
BLOCK_K = 64  # QL per step: 64 B of each int8 row, K % 32 == 0 for Hopper int8 MMA


def query_block_m(t: int) -> int:
    """Tokens per query program for ``t`` tokens."""
    return min(BLOCK_M_MAX, max(BLOCK_M_MIN, triton.next_power_of_2(t)))


@triton.jit
def query_tile(
    pid,  # program index among the query programs: (token tile, head), head fastest
    qr_ptr,  # [T, QL] int8
    qr_scale_ptr,  # [T] fp32
    wq_b_ptr,  # [HI*HID, QL] int8
    wq_b_scale_ptr,  # [HI*HID] fp32
    start_ptr,  # [B] int64; token t = b*S + s sits at start[b] + s
    cos_ptr,  # [P, R/2] fp32
    sin_ptr,
    q8_ptr,  # out [T, HI, HID] int8
    q_scale_ptr,  # out [T, HI] fp32
    T,
    S,
    QL,
    HI,
    hadamard_scale,
    HID: tl.constexpr,
    NOPE: tl.constexpr,
    HALF_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    head = (pid % HI).to(tl.int64)
    rows = (pid // HI).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    n_nope = head * HID + tl.arange(0, NOPE)
    n_even = head * HID + NOPE + 2 * tl.arange(0, HALF_R)
    n_odd = n_even + 1

    acc_nope = tl.zeros([BLOCK_M, NOPE], dtype=tl.int32)
    acc_even = tl.zeros([BLOCK_M, HALF_R], dtype=tl.int32)
    acc_odd = tl.zeros([BLOCK_M, HALF_R], dtype=tl.int32)
    for k0 in range(0, QL, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < QL
        a = tl.load(qr_ptr + rows[:, None] * QL + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0)
        w_nope = tl.load(wq_b_ptr + n_nope[None, :] * QL + ks[:, None], mask=k_ok[:, None], other=0)
        w_even = tl.load(wq_b_ptr + n_even[None, :] * QL + ks[:, None], mask=k_ok[:, None], other=0)
        w_odd = tl.load(wq_b_ptr + n_odd[None, :] * QL + ks[:, None], mask=k_ok[:, None], other=0)
        acc_nope = tl.dot(a, w_nope, acc_nope, out_dtype=tl.int32)
        acc_even = tl.dot(a, w_even, acc_even, out_dtype=tl.int32)
        acc_odd = tl.dot(a, w_odd, acc_odd, out_dtype=tl.int32)

    # dequant in the reference's order: (acc * qr_scale) * wq_b_scale
    qs = tl.load(qr_scale_ptr + rows, mask=row_ok, other=0.0)[:, None]
    q_nope = acc_nope.to(tl.float32) * qs * tl.load(wq_b_scale_ptr + n_nope)[None, :]
    q_even = acc_even.to(tl.float32) * qs * tl.load(wq_b_scale_ptr + n_even)[None, :]
    q_odd = acc_odd.to(tl.float32) * qs * tl.load(wq_b_scale_ptr + n_odd)[None, :]

    pos = tl.load(start_ptr + rows // S, mask=row_ok, other=0) + rows % S
    trig = pos[:, None] * HALF_R + tl.arange(0, HALF_R)[None, :]
    cos = tl.load(cos_ptr + trig, mask=row_ok[:, None], other=0.0)
    sin = tl.load(sin_ptr + trig, mask=row_ok[:, None], other=0.0)
    q_even, q_odd = rope_pairs(q_even, q_odd, cos, sin)
    rotated = hadamard_rows(
        round_bf16(q_nope), round_bf16(q_even), round_bf16(q_odd), hadamard_scale, HID, NOPE, HALF_R
    )
    q8, q_scale = quantize_int8_rows(rotated)  # the same per-row INT8 as the keys get
    out = (rows * HI + head)[:, None] * HID + tl.arange(0, HID)[None, :]
    tl.store(q8_ptr + out, q8, mask=row_ok[:, None])
    tl.store(q_scale_ptr + rows * HI + head, q_scale, mask=row_ok)

"""Fused ``qkv_proj_rope`` (spec §3) in three launches.

1. ``split_k_projection``: ``x @ [wq_a; wkv].T`` as fp32 partial sums over slices of D (see projection.py).
2. ``_qr_kv_rows_kernel``, one program per token: adds the slices (all in flight, in slice order), then
   qr path: RMSNorm(gamma_cq) and per-row INT8 quantization -> ``qr``, ``qr_scale``;
   kv path: RMSNorm(gamma_ckv), NOPE and interleaved RoPE at the token's position -> ``kv``.
3. ``_q_heads_kernel``, one program per (M-tile, head): INT8 x INT8 -> int32 ``qr @ wq_b.T`` for a
   whole head, dequant by ``qr_scale * wq_b_scale``, per-head RMSNorm, NOPE and RoPE in registers
   -> ``q``. The fp32 ``[T, H*HD]`` projection never reaches memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..model.rope import RopeTable
from ..model.structs import QKV
from ..model.weights import AttnWeights
from .epilogue import quantize_int8_rows, rms_inv, store_rope_bf16
from .launch import is_pow2, pow2_divisor
from .projection import split_k_projection
from .split_k import sum_k_slices
from .workspace import Workspace

ROWS_NUM_WARPS = 4  # one token per program; its widest row (QL=1536, padded to 2048 fp32) is 16 values a thread

Q_BLOCK_M_MAX = 64  # tokens per tile: the 64 x 512 int32 accumulator of a whole head is 128 KiB of registers
#                     (half an SM's file); T=128 decode -> 2 M-tiles x 64 heads = 128 programs on 132 SMs
Q_BLOCK_M_MIN = 16  # smallest tl.dot M
Q_BLOCK_K_MAX = 128  # 128 int8 = 128 B: each wq_b row read per step fills exactly one 128-B line
Q_BLOCK_K_MIN = 32  # INT8 tensor-core MMA consumes K in steps of 32
Q_NUM_WARPS = 8  # 128 KiB accumulator over 256 threads = 128 registers each
Q_NUM_STAGES = 2  # (512 + 64) rows x 128 B = 72 KiB of shared memory per stage, 144 KiB for 2


@triton.jit
def _qr_kv_rows_kernel(
    partial_ptr,  # [SPLITS, T, QL + HD] fp32 partial sums of x @ [wq_a; wkv].T
    gamma_cq_ptr,  # [QL] bf16|fp32
    gamma_ckv_ptr,  # [HD] bf16|fp32
    positions_ptr,  # [T] int32|int64
    cos_ptr,  # [P, R/2] fp32
    sin_ptr,  # [P, R/2] fp32
    qr_ptr,  # [T, QL] int8 out
    qr_scale_ptr,  # [T, 1] fp32 out
    kv_ptr,  # [T, HD] bf16 out
    T,
    eps,
    QL: tl.constexpr,
    HD: tl.constexpr,
    R: tl.constexpr,
    BLOCK_QL: tl.constexpr,
    SPLITS: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    row = partial_ptr + t * (QL + HD)
    slice_stride = tl.cast(T, tl.int64) * (QL + HD)

    # qr path: c = rms(a, gamma_cq); qr, qr_scale = int8_per_row(c)
    cq = tl.arange(0, BLOCK_QL)[None, :]
    cq_ok = cq < QL
    a = sum_k_slices(row + cq, cq_ok, slice_stride, SPLITS)
    gamma_cq = tl.load(gamma_cq_ptr + cq, mask=cq_ok, other=0.0).to(tl.float32)
    c = a * rms_inv(a, QL, eps) * gamma_cq
    qr, qr_scale = quantize_int8_rows(c)
    tl.store(qr_ptr + t * QL + cq, qr, mask=cq_ok)
    tl.store(qr_scale_ptr + t + tl.zeros((1,), dtype=tl.int64), qr_scale)

    # kv path: k = rms(x @ wkv.T, gamma_ckv); NOPE as is, RoPE on the last R entries
    ck = tl.arange(0, HD)[None, :]
    k = sum_k_slices(row + QL + ck, ck < HD, slice_stride, SPLITS)
    k = k * rms_inv(k, HD, eps) * tl.load(gamma_ckv_ptr + ck).to(tl.float32)
    pos = tl.load(positions_ptr + t).to(tl.int64)
    half = tl.arange(0, R // 2)[None, :]
    cos = tl.load(cos_ptr + pos * (R // 2) + half)
    sin = tl.load(sin_ptr + pos * (R // 2) + half)
    store_rope_bf16(kv_ptr + t * HD + ck, k, cos, sin, ck < HD, HD, R)


@triton.jit
def _q_heads_kernel(
    qr_ptr,  # [T, QL] int8
    qr_scale_ptr,  # [T, 1] fp32
    wq_b_ptr,  # [H*HD, QL] int8
    wq_b_scale_ptr,  # [H*HD] fp32
    positions_ptr,  # [T] int32|int64
    cos_ptr,  # [P, R/2] fp32
    sin_ptr,  # [P, R/2] fp32
    q_ptr,  # [T, H, HD] bf16 out
    T,
    eps,
    QL: tl.constexpr,
    H: tl.constexpr,
    HD: tl.constexpr,
    R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    dims = tl.arange(0, HD)
    ks = tl.arange(0, BLOCK_K)
    qr_rows = qr_ptr + rows[:, None] * QL
    w_cols = wq_b_ptr + (head * HD + dims)[None, :] * QL  # [BLOCK_K, HD] tiles, K contiguous in memory

    acc = tl.zeros((BLOCK_M, HD), dtype=tl.int32)  # exact: |sum| <= 127^2 * QL < 2^31
    for k0 in range(0, QL, BLOCK_K):
        a = tl.load(qr_rows + (k0 + ks)[None, :], mask=row_ok[:, None], other=0)
        w = tl.load(w_cols + (k0 + ks)[:, None])
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)

    qr_scale = tl.load(qr_scale_ptr + rows, mask=row_ok, other=0.0)[:, None]
    w_scale = tl.load(wq_b_scale_ptr + head * HD + dims)[None, :]
    qp = acc.to(tl.float32) * qr_scale * w_scale
    qn = qp * rms_inv(qp, HD, eps)

    pos = tl.load(positions_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    half = tl.arange(0, R // 2)[None, :]
    cos = tl.load(cos_ptr + pos[:, None] * (R // 2) + half, mask=row_ok[:, None], other=1.0)
    sin = tl.load(sin_ptr + pos[:, None] * (R // 2) + half, mask=row_ok[:, None], other=0.0)
    out = q_ptr + rows[:, None] * (H * HD) + head * HD + dims[None, :]
    store_rope_bf16(out, qn, cos, sin, row_ok[:, None], HD, R)


def qkv_proj_rope(
    x: torch.Tensor,
    w: AttnWeights,
    positions: torch.Tensor,
    rope: RopeTable,
    eps: float,
    out: QKV | None = None,
    ws: Workspace | None = None,
) -> QKV:
    """Fused spec §3 on validated arguments, in three launches.

    ``x``: ``[T, D] bf16``; ``w``: ``AttnWeights`` (``HD`` = ``w.wkv`` rows, ``H`` = ``w.wq_b`` rows / HD,
    ``QL`` = ``w.wq_a`` rows); ``positions``: ``[T] int32|int64``; ``rope``: table ``[P, R/2]`` fp32.
    Returns ``QKV(q [T, H, HD] bf16, kv [T, HD] bf16, qr [T, QL] int8, qr_scale [T, 1] fp32)``, written
    straight into ``out`` (validated, contiguous, not aliasing the inputs) when it is given; scratch
    comes from ``ws`` when given.
    """
    t = x.shape[0]
    hd, ql = w.wkv.shape[0], w.wq_a.shape[0]
    h = w.wq_b.shape[0] // hd
    r = rope.rope_dim
    if not is_pow2(hd) or hd % r or not is_pow2(hd // r):
        raise ValueError(
            f"w.wkv: the Triton backend needs a head dim that is a power of two and a power-of-two multiple "
            f"of the rope dim (a tile holds a whole head), got HD={hd}, R={r}"
        )
    block_k = pow2_divisor(ql, Q_BLOCK_K_MAX)
    if block_k < Q_BLOCK_K_MIN:
        raise ValueError(
            f"w.wq_a: the Triton backend needs a q LoRA rank that is a multiple of {Q_BLOCK_K_MIN}, got {ql}"
        )
    dev = x.device

    if out is None:
        out = QKV(
            q=torch.empty(t, h, hd, dtype=torch.bfloat16, device=dev),
            kv=torch.empty(t, hd, dtype=torch.bfloat16, device=dev),
            qr=torch.empty(t, ql, dtype=torch.int8, device=dev),
            qr_scale=torch.empty(t, 1, dtype=torch.float32, device=dev),
        )
    q, kv, qr, qr_scale = out

    partial = split_k_projection(x, w.wq_a, w.wkv, ws)
    _qr_kv_rows_kernel[(t,)](
        partial, w.gamma_cq, w.gamma_ckv, positions, rope.cos, rope.sin, qr, qr_scale, kv,
        t, eps,
        QL=ql, HD=hd, R=r, BLOCK_QL=triton.next_power_of_2(ql), SPLITS=partial.shape[0], num_warps=ROWS_NUM_WARPS,
    )  # fmt: skip

    block_m = min(Q_BLOCK_M_MAX, max(Q_BLOCK_M_MIN, triton.next_power_of_2(t)))
    _q_heads_kernel[(triton.cdiv(t, block_m), h)](
        qr, qr_scale, w.wq_b, w.wq_b_scale, positions, rope.cos, rope.sin, q,
        t, eps,
        QL=ql, H=h, HD=hd, R=r, BLOCK_M=block_m, BLOCK_K=block_k,
        num_warps=Q_NUM_WARPS, num_stages=Q_NUM_STAGES,
    )  # fmt: skip
    return out

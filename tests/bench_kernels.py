"""Small Triton kernels with known traffic, for the bench tests (run through the interpreter).

``touching_qkv_proj_rope`` stands in for a Triton ``qkv_proj_rope`` that moves exactly the
minimal bytes: it reads every input once (RoPE rows only at the tokens' positions) and writes
every output once, computing nothing. The bench must count it at exactly 1x the bytes model.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.model.structs import QKV

BLOCK = 4096  # bytes per program of the read/write kernels: a few programs per tensor at the tiny preset


@triton.jit
def masked_copy_kernel(src, dst, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)


@triton.jit
def read_bytes_kernel(src, sink, n, BLOCK: tl.constexpr):
    """Reads ``n`` bytes; one program per block, nothing written but a single byte per program
    into ``sink`` when the block sums to a value no input reaches (never)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(src + offs, mask=offs < n, other=0).to(tl.int32)
    tl.store(sink + tl.program_id(0), tl.sum(v, axis=0).to(tl.int8), mask=tl.sum(v, axis=0) > 1 << 30)


@triton.jit
def write_bytes_kernel(dst, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst + offs, tl.zeros((BLOCK,), dtype=tl.uint8), mask=offs < n)


@triton.jit
def rope_rows_kernel(positions, cos, sin, sink, HALF: tl.constexpr):
    """Reads one token's position and its cos and sin rows."""
    p = tl.load(positions + tl.program_id(0))
    cols = tl.arange(0, HALF)
    v = tl.load(cos + p * HALF + cols) + tl.load(sin + p * HALF + cols)
    tl.store(sink + tl.program_id(0), tl.sum(v, axis=0), mask=tl.sum(v, axis=0) > 1e30)


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def read_all(t: torch.Tensor) -> None:
    data = _bytes_of(t)
    sink = torch.empty(triton.cdiv(data.numel(), BLOCK), dtype=torch.int8)
    read_bytes_kernel[(triton.cdiv(data.numel(), BLOCK),)](data, sink, data.numel(), BLOCK=BLOCK)


def write_all(t: torch.Tensor) -> None:
    data = _bytes_of(t)
    write_bytes_kernel[(triton.cdiv(data.numel(), BLOCK),)](data, data.numel(), BLOCK=BLOCK)


TOUCHING_QKV_LAUNCHES = 12  # 7 inputs, the RoPE rows, 4 outputs


def touching_qkv_proj_rope(x, w, positions, rope, eps, out=None) -> QKV:
    """Signature of ``dsv4.kernels.qkv_proj_rope.qkv_proj_rope``; outputs are zeros."""
    t, hd = x.shape[0], w.wkv.shape[0]
    for tensor in (x, w.wq_a, w.gamma_cq, w.wq_b, w.wq_b_scale, w.wkv, w.gamma_ckv):
        read_all(tensor)
    sink = torch.empty(t, dtype=torch.float32)
    rope_rows_kernel[(t,)](positions, rope.cos, rope.sin, sink, HALF=rope.cos.shape[1])
    qkv = QKV(
        torch.empty(t, w.wq_b.shape[0] // hd, hd, dtype=torch.bfloat16),
        torch.empty(t, hd, dtype=torch.bfloat16),
        torch.empty(t, w.wq_a.shape[0], dtype=torch.int8),
        torch.empty(t, 1, dtype=torch.float32),
    )
    for tensor in qkv:
        write_all(tensor)
    return qkv

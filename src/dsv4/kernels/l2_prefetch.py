"""Bring bytes into L2 ahead of the loads that use them (sm_90 and newer, compiled kernels only).

A launch that waits for its predecessor (programmatic dependent launch, ``gdc_wait``) may already
stream what does not depend on it: weights. ``prefetch_l2`` asks L2 for a byte range with
``cp.async.bulk.prefetch.L2`` (sm_90), one 1 KiB chunk per lane and instruction: no registers hold
the data and nothing waits for it, so a kernel at the edge of its register file can issue it before
its wait. Only whole chunks inside the range are asked for, each 16-byte aligned when the base is
(the launcher checks ``base.data_ptr() % PREFETCH_ALIGN``). ``prefetch_l2_lines`` asks for scattered
lines instead (``prefetch.global.L2``, one per lane): the score launch's first key rows, gathered
through the block table. Under the interpreter the instructions cannot run: kernels call
``prefetch_l2`` behind a constexpr that is off there, and ``prefetch_l2_lines`` does nothing there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import INTERPRETED

PREFETCH_CHUNK = tl.constexpr(1024)  # bytes per prefetch instruction (a multiple of 16, as the bulk copy needs)
PREFETCH_ALIGN = 16  # cp.async.bulk addresses are 16-byte aligned
PREFETCH_LANES = tl.constexpr(256)  # chunks asked for per step: one per thread of an 8-warp program

_ASM = tl.constexpr(
    "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], 1024; mov.u32 $0, 0; }"
)  # a guard lane asks for nothing


@triton.jit
def prefetch_l2(base_ptr, lo, hi):
    """Ask L2 for bytes ``[lo, hi)`` (int64 offsets, ``lo`` a multiple of ``PREFETCH_CHUNK``) of the
    buffer at ``base_ptr`` (an int8 pointer), whole chunks only."""
    lanes = tl.arange(0, PREFETCH_LANES).to(tl.int64) * PREFETCH_CHUNK
    for start in range(lo, hi, PREFETCH_LANES * PREFETCH_CHUNK):
        off = start + lanes
        tl.inline_asm_elementwise(
            _ASM, "=r,l,r", [base_ptr + off, (off + PREFETCH_CHUNK <= hi).to(tl.int32)],
            dtype=tl.int32, is_pure=False, pack=1,
        )  # fmt: skip


@triton.jit
def prefetch_l2_share(base_ptr, nbytes, share, shares):
    """Ask L2 for share ``share`` of ``shares`` near-equal runs of whole chunks of the ``nbytes`` bytes
    at ``base_ptr`` (an int8 pointer): the programs of one launch spread a buffer between them."""
    chunks = nbytes // PREFETCH_CHUNK
    lo = share.to(tl.int64) * chunks // shares
    hi = (share.to(tl.int64) + 1) * chunks // shares
    prefetch_l2(base_ptr, lo * PREFETCH_CHUNK, hi * PREFETCH_CHUNK)


@triton.jit
def prefetch_l2_lines(ptrs, mask):
    """Ask L2 for the line holding each of ``ptrs`` where ``mask`` (nothing in the interpreter, which
    cannot run it). A hint, never a read of a value: every SM's writes land in L2, so a prefetched
    line is never stale."""
    if not INTERPRETED:
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
            "=r,l,r", [ptrs, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1,
        )  # fmt: skip


def can_prefetch(t: torch.Tensor) -> bool:
    """Whether ``prefetch_l2`` may be pointed at tensor ``t``: one-byte elements, 16-byte aligned."""
    return t.element_size() == 1 and t.data_ptr() % PREFETCH_ALIGN == 0

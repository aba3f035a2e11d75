"""Fused ``qkv_proj_rope`` (spec §3) in three launches.

1. ``split_k_projection``: ``x @ [wq_a; wkv].T`` as fp32 partial sums over slices of D (see projection.py).
2. ``_qr_kv_rows_kernel``, two programs per token (the two paths are independent: 2T programs, 256 at
   decode), each adding its columns' slices (all in flight, in slice order), then
   qr path: RMSNorm(gamma_cq) and per-row INT8 quantization -> ``qr``, ``qr_scale``;
   kv path: RMSNorm(gamma_ckv), NOPE and interleaved RoPE at the token's position -> ``kv``.
3. ``_q_heads_kernel``: INT8 x INT8 -> int32 ``qr @ wq_b.T`` with all decode tokens in one M-tile, so
   every ``wq_b`` byte is read once; dequant by ``qr_scale * wq_b_scale``, per-head RMSNorm, NOPE and
   RoPE in registers -> ``q``. The fp32 ``[T, H*HD]`` projection never reaches memory.

A whole head for 128 tokens would need a 256 KiB int32 accumulator (the whole register file), so a
head is computed as two column halves of HD/2. On a GPU, when the grid fits one wave of SMs, each
half is its own program and the two swap their rows' sums of squares through a small scratch buffer
(``PAIRED``); a half whose partner is not running (SMs held by other streams' kernels) does not wait
for it without end, but parks its values for the partner to finish (``_meet_partner``). Otherwise (a
larger grid; and always under the interpreter, which runs programs one after another) one program
computes both halves in one pass over QL, each ``qr`` tile feeding both halves' dots. Both ways the
per-head sum of squares is ``sum(half 0) + sum(half 1)``, so both give the same numbers.

On sm_90 every launch takes part in programmatic dependent launch, and each lets its successor start
at its own start, before it waits for its predecessor: so ``wq_b`` (60% of the bytes at decode,
read by launch 3 and independent of launches 1 and 2) is asked of L2 before the q heads' wait,
by each q-head program for its own rows, or by the projection's programs when the op starts
(``WQ_B_PREFETCH``, a tuning choice).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ..model.rope import RopeTable
from ..model.structs import QKV
from ..model.weights import AttnWeights
from .epilogue import quantize_int8_rows, rms_scale, store_rope_bf16, to_bf16
from .interpreter import interpreted
from .l2_prefetch import can_prefetch, prefetch_l2
from .launch import is_pow2, pdl_supported, pow2_divisor, sm_count
from .projection import check_widths, split_k_projection
from .q_head_epilogue import dequant_half, head_rms, rope_rows, store_q_half, store_q_head
from .q_heads_split import launch_q_heads_split
from .split_k import sum_k_slices
from .tuning import Config, Param, Tunable
from .workspace import Workspace, scratch

ROWS_NUM_WARPS = 4  # one token's path per program; the widest row (QL=1536, padded to 2048 fp32): 16 a thread

Q_BLOCK_M_PAIRED = 128  # tokens per tile: all T=128 decode tokens, so every wq_b byte is read once; a half head
#                         (128 x 256 int32) is 128 KiB of registers; 64 heads x 2 halves = 128 programs on 132 SMs
Q_BLOCK_M = 64  # tokens per tile when a program holds both halves of a head: 2 x 64 x 256 x 4 B = 128 KiB
Q_BLOCK_M_MIN = 16  # smallest tl.dot M
Q_BLOCK_K_MAX = 128  # 128 int8 = 128 B: each wq_b row read per step fills exactly one 128-B line
Q_BLOCK_K_MIN = 32  # INT8 tensor-core MMA consumes K in steps of 32
Q_NUM_WARPS = 8  # 128 KiB of accumulators over 256 threads = 128 registers each
PAIR_SPINS = 4096  # reads of the pair's arrival word a first-arriving half makes before it parks its values and
#                    leaves (milliseconds: a partner that is resident arrives within microseconds)
_LOW32 = tl.constexpr(0xFFFFFFFF)  # the low word of an exchanged int64: a half's sum of squares
_ONE_AND_ZERO = tl.constexpr(0x3F800000 << 32)  # the word of c = 1.0, sum 0 (masked rows)
Q_NUM_STAGES = 3  # (128 + 256) rows x 128 B = 48 KiB of shared memory per stage, 144 KiB for 3
# Who asks L2 for wq_b before the launches it does not depend on have finished (compiled on sm_90 only):
# "q_heads": each q-head program its own rows, before its PDL wait (it can start once the rows kernel has
# started, SMs permitting: a paired program takes a whole SM's registers); "projection": the projection's
# programs, 1/132 of wq_b each, at the op's start; "none". Which wins is a GPU measurement.
WQ_B_PREFETCH = ("none", "q_heads", "projection")

_PDL = Param(
    "pdl",
    True,
    (False, True),
    "programmatic dependent launch (sm_90): start while the previous launch ends, wait before reading its output",
    exact=True,
    compiled_only=True,
)
ROWS_TUNING = Tunable(
    "qkv.rows",
    "_qr_kv_rows_kernel: slice sums, RMSNorm, qr quantization, kv RoPE (qkv_proj_rope launch 2)",
    dims=("T", "QL", "HD"),
    pow2_dims=("T",),
    params=(Param("num_warps", ROWS_NUM_WARPS, (2, 4, 8), "warps per token and path", compiled_only=True), _PDL),
    candidates=({"num_warps": 8}, {"pdl": False}),
)

Q_HEADS_CANDIDATES = (
    {"num_warps": 16},  # half the accumulator registers a thread: 128 at T=128 (Triton 3.9 and 3.6)
    {"num_stages": 2},
    {"num_stages": 4},
    {"block_k": 64},
    {"paired": False},
    # pairs at prefill; 2 stages: at 3, two GEMM loops more (a late partner's) spill 128 B (3.9) / 80 B (3.6)
    {"pair_waves": "many", "num_stages": 2},
    {"pdl": False},
    {"wq_b_prefetch": "projection"},
    {"wq_b_prefetch": "none"},
)
Q_TOKENS = (Q_BLOCK_M_MIN, 32, 64, Q_BLOCK_M_PAIRED)  # the M-tiles a config may cap the q heads at
Q_SPLITS = (1, 2, 4, 8)  # QL slices of the q heads (q_heads_split.py): 8 x 128 = flash's QL, a K step a slice
FEW_HEADS_PROGRAMS = 128  # a candidate's grid of few heads (a tensor-parallel rank) fills at most this: one wave of
#                           an H100 SXM or H200 (132 SMs), so that its pairs still meet (q_heads_tiles checks the
#                           device's own count: a pair plan that does not fit runs one program per head)


def _q_heads_candidates(bucket: dict[str, int]) -> list[dict]:
    """The declared candidates, and where few heads leave most SMs idle (a tensor-parallel rank: 16 paired
    programs at flash decode over 8 ranks): M-tiles of fewer tokens whose pairs still fit one wave, and at
    a few tokens QL split over programs, where the int32 slices (written and read back) cost no more bytes
    than the weights (``2 x splits x T x 4 <= QL`` a column)."""
    t, h, ql = bucket["T"], bucket["H"], bucket["QL"]
    fewer = [n for n in Q_TOKENS if n < min(t, Q_BLOCK_M_PAIRED) and triton.cdiv(t, n) * 2 * h <= FEW_HEADS_PROGRAMS]
    m_tiles = triton.cdiv(t, Q_BLOCK_M)
    sliced = [s for s in Q_SPLITS[1:] if m_tiles * 2 * h * s <= FEW_HEADS_PROGRAMS and 8 * s * t <= ql]
    return [*Q_HEADS_CANDIDATES, *({"tokens": n} for n in fewer), *({"splits": s} for s in sliced)]


Q_HEADS_TUNING = Tunable(
    "qkv.q_heads",
    "_q_heads_kernel: INT8 qr @ wq_b.T, per-head RMSNorm and RoPE (qkv_proj_rope launch 3)",
    dims=("T", "H", "QL"),
    pow2_dims=("T",),
    params=(
        Param("num_warps", Q_NUM_WARPS, (4, 8, 16), "warps per program", compiled_only=True),
        Param("num_stages", Q_NUM_STAGES, (2, 3, 4), "pipelined K steps", exact=True, compiled_only=True),
        Param("block_k", Q_BLOCK_K_MAX, (32, 64, 128), "QL per step (int32 sums: exact)", exact=True),
        Param(
            "paired",
            True,
            (False, True),
            # not exact: a half's sum of squares is reduced over the half-head tile's layout, which is not
            # the whole-head tile's, so the float sums (and q) differ in their last bits (seen on an H200)
            "half-head programs that swap their sums when the grid fits one wave",
        ),
        Param(
            "pair_waves",
            "one",
            ("one", "many"),
            # "many": the pairs' M-tiles of 128 tokens read each wq_b byte T/128 times instead of T/64 (prefill)
            "half-head pairs only when the grid fits one wave (a half that cannot wait parks its values), or at "
            "every T (a pair's halves adjacent in the grid; a half whose partner is late computes its sums again)",
        ),
        Param(
            "tokens",
            Q_BLOCK_M_PAIRED,
            Q_TOKENS,
            # not exact: as "paired", a half's sums are reduced over its tile's layout, which the tile's M sets
            "most tokens per M-tile: fewer give a launch of few heads (a tensor-parallel rank) more programs, "
            "each reading its heads' wq_b rows again (from L2)",
        ),
        Param(
            "splits",
            1,
            Q_SPLITS,
            # not exact: the finish launch's tiles are loads, not dot results, so its sums of squares may be
            # reduced over another layout than the one-program-per-head plan's
            "QL slices a program (int32 partials, then a launch that finishes each head: q_heads_split.py); "
            "more than 1: few heads at a few tokens fill more SMs",
        ),
        _PDL,
        Param(
            "wq_b_prefetch",
            "q_heads",
            WQ_B_PREFETCH,
            "who asks L2 for wq_b before the earlier launches end (with PDL, sm_90): q-head or projection programs",
            exact=True,
            compiled_only=True,
        ),
    ),
    candidates=_q_heads_candidates,
)


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
    sumsq_ptr,  # [T * PAIR_SLOTS] int64 out: -1, "not yet published" / "nobody arrived", for the q heads (PAIRED)
    T,
    eps,
    QL: tl.constexpr,
    HD: tl.constexpr,
    R: tl.constexpr,
    BLOCK_QL: tl.constexpr,
    SPLITS: tl.constexpr,
    PAIRED: tl.constexpr,
    PAIR_SLOTS: tl.constexpr,  # 3*H a token: a sum of squares per head half, an arrival word per head (pair_words)
    PAIR_BLOCK: tl.constexpr,  # PAIR_SLOTS rounded up to a power of two
    PDL: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    if PDL:
        # the q heads may be scheduled now: they ask L2 for their wq_b before their own wait, which
        # returns only once this grid has completed (qr, qr_scale and the exchange buffer's reset written)
        gdc_launch_dependents()
        gdc_wait()  # the projection's partials are complete and visible
    row = partial_ptr + t * (QL + HD)
    slice_stride = tl.cast(T, tl.int64) * (QL + HD)

    # Each path asks for what its epilogue reads (gamma; the kv path's position and its cos/sin rows) before
    # the slices: those loads wait under the slices' round trips, not after the row's reductions.
    if tl.program_id(1) == 0:  # qr path: c = rms(x @ wq_a.T, gamma_cq); qr, qr_scale = int8_per_row(c)
        cq = tl.arange(0, BLOCK_QL)[None, :]
        cq_ok = cq < QL
        gamma_cq = tl.load(gamma_cq_ptr + cq, mask=cq_ok, other=0.0).to(tl.float32)
        a = sum_k_slices(row + cq, cq_ok, slice_stride, SPLITS)
        a_scale, a_inv = rms_scale(a, QL, eps)
        c = (a * a_scale) * a_inv * gamma_cq
        qr, qr_scale = quantize_int8_rows(c)
        tl.store(qr_ptr + t * QL + cq, qr, mask=cq_ok)
        tl.store(qr_scale_ptr + t + tl.zeros((1,), dtype=tl.int64), qr_scale)
        if PAIRED:  # reset words [t * 3H, (t+1) * 3H) of the q heads' exchange buffer (pair_words): all of it
            slots = tl.arange(0, PAIR_BLOCK)
            minus_one = tl.full((PAIR_BLOCK,), -1, tl.int64)
            tl.store(sumsq_ptr + t * PAIR_SLOTS + slots, minus_one, mask=slots < PAIR_SLOTS)
    else:  # kv path: k = rms(x @ wkv.T, gamma_ckv); NOPE as is, RoPE on the last R entries
        ck = tl.arange(0, HD)[None, :]
        gamma_ckv = tl.load(gamma_ckv_ptr + ck).to(tl.float32)
        pos = tl.load(positions_ptr + t).to(tl.int64)
        half = tl.arange(0, R // 2)[None, :]
        cos = tl.load(cos_ptr + pos * (R // 2) + half)
        sin = tl.load(sin_ptr + pos * (R // 2) + half)
        k = sum_k_slices(row + QL + ck, ck < HD, slice_stride, SPLITS)
        k_scale, k_inv = rms_scale(k, HD, eps)
        k = (k * k_scale) * k_inv * gamma_ckv
        store_rope_bf16(kv_ptr + t * HD + ck, k, cos, sin, ck < HD, HD, R)


@triton.jit
def _half_head(qr_ptr, qr_scale, wq_b_ptr, wq_b_scale_ptr, rows, row_ok, col0, QL: tl.constexpr, HALF: tl.constexpr,
               BLOCK_K: tl.constexpr):  # fmt: skip
    """Columns ``[col0, col0 + HALF)`` of ``qr @ wq_b.T`` for ``rows``, dequantized (``dequant_half``)."""
    ks = tl.arange(0, BLOCK_K)
    cols = col0 + tl.arange(0, HALF)
    qr_rows = qr_ptr + rows[:, None] * QL
    w_cols = wq_b_ptr + cols[None, :] * QL  # [BLOCK_K, HALF] tiles, K contiguous in memory

    acc = tl.zeros((rows.shape[0], HALF), dtype=tl.int32)  # exact: |sum| <= 127^2 * QL < 2^31
    for k0 in range(0, QL, BLOCK_K):
        a = tl.load(qr_rows + (k0 + ks)[None, :], mask=row_ok[:, None], other=0)
        w = tl.load(w_cols + (k0 + ks)[:, None])
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)
    return dequant_half(acc, qr_scale, wq_b_scale_ptr, cols)


@triton.jit
def _whole_head(qr_ptr, qr_scale, wq_b_ptr, wq_b_scale_ptr, rows, row_ok, col0, QL: tl.constexpr,
                HALF: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """Both halves of the head at columns ``[col0, col0 + 2*HALF)`` in one pass over QL: each ``qr`` tile
    is loaded once and feeds both halves' dots (two half-head accumulators, as many registers as one
    half's ``qp`` held while the other accumulates). ``(qp0, c0, sumsq0, qp1, c1, sumsq1)``, each half
    as ``_half_head`` gives it (exact int32 sums: the same bits)."""
    ks = tl.arange(0, BLOCK_K)
    cols0 = col0 + tl.arange(0, HALF)
    cols1 = cols0 + HALF
    qr_rows = qr_ptr + rows[:, None] * QL
    w_cols0 = wq_b_ptr + cols0[None, :] * QL
    w_cols1 = wq_b_ptr + cols1[None, :] * QL

    acc0 = tl.zeros((rows.shape[0], HALF), dtype=tl.int32)
    acc1 = tl.zeros((rows.shape[0], HALF), dtype=tl.int32)
    for k0 in range(0, QL, BLOCK_K):
        a = tl.load(qr_rows + (k0 + ks)[None, :], mask=row_ok[:, None], other=0)
        w0 = tl.load(w_cols0 + (k0 + ks)[:, None])
        w1 = tl.load(w_cols1 + (k0 + ks)[:, None])
        acc0 = tl.dot(a, w0, acc0, out_dtype=tl.int32)
        acc1 = tl.dot(a, w1, acc1, out_dtype=tl.int32)
    qp0, c0, sumsq0 = dequant_half(acc0, qr_scale, wq_b_scale_ptr, cols0)
    qp1, c1, sumsq1 = dequant_half(acc1, qr_scale, wq_b_scale_ptr, cols1)
    return qp0, c0, sumsq0, qp1, c1, sumsq1


@triton.jit
def _publish_sumsq(sumsq_ptr, pair, half, c, sumsq, rows, row_ok, T):
    """Publish this half's scale and sum of squares (``[BM]`` each) for its partner (``_await_sumsq``).

    Both travel in one int64 word, ``c``'s bits above the sum's, and every word is its own flag: the
    rows kernel set them to -1, and a published word is positive (``c`` is a positive power of two; a
    NaN sum's sign bit stays in the low word). An atomic store, read by the partner's volatile loads
    and its final atomic read.
    """
    mine = sumsq_ptr + (pair * 2 + half) * T + rows
    word = (c.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (sumsq.to(tl.int32, bitcast=True).to(tl.int64) & _LOW32)
    tl.atomic_xchg(mine, word, mask=row_ok, sem="relaxed", scope="gpu")


@triton.jit
def _await_sumsq(sumsq_ptr, pair, half, rows, row_ok, T):
    """The other half's ``(c, sumsq)`` (``[BM]`` each), once the partner has published them.

    Called once the pair has met (``_meet_partner``), so the partner has published them and the wait
    is only for its words to be seen here: it ends when the block-wide count of unpublished values is 0. A
    row's value may be held by several threads (a tile split over warp groups along N replicates its
    rows), and the count sees one copy of each; so after the wait the values are read once more, after
    the barrier that orders the read after the copies that were seen published: by an atomic read (an
    ``or`` of 0, which leaves the word as it is), one per row, its result handed to the row's other
    holders. Not a volatile load: Triton 3.6 rematerializes a load in each layout its users take, and
    a volatile one stays even where unused, so that read became five loads, two of them 32 int64 a
    thread that nothing used: the register pressure that made the paired kernel spill 72 B on 3.6.
    """
    theirs = sumsq_ptr + (pair * 2 + 1 - half) * T + rows
    other = tl.load(theirs, mask=row_ok, other=_ONE_AND_ZERO, volatile=True)
    while tl.sum((other < 0).to(tl.int32), axis=0) > 0:
        other = tl.load(theirs, mask=row_ok, other=_ONE_AND_ZERO, volatile=True)
    return _reread_sumsq(theirs, row_ok)


@triton.jit
def _poll_sumsq(sumsq_ptr, pair, half, rows, row_ok, T, SPINS: tl.constexpr):
    """The other half's ``(c, sumsq)`` (``[BM]`` each) and whether it has published them all: looked for
    ``SPINS + 1`` times at most, so a half never waits for a partner that is not running (the count is
    block-wide: every warp takes the same way). Where not all were found, the values are not to be used."""
    theirs = sumsq_ptr + (pair * 2 + 1 - half) * T + rows
    other = tl.load(theirs, mask=row_ok, other=_ONE_AND_ZERO, volatile=True)
    missing = tl.sum((other < 0).to(tl.int32), axis=0)
    spins = 0
    while (missing > 0) & (spins < SPINS):
        other = tl.load(theirs, mask=row_ok, other=_ONE_AND_ZERO, volatile=True)
        missing = tl.sum((other < 0).to(tl.int32), axis=0)
        spins += 1
    c, sumsq = _reread_sumsq(theirs, row_ok)
    return c, sumsq, missing == 0


@triton.jit
def _reread_sumsq(theirs, row_ok):
    """The published words at ``theirs [BM]``, read once more after a barrier (``_await_sumsq``), unpacked."""
    tl.debug_barrier()
    other = tl.atomic_or(theirs, 0, mask=row_ok, sem="relaxed", scope="gpu")
    other = tl.where(row_ok, other, _ONE_AND_ZERO)  # a masked atomic returns nothing defined
    return (other >> 32).to(tl.int32).to(tl.float32, bitcast=True), other.to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _park_slot(park_ptr, H: tl.constexpr, BLOCK_M: tl.constexpr, HALF: tl.constexpr, half):
    """The parking slot ``[BLOCK_M, HALF]`` fp32 of half ``half`` of this program's pair (M-tile, head)."""
    pair = tl.program_id(0).to(tl.int64) * H + tl.program_id(1).to(tl.int64) // 2
    return park_ptr + (pair * 2 + half) * BLOCK_M * HALF


@triton.jit
def _park(park_ptr, qp, row_ok):
    """Store a half's values ``qp [BM, HALF]`` fp32 at its parking slot ``park_ptr`` (rows of HALF)."""
    HALF: tl.constexpr = qp.shape[1]
    slot = park_ptr + tl.arange(0, qp.shape[0])[:, None] * HALF + tl.arange(0, HALF)[None, :]
    tl.store(slot, qp, mask=row_ok[:, None])


@triton.jit
def _meet_partner(state_ptr, park_ptr, qp, row_ok, SPINS: tl.constexpr):
    """Meet the other half of the pair at its arrival word (after both published their sums): ``1``,
    finish this half; ``2``, finish both (the partner parked its values in its slot and left); ``0``,
    this half's values ``qp [BM, HALF]`` are parked in its slot, ``park_ptr``, for the partner to finish.

    The word (reset to -1 by the rows kernel): -1 nobody, 1 one half waits, 2 both came, 3 the first
    parked and left. The first to arrive waits for 2 for at most ``SPINS`` reads; still alone, it parks
    and hands over (1 -> 3), unless the partner came in between. So no program waits for one that is
    not resident (kernels of other streams, MPS or green contexts holding SMs): the pair then takes
    longer, never forever. Either way each half is normalized by the same operations on the same
    values (the published sums, ``head_rms``): the same bits whoever finishes it.
    """
    # the words as int64 scalars: the interpreter's atomic_cas stores a value of the type it is given
    nobody = tl.full((), -1, tl.int64)
    waits = tl.full((), 1, tl.int64)
    both = tl.full((), 2, tl.int64)
    parked = tl.full((), 3, tl.int64)
    tl.debug_barrier()  # every thread's sums are published before the arrival says so
    old = tl.atomic_cas(state_ptr, nobody, waits, sem="acq_rel", scope="gpu")
    mode = 1
    if old == nobody:  # first: wait for the partner, for a while
        # read by a scalar atomic (an or of 0): one thread reads, the block gets its value, so every
        # warp leaves the wait on the same read (a load per warp could see the partner's 2 in one warp
        # and not yet in another at the last read, and send the warps down different ways)
        zero = tl.full((), 0, tl.int64)
        seen = tl.atomic_or(state_ptr, zero, sem="acquire", scope="gpu")
        spins = 0
        while (seen == waits) & (spins < SPINS):
            seen = tl.atomic_or(state_ptr, zero, sem="acquire", scope="gpu")
            spins += 1
        if seen == waits:
            _park(park_ptr, qp, row_ok)
            tl.debug_barrier()  # the values are stored before the hand-over says so
            if tl.atomic_cas(state_ptr, waits, parked, sem="acq_rel", scope="gpu") == waits:
                mode = 0
    elif old == waits:  # the partner waits: tell it, unless it has just parked
        if tl.atomic_cas(state_ptr, waits, both, sem="acq_rel", scope="gpu") == parked:
            mode = 2
    elif old == parked:
        mode = 2
    return mode


@triton.jit
def _finish_half(q_ptr, qp, c, sumsq, c_other, sumsq_other, half, rows, row_ok, col0, cos, sin, eps,
                 H: tl.constexpr, HD: tl.constexpr, R: tl.constexpr):  # fmt: skip
    """Store half ``half`` of a head, ``qp [BM, HD/2]`` fp32 with its ``(c, sumsq)``, normalized with the
    other half's: ``head_rms`` adds half 0's sums first in both programs of a pair (the same bits), then
    ``store_q_half`` (half 1 with the RoPE of the head's last ``R`` columns at ``cos``, ``sin``: the
    caller's ``rope_rows``, masked off for half 0)."""
    first = half == 0
    scale, inv = head_rms(
        tl.where(first, c, c_other), tl.where(first, sumsq, sumsq_other),
        tl.where(first, c_other, c), tl.where(first, sumsq_other, sumsq), HD, eps,
    )  # fmt: skip
    qn = (qp * scale) * inv
    if half == 0:
        store_q_half(q_ptr, qn, rows, row_ok, col0, cos, sin, H, HD, R, False)
    else:
        store_q_half(q_ptr, qn, rows, row_ok, col0, cos, sin, H, HD, R, True)


@triton.jit
def _store_parked_half(q_ptr, park_ptr, sumsq_ptr, T, eps, positions_ptr, cos_ptr, sin_ptr, H: tl.constexpr,
                       HD: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr, HALF_IDX: tl.constexpr):  # fmt: skip
    """Half ``HALF_IDX`` of this program's head, parked (``[BM, HD/2]`` fp32 at its slot of ``park_ptr``),
    finished as its own program finishes a half: ``head_rms`` of the two published words (the same
    bits as the values they were packed from), ``(qp * scale) * inv``, the bf16 store (half 1 with the
    RoPE of the head's last ``R`` columns). Element by element the operations of ``store_q_half``, ``R``
    columns at a time, from the program ids and the kernel's arguments alone."""
    HALF: tl.constexpr = HD // 2
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    head = tl.program_id(1).to(tl.int64) // 2
    c0, sumsq0 = _await_sumsq(sumsq_ptr, head, 1, rows, row_ok, T)  # both published: no wait
    c1, sumsq1 = _await_sumsq(sumsq_ptr, head, 0, rows, row_ok, T)
    scale, inv = head_rms(c0, sumsq0, c1, sumsq1, HD, eps)
    slot = _park_slot(park_ptr, H, BLOCK_M, HALF, HALF_IDX)
    parked = slot + tl.arange(0, BLOCK_M)[:, None] * HALF + tl.arange(0, R)[None, :]
    out = q_ptr + rows[:, None] * (H * HD) + head * HD + HALF_IDX * HALF + tl.arange(0, R)[None, :]
    if HALF_IDX == 1:
        cos, sin = rope_rows(positions_ptr, cos_ptr, sin_ptr, rows, row_ok, R)
    for c in tl.range(0, HALF, R, num_stages=1):  # a fallback: no pipelining, fewest registers
        qn = (tl.load(parked + c, mask=row_ok[:, None], other=0.0, cache_modifier=".cg") * scale) * inv
        if HALF_IDX == 1 and c == HALF - R:  # the head's last R columns: the RoPE ones
            store_rope_bf16(out + c, qn, cos, sin, row_ok[:, None], R, R)
        else:
            tl.store(out + c, to_bf16(qn), mask=row_ok[:, None])


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
    sumsq_ptr,  # [pair_words(T, H)] int64: the halves' sums [H, 2, T], then the pairs' arrival words (PAIRED)
    park_ptr,  # [M-tiles * H * 2, BLOCK_M, HD/2] fp32: the halves' values, parked when a pair hands over (PAIRED)
    T,
    eps,
    QL: tl.constexpr,
    H: tl.constexpr,
    HD: tl.constexpr,
    R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PAIRED: tl.constexpr,  # program (M-tile, 2*head + half); else (M-tile, head) computing both halves
    RECOMPUTE: tl.constexpr,  # (PAIRED) program (half, M-tile, head); a half whose partner is late recomputes
    PDL: tl.constexpr,
    PREFETCH: tl.constexpr,  # ask L2 for this program's wq_b rows before the wait (first M-tile only)
    SPINS: tl.constexpr,  # reads of the arrival word before a first-arriving half parks (PAIRED), of the
    #                       partner's sums before a half computes them itself (RECOMPUTE)
):
    HALF: tl.constexpr = HD // 2
    mtile = tl.program_id(1 if RECOMPUTE else 0).to(tl.int64)
    rows = mtile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    if RECOMPUTE:  # the halves of a pair are neighbours in the grid, so they start together at any grid size
        head = tl.program_id(2).to(tl.int64)
        half = tl.program_id(0).to(tl.int64)
        col0 = head * HD + half * HALF
        width = HALF
    elif PAIRED:
        head = tl.program_id(1).to(tl.int64) // 2
        half = tl.program_id(1).to(tl.int64) % 2
        col0 = head * HD + half * HALF
        width = HALF
    else:
        col0 = tl.program_id(1).to(tl.int64) * HD
        width = HD
    if PREFETCH:  # noqa: SIM102 (wq_b depends on no earlier launch: it streams while the projection and rows run)
        if mtile == 0:
            prefetch_l2(wq_b_ptr, col0 * QL, (col0 + width) * QL)
    if PDL:
        gdc_wait()  # qr, qr_scale and the exchange buffer's reset are complete and visible
    qr_scale = tl.load(qr_scale_ptr + rows, mask=row_ok, other=0.0)[:, None]
    if RECOMPUTE:
        qp, c, sumsq = _half_head(qr_ptr, qr_scale, wq_b_ptr, wq_b_scale_ptr, rows, row_ok, col0, QL, HALF, BLOCK_K)
        _publish_sumsq(sumsq_ptr, head, half, c, sumsq, rows, row_ok, T)
        c_other, sumsq_other, found = _poll_sumsq(sumsq_ptr, head, half, rows, row_ok, T, SPINS)
        # each way finishes itself: a tile merged after the branch kept the first pass's values live across
        # the late partner's two loops, and the kernel spilled at sm_90
        if found:
            cos, sin = rope_rows(positions_ptr, cos_ptr, sin_ptr, rows, tl.where(half == 1, row_ok, False), R)
            _finish_half(q_ptr, qp, c, sumsq, c_other, sumsq_other, half, rows, row_ok, col0, cos, sin, eps, H, HD, R)
        else:  # the partner is not running yet: its sums, then this half's values again (the same bits)
            col_other = head * HD + (1 - half) * HALF
            _, c_other, sumsq_other = _half_head(qr_ptr, qr_scale, wq_b_ptr, wq_b_scale_ptr, rows, row_ok, col_other,
                                                 QL, HALF, BLOCK_K)  # fmt: skip
            qp, c, sumsq = _half_head(qr_ptr, qr_scale, wq_b_ptr, wq_b_scale_ptr, rows, row_ok, col0, QL, HALF,
                                      BLOCK_K)  # fmt: skip
            cos, sin = rope_rows(positions_ptr, cos_ptr, sin_ptr, rows, tl.where(half == 1, row_ok, False), R)
            _finish_half(q_ptr, qp, c, sumsq, c_other, sumsq_other, half, rows, row_ok, col0, cos, sin, eps, H, HD, R)
    elif PAIRED:
        qp, c, sumsq = _half_head(qr_ptr, qr_scale, wq_b_ptr, wq_b_scale_ptr, rows, row_ok, col0, QL, HALF, BLOCK_K)
        _publish_sumsq(sumsq_ptr, head, half, c, sumsq, rows, row_ok, T)
        mine = _park_slot(park_ptr, H, BLOCK_M, HALF, half)
        arrival = sumsq_ptr + 2 * H * T + tl.program_id(0).to(tl.int64) * H + head  # the pair's word
        mode = _meet_partner(arrival, mine, qp, row_ok, SPINS)
        if mode == 2:  # the partner parked: park this half too, then finish both from memory, in chunks
            _park(mine, qp, row_ok)
            tl.debug_barrier()  # the values are stored before they are read back
            _store_parked_half(q_ptr, park_ptr, sumsq_ptr, T, eps, positions_ptr, cos_ptr, sin_ptr,
                               H, HD, R, BLOCK_M, 0)  # fmt: skip
            _store_parked_half(q_ptr, park_ptr, sumsq_ptr, T, eps, positions_ptr, cos_ptr, sin_ptr,
                               H, HD, R, BLOCK_M, 1)  # fmt: skip
        elif mode == 1:  # the pair met: this half, from its registers
            # the rope half's cos/sin rows go out beside the partner's sums (asked for before the meeting,
            # they stayed live across its two ways and the kernel spilled at sm_90)
            cos, sin = rope_rows(positions_ptr, cos_ptr, sin_ptr, rows, tl.where(half == 1, row_ok, False), R)
            c_other, sumsq_other = _await_sumsq(sumsq_ptr, head, half, rows, row_ok, T)
            _finish_half(q_ptr, qp, c, sumsq, c_other, sumsq_other, half, rows, row_ok, col0, cos, sin, eps, H, HD, R)
    else:
        qp0, c0, sumsq0, qp1, c1, sumsq1 = _whole_head(
            qr_ptr, qr_scale, wq_b_ptr, wq_b_scale_ptr, rows, row_ok, col0, QL, HALF, BLOCK_K
        )
        store_q_head(q_ptr, qp0, c0, sumsq0, qp1, c1, sumsq1, rows, row_ok, col0, positions_ptr, cos_ptr, sin_ptr,
                     eps, H, HD, R)  # fmt: skip


def q_heads_tiles(
    t: int, h: int, sms: int, pair: bool = True, many_waves: bool = False, tokens: int = Q_BLOCK_M_PAIRED
) -> tuple[int, bool]:
    """``(BLOCK_M, paired)`` of the q heads on ``sms`` SMs: M-tiles of up to ``tokens`` (128) tokens and
    one program per half head when ``pair`` and either ``many_waves`` (the ``pair_waves`` "many" plan) or
    that grid fits one wave (every program resident, so the pairs can swap their sums); else tiles of up
    to 64 tokens, one program per head."""
    block_m = min(tokens, Q_BLOCK_M_PAIRED, max(Q_BLOCK_M_MIN, triton.next_power_of_2(t)))
    if pair and (many_waves or triton.cdiv(t, block_m) * 2 * h <= sms):
        return block_m, True
    return min(Q_BLOCK_M, block_m), False


def pair_words(t: int, h: int) -> int:
    """int64 words of the paired q heads' exchange buffer: ``[H, 2, T]`` halves' sums of squares, then
    ``T * H`` arrival words (pair ``(M-tile m, head)`` at ``m * H + head``). The rows kernel sets all to -1."""
    return 3 * h * t


def park_shape(t: int, h: int, hd: int, block_m: int) -> tuple[int, int, int]:
    """fp32 room for every half's values, ``(M-tiles * H * 2, BLOCK_M, HD/2)``: where a half that arrived
    first and could not wait leaves them for its partner, which then parks its own beside them and
    finishes both (``_meet_partner``)."""
    return (triton.cdiv(t, block_m) * h * 2, block_m, hd // 2)


def launch_q_heads(
    qr: torch.Tensor,
    qr_scale: torch.Tensor,
    w: AttnWeights,
    positions: torch.Tensor,
    rope: RopeTable,
    eps: float,
    q: torch.Tensor,
    sumsq: torch.Tensor,
    park: torch.Tensor,
    block_m: int,
    paired: bool,
    cfg: Config | None = None,
    spins: int | None = None,
) -> None:
    """Launch 3 into ``q [T, H, HD] bf16``. When ``paired``: ``sumsq`` ``[pair_words(T, H)]`` int64, every
    value -1 (the rows kernel leaves it so), and ``park`` fp32 of ``park_shape`` (not read by the
    ``pair_waves`` "many" plan); otherwise neither is read. ``cfg``: the launch parameters
    (``Q_HEADS_TUNING``; default: the lookup for this shape). ``spins``: reads of its pair's arrival word
    (of its partner's sums, "many") a first-arriving half makes before it parks (computes them itself)
    (default ``PAIR_SPINS``; 1 under the interpreter, which runs one program at a time, so no partner can
    come; 0: every half that arrives first does so: tests)."""
    t, ql = qr.shape
    h, hd = q.shape[1], q.shape[2]
    if cfg is None:
        cfg = Q_HEADS_TUNING.config(q.device, T=t, H=h, QL=ql)
    pdl = cfg.pdl and pdl_supported(q.device)
    block_k = max(Q_BLOCK_K_MIN, pow2_divisor(ql, cfg.block_k))
    prefetch = pdl and cfg.wq_b_prefetch == "q_heads" and can_prefetch(w.wq_b)
    if spins is None:
        spins = 1 if interpreted() else PAIR_SPINS
    recompute = paired and cfg.pair_waves == "many"
    m_tiles = triton.cdiv(t, block_m)
    grid = (2, m_tiles, h) if recompute else (m_tiles, 2 * h if paired else h)
    _q_heads_kernel[grid](
        qr, qr_scale, w.wq_b, w.wq_b_scale, positions, rope.cos, rope.sin, q, sumsq, park,
        t, eps,
        QL=ql, H=h, HD=hd, R=rope.rope_dim, BLOCK_M=block_m, BLOCK_K=block_k,
        PAIRED=paired, RECOMPUTE=recompute, PDL=pdl, PREFETCH=prefetch, SPINS=spins,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, launch_pdl=pdl, enable_fp_fusion=False,
    )  # fmt: skip


def check_dims(w: AttnWeights, rope_dim: int) -> None:
    """``ValueError`` naming the weight whose dims the kernels cannot take (``w``'s head dim ``HD`` with
    the RoPE table's ``rope_dim``, the q LoRA rank ``QL``, the projection's widths); the launcher's
    checks, which a module built on Triton also runs at build."""
    hd, ql = w.wkv.shape[0], w.wq_a.shape[0]
    r = rope_dim
    if not is_pow2(hd) or hd % (2 * r) or not is_pow2(hd // r):
        raise ValueError(
            f"w.wkv: the Triton backend needs a head dim that is a power of two and a power-of-two multiple "
            f"of twice the rope dim (a tile holds half a head), got HD={hd}, R={r}"
        )
    if pow2_divisor(ql, Q_BLOCK_K_MAX) < Q_BLOCK_K_MIN:
        raise ValueError(
            f"w.wq_a: the Triton backend needs a q LoRA rank that is a multiple of {Q_BLOCK_K_MIN}, got {ql}"
        )
    check_widths(ql, hd)


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
    check_dims(w, r)
    dev = x.device

    if out is None:
        out = QKV(
            q=torch.empty(t, h, hd, dtype=torch.bfloat16, device=dev),
            kv=torch.empty(t, hd, dtype=torch.bfloat16, device=dev),
            qr=torch.empty(t, ql, dtype=torch.int8, device=dev),
            qr_scale=torch.empty(t, 1, dtype=torch.float32, device=dev),
        )
    q, kv, qr, qr_scale = out
    rows_cfg = ROWS_TUNING.config(dev, T=t, QL=ql, HD=hd)
    q_cfg = Q_HEADS_TUNING.config(dev, T=t, H=h, QL=ql)
    many = q_cfg.pair_waves == "many"
    sliced = q_cfg.splits > 1  # QL over programs, then a launch that finishes each head: no pairs
    block_m, paired = q_heads_tiles(t, h, sm_count(dev), q_cfg.paired and not sliced, many, q_cfg.tokens)
    # the interpreter runs one program at a time: no pair could swap, and only "many" finishes without it
    paired = paired and (many or not interpreted())
    sumsq = scratch(ws, "qkv.sumsq", (pair_words(t, h) if paired else 1,), torch.int64, dev)
    parks = paired and not many
    park = scratch(ws, "qkv.park", park_shape(t, h, hd, block_m) if parks else (1,), torch.float32, dev)
    pdl = rows_cfg.pdl and pdl_supported(dev)

    prefetch = w.wq_b if q_cfg.wq_b_prefetch == "projection" else None
    partial = split_k_projection(x, w.wq_a, w.wkv, ws, pdl, prefetch)
    _qr_kv_rows_kernel[(t, 2)](
        partial, w.gamma_cq, w.gamma_ckv, positions, rope.cos, rope.sin, qr, qr_scale, kv, sumsq,
        t, eps,
        QL=ql, HD=hd, R=r, BLOCK_QL=triton.next_power_of_2(ql), SPLITS=partial.shape[0],
        PAIRED=paired, PAIR_SLOTS=3 * h, PAIR_BLOCK=triton.next_power_of_2(3 * h),
        PDL=pdl, num_warps=rows_cfg.num_warps, launch_pdl=pdl, enable_fp_fusion=False,
    )  # fmt: skip
    if sliced:
        block_k = max(Q_BLOCK_K_MIN, pow2_divisor(ql, q_cfg.block_k))
        launch_q_heads_split(qr, qr_scale, w, positions, rope, eps, q, block_m, block_k, q_cfg, ws)
    else:
        launch_q_heads(qr, qr_scale, w, positions, rope, eps, q, sumsq, park, block_m, paired, q_cfg)
    return out

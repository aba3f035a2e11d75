"""Sparse attention with sink over the paged FP8 KV pools (attention spec §5), for the three kinds.

**Programs.** One program per (slot ``b``, token block, head block, key split): a token block is
``TOKENS`` consecutive tokens of the step (one by default; a decode step's two tokens together with
the ``tokens`` tuning choice), a head block ``HEADS`` heads (32 by default). One token a program reads
fewer key bytes than a pair at the same M: a CSA token's top-k rows are its own, so a pair's programs
read both tokens' lists; the window and HCA's rows are read as often either way. The more heads a
program holds, the fewer times each key row is read (64 heads: once a token), and the larger its
accumulator. With fewer heads
than 16 (the ``tiny`` preset) the rows a head block would pad hold more of the step's tokens. Its
``M = TOKENS * HEADS`` (token, head) rows are the M side of every ``tl.dot``: each key tile
``[KEYS, HD]`` (one MQA head for all heads, value = key) is read once for all of them, dequantized
on chip to bf16 and used for both products, ``z = q @ k^T`` and ``acc += bf16(e) @ k``; a row whose
token does not see a key gets ``e = 0`` for it (the mask is per token). The queries are loaded once
and stay in registers as ``[HD / 64, M, 64]``: ``z`` is a dot batched over the 64-column chunks of
``HD``, summed over the chunks, so each warp holds one chunk of ``q`` rather than every warp all of it.

**Keys**, in this order (the online softmax's order):

1. the window, in tiles aligned to absolute positions (``u // KEYS``) from the first token's
   ``max(0, p - W + 1)`` to the last token's ``p``: rows below ``start_pos[b]`` from the window pool
   through its block table, this call's rows from ``kv`` round-tripped through ``fp8_row`` in
   registers (``quant_e4m3``/``dequant_e4m3``, bit for bit what ``window_kv_write`` stores). A
   token's tiles and their contents depend on its position only, not on the step's start, so a
   step of S tokens gives each token the bits of S one-token steps.
2. the compressed rows: HCA, every row ``j < vis(p)`` in tiles of ``KEYS`` rows; CSA, each token's
   ``topk_idxs`` list in tiles of ``KEYS`` entries (an entry adds row ``e - topk_offset`` when
   ``e >= 0`` and that row is ``< vis(p)``, repeats counted), token after token (the other token's
   rows masked: its list is its own).

**One round of loads a tile.** A tile's rows come through up to three dependent loads: a CSA list's
entries, the block table, the rows. A program's walk is a chain of tiles, so each loop looks its next
tiles up an iteration ahead (the window's and HCA's slots one tile ahead; a list's slots one tile and
its entries two tiles ahead, carried in registers): no load of an iteration needs the value of another
of its loads, and a tile waits for one round of memory latency, its rows, while the next tiles' lookups
are in flight. The bits are those of looking each tile up in place.

A pool row is ``codes * 2^e`` per 64 (``dequant_e4m3``; scale byte 255: a NaN block) and its bf16
rope tail, one ``[KEYS, HD]`` tile (``HD`` a power of two: the tail fills the last ``R`` columns).

**Numerics** (spec §5): ``z = (q . k) * HD^-0.5`` (fp32 accumulate); a running max ``m`` per row;
``e = exp(z - m)`` enters the PV product rounded to bf16, ``l`` sums the unrounded ``e``; tiles
rescale both by ``exp(m_old - m_new)``. A tile no row of a token sees leaves that row's state
bit-identical. ``o1 = bf16(acc / (l + exp(sink - m)))``, then the inverse RoPE of the last ``R``
entries at ``p`` (fp32, ``epilogue.store_rope_bf16`` with ``-sin``) and the bf16 store. The running
max against the reference's global max moves ``o`` within §8's rule.

**Non-finite values** follow the formulas, as the reference: ``z`` takes the keys as they are (a NaN
gives NaN, an infinity ``+-inf`` or NaN; a row's ``z`` of a key it does not see is replaced by
``-inf``), so a ``z`` of NaN or ``+inf`` makes the row's ``l`` NaN. The PV product takes the keys with
their non-finite entries zeroed (``e = 0`` of a row that does not see a key would otherwise make
``0 * inf`` NaN there), and a tile holding such a key (rare: a branch) then sets NaN in the columns
where a row sees a non-finite entry: ``bf16(e) * inf`` is NaN for ``e = 0`` (``z = -inf``), the only
finite ``e`` a key with an infinity can give. A live row always sees its own key; one whose every
``z`` is ``-inf`` has ``m = -inf`` and gives NaN, as ``exp(-inf - -inf)`` does in the reference.

**Split** (``splits > 1``: HCA at long context, few slots): of a token's ``n`` compressed tiles
(HCA: its visible rows; CSA: its list), split ``i`` takes ``[i * n // splits, (i + 1) * n //
splits)``: its own share, whatever other tokens share its program (where they do, the program walks
the union of their ranges and masks each row to its own); the window goes to split 0. Each writes
its partial ``(m, l, acc)`` to scratch; a second launch combines the splits in order (``m = max
m_i``, ``l = sum l_i exp(m_i - m)``, ``acc`` alike), deterministic, then runs the same epilogue. By
default (``key_splits``) the launcher splits when the launch's programs leave SMs idle and the keys
are many: B=1 HCA at 1M tokens runs 32 splits (128 programs a decode step instead of 4), flash
decode at B=64 and prefill none. Without a split: one launch.

**Launch.** The grid ``(B * ceil(S / TOKENS) * ceil(H / HEADS), 1, splits)`` depends on shapes only,
the key loop bounds on ``start_pos`` read in the kernel: no host sync, a CUDA graph can capture it.
Program ids run over head blocks first, then token blocks, then slots (``_program_rows``): the GPU
hands out blocks in id order (in practice), so the programs that share a slot's key rows (its
tokens' head blocks) run side by side and read the rows from HBM once, whatever the batch; ordered
by head block last, the re-reads of a row would be a wave of programs apart, and served by L2 only
while a wave's rows (every slot's) fit in it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ..model.attention_state import KVPool
from ..model.fp8_row import ROW_BLOCK, SCALE_BYTES
from ..model.rope import RopeTable
from ..model.structs import AttnOut, StepPositions
from .epilogue import round_bf16, store_rope_bf16, to_bf16
from .fp8_quant import SCALE_BIAS, byte_exponent, dequant_e4m3, quant_e4m3
from .launch import is_pow2, pdl_supported, require, sm_count
from .split_k import BF16_DOT_DTYPE
from .tuning import Param, Tunable
from .window_kv_write import store_window_rows
from .workspace import Workspace, scratch

TOKENS_PER_BLOCK = 1  # tokens per program: a CSA token's top-k rows are its own, so a token pair reads both lists
#                      for every head block; one token with twice the heads reads each list half as often
#                      (and the window and HCA rows as often as a pair): as many programs, fewer key bytes
HEADS = 32  # heads per program: M = 1 x 32 rows, each key row read by 2 programs a token; the fp32 acc [32, 512]
#            64 registers a thread at 8 warps (64 heads, each row read once a token: 128, and spills at sm_90)
QK_CHUNK = 64  # columns of q each warp holds for z = q k^T, a batched dot over HD / 64 chunks: one warp a chunk
#               instead of every warp all of q ([16, 512] bf16 replicated on the key axis: 128 registers)
KEYS = 16  # keys per tile: 16 x 584 B of FP8 rows read, a [16, 512] bf16 operand tile
NUM_WARPS = 8  # the [M, HD] accumulator spread over two warpgroups
NUM_STAGES = 1  # software pipelining of the key loads: 2 stages fit at sm_90 (255 registers), a tuning candidate
MAX_SPLITS = 32  # key splits the launcher picks at most: B=1 HCA at 1M tokens (8192 rows) in 32 x 256 rows,
#                 128 programs a decode step (2 tokens x 2 head blocks x 32)
SPLIT_MIN_TILES = 16  # compressed tiles a split takes at least: 256 rows (150 KB of FP8 rows) against its
#                      partial's 64 KB written and read again (M = 32 rows of HD = 512 fp32)
MIN_DOT_WIDTH = 16  # tl.dot needs every dimension >= 16: fewer (token, head) rows are padded up to it

KIND_SWA, KIND_CSA, KIND_HCA = 0, 1, 2
_KINDS = {"swa": KIND_SWA, "csa": KIND_CSA, "hca": KIND_HCA}
_SWA = tl.constexpr(KIND_SWA)
_CSA = tl.constexpr(KIND_CSA)
_HCA = tl.constexpr(KIND_HCA)
_ROW_BLOCK = tl.constexpr(ROW_BLOCK)
_QK_CHUNK = tl.constexpr(QK_CHUNK)
_SCALE_BYTES = tl.constexpr(SCALE_BYTES)

TUNING = Tunable(
    "sparse_attn",
    "_attn_kernel (+ _combine_kernel with splits): every (slot, token block, head block, key split)",
    dims=("B", "S", "H", "KEYS"),  # KEYS: compressed keys a token may walk (CSA's list, HCA's table; SWA 0)
    pow2_dims=("B", "S", "H", "KEYS"),
    params=(
        Param("tokens", TOKENS_PER_BLOCK, (1, 2), "tokens of a step per program (2: a pair shares window tiles)"),
        Param("heads", HEADS, (8, 16, 32, 64), "heads per program (the MMA's M is tokens x heads)"),
        Param("key_tile", KEYS, (16, 32, 64), "keys per tile"),
        Param("num_stages", NUM_STAGES, (1, 2, 3), "pipeline stages of the key loads", compiled_only=True),
        Param("splits", None, (None, 1, 2, 4, 8, 16, 32), "splits of the compressed keys in order; null: key_splits"),
        Param("num_warps", NUM_WARPS, (4, 8), "warps per program", compiled_only=True),
        Param("pdl", True, (False, True), "programmatic dependent launch (sm_90)", exact=True, compiled_only=True),
    ),
    candidates=(
        {"splits": 1},
        {"splits": 2},
        {"splits": 8},  # small batches: more, shorter walks than SPLIT_MIN_TILES allows by default
        {"heads": 16},  # twice the programs (4 a token), each with half the rows: more SMs busy at small B
        {"tokens": 2, "heads": 16},
        {"heads": 16, "key_tile": 32},  # half the tiles a walk (32 rows spill)
        {"heads": 64},  # a token's every head (M = 64, wgmma): each key row read once a token; spills at sm_90
        {"num_stages": 2},  # the next tile's gathers in flight during this one's products
        {"num_stages": 3},  # a list tile's three dependent loads (entry, block, row) each a stage ahead
        {"heads": 16, "num_stages": 2},
        {"heads": 16, "num_warps": 4},  # two programs an SM (32 heads spill at 4 warps)
        {"pdl": False},
    ),
)


@triton.jit
def _program_rows(S, H, TOKENS: tl.constexpr, HEADS: tl.constexpr):
    """This program's slot ``b``, first token ``s0`` and first head ``h0``. The head blocks of a token
    block are consecutive program ids, then the token blocks of a slot: the programs that read the
    same key rows are dispatched together, so the rows come from HBM once and from L2 for the others."""
    head_blocks = tl.cdiv(H, HEADS)
    token_block = tl.program_id(0) // head_blocks
    token_blocks = tl.cdiv(S, TOKENS)
    return token_block // token_blocks, (token_block % token_blocks) * TOKENS, (tl.program_id(0) % head_blocks) * HEADS


@triton.jit
def _pool_slots(table_ptr, width, b, rows, present, BS: tl.constexpr):
    """The pool slots (``block * BS + row % BS``, int64) of rows ``rows [KEYS]`` of slot ``b`` through its
    block table (``present``: rows to look up; the others 0)."""
    block = tl.load(table_ptr + b * width + rows // BS, mask=present, other=0).to(tl.int64)
    return block * BS + rows % BS


@triton.jit
def _pool_rows(codes_ptr, scale_ptr, rope_ptr, slot, present, HD: tl.constexpr, NOPE: tl.constexpr, R: tl.constexpr):
    """``deq`` of the pool rows at ``slot [KEYS]`` (``present``: rows to read) -> ``[KEYS, HD]`` in the
    dots' dtype (bf16; fp32 under the interpreter), absent rows 0: e4m3 codes times ``2^e`` per 64 (bf16
    values for every ``e >= -124``; the pools' writers give ``e >= -22``), then the bf16 tail."""
    KEYS: tl.constexpr = slot.shape[0]
    NBLK: tl.constexpr = HD // _ROW_BLOCK
    col = tl.arange(0, HD)
    is_nope = col < NOPE
    codes = tl.load(codes_ptr + slot[:, None] * NOPE + col[None, :], mask=present[:, None] & is_nope[None, :], other=0)
    # The row's 8 scale bytes in one load; byte i is block i's (those past NOPE/64 are 0: the tail's
    # block, whose dequantized values are not used). Fewer blocks than bytes (HD < 512): the first NBLK.
    byte = tl.arange(0, _SCALE_BYTES)
    e8 = tl.load(scale_ptr + slot[:, None] * _SCALE_BYTES + byte[None, :], mask=present[:, None], other=SCALE_BIAS)
    first = (byte // NBLK == 0).to(tl.int32)
    e = tl.sum(tl.reshape(byte_exponent(e8) * first[None, :], [KEYS, _SCALE_BYTES // NBLK, NBLK]), axis=1)
    deq = dequant_e4m3(tl.reshape(codes, [KEYS * NBLK, _ROW_BLOCK]), tl.reshape(e, [KEYS * NBLK]))
    tail_ok = present[:, None] & ~is_nope[None, :]
    tail = tl.load(rope_ptr + slot[:, None] * R + (col - NOPE)[None, :], mask=tail_ok, other=0.0)
    return tl.where(is_nope[None, :], tl.reshape(deq, [KEYS, HD]).to(BF16_DOT_DTYPE), tail.to(BF16_DOT_DTYPE))


@triton.jit
def _own_rows(kv_ptr, tok, present, HD: tl.constexpr, NOPE: tl.constexpr):
    """``deq(fp8_row(kv[tok]))`` of this call's rows ``tok [KEYS]`` (flat token indices) -> ``[KEYS, HD]``
    as ``_pool_rows`` (absent rows 0): the values ``window_kv_write`` stores for them."""
    KEYS: tl.constexpr = tok.shape[0]
    NBLK: tl.constexpr = HD // _ROW_BLOCK
    col = tl.arange(0, HD)
    x = tl.load(kv_ptr + tok.to(tl.int64)[:, None] * HD + col[None, :], mask=present[:, None], other=0.0)
    x = x.to(tl.float32)
    codes, e = quant_e4m3(tl.reshape(x, [KEYS * NBLK, _ROW_BLOCK]))
    rt = tl.reshape(dequant_e4m3(codes, e), [KEYS, HD])
    return tl.where((col < NOPE)[None, :], rt, x).to(BF16_DOT_DTYPE)


@triton.jit
def _list_tile(topk_ptr, b, s, S, K, c, c_hi, topk_offset, vis, KEYS: tl.constexpr):
    """Tile ``c`` of token ``s``'s top-k list (none past tile ``c_hi``): ``(rows [KEYS], valid [KEYS])``,
    row ``e - topk_offset`` of each entry ``e >= 0`` whose row is ``< vis`` (invalid entries: row 0)."""
    entry = c * KEYS + tl.arange(0, KEYS)
    listed = (entry < K) & (entry * 0 + s < S) & (entry * 0 + c < c_hi)
    e = tl.load(topk_ptr + ((b * S + s) * K).to(tl.int64) + entry, mask=listed, other=-1)
    j = e - topk_offset
    valid = (e >= 0) & (j >= 0) & (j < vis)
    return tl.where(valid, j, 0), valid


@triton.jit
def _attend(q, k, seen, m, l, acc, sm_scale):
    """One key tile into the online softmax of the rows: ``q [HD / C, M, C]`` bf16 (``C = QK_CHUNK``),
    ``k [KEYS, HD]`` bf16 (fp32 under the interpreter), ``seen [M, KEYS]`` (row sees key); state ``m``,
    ``l`` ``[M]``, ``acc [M, HD]`` fp32."""
    KEYS: tl.constexpr = k.shape[0]
    finite = tl.abs(k) < float("inf")
    kb = tl.where(finite, k, 0.0).to(BF16_DOT_DTYPE)
    # z: one [M, C] x [C, KEYS] product a chunk of HD (a warp each), fp32, summed over the chunks
    k_chunks = tl.permute(tl.reshape(k.to(BF16_DOT_DTYPE), [KEYS, q.shape[0], q.shape[2]]), 1, 2, 0)
    z = tl.sum(tl.dot(q.to(BF16_DOT_DTYPE), k_chunks), axis=0) * sm_scale
    z = tl.where(seen, z, float("-inf"))  # a key the row does not see weighs exp(-inf) = 0
    m_new = tl.maximum(m, tl.max(z, axis=1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key seen yet: nothing to rescale
    alpha = tl.exp(m - m_ref)
    e = tl.exp(z - m_ref[:, None])
    l = l * alpha + tl.sum(e, axis=1)
    acc = acc * alpha[:, None] + tl.dot(to_bf16(e).to(BF16_DOT_DTYPE), kb)
    if tl.max(tl.sum((~finite).to(tl.int32), axis=1), axis=0) > 0:  # a non-finite key entry: 0 * inf
        hits = tl.dot(seen.to(BF16_DOT_DTYPE), (~finite).to(BF16_DOT_DTYPE))  # [M, HD] seen entries
        acc = tl.where(hits > 0, float("nan"), acc)
    return m_new, l, acc


@triton.jit
def _saw_keys(m, l):
    """Rows of a split's partial that saw a key: ``m > -inf``, or an ``l`` other than ``+0.0``: NaN (a
    NaN score the max dropped) or ``-0.0``, which marks a row whose keys all scored ``-inf`` and whose
    ``acc`` holds NaN columns (``0 * inf``)."""
    return (m > float("-inf")) | (l.to(tl.int32, bitcast=True) != 0)


@triton.jit
def _finish(o_ptr, sink_ptr, cos_ptr, sin_ptr, m, l, acc, start, b, s0, h0, S, H,
            HEADS: tl.constexpr, TOKENS: tl.constexpr, HD: tl.constexpr, R: tl.constexpr):  # fmt: skip
    """The epilogue: ``o1 = bf16(acc / (l + exp(sink - m)))``, the inverse RoPE of its last ``R``
    entries at each row's position, the bf16 store into ``o [B, S, H, HD]``."""
    M: tl.constexpr = TOKENS * HEADS
    r = tl.arange(0, M)
    s = s0 + r // HEADS
    h = h0 + r % HEADS
    live = (s < S) & (h < H) & (r // HEADS < TOKENS)
    # a row that saw no key (m = -inf: the rows past S or H) is taken against m = 0 and, past S or H,
    # sink = 0, so nothing computes -inf - -inf; its acc is 0, so its o1 is 0 either way. A live row
    # sees its own key: m = -inf there is every z -inf, NaN by the formula (exp(-inf - -inf))
    sink = tl.load(sink_ptr + h, mask=live, other=0.0)
    den = l + tl.exp(sink - tl.where(m == float("-inf"), 0.0, m))
    den = tl.where(live & (m == float("-inf")), float("nan"), den)
    o1 = round_bf16(tl.div_rn(acc, den[:, None]))
    half = tl.arange(0, R // 2)
    p = (start + s).to(tl.int64)
    cos = tl.load(cos_ptr + p[:, None] * (R // 2) + half[None, :], mask=live[:, None], other=1.0)
    sin = tl.load(sin_ptr + p[:, None] * (R // 2) + half[None, :], mask=live[:, None], other=0.0)
    col = tl.arange(0, HD)
    row = ((b * S + s).to(tl.int64) * H + h) * HD
    store_rope_bf16(o_ptr + row[:, None] + col[None, :], o1, cos, -sin, live[:, None], HD, R)


# A block table's width is the caller's cache size: not specialized on (== 1, divisible by 16), one variant
# serves every width (its loads are gathers either way).
@triton.jit(do_not_specialize=["win_width", "cmp_width"])
def _attn_kernel(
    q_ptr,  # [B, S, H, HD] bf16
    kv_ptr,  # [B, S, HD] bf16: this call's rows
    start_ptr,  # [B] int64
    sink_ptr,  # [H] fp32
    cos_ptr,  # [max_position, R/2] fp32
    sin_ptr,
    win_codes_ptr,  # window pool: [NB, bs, NOPE] e4m3 bits (uint8), [NB, bs, 8] uint8, [NB, bs, R] bf16
    win_scale_ptr,
    win_rope_ptr,
    win_table_ptr,  # [>= B, win_width] int32
    win_width,
    cmp_codes_ptr,  # compressed pool (CSA, HCA; the window pool's tensors for SWA: never read)
    cmp_scale_ptr,
    cmp_rope_ptr,
    cmp_table_ptr,
    cmp_width,
    topk_ptr,  # [B, S, K] int32 (CSA)
    K,
    topk_offset,
    o_ptr,  # out [B, S, H, HD] bf16 (SPLITS == 1)
    part_m_ptr,  # out [SPLITS, B*S*H] fp32 (SPLITS > 1)
    part_l_ptr,  # out [SPLITS, B*S*H] fp32
    part_acc_ptr,  # out [SPLITS, B*S*H, HD] fp32
    S,
    H,
    window,
    ratio,
    sm_scale,
    KIND: tl.constexpr,
    HEADS: tl.constexpr,
    TOKENS: tl.constexpr,
    KEYS: tl.constexpr,
    SPLITS: tl.constexpr,
    HD: tl.constexpr,
    NOPE: tl.constexpr,
    R: tl.constexpr,
    WIN_BS: tl.constexpr,
    CMP_BS: tl.constexpr,
    WRITE: tl.constexpr,  # also store the step's window rows (sparse_attn_write)
    PDL: tl.constexpr,
):
    M: tl.constexpr = TOKENS * HEADS
    b, s0, h0 = _program_rows(S, H, TOKENS, HEADS)
    split = tl.program_id(2)
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    start = tl.load(start_ptr + b)
    s_last = tl.minimum(s0 + TOKENS, S) - 1  # the block's last token
    # sparse_attn_write: one program a slot stores the step's last min(S, W) window rows, first; no program
    # of the launch reads a pool row at or above start (this call's rows come from kv)
    if WRITE:  # noqa: SIM102 (a compile-time branch around a run-time one)
        if (s0 == 0) & (h0 == 0) & (split == 0):
            for t in tl.range(tl.maximum(S - window, 0), S, KEYS):
                store_window_rows(kv_ptr, b, t + tl.arange(0, KEYS), S, start, win_table_ptr, win_width,
                                  win_codes_ptr, win_scale_ptr, win_rope_ptr, NOPE, R, HD, WIN_BS)  # fmt: skip

    r = tl.arange(0, M)
    r_tok = r // HEADS
    r_s = s0 + r_tok
    r_h = h0 + r % HEADS
    r_live = (r_s < S) & (r_h < H)
    r_p = start + r_s  # each row's position
    col = tl.arange(0, HD)
    q_rows = ((b * S + r_s).to(tl.int64) * H + r_h) * HD
    ch = tl.arange(0, HD // _QK_CHUNK)
    dd = tl.arange(0, _QK_CHUNK)
    q_cols = ch[:, None, None] * _QK_CHUNK + dd[None, None, :]
    q = tl.load(q_ptr + q_rows[None, :, None] + q_cols, mask=r_live[None, :, None], other=0.0)  # resident: one load

    m = tl.full([M], float("-inf"), tl.float32)
    l = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, HD], tl.float32)
    key = tl.arange(0, KEYS)

    # 1. the window (split 0): tiles aligned to absolute positions
    lo = tl.maximum(start + s0 - window + 1, 0)
    hi = start + s_last + 1
    t_hi = tl.where(split == 0, tl.cdiv(hi, KEYS), lo // KEYS)
    r_first = tl.maximum(r_p - window + 1, 0)
    # Each tile's pool slots are looked up one tile ahead (the table loads of tile t + 1 are in flight
    # while tile t is read and used), so a tile waits for one round of loads, its rows, not two.
    u = (lo // KEYS) * KEYS + key
    slot_next = _pool_slots(
        win_table_ptr, win_width, b, u, (u >= lo) & (u < start) & (u * 0 + lo // KEYS < t_hi), WIN_BS
    )
    for t in tl.range(lo // KEYS, t_hi):
        u = t * KEYS + key  # positions
        slot = slot_next
        u_next = u + KEYS
        ahead = (u_next >= lo) & (u_next < start) & (u_next * 0 + t + 1 < t_hi)
        slot_next = _pool_slots(win_table_ptr, win_width, b, u_next, ahead, WIN_BS)
        k = _pool_rows(win_codes_ptr, win_scale_ptr, win_rope_ptr, slot, (u >= lo) & (u < start), HD, NOPE, R)
        if t * KEYS + KEYS > start:  # the tile holds rows of this call
            own = (u >= start) & (u >= lo) & (u < hi)
            k = tl.where(own[:, None], _own_rows(kv_ptr, b * S + u - start, own, HD, NOPE), k)
        seen = (u[None, :] >= r_first[:, None]) & (u[None, :] <= r_p[:, None]) & r_live[:, None]
        m, l, acc = _attend(q, k, seen, m, l, acc, sm_scale)

    # 2. the compressed rows, this split's share: of a token's tiles (HCA: its visible rows; CSA: its
    # list), split i takes [i * n // SPLITS, (i + 1) * n // SPLITS). A row's range is its own token's, so
    # a token's tiles in a split are the same whatever tokens share the program (HCA: the program walks
    # the union of its tokens' ranges, each row masked to its own)
    if KIND != _SWA:
        r_vis = (r_p + 1) // ratio
        if KIND == _HCA:
            lo_t = split * tl.cdiv((start + s0 + 1) // ratio, KEYS) // SPLITS
            hi_t = (split + 1) * tl.cdiv((start + s_last + 1) // ratio, KEYS) // SPLITS
            r_tiles = tl.cdiv(r_vis, KEYS)
            rows_hi = (start + s_last + 1) // ratio  # the rows the program's last token sees
            j = lo_t * KEYS + key
            slot_next = _pool_slots(cmp_table_ptr, cmp_width, b, j, (j < rows_hi) & (j * 0 + lo_t < hi_t), CMP_BS)
            for c in tl.range(lo_t, hi_t):
                j = c * KEYS + key
                slot = slot_next  # looked up a tile ahead, as the window's
                j_next = j + KEYS
                slot_next = _pool_slots(
                    cmp_table_ptr, cmp_width, b, j_next, (j_next < rows_hi) & (j_next * 0 + c + 1 < hi_t), CMP_BS
                )
                r_in = r_live
                if SPLITS > 1:  # noqa: SIM102 (compile-time branches)
                    if TOKENS > 1:  # the program's tokens have ranges of their own (one split: all tiles)
                        r_in = r_in & (c >= split * r_tiles // SPLITS) & (c < (split + 1) * r_tiles // SPLITS)
                seen = (j[None, :] < r_vis[:, None]) & r_in[:, None]
                k = _pool_rows(cmp_codes_ptr, cmp_scale_ptr, cmp_rope_ptr, slot, j < rows_hi, HD, NOPE, R)
                m, l, acc = _attend(q, k, seen, m, l, acc, sm_scale)
        else:  # token after token, each its own list
            lo_t = split * tl.cdiv(K, KEYS) // SPLITS
            hi_t = (split + 1) * tl.cdiv(K, KEYS) // SPLITS
            for tok in tl.range(0, TOKENS):
                s = s0 + tok
                vis = (start + s + 1) // ratio
                # A list tile's three dependent loads (entries, block table, rows) are spread over three
                # iterations: tile c's rows are read while tile c + 1's slots and tile c + 2's entries
                # are looked up, so a tile waits for one round of loads, not three.
                j, valid = _list_tile(topk_ptr, b, s, S, K, lo_t, hi_t, topk_offset, vis, KEYS)
                slot_next = _pool_slots(cmp_table_ptr, cmp_width, b, j, valid, CMP_BS)
                valid_next = valid
                j_after, valid_after = _list_tile(topk_ptr, b, s, S, K, lo_t + 1, hi_t, topk_offset, vis, KEYS)
                for c in tl.range(lo_t, hi_t):
                    slot, valid = slot_next, valid_next
                    slot_next = _pool_slots(cmp_table_ptr, cmp_width, b, j_after, valid_after, CMP_BS)
                    valid_next = valid_after
                    j_after, valid_after = _list_tile(topk_ptr, b, s, S, K, c + 2, hi_t, topk_offset, vis, KEYS)
                    seen = valid[None, :] & (r_tok == tok)[:, None] & r_live[:, None]
                    k = _pool_rows(cmp_codes_ptr, cmp_scale_ptr, cmp_rope_ptr, slot, valid, HD, NOPE, R)
                    m, l, acc = _attend(q, k, seen, m, l, acc, sm_scale)

    if SPLITS == 1:
        _finish(o_ptr, sink_ptr, cos_ptr, sin_ptr, m, l, acc, start, b, s0, h0, S, H, HEADS, TOKENS, HD, R)
    else:
        rows = (b * S + r_s).to(tl.int64) * H + r_h
        slots = tl.num_programs(0) // (tl.cdiv(S, TOKENS) * tl.cdiv(H, HEADS))  # B
        part = split.to(tl.int64) * slots * S * H + rows
        tl.store(part_m_ptr + part, m, mask=r_live)
        # l = -0.0 marks a row whose keys here all scored -inf with NaN columns in its acc (0 * inf)
        nan_cols = tl.sum((acc != acc).to(tl.int32), axis=1) > 0
        # -0.0 from its bits: Triton 3.6 turns a -0.0 literal into +0.0 (compiled and interpreted alike)
        neg_zero = tl.full(l.shape, -2147483648, tl.int32).to(tl.float32, bitcast=True)
        l = tl.where(nan_cols & (m == float("-inf")), neg_zero, l)
        tl.store(part_l_ptr + part, l, mask=r_live)
        # a split in which no row saw a key (a history of fewer tiles than splits; never split 0, which
        # has the window) stores no acc: every row's is 0, and the combine reads only rows that saw keys.
        # (A branch: as a store mask, the HCA variant spilled 8 B on Triton 3.6.)
        if tl.max(_saw_keys(m, l).to(tl.int32), axis=0) > 0:
            tl.store(part_acc_ptr + part[:, None] * HD + col[None, :], acc, mask=r_live[:, None])


@triton.jit
def _combine_kernel(
    part_m_ptr, part_l_ptr, part_acc_ptr, start_ptr, sink_ptr, cos_ptr, sin_ptr, o_ptr, B, S, H,
    HEADS: tl.constexpr, TOKENS: tl.constexpr, SPLITS: tl.constexpr, HD: tl.constexpr, R: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    """The splits' partial ``(m, l, acc)`` of a program's rows combined in split order, then the epilogue."""
    M: tl.constexpr = TOKENS * HEADS
    b, s0, h0 = _program_rows(S, H, TOKENS, HEADS)
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    start = tl.load(start_ptr + b)  # asked for first: its round trip overlaps the splits' loads
    r = tl.arange(0, M)
    r_s = s0 + r // HEADS
    r_h = h0 + r % HEADS
    r_live = (r_s < S) & (r_h < H)
    rows = (b * S + r_s).to(tl.int64) * H + r_h
    col = tl.arange(0, HD)
    n = B * S * H
    m = tl.full([M], float("-inf"), tl.float32)
    for i in tl.static_range(SPLITS):
        m = tl.maximum(m, tl.load(part_m_ptr + i * n + rows, mask=r_live, other=float("-inf")))
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    l = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, HD], tl.float32)
    # a split's (m, l) are read an iteration ahead: its acc load, masked by them, waits for nothing else
    m_next = tl.load(part_m_ptr + rows, mask=r_live, other=float("-inf"))
    l_next = tl.load(part_l_ptr + rows, mask=r_live, other=0.0)
    for i in tl.range(SPLITS):
        m_i, l_i = m_next, l_next
        ahead = r_live & (rows * 0 + i + 1 < SPLITS)
        m_next = tl.load(part_m_ptr + (i + 1) * n + rows, mask=ahead, other=float("-inf"))
        l_next = tl.load(part_l_ptr + (i + 1) * n + rows, mask=ahead, other=0.0)
        w = tl.exp(m_i - m_ref)
        l += l_i * w
        saw = r_live & _saw_keys(m_i, l_i)  # the others' acc is 0 (and unstored where no row saw a key)
        a = tl.load(part_acc_ptr + (i * n + rows)[:, None] * HD + col[None, :], mask=saw[:, None], other=0.0)
        acc += a * w[:, None]
    _finish(o_ptr, sink_ptr, cos_ptr, sin_ptr, m, l, acc, start, b, s0, h0, S, H, HEADS, TOKENS, HD, R)


def key_splits(programs: int, key_tiles: int, sms: int) -> int:
    """The key splits of a launch of ``programs`` (slots x token blocks x head blocks) over
    ``key_tiles`` compressed tiles a token may read (HCA: the slot's pool capacity; CSA: its top-k
    list): as many as keep the split launch within one wave of ``sms`` (a power of two, at most
    ``MAX_SPLITS``) while each split keeps ``SPLIT_MIN_TILES`` tiles. From shapes only (a CUDA graph
    can capture it); the scratch holds at most one wave's partials (``sms`` programs of M rows)."""
    fill = max(1, sms // programs)
    by_keys = max(1, key_tiles // SPLIT_MIN_TILES)
    return 1 << (min(fill, by_keys, MAX_SPLITS).bit_length() - 1)


def sparse_attn(
    q: torch.Tensor,
    kv: torch.Tensor,
    pos: StepPositions,
    window_pool: KVPool,
    attn_sink: torch.Tensor,
    rope: RopeTable,
    kind: str,
    window: int,
    compress_ratio: int,
    compressed: KVPool | None,
    topk_idxs: torch.Tensor | None,
    topk_offset: int,
    out: AttnOut | None = None,
    ws: Workspace | None = None,
) -> AttnOut:
    """``q [B, S, H, HD] bf16``, ``kv [B, S, HD] bf16`` -> ``AttnOut(o [B, S, H, HD] bf16)`` (attention
    spec §5; arguments as ``dsv4.reference.attention.sparse_attn``, validated). One launch, two with a
    key split (scratch from ``ws``)."""
    args = (q, kv, pos, window_pool, attn_sink, rope, kind, window, compress_ratio, compressed, topk_idxs, topk_offset)
    return _launch(*args, out, ws, write=False)


def sparse_attn_write(
    q: torch.Tensor,
    kv: torch.Tensor,
    pos: StepPositions,
    window_pool: KVPool,
    attn_sink: torch.Tensor,
    rope: RopeTable,
    kind: str,
    window: int,
    compress_ratio: int,
    compressed: KVPool | None,
    topk_idxs: torch.Tensor | None,
    topk_offset: int,
    out: AttnOut | None = None,
    ws: Workspace | None = None,
) -> AttnOut:
    """``sparse_attn``, and in the same launch ``window_kv_write(kv, window_pool, pos, window)``: the
    step's last ``min(S, W)`` rows stored in the window pool (attention spec §4, §7: the rows it writes
    must alias no row the attention reads, as the spec's block recycling ensures). One program a slot
    (its first token block, first head block and split 0) stores them before its attention."""
    args = (q, kv, pos, window_pool, attn_sink, rope, kind, window, compress_ratio, compressed, topk_idxs, topk_offset)
    return _launch(*args, out, ws, write=True)


def _compressed_keys(kind: str, cmp: KVPool, topk_idxs: torch.Tensor | None) -> int:
    """Compressed keys a token may walk: its list (CSA), the rows its slot's table can hold (HCA), none (SWA)."""
    if kind == "csa":
        assert topk_idxs is not None  # a CSA call holds its list (checked)
        return topk_idxs.shape[2]
    if kind == "hca":
        return cmp.block_table.shape[1] * cmp.block_size
    return 0


def check_dims(hd: int, rope_dim: int) -> None:
    """``ValueError`` naming ``q`` where its head dim ``hd`` (with the RoPE table's ``rope_dim``) does
    not fit the kernels: a power of two in [64, 512] and a multiple of ``rope_dim``, a power of two."""
    r = rope_dim
    require(
        is_pow2(hd) and ROW_BLOCK <= hd <= ROW_BLOCK * SCALE_BYTES and hd % r == 0 and is_pow2(r),
        "q", "a head dim that is a power of two in [64, 512] and a multiple of R (a power of two)",
    )  # fmt: skip


def _launch(
    q: torch.Tensor,
    kv: torch.Tensor,
    pos: StepPositions,
    window_pool: KVPool,
    attn_sink: torch.Tensor,
    rope: RopeTable,
    kind: str,
    window: int,
    compress_ratio: int,
    compressed: KVPool | None,
    topk_idxs: torch.Tensor | None,
    topk_offset: int,
    out: AttnOut | None,
    ws: Workspace | None,
    write: bool,
) -> AttnOut:
    """Both ops' launch; ``write``: also store the window rows."""
    b, s, h, hd = q.shape
    r = rope.rope_dim
    check_dims(hd, r)
    o = torch.empty(q.shape, dtype=torch.bfloat16, device=q.device) if out is None else out.o
    cmp = window_pool if compressed is None else compressed
    n_keys = _compressed_keys(kind, cmp, topk_idxs)
    cfg = TUNING.config(q.device, B=b, S=s, H=h, KEYS=n_keys)
    # fewer heads than the MMA's 16 rows (the tiny preset's 4): the rows that would be padding take more
    # of the step's tokens instead (fewer programs, each window tile read once for them; the same bits)
    heads = min(cfg.heads, triton.next_power_of_2(h))
    tokens = min(triton.next_power_of_2(s), max(cfg.tokens, MIN_DOT_WIDTH // heads))
    heads = max(heads, MIN_DOT_WIDTH // tokens)
    # the rows a slot's table can hold (HCA) or a token's list (CSA), in tiles; SWA has no compressed rows
    key_tiles = max(1, triton.cdiv(n_keys, cfg.key_tile))
    programs = b * triton.cdiv(s, tokens) * triton.cdiv(h, heads)  # _program_rows: head blocks fastest
    splits = key_splits(programs, key_tiles, sm_count(q.device)) if cfg.splits is None else cfg.splits
    splits = 1 if kind == "swa" else splits
    pdl = cfg.pdl and pdl_supported(q.device)
    topk = topk_idxs if topk_idxs is not None else pos.start  # never read (SWA, HCA)
    grid = (programs, 1, splits)
    n = b * s * h
    part_m = scratch(ws, "sparse_attn.m", (splits, n), torch.float32, q.device) if splits > 1 else o
    part_l = scratch(ws, "sparse_attn.l", (splits, n), torch.float32, q.device) if splits > 1 else o
    part_acc = scratch(ws, "sparse_attn.acc", (splits, n, hd), torch.float32, q.device) if splits > 1 else o
    _attn_kernel[grid](
        q, kv, pos.start, attn_sink, rope.cos, rope.sin,
        window_pool.nope.view(torch.uint8), window_pool.scale, window_pool.rope, window_pool.block_table,
        window_pool.block_table.shape[1],
        cmp.nope.view(torch.uint8), cmp.scale, cmp.rope, cmp.block_table, cmp.block_table.shape[1],
        topk, topk_idxs.shape[2] if topk_idxs is not None else 1, topk_offset,
        o, part_m, part_l, part_acc, s, h, window, max(compress_ratio, 1), hd**-0.5,
        KIND=_KINDS[kind], HEADS=heads, TOKENS=tokens, KEYS=cfg.key_tile, SPLITS=splits, HD=hd, NOPE=hd - r, R=r,
        WIN_BS=window_pool.block_size, CMP_BS=cmp.block_size, WRITE=write, PDL=pdl,
        num_warps=cfg.num_warps, enable_fp_fusion=False, launch_pdl=pdl, num_stages=cfg.num_stages,
    )  # fmt: skip
    if splits > 1:
        _combine_kernel[grid[:2]](
            part_m, part_l, part_acc, pos.start, attn_sink, rope.cos, rope.sin, o, b, s, h,
            HEADS=heads, TOKENS=tokens, SPLITS=splits, HD=hd, R=r, PDL=pdl,
            num_warps=cfg.num_warps, enable_fp_fusion=False, launch_pdl=pdl,
        )  # fmt: skip
    return AttnOut(o) if out is None else out

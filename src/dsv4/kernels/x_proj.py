"""The indexer's x-side projection: one GEMM of ``x`` against the stacked compressor ``wkv``,
compressor ``wgate`` and (for the indexer) ``weights_proj`` — they share ``x``.

``x_proj_tile`` is one program of it, run inside the indexer's front launch (``index_front.py``):
the three weights are not concatenated, each N-tile picks its weight from its tile index, and an
M-tile holds every decode token (T <= 128), so each weight byte is read once. Decode has few
tokens, so ``D`` is split over enough programs that the front launch as a whole (these and the
query programs beside them) fills the SMs (``fill_splits``; the K-slice dot is ``split_k.py``'s, shared
with qkv's projection). Every program writes the raw fp32 sums of its
K-slice to ``xp [SPLITS, T, 4*HID + HI]`` (columns: kv | gate | head weights). The compressor step
adds the slices in slice order and stores the sums (``kvg``; a row whose slices would take it too
many steps has them added by a launch of its own first, ``split_k.sum_slices``), and the epilogues
are applied where the sums are read: the gate adds ``ape[p % RC]`` (spec §4 step 1, ``kvg_rows``),
the score launch multiplies the head weights by ``HID^-0.5 * HI^-0.5`` (spec §5 step 3).
Deterministic: one order of the slices everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import triton
import triton.language as tl

from .split_k import BLOCK_K, dot_k_slice, k_splits, sum_k_slices

BLOCK_M_MAX = 128  # tokens per tile: every decode token (T=128) in one M-tile, so each weight byte is read once
BLOCK_M_MIN = 16  # smallest tl.dot M
BLOCK_N = 128  # output columns per tile: divides 2*HID (no tile straddles two weights); wkv and wgate are two
#                tiles each, the 64 head weights one (half masked): x is re-read by 5 tiles, not 9 as at 64
SLICE_TOKENS_MIN = 0.5  # K-slice length >= T/2: the fp32 partials (T x N x 4 B a slice, written once and summed
#                         once, in order, by the compressor step) then cost at most 4x the bf16 weights (N x D x 2 B)
_BLOCK_K = tl.constexpr(BLOCK_K)


@dataclass(frozen=True)
class XProjTiles:
    """The x-projection's programs: ``n_tiles`` column tiles x ``m_tiles`` token tiles x ``splits`` K-slices."""

    block_m: int
    n_tiles: int
    m_tiles: int
    splits: int


def fill_splits(tiles: int, others: int, t: int, d: int, sms: int) -> int:
    """K-slices of the x-projection's ``tiles`` output tiles when ``others`` programs share its launch:
    enough that the launch has at least ``sms`` programs (every SM streams weights), at least
    ``split_k.k_splits`` (one wave of the projection alone), no slice shorter than ``SLICE_TOKENS_MIN * T``
    and none empty."""
    fill = -(-max(sms - others, 0) // tiles)
    cap = min(int(d // max(SLICE_TOKENS_MIN * t, 1)), triton.cdiv(d, BLOCK_K))
    return max(1, k_splits(tiles, t, d, sms), min(fill, cap))


def check_rows(two_hid: int) -> None:
    """``ValueError`` unless ``2*HID`` (``w.wkv``'s rows) splits into whole column tiles of ``BLOCK_N``."""
    if two_hid % BLOCK_N:
        raise ValueError(f"w.wkv: the Triton backend needs 2*HID rows that are a multiple of {BLOCK_N}, got {two_hid}")


def x_proj_tiles(
    t: int, d: int, two_hid: int, hi: int, sms: int, block_n: int = BLOCK_N, splits: int | None = None,
    others: int = 0,
) -> XProjTiles:  # fmt: skip
    """Tiles of ``[T, D] @ [wkv; wgate; weights_proj].T`` (``hi`` head-weight rows, 0 for the
    compressor alone) in columns of ``block_n``; ``splits`` K-slices (at most one per ``BLOCK_K`` step
    of D) or, when None, as many as fill the ``sms`` beside ``others`` programs (``fill_splits``)."""
    check_rows(two_hid)
    block_m = min(BLOCK_M_MAX, max(BLOCK_M_MIN, triton.next_power_of_2(t)))
    n_tiles = 2 * (two_hid // block_n) + triton.cdiv(hi, block_n)
    m_tiles = triton.cdiv(t, block_m)
    if splits is None:
        splits = fill_splits(n_tiles * m_tiles, others, t, d, sms)
    return XProjTiles(block_m, n_tiles, m_tiles, max(1, min(splits, triton.cdiv(d, BLOCK_K))))


@triton.jit
def x_proj_tile(
    pid,  # program index among the x-projection's programs: (column tile, token tile, K-slice), column fastest
    x_ptr,  # [T, D] bf16
    wkv_ptr,  # [2*HID, D] bf16
    wgate_ptr,  # [2*HID, D] bf16
    wproj_ptr,  # [HI, D] bf16 (unused when HI == 0)
    xp_ptr,  # out [SPLITS, T, 4*HID + HI] fp32: this K-slice's raw sums
    T,
    D,
    HI,
    TWO_HID: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    N_TILES: tl.constexpr,
    M_TILES: tl.constexpr,
    SPLITS: tl.constexpr,
):
    pid_n = pid % N_TILES
    pid_m = (pid // N_TILES) % M_TILES
    split = pid // (N_TILES * M_TILES)
    tiles_per_weight: tl.constexpr = TWO_HID // BLOCK_N
    segment = tl.minimum(pid_n // tiles_per_weight, 2)  # 0 wkv, 1 wgate, 2 weights_proj
    cols = (pid_n - segment * tiles_per_weight) * BLOCK_N + tl.arange(0, BLOCK_N)
    if segment == 0:
        w_ptr = wkv_ptr
    elif segment == 1:
        w_ptr = wgate_ptr
    else:
        w_ptr = wproj_ptr
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    col_ok = cols < tl.where(segment == 2, HI, TWO_HID)
    acc = dot_k_slice(x_ptr + rows[:, None] * D, w_ptr + cols[None, :] * D, row_ok, col_ok, split, D, SPLITS, _BLOCK_K)
    n_out = 2 * TWO_HID + HI
    out = xp_ptr + (split * T + rows)[:, None] * n_out + segment * TWO_HID + cols[None, :]
    tl.store(out, acc, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def kvg_rows(xp_ptr, ape_ptr, tokens, positions, cols, mask, T, HI, GATE: tl.constexpr, TWO_HID: tl.constexpr,
             SPLITS: tl.constexpr, RC: tl.constexpr):  # fmt: skip
    """Columns ``cols`` (``[1, C]``, or ``[R, C]``: each row its own) of the kv projection (``GATE`` 0)
    or of the gate + ``ape[p % RC]`` (``GATE`` 1) of ``tokens [R]`` at ``positions [R]``: ``[R, C]``
    fp32, the K-slices added in slice order. ``TWO_HID``: the projection's width (``COFF * W``)."""
    n_out = 2 * TWO_HID + HI
    ptrs = xp_ptr + tokens[:, None] * n_out + GATE * TWO_HID + cols
    v = sum_k_slices(ptrs, mask, T * n_out, SPLITS)
    if GATE:
        v += tl.load(ape_ptr + (positions % RC)[:, None] * TWO_HID + cols, mask=mask, other=0.0)
    return v

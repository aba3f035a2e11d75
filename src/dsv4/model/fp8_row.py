"""FP8 e4m3 codes with power-of-two (UE8M0) block scales: the KV row of the attention's pools and
the activation quant of its output projection (attention spec §2, §6). The row's format record
(dtypes, scale layout, bytes, kernel constants) is ``pool_format.FP8_KV``, made from these functions.

**FP8 KV row** (``fp8_rows``): a row ``v [HD] bf16`` is stored as the codes of its first
``NOPE = HD - R`` entries in blocks of 64 (``float8_e4m3fn``), one scale byte per block (``e + 127``;
bytes ``>= NOPE/64`` of the 8 are 0) and its last ``R`` entries unchanged (bf16): 584 B a row at
HD 512, R 64, against 1024 in bf16. Per block: ``amax = max(max|blk|, 1e-4)``,
``e = ceil(log2(amax / 448))`` exactly (the smallest ``e`` with ``amax <= 448 * 2^e``), codes
``e4m3(blk / 2^e)`` (round to nearest even; ``|blk / 2^e| <= 448``, so it never saturates). A block
holding NaN or an infinity stores scale byte 255 and 64 NaN codes (``0x7F``). Dequantization
``codes * 2^e`` is exact in bf16, but for the top binade: an entry ``>= 248 * 2^120`` (about 3.297e38,
below bf16's largest 3.390e38) rounds to code 256 at ``e = 120`` and decodes to ``2^128 = inf``, as
DeepSeek's ``act_quant`` values do. These are the values DeepSeek's inference code keeps after its
``act_quant(kv[..., :-R], 64, ue8m0)`` (the rows FlashMLA's FP8 cache holds), stored losslessly.

**FP8 activation quant per 128** (``fp8_act_quant``): the same rule with 128-wide blocks over the
whole row, returning the codes and the scales ``2^e`` (fp32).

Everything is computed exactly: the exponent in float64 with a check on both sides, the division
by ``2^e`` as a multiplication by a power of two (exact in fp32), the rounding by torch's e4m3 cast.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .config import WEIGHT_BLOCK

E4M3_MAX = 448.0  # largest finite float8_e4m3fn
AMAX_FLOOR = 1e-4  # a block smaller than this is scaled as if its amax were 1e-4 (the official code's floor)
ROW_BLOCK = 64  # NOPE entries per scale byte of a KV row
ACT_BLOCK = 128  # activation entries per scale of the output projection's FP8 input
SCALE_BYTES = 8  # scale bytes stored per KV row (up to 8 blocks: NOPE <= 512; FlashMLA stores 7 + 1 pad)
SCALE_BIAS = 127  # UE8M0: byte b is 2^(b - 127)
NAN_SCALE = 255  # the UE8M0 byte of a block holding NaN or an infinity
NAN_CODE = 0x7F  # float8_e4m3fn NaN


class FP8Rows(NamedTuple):
    """KV rows in the pool format: ``nope [..., NOPE] float8_e4m3fn``, ``scale [..., 8] uint8``,
    ``rope [..., R] bf16``."""

    nope: torch.Tensor
    scale: torch.Tensor
    rope: torch.Tensor


def check_row_dims(head_dim: int, rope_dim: int) -> int:
    """``NOPE / 64`` (the scale bytes in use) for rows of ``head_dim`` with ``rope_dim`` rope entries;
    ``ValueError`` when NOPE is not a positive multiple of 64 of at most 512."""
    nope = head_dim - rope_dim
    if nope < ROW_BLOCK or nope % ROW_BLOCK or nope // ROW_BLOCK > SCALE_BYTES:
        raise ValueError(
            f"head_dim: an FP8 KV row needs HD - R to be a multiple of {ROW_BLOCK} in "
            f"[{ROW_BLOCK}, {ROW_BLOCK * SCALE_BYTES}], got HD {head_dim}, R {rope_dim}"
        )
    return nope // ROW_BLOCK


def block_exponents(amax: torch.Tensor) -> torch.Tensor:
    """``e = ceil(log2(max(amax, 1e-4) / 448))`` exactly, as int32 (``amax`` finite, any float dtype)."""
    a = amax.to(torch.float64).clamp_min(AMAX_FLOOR)
    e = torch.ceil(torch.log2(a / E4M3_MAX))
    e = torch.where(a > E4M3_MAX * torch.exp2(e), e + 1, e)  # log2 rounded down across a power of two
    e = torch.where(a <= E4M3_MAX * torch.exp2(e - 1), e - 1, e)  # or up
    return e.to(torch.int32)


def quantize_e4m3_blocks(v: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``v [..., N]`` (any float dtype, ``N`` a multiple of ``block``) -> ``(codes [..., N]
    float8_e4m3fn, e [..., N / block] int32)`` with ``v ≈ codes * 2^e`` per block; a block holding
    NaN or an infinity gets ``e = 128`` (scale byte 255) and NaN codes."""
    x = v.to(torch.float32).unflatten(-1, (-1, block))
    finite = torch.isfinite(x).all(-1)
    amax = torch.where(finite, x.abs().amax(-1), torch.ones_like(x[..., 0]))
    e = block_exponents(amax)
    codes = (x * torch.exp2(-e.to(torch.float32)).unsqueeze(-1)).to(torch.float8_e4m3fn)
    nan_block = ~finite  # selected without a host read, so a step that quantizes rows stays capturable
    bits = torch.where(nan_block.unsqueeze(-1), NAN_CODE, codes.view(torch.uint8))
    e = torch.where(nan_block, NAN_SCALE - SCALE_BIAS, e)
    return bits.view(torch.float8_e4m3fn).flatten(-2), e


def dequantize_e4m3_blocks(codes: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``codes [..., N] float8_e4m3fn`` times ``2^e`` per block (``e [..., N / block]``) -> fp32 (exact)."""
    c = codes.to(torch.float32).unflatten(-1, (e.shape[-1], -1))
    return (c * torch.exp2(e.to(torch.float32)).unsqueeze(-1)).flatten(-2)


def fp8_blocks(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The quantized part of KV rows: ``rows [..., NOPE]`` (NOPE a multiple of 64, at most 512) ->
    ``(codes [..., NOPE] float8_e4m3fn, scale bytes [..., 8] uint8)``: byte ``i`` is block ``i``'s
    ``e + 127`` (255 for a block holding NaN or an infinity), bytes ``>= NOPE/64`` are 0."""
    used = rows.shape[-1] // ROW_BLOCK
    codes, e = quantize_e4m3_blocks(rows, ROW_BLOCK)
    scale = torch.zeros(*rows.shape[:-1], SCALE_BYTES, dtype=torch.uint8, device=rows.device)
    scale[..., :used] = (e + SCALE_BIAS).to(torch.uint8)
    return codes, scale


def fp8_blocks_dequantized(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``codes [..., NOPE]`` times ``2^(byte - 127)`` per 64 -> ``[..., NOPE]`` fp32 (exact)."""
    used = codes.shape[-1] // ROW_BLOCK
    return dequantize_e4m3_blocks(codes, scale[..., :used].to(torch.int32) - SCALE_BIAS)


def fp8_rows(v: torch.Tensor, rope_dim: int) -> FP8Rows:
    """KV rows ``v [..., HD] bf16`` in the pool format (``fp8_row`` of attention spec §2)."""
    if v.dtype != torch.bfloat16:
        raise TypeError(f"v: expected bf16 rows, got {v.dtype}")
    nope = v.shape[-1] - rope_dim
    check_row_dims(v.shape[-1], rope_dim)
    return FP8Rows(*fp8_blocks(v[..., :nope]), v[..., nope:].clone())


def dequantize_fp8_rows(nope: torch.Tensor, scale: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """``deq`` of attention spec §2: rows in the pool format -> ``[..., HD] bf16`` (exact, but for an entry
    ``>= 248 * 2^120``, which decodes to inf: see the module docstring)."""
    return torch.cat((fp8_blocks_dequantized(nope, scale).to(torch.bfloat16), rope.to(torch.bfloat16)), dim=-1)


def fp8_round_trip(v: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """``deq(fp8_row(v))``: the bf16 values a KV row ``v [..., HD] bf16`` has once stored."""
    return dequantize_fp8_rows(*fp8_rows(v, rope_dim))


def fp8_act_quant(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 activation quant per 128 (attention spec §6): ``a [..., N]`` (``N`` a multiple of 128) ->
    ``(codes [..., N] float8_e4m3fn, scale [..., N / 128] fp32)`` with ``a ≈ codes * scale`` per block."""
    codes, e = quantize_e4m3_blocks(a, ACT_BLOCK)
    return codes, torch.exp2(e.to(torch.float32))


def quantize_fp8_weight(w: torch.Tensor, block: int = WEIGHT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [out, in]`` -> ``(float8_e4m3fn [out, in], scale [ceil(out/block), ceil(in/block)] fp32)``:
    each ``block x block`` tile scaled by the power of two of the rule above, as DeepSeek's
    checkpoints store their FP8 weights (edge tiles partial)."""
    out, inp = w.shape
    rows, cols = -(-out // block), -(-inp // block)
    padded = torch.zeros(rows * block, cols * block, dtype=torch.float32, device=w.device)
    padded[:out, :inp] = w
    tiles = padded.view(rows, block, cols, block)
    e = block_exponents(tiles.abs().amax(dim=(1, 3)))
    scale = torch.exp2(e.to(torch.float32))
    codes = (tiles / scale[:, None, :, None]).to(torch.float8_e4m3fn).view(rows * block, cols * block)
    return codes[:out, :inp].contiguous(), scale


def dequantize_fp8_weight(w8: torch.Tensor, scale: torch.Tensor, block: int = WEIGHT_BLOCK) -> torch.Tensor:
    """``w8 [out, in] float8_e4m3fn`` times its block scales -> ``[out, in]`` bf16: ``bf16(code x scale)``,
    exact for a power-of-two scale whose products stay in bf16's normal range."""
    out, inp = w8.shape
    s = scale.repeat_interleave(block, 0)[:out].repeat_interleave(block, 1)[:, :inp]
    return (w8.to(torch.float32) * s).to(torch.bfloat16)

"""DeepSeek's FP8 checkpoint format: ``float8_e4m3fn`` weights with one UE8M0 (power-of-two) scale
per ``128 x 128`` block; dequantized weight = fp8 value x its block's scale.

Decoding from raw bytes is exact and needs no float8 dtype in torch (torch 2.4 has no
``float8_e8m0fnu``): e4m3 through a 256-entry table, e8m0 by building the fp32 bit pattern.
"""

from __future__ import annotations

import math

import torch

E8M0_BIAS = 127  # UE8M0 byte b encodes 2^(b - 127)
E8M0_NAN = 255  # the one non-number UE8M0 byte


def _e4m3_table() -> torch.Tensor:
    """fp32 value of every ``float8_e4m3fn`` byte (1 sign, 4 exponent bits biased by 7, 3 mantissa
    bits; subnormals at exponent 0; S.1111.111 is NaN, there is no infinity)."""
    values = []
    for byte in range(256):
        sign = -1.0 if byte & 0x80 else 1.0
        exponent, mantissa = (byte >> 3) & 0xF, byte & 0x7
        if exponent == 0xF and mantissa == 0x7:
            values.append(math.nan)
        elif exponent == 0:
            values.append(sign * mantissa / 8 * 2.0**-6)
        else:
            values.append(sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7))
    return torch.tensor(values, dtype=torch.float32)  # every value is exact in fp32


E4M3_TABLE = _e4m3_table()


def e4m3_bytes_to_float32(raw: torch.Tensor) -> torch.Tensor:
    """``raw``: uint8 bytes of ``float8_e4m3fn`` values, any shape -> the same shape, fp32 (exact)."""
    return E4M3_TABLE[raw.to(torch.int64)]


def e8m0_bytes_to_float32(raw: torch.Tensor) -> torch.Tensor:
    """``raw``: uint8 UE8M0 bytes, any shape -> ``2^(b - 127)`` fp32 (exact; byte 255 -> NaN)."""
    b = raw.to(torch.int32)
    # Bytes 1..254 are the fp32 pattern with exponent field b; byte 0 is 2^-127, the fp32 subnormal 1 << 22.
    bits = torch.where(b == 0, torch.full_like(b, 1 << 22), b << 23)
    bits = torch.where(b == E8M0_NAN, torch.full_like(b, 0x7FC00000), bits)
    return bits.view(torch.float32)


def scale_grid(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    """Shape of the block-scale tensor of a ``[out, in]`` weight: ``ceil(out/bm), ceil(in/bn)``."""
    return -(-shape[0] // block[0]), -(-shape[1] // block[1])


def dequantize_rows_(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Multiply ``w [rows, in]`` fp32 (in place) by its block scales and return it.

    ``scale [ceil(rows/bm), ceil(in/bn)]`` fp32 are the scales of these rows, the first row of
    ``w`` starting a block. Edge blocks (a dim not a multiple of the block) are partial.
    """
    rows, cols = w.shape
    # a block larger than the rows given (which start a block) is one block of them: no larger repeat or view
    bm = max(1, min(block[0], rows))
    per_column = scale.repeat_interleave(min(block[1], cols), dim=1)[:, :cols]  # [row blocks, in]: small
    full = rows // bm * bm
    w[:full].view(-1, bm, cols).mul_(per_column[: full // bm, None, :])
    if full < rows:  # a partial last row block
        w[full:].mul_(per_column[full // bm])
    return w

"""The numerics of a cache pool's rows: one record per row format, the one place they are spelled out.

A pool (the indexer's key cache; the attention layer's KV caches next) stores each row as *codes*
with their *scales*, in blocks of ``block_size`` rows, plus, for formats that keep part of a row as
it is, an unquantized *tail*. A ``PoolFormat`` says how: the dtype of the codes, the scale layout
(dtype; one scale per row or one per block of columns), the bytes a row takes, how rows are
quantized and dequantized, and the constants a kernel compiles in. Whatever touches a pool reads
them from here: the state constructors allocate the pool tensors (``empty``), validation checks them
(``codes_shape``/``scale_shape`` and the dtypes), the bytes model charges ``row_bytes``, the
reference quantizes with ``quantize``, and the kernel launchers pass ``constexprs``.

``INT8_KEYS`` (spec §2, §4) is the indexer's compressed key: ``HID`` int8 codes and one fp32 scale a
row (the scales of a pool are ``[num_blocks, block_size]``, no trailing axis): 132 B at HID=128.

``FP8_KV`` (attention spec §2) is the attention layer's KV row: ``NOPE`` e4m3 codes with one UE8M0
scale byte per 64 (8 bytes a row, those past ``NOPE/64`` written 0) and the bf16 rope part as its
tail, which ``quantize`` never sees (the pool stores it as it comes): 584 B at HD 512, R 64
(``dsv4.model.fp8_row`` holds the arithmetic).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import fp8_row
from .quant import AMAX_FLOOR, INT8_MAX, quantize_int8_per_row


@dataclass(frozen=True)
class PoolFormat:
    """How one row of a pool is stored.

    Attributes:
        name: what the format is called (``"int8-keys"``).
        code_dtype: dtype of the stored codes, one per quantized column: ``[..., W]``.
        scale_dtype: dtype of the stored scales.
        scale_block: columns that share one scale; None: one scale for the whole row, stored without
            a trailing axis (``[...]``), otherwise ``[..., n]`` with ``n = ceil(W / scale_block)``
            rounded up to ``scale_align`` (unused scales written 0).
        scale_align: the scale count of a row is a multiple of this (8 bytes for UE8M0 scales).
        tail_dtype: dtype of the unquantized columns that follow the codes in a row (a rope part),
            None when the format has none.
        code_max: the largest code magnitude (127 for INT8).
        amax_floor: a row (block) whose ``max|v|`` is smaller is scaled as if it were this.
        quantize: ``rows [..., W]`` (any float dtype) -> ``(codes [..., W] code_dtype, scales
            [..., *scale_shape(W)] scale_dtype)``, as the model quantizes a row it stores.
        dequantize: ``(codes, scales)`` -> ``rows [..., W] fp32``, the values the codes stand for.
    """

    name: str
    code_dtype: torch.dtype
    scale_dtype: torch.dtype
    code_max: float
    amax_floor: float
    quantize: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    dequantize: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    scale_block: int | None = None
    scale_align: int = 1
    tail_dtype: torch.dtype | None = None

    def codes_shape(self, width: int) -> tuple[int, ...]:
        """The trailing shape of one row's codes for ``width`` quantized columns."""
        return (width,)

    def scale_shape(self, width: int) -> tuple[int, ...]:
        """The trailing shape of one row's scales for ``width`` quantized columns: ``()`` for one
        scale a row, ``(n,)`` for one per block."""
        if self.scale_block is None:
            return ()
        blocks = -(-width // self.scale_block)
        return (-(-blocks // self.scale_align) * self.scale_align,)

    def row_bytes(self, width: int, tail: int = 0) -> int:
        """Bytes one row takes in the pool: ``width`` codes, their scales and ``tail`` unquantized columns."""
        tail_bytes = 0
        if tail:
            if self.tail_dtype is None:
                raise ValueError(f"tail: the {self.name} format has no unquantized columns, got {tail}")
            tail_bytes = tail * self.tail_dtype.itemsize
        scales = math.prod(self.scale_shape(width))
        return width * self.code_dtype.itemsize + scales * self.scale_dtype.itemsize + tail_bytes

    def empty(
        self, num_blocks: int, block_size: int, width: int, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A zeroed pool of ``num_blocks`` blocks of ``block_size`` rows: ``(codes [num_blocks, block_size,
        *codes_shape], scales [num_blocks, block_size, *scale_shape])`` (the tail, if any, is the owner's)."""
        rows = (num_blocks, block_size)
        return (
            torch.zeros(*rows, *self.codes_shape(width), dtype=self.code_dtype, device=device),
            torch.zeros(*rows, *self.scale_shape(width), dtype=self.scale_dtype, device=device),
        )

    def constexprs(self, prefix: str) -> dict[str, float]:
        """The constants a kernel compiles in, as ``tl.constexpr`` keyword arguments named ``prefix`` +
        ``CODE_MAX`` / ``AMAX_FLOOR`` (a launcher passes ``**fmt.constexprs("KEY_")``)."""
        return {f"{prefix}CODE_MAX": self.code_max, f"{prefix}AMAX_FLOOR": self.amax_floor}


def _int8_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Spec §2 per-row INT8 of ``rows [..., W]``: ``(codes [..., W] int8, scales [...] fp32)``."""
    codes, scale = quantize_int8_per_row(rows, INT8_KEYS.code_max, INT8_KEYS.amax_floor)
    return codes, scale.squeeze(-1)


def _int8_rows_dequantized(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``codes [..., W] int8``, ``scales [...] fp32`` -> ``codes * scale`` ``[..., W]`` fp32."""
    return codes.to(torch.float32) * scales.unsqueeze(-1)


INT8_KEYS = PoolFormat(
    name="int8-keys",
    code_dtype=torch.int8,
    scale_dtype=torch.float32,
    code_max=INT8_MAX,
    amax_floor=AMAX_FLOOR,
    quantize=_int8_rows,
    dequantize=_int8_rows_dequantized,
)

FP8_KV = PoolFormat(
    name="fp8-kv",
    code_dtype=torch.float8_e4m3fn,
    scale_dtype=torch.uint8,  # UE8M0: byte b is 2^(b - 127)
    code_max=fp8_row.E4M3_MAX,
    amax_floor=fp8_row.AMAX_FLOOR,
    quantize=fp8_row.fp8_blocks,  # e = ceil(log2(amax / 448)), codes e4m3(v / 2^e), scale byte e + 127
    dequantize=fp8_row.fp8_blocks_dequantized,
    scale_block=fp8_row.ROW_BLOCK,  # [..., 8] scale bytes a row
    scale_align=fp8_row.SCALE_BYTES,
    tail_dtype=torch.bfloat16,  # the rope part
)

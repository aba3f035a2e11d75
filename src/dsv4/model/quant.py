"""Per-row symmetric INT8 quantization (spec §2), shared by the reference and weight loading."""

from __future__ import annotations

import torch

INT8_MAX = 127.0
AMAX_FLOOR = 1e-4  # rows smaller than this are scaled as if their amax were 1e-4


def quantize_int8_per_row(
    x: torch.Tensor, code_max: float = INT8_MAX, amax_floor: float = AMAX_FLOOR
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize each row (last axis) of ``x`` to INT8.

    ``x``: ``[..., N]`` any float dtype (computed in fp32). Returns ``(q [..., N] int8,
    scale [..., 1] fp32)`` with ``amax = max(max|row|, 1e-4)``, ``s = 127/amax``,
    ``q = round_half_even(row*s)`` and ``scale = 1/s`` (dequant: ``q * scale``). ``code_max`` (<= 127)
    and ``amax_floor`` replace 127 and 1e-4 (a pool format's constants: ``dsv4.model.pool_format``).
    """
    v = x.to(torch.float32)
    amax = v.abs().amax(dim=-1, keepdim=True).clamp_min(amax_floor)
    s = torch.full_like(amax, code_max) / amax  # correctly rounded; ``127.0 / amax`` would be 127 * (1/amax)
    q = torch.round(v * s).clamp_(-code_max, code_max).to(torch.int8)
    return q, 1.0 / s


def quantize_weight_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel INT8 weights. ``w``: ``[out, in]`` float -> ``(int8 [out, in], scale [out] fp32)``."""
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D [out, in], got shape {tuple(w.shape)}")
    q, scale = quantize_int8_per_row(w)
    return q, scale.squeeze(-1)

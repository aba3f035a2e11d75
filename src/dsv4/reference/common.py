"""Small fp32 building blocks of the reference, each one line of the spec."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..model.rms import FP32_EXP_INF, RMS_SCALE_BITS, RMS_SCALE_MIN_EXP
from ..model.rope import RopeTable


def overflow_scale(amax: torch.Tensor) -> torch.Tensor:
    """The power of two a row is scaled by before its squares are summed (``dsv4.model.rms``): ``amax``
    fp32 (a row's ``max|v|``) -> 1 where it is below ``2^48`` or not finite, else ``2^(143 - E)``."""
    e = (amax.contiguous().view(torch.int32) >> 23) & 0xFF
    big = (e >= RMS_SCALE_MIN_EXP) & (e < FP32_EXP_INF)
    return torch.where(big, ((RMS_SCALE_BITS - e) << 23).view(torch.float32), 1.0)


def rms_norm(v: torch.Tensor, gamma: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``v * 1/sqrt(mean(v^2) + eps) * gamma`` over the last axis, fp32 (no gain when ``gamma`` is None),
    for any finite ``v``: a row whose squares could overflow is scaled by a power of two ``c`` first,
    ``(v*c) * 1/sqrt(mean((v*c)^2) + eps*c^2)`` (``c = 1`` for every other row: the plain formula)."""
    v = v.to(torch.float32)
    c = overflow_scale(v.abs().amax(-1, keepdim=True))
    u = v * c
    out = u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + eps * c * c)
    return out if gamma is None else out * gamma.to(torch.float32)


def apply_rope(u: torch.Tensor, positions: torch.Tensor, rope: RopeTable) -> torch.Tensor:
    """Interleaved RoPE of the pairs ``(u[2i], u[2i+1])``; ``u [..., R]`` fp32, ``positions``
    broadcastable to ``u.shape[:-1]`` (int)."""
    cos = rope.cos[positions]
    sin = rope.sin[positions]
    while cos.dim() < u.dim():  # broadcast over head axes between the token axes and R
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    u0, u1 = u[..., 0::2], u[..., 1::2]
    return torch.stack((u0 * cos - u1 * sin, u0 * sin + u1 * cos), dim=-1).flatten(-2)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` with bf16 operands and fp32 accumulation (operands are exact in fp32)."""
    return x.to(torch.float32) @ w.to(torch.float32).T


_EXACT_CHUNK = 1 << 24  # output elements per float64 chunk: bounds the temporary to 128 MiB


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b.T`` of INT8 matrices as int32: ``a [M, K]``, ``b [N, K]`` -> ``[M, N]``.

    float64 holds every partial sum exactly (|sum| <= 127^2 * K << 2^53), on any device.
    """
    a64 = a.to(torch.float64)
    step = max(1, _EXACT_CHUNK // max(1, a.shape[0]))
    out = torch.empty(a.shape[0], b.shape[0], dtype=torch.int32, device=a.device)
    for n0 in range(0, b.shape[0], step):
        out[:, n0 : n0 + step] = (a64 @ b[n0 : n0 + step].to(torch.float64).T).to(torch.int32)
    return out


def inverse_rope(u: torch.Tensor, positions: torch.Tensor, rope: RopeTable) -> torch.Tensor:
    """The inverse of ``apply_rope`` (attention spec §2): ``y[2i] = u[2i]*c + u[2i+1]*s``,
    ``y[2i+1] = u[2i+1]*c - u[2i]*s`` with ``c, s`` the table's cos, sin at ``positions``; fp32."""
    cos = rope.cos[positions]
    sin = rope.sin[positions]
    while cos.dim() < u.dim():
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    u0, u1 = u[..., 0::2], u[..., 1::2]
    return torch.stack((u0 * cos + u1 * sin, u1 * cos - u0 * sin), dim=-1).flatten(-2)


@dataclass(frozen=True)
class Gemms:
    """The two matrix products the reference is written with: ``linear(x, w)`` = ``x @ w.T`` of bf16
    operands as fp32, and ``int8(a, b)`` = exact ``a @ b.T`` of INT8 matrices as int32. The reference
    uses ``EXACT``; a baseline may pass library GEMMs that compute the same products."""

    linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    int8: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


EXACT = Gemms(linear, int8_matmul)

"""Reference ``qkv_proj_rope`` (spec §3): the attention Q/KV projection, literally, in fp32."""

from __future__ import annotations

import torch

from ..model.quant import quantize_int8_per_row
from ..model.rope import RopeTable
from ..model.structs import QKV, copy_into
from ..model.weights import AttnWeights
from .common import EXACT, Gemms, apply_rope, rms_norm


def _nope_rope_bf16(v: torch.Tensor, positions: torch.Tensor, rope: RopeTable) -> torch.Tensor:
    """bf16 of ``v [T, ..., HD]`` with interleaved RoPE applied to its last R entries."""
    nope = v.shape[-1] - rope.rope_dim
    out = torch.empty(v.shape, dtype=torch.bfloat16, device=v.device)
    out[..., :nope] = v[..., :nope]
    out[..., nope:] = apply_rope(v[..., nope:], positions, rope)
    return out


def qkv_proj_rope(
    x: torch.Tensor,
    w: AttnWeights,
    positions: torch.Tensor,
    rope: RopeTable,
    eps: float,
    out: QKV | None = None,
    gemms: Gemms = EXACT,
) -> QKV:
    """x ``[T, D] bf16``, positions ``[T] int`` -> ``QKV(q [T, H, HD], kv [T, HD], qr [T, QL], qr_scale [T, 1])``."""
    t = x.shape[0]
    hd = w.wkv.shape[0]
    positions = positions.long()

    c = rms_norm(gemms.linear(x, w.wq_a), w.gamma_cq, eps)
    qr, qr_scale = quantize_int8_per_row(c)

    qp = gemms.int8(qr, w.wq_b).to(torch.float32) * qr_scale * w.wq_b_scale
    qn = rms_norm(qp.view(t, -1, hd), None, eps)
    q = _nope_rope_bf16(qn, positions, rope)

    k = rms_norm(gemms.linear(x, w.wkv), w.gamma_ckv, eps)
    kv = _nope_rope_bf16(k, positions, rope)
    return copy_into(QKV(q, kv, qr, qr_scale), out)

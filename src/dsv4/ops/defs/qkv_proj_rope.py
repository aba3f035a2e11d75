"""``qkv_proj_rope`` (spec §3): the attention Q/KV projection with RMSNorm and interleaved RoPE."""

from __future__ import annotations

from typing import Any

import torch

from ...model.config import DeepSeekV4Config
from ...model.rope import RopeTable
from ...model.structs import QKV
from ...model.weights import AttnWeights
from ..case_inputs import CaseInputs
from ..costs import BF16, FP32, INT8, INT64, OpCost, rope_rows_bytes
from ..registry import OpDescriptor, Output, Tolerance
from ..validate import check_qkv_proj_rope

BF16_OUT = Tolerance(1e-4, 1 / 128)  # spec §6: q, kv


def qkv_proj_rope(
    x: torch.Tensor,
    w: AttnWeights,
    positions: torch.Tensor,
    rope: RopeTable,
    *,
    eps: float = 1e-6,
    backend: str = "auto",
    out: QKV | None = None,
) -> QKV:
    """Attention Q/KV projection with RMSNorm and interleaved RoPE (spec §3).

    Args:
        x: ``[T, D] bf16`` attention-normed hidden states, any ``T >= 1``.
        w: ``AttnWeights``; ``H`` and ``HD`` come from ``w.wq_b`` and ``w.wkv``.
        positions: ``[T] int32|int64`` position of every token, inside the rope table.
        rope: the layer's ``RopeTable`` (``R`` = twice its width).
        eps: RMSNorm epsilon.
        backend: ``"reference"``, ``"triton"`` or ``"auto"`` (Triton on CUDA, else the reference).
        out: optional preallocated ``QKV`` to write into (returned).

    Returns:
        ``QKV(q [T, H, HD] bf16, kv [T, HD] bf16, qr [T, QL] int8, qr_scale [T, 1] fp32)``.
    """


def validate(args: dict[str, Any], out: QKV | None) -> dict[str, Any]:
    check_qkv_proj_rope(**args, out=out)
    return {}


def case_args(c: CaseInputs) -> dict[str, Any]:
    return {"x": c.x.reshape(c.batch * c.seq, -1), "w": c.weights.attn, "positions": c.positions(), "rope": c.rope}


def cost(cfg: DeepSeekV4Config, start_pos: list[int], seq: int) -> OpCost:
    """``qkv_proj_rope`` on ``len(start_pos) * seq`` tokens (spec §3); token ``s`` of row ``b`` at
    ``start_pos[b] + s`` (one RoPE row per distinct position)."""
    t, d, ql, hd = len(start_pos) * seq, cfg.hidden_size, cfg.q_lora_rank, cfg.head_dim
    nq = cfg.num_attention_heads * hd
    reads = {
        "x": t * d * BF16,
        "positions": t * INT64,
        "rope rows (distinct positions)": rope_rows_bytes(cfg, (p + s for p in start_pos for s in range(seq))),
        "wq_a": ql * d * BF16,
        "gamma_cq": ql * BF16,
        "wq_b": nq * ql * INT8,
        "wq_b_scale": nq * FP32,
        "wkv": hd * d * BF16,
        "gamma_ckv": hd * BF16,
    }
    writes = {"q": t * nq * BF16, "kv": t * hd * BF16, "qr": t * ql * INT8, "qr_scale": t * FP32}
    flops = {"bf16": 2 * t * d * ql + 2 * t * d * hd, "int8": 2 * t * ql * nq}
    return OpCost("qkv_proj_rope", reads, writes, flops)


def fake_result(args: dict[str, Any]) -> QKV:
    x, w = args["x"], args["w"]
    t, hd = x.shape[0], w.wkv.shape[0]
    return QKV(
        x.new_empty((t, w.wq_b.shape[0] // hd, hd)),
        x.new_empty((t, hd)),
        x.new_empty((t, w.wq_a.shape[0]), dtype=torch.int8),
        x.new_empty((t, 1), dtype=torch.float32),
    )


QKV_PROJ_ROPE = OpDescriptor(
    name="qkv_proj_rope",
    signature=qkv_proj_rope,
    outputs=(
        Output("q", BF16_OUT),
        Output("kv", BF16_OUT),
        Output("qr", Tolerance(1.0, 0.0, 0.0)),
        Output("qr_scale", Tolerance(2.5e-5, 5e-3)),
    ),
    mutates=(),
    validate=validate,
    case_args=case_args,
    cost=cost,
    fake_result=fake_result,
    implementations={
        "reference": "dsv4.reference.qkv_proj_rope:qkv_proj_rope",
        "triton": "dsv4.kernels.qkv_proj_rope:qkv_proj_rope",
    },
)

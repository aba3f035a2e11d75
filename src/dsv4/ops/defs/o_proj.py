"""``o_proj`` (attention spec §6): the grouped FP8 output projection, ``wo_a`` then ``wo_b``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ...model.config import DeepSeekV4Config
from ...model.structs import OProjOut
from ...model.weights import OProjWeights, synthetic_o_proj
from ..attention_cases import unit_rows
from ..case_inputs import CaseInputs
from ..costs import BF16, FP32, OpCost
from ..registry import OpDescriptor, Output, Tolerance
from ..validate_attention import check_o_proj

Y_RULE = Tolerance(1e-4, 1 / 128)  # attention spec §8: y, op by op from the same o


def o_proj(o: torch.Tensor, w: OProjWeights, *, backend: str = "auto", out: OProjOut | None = None) -> OProjOut:
    """Grouped FP8 output projection (attention spec A6).

    Args:
        o: ``[T, H, HD] bf16`` (``sparse_attn``'s output, tokens flattened).
        w: ``OProjWeights``: ``wo_a [G*OL, HG*HD]`` and ``wo_b [D, G*OL]`` float8_e4m3fn with their
            128x128 block scales (fp32), as the checkpoint stores them; ``G = H*HD / (HG*HD)``.
        backend: ``"reference"``, ``"triton"`` or ``"auto"``.
        out: optional preallocated ``OProjOut`` to write into (returned).

    Returns:
        ``OProjOut(y [T, D] bf16)``: ``r = bf16(o_group @ wo_a[g].T)`` per group, FP8-quantized per
        128, times ``wo_b`` with both block scales.
    """


def validate(args: dict[str, Any], out: OProjOut | None) -> dict[str, Any]:
    check_o_proj(args["o"], args["w"], out)
    return {}


def case_args(c: CaseInputs) -> dict[str, Any]:
    cfg = c.cfg
    return {
        "o": unit_rows(c, c.batch * c.seq, cfg.num_attention_heads, cfg.head_dim),
        "w": synthetic_o_proj(cfg, c.seed).to(c.device),
    }


def cost(cfg: DeepSeekV4Config, start_pos: Sequence[int], seq: int) -> OpCost:
    """``o_proj`` on ``len(start_pos) * seq`` tokens: each FP8 weight read once (with its block scales)."""
    t, d, h, hd = len(start_pos) * seq, cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    gol, inner = cfg.o_groups * cfg.o_lora_rank, h // cfg.o_groups * hd
    reads = {
        "o": t * h * hd * BF16,
        "w.wo_a (FP8)": gol * inner,
        "w.wo_a_scale": -(-gol // 128) * -(-inner // 128) * FP32,
        "w.wo_b (FP8)": d * gol,
        "w.wo_b_scale": -(-d // 128) * -(-gol // 128) * FP32,
    }
    writes = {"y": t * d * BF16}
    flops = {"bf16": 2 * t * gol * inner, "fp8": 2 * t * d * gol}
    return OpCost("o_proj", reads, writes, flops)


def fake_result(args: dict[str, Any]) -> OProjOut:
    return OProjOut(args["o"].new_empty((args["o"].shape[0], args["w"].wo_b.shape[0])))


O_PROJ = OpDescriptor(
    name="o_proj",
    signature=o_proj,
    outputs=(Output("y", Y_RULE),),
    mutates=(),
    validate=validate,
    case_args=case_args,
    cost=cost,
    fake_result=fake_result,
    implementations={"reference": "dsv4.reference.o_proj:o_proj", "triton": "dsv4.kernels.o_proj:o_proj"},
)

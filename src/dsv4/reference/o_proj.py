"""Reference ``o_proj`` (attention spec §6): the grouped FP8 output projection, literally, in fp32."""

from __future__ import annotations

import torch

from ..model.fp8_row import ACT_BLOCK, dequantize_fp8_weight, fp8_act_quant
from ..model.structs import OProjOut
from ..model.weights import OProjWeights


def o_proj(o: torch.Tensor, w: OProjWeights, out: OProjOut | None = None) -> OProjOut:
    """``o [T, H, HD] bf16`` -> ``OProjOut(y [T, D] bf16)``.

    1. ``r[t, g] = bf16(o[t, group g's heads].flatten() @ wo_a[g].T)``: ``wo_a`` dequantized to bf16
       (exact) and viewed as ``[G, OL, HG*HD]``, fp32 accumulation.
    2. ``a = r[t].flatten()``, FP8 activation quant per 128: codes ``a8``, scales ``sa``.
    3. ``y[t, n] = bf16(sum_kb sa[t, kb] * wo_b_scale[n // 128, kb] * sum_{i in kb} a8[t, i] * wo_b[n, i])``.
    """
    t = o.shape[0]
    rows, cols = w.wo_a.shape  # G*OL, HG*HD
    groups = o.shape[1] * o.shape[2] // cols
    wo_a = dequantize_fp8_weight(w.wo_a, w.wo_a_scale).to(torch.float32).view(groups, rows // groups, cols)
    r = torch.einsum("tgk,gok->tgo", o.to(torch.float32).reshape(t, groups, cols), wo_a).to(torch.bfloat16)
    a8, sa = fp8_act_quant(r.reshape(t, rows))
    a8 = a8.to(torch.float32)
    wo_b = w.wo_b.to(torch.float32)
    d = wo_b.shape[0]
    w_scale = w.wo_b_scale.repeat_interleave(ACT_BLOCK, dim=0)[:d]  # [D, G*OL/128]: each output row's scales
    y = torch.zeros(t, d, dtype=torch.float32, device=o.device)
    for kb in range(rows // ACT_BLOCK):
        blk = slice(kb * ACT_BLOCK, (kb + 1) * ACT_BLOCK)
        y += (a8[:, blk] @ wo_b[:, blk].T) * sa[:, kb, None] * w_scale[None, :, kb]
    y = y.to(torch.bfloat16)
    if out is None:
        return OProjOut(y)
    out.y.copy_(y)
    return out

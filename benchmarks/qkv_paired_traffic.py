"""Traffic of ``qkv_proj_rope``'s GPU plan at flash decode, counted under Triton's CPU interpreter.

    python benchmarks/qkv_paired_traffic.py

On a GPU the q heads run as pairs of programs (one per half head) that swap their rows' sums of
squares; the interpreter runs programs one at a time, so ``dsv4 bench --cpu`` counts the plan it
can run (each pair as one program). This script counts the paired plan itself: the projection, the
rows kernel with the exchange buffer's reset, and the paired q-heads launch as the pairs meet on a
GPU, each half finishing its own (a first, uncounted paired launch publishes every half's sums, then
every pair's arrival word is set to "one half waits"). It checks the outputs against the op's and
prints the bytes per launch and the ratios to the minimal 56,005,120 B.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # traffic is counted in the interpreter: chosen before Triton is imported
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import triton  # noqa: E402

import dsv4  # noqa: E402
from dsv4.bench.interp_traffic import count_traffic  # noqa: E402
from dsv4.harness.cases import make_case  # noqa: E402
from dsv4.kernels.launch import H100_SMS  # noqa: E402
from dsv4.kernels.projection import split_k_projection  # noqa: E402
from dsv4.model.config import get_config  # noqa: E402

qk = importlib.import_module("dsv4.kernels.qkv_proj_rope")
MINIMAL = 56_005_120  # bytes model of qkv_proj_rope at flash decode (docs/DESIGN.md)


def main() -> None:
    cfg = get_config("flash")
    args = make_case(cfg, "qkv_proj_rope", "decode", 0, device="cpu").args
    x, w, positions, rope = args["x"], args["w"], args["positions"], args["rope"]
    t, h, eps = x.shape[0], cfg.num_attention_heads, cfg.rms_norm_eps
    ql, hd = w.wq_a.shape[0], w.wkv.shape[0]
    expected = dsv4.qkv_proj_rope(x, w, positions, rope, backend="triton")
    block_m, paired = qk.q_heads_tiles(t, h, H100_SMS)
    assert paired, "flash decode pairs the q heads on an H100"

    published = torch.full((qk.pair_words(t, h),), -1, dtype=torch.int64)
    park = torch.empty(qk.park_shape(t, h, hd, block_m))
    q = torch.empty_like(expected.q)
    qk.launch_q_heads(expected.qr, expected.qr_scale, w, positions, rope, eps, q, published, park, block_m, True)
    published[2 * h * t :] = 1  # every pair: one half waits, the other comes
    qr, qr_scale, kv = (torch.empty_like(v) for v in (expected.qr, expected.qr_scale, expected.kv))
    reset = torch.empty(qk.pair_words(t, h), dtype=torch.int64)
    with count_traffic() as log:
        partial = split_k_projection(x, w.wq_a, w.wkv)
        qk._qr_kv_rows_kernel[(t, 2)](
            partial, w.gamma_cq, w.gamma_ckv, positions, rope.cos, rope.sin, qr, qr_scale, kv, reset, t, eps,
            QL=ql, HD=hd, R=rope.rope_dim, BLOCK_QL=triton.next_power_of_2(ql), SPLITS=partial.shape[0],
            PAIRED=True, PAIR_SLOTS=3 * h, PAIR_BLOCK=triton.next_power_of_2(3 * h), PDL=False,
        )  # fmt: skip
        qk.launch_q_heads(qr, qr_scale, w, positions, rope, eps, q, published, park, block_m, True)
    for name, got in (("q", q), ("kv", kv), ("qr", qr), ("qr_scale", qr_scale)):
        assert torch.equal(got, getattr(expected, name)), name
    assert bool((reset == -1).all()), "the rows kernel resets the whole exchange buffer"
    assert bool((published[2 * h * t : 2 * h * t + h] == 2).all()), "every pair met, none parked"

    for launch in log.launches:
        print(f"{launch.kernel:28s} grid {launch.grid}  requested {launch.requested_bytes:>11,}  "
              f"sector {launch.sector_bytes:>11,}  unique {launch.unique_bytes:>11,}")  # fmt: skip
    requested, unique = log.total("requested_bytes"), log.total("unique_bytes")
    print(f"total: requested {requested:,} ({requested / MINIMAL:.3f}x), unique {unique:,} ({unique / MINIMAL:.3f}x)")


if __name__ == "__main__":
    main()

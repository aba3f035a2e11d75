"""Compile ``_select_row_kernel`` for sm_90 on the CPU, no GPU: SASS, block barriers, registers, spills.

The one-program top-k is a straight-line kernel (every loop over a row is unrolled), so its
instruction count is its serial chain. For each (row length, topk, tuning config) this lowers the
variant ``select_topk`` launches at that shape through ``tests/sm90.py``'s compile-only H100 stand-in
and counts, in the cubin: SASS instructions (``nvdisasm``), ``BAR.SYNC`` barriers, registers per
thread and local memory (spills).

    python benchmarks/topk_select_sass.py [--shapes 2048:512,4096:512,4096:1024] [--configs '{}' '{"radix_bits": 11}']

Runs ``TRITON_INTERPRET=0`` itself; the figures belong to the installed Triton.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ["TRITON_INTERPRET"] = "0"
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

import sm90  # noqa: E402  (after the interpreter switch and the path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="2048:512,4096:512,4096:1024", help="keys:topk, comma-separated")
    parser.add_argument("--configs", nargs="*", default=["{}"], help="topk.select_row settings (JSON), one per run")
    args = parser.parse_args()
    launches: list = []
    sm90._on_h100(launches)
    import torch
    import triton

    from dsv4.kernels import tuning
    from dsv4.kernels.topk import select_topk
    from dsv4.ops.validate import step_positions

    for shape in args.shapes.split(","):
        n, topk = map(int, shape.split(":"))
        pos = step_positions(torch.tensor([4 * n - 2]), 1, 2, torch.device("cpu"))  # the second token sees all n keys
        score = torch.zeros(1, 2, n)
        for cfg in map(json.loads, args.configs):
            launches.clear()
            with tuning.defaults_only(), tuning.forced("topk.select_row", cfg):
                select_topk(score, pos, topk, 128)
            fn, _, kernel = launches[-1]
            usage = sm90._resource_usage(kernel.asm["cubin"])
            sass, _ = sm90._sass(kernel.asm["cubin"])
            row = {
                "triton": triton.__version__, "kernel": fn.__name__, "keys": n, "topk": topk, "config": cfg,
                "sass": len(sass), "bar_sync": sum("BAR.SYNC" in i for i in sass), "registers": usage["REG"],
                "local_bytes": usage["STACK"] + usage["LOCAL"],
            }  # fmt: skip
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

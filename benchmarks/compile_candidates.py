"""Compile every declared launch candidate for sm_90 on the CPU, no GPU: registers, spills, shared memory.

Each kernel's candidates (``dsv4 tune --list``) are forced one at a time while the op runs at a
decode shape (flash, or ``--preset``; each plan's batch, or ``--batch``) through ``tests/sm90.py``'s
compile-only H100 stand-in (Triton's own JIT specializes the real arguments and lowers them for sm_90;
nothing is launched). One row per (kernel, candidate, function it launches): registers per thread,
local memory (spills), shared memory per block, blocks per SM and whether the block fits an H100 at
all, and per MMA loop the dependent global loads one iteration waits for in a row
(``loop_load_chains``); a candidate that does not compile says why. So a GPU slice's ``dsv4 tune``
meets no candidate that cannot launch, and the spills are known before.

    python benchmarks/compile_candidates.py [--kernels qkv.projection,...] [--kind hca] [--preset flash/tp8]
        [--batch 1] [--json out.json]

Runs ``TRITON_INTERPRET=0`` itself (kernels defined under the interpreter cannot be compiled).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ["TRITON_INTERPRET"] = "0"
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

import sm90  # noqa: E402  (after the interpreter switch and the path)
from dsv4.model.config import get_config  # noqa: E402
from dsv4.ops.registry import get_op  # noqa: E402

# the @triton.jit functions behind each tuned kernel (a candidate may launch another: each of the names it
# launches gets a row), and a decode call that launches them
KERNELS = {
    "qkv.projection": ("_split_k_projection_kernel", "qkv"),
    "qkv.rows": ("_qr_kv_rows_kernel", "qkv"),
    "qkv.q_heads": ("_q_heads_kernel,_q_slices_kernel,_q_finish_kernel", "qkv"),
    "index.front": ("_front_kernel", "indexer"),
    "compressor.step": ("_compressor_step_kernel", "compressor"),
    "index.score": ("_score_kernel", "indexer"),
    "topk.select_row": ("_select_row_kernel,_select_bin_kernel", "indexer"),
    "topk.select_chunks": ("_select_chunks_kernel", "indexer_long"),
    "kv_compressor.step": ("_compressor_step_kernel", "kv_compressor"),
    "window_kv_write": ("_window_kv_write_kernel", "window_kv_write"),
    "sparse_attn": ("_attn_kernel", "sparse_attn"),
    "o_proj.wo_a": ("_wo_a_kernel", "o_proj"),
    "o_proj.quant": ("_act_quant_kernel", "o_proj"),
    "o_proj.wo_b": ("_wo_b_kernel", "o_proj"),
}
PLANS = {
    "qkv": sm90.Plan("qkv", "qkv_proj_rope", "flash", 64, 2),
    "compressor": sm90.Plan("compressor", "indexer_compressor", "flash", 64, 2, start_pos=4 * 1024 - 2),
    "indexer": sm90.Plan("indexer", "indexer", "flash", 64, 2, start_pos=4 * 2048 - 2),
    "indexer_long": sm90.Plan(
        "indexer_long", "indexer", "flash", 1, 2, start_pos=4 * 65536 - 2, max_position=4 * 65536
    ),
    # the attention ops at 4 slots where the compile does not depend on the batch (drawing 64 slots'
    # pools takes minutes on the CPU): their buckets and tiles are per slot or per head
    "kv_compressor": sm90.Plan("kv_compressor", "kv_compressor", "flash", 4, 2, start_pos=4 * 2048 - 2),
    "window_kv_write": sm90.Plan("window_kv_write", "window_kv_write", "flash", 64, 2, start_pos=4 * 2048 - 2),
    "sparse_attn": sm90.Plan(
        "sparse_attn", "sparse_attn", "flash", 4, 2, start_pos=4 * 2048 - 2, max_position=4 * 2048
    ),
    "o_proj": sm90.Plan("o_proj", "o_proj", "flash", 64, 2),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", help="comma-separated (default: every tuned kernel)")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument(
        "--kind", choices=("hca", "swa"), help="the ops that have layer kinds (kv_compressor, sparse_attn) in this one"
    )
    parser.add_argument(
        "--preset", default="flash", help="the preset of the shapes, or one of its tensor-parallel ranks (flash/tp8)"
    )
    parser.add_argument("--batch", type=int, help="sequences of every plan (default: each plan's own)")
    args = parser.parse_args()
    launches: list = []
    sm90._on_h100(launches)
    from dsv4.kernels import tuning

    wanted = args.kernels.split(",") if args.kernels else list(KERNELS)
    unknown = [name for name in wanted if name not in KERNELS]
    if unknown:
        parser.error(f"--kernels: no tuned kernel {', '.join(unknown)} (known: {', '.join(KERNELS)})")
    try:
        positions = get_config(args.preset).max_position_embeddings
    except ValueError as e:
        parser.error(f"--preset: {e}")
    for name in wanted:  # the plans are decode steps at a deployment's positions, which a short preset lacks
        plan = PLANS[KERNELS[name][1]]
        reach = max(plan.start_pos + plan.seq, plan.max_position or 0)
        if reach > positions:
            parser.error(
                f"--preset {args.preset}: {positions} positions, fewer than the {reach} that {name}'s plan "
                f"({plan.op} from position {plan.start_pos}) reaches"
            )
    rows = []
    for name in wanted:
        fn_name, plan_name = KERNELS[name]
        plan = dataclasses.replace(PLANS[plan_name], preset=args.preset, batch=args.batch or PLANS[plan_name].batch)
        if args.kind in get_op(plan.op).kinds:
            plan = dataclasses.replace(plan, kind=args.kind)
        tunable = tuning.TUNABLES[name]
        # the bucket the plan's launch looks up: recorded from one run at the defaults
        launches.clear()
        with tuning.defaults_only(), tuning.recording() as seen:
            sm90._run_plan(plan)
        bucket = next(b for k, b in seen if k == name)
        for cfg in tunable.candidate_configs(tunable.parse_bucket(bucket)):
            changed = {k: v for k, v in cfg.items() if v != tunable.default[k]}
            t0 = time.perf_counter()
            launches.clear()
            found: list[dict] = []
            try:
                with tuning.defaults_only(), tuning.forced(name, cfg):
                    sm90._run_plan(plan)
                mine = [(fn, grid, k) for fn, grid, k in launches if fn.__name__ in fn_name.split(",")]
                for fn, grid, kernel in mine[:1] if len(fn_name.split(",")) == 1 else mine:
                    v = sm90._variant(fn, kernel, [(plan.name, tuple(grid))])
                    variant = sm90.Variant(
                        **{**v, "launches": tuple(v["launches"]), "aligned": tuple(v["aligned"]),
                           "pdl_order": tuple(v["pdl_order"]), "loop_load_chains": tuple(v["loop_load_chains"])}
                    )  # fmt: skip
                    found.append(dict(
                        function=fn.__name__, grid=list(grid), registers=variant.registers,
                        local_bytes=variant.local_bytes, shared_bytes=variant.shared_bytes,
                        num_warps=variant.num_warps, num_stages=variant.num_stages,
                        blocks_per_sm=variant.blocks_per_sm(), fits=variant.shared_bytes <= sm90.H100_SHARED,
                        pipelined=variant.pipelined, mma=variant.mma, dependent_launch=variant.dependent_launch,
                        loop_load_chains=list(variant.loop_load_chains),
                    ))  # fmt: skip
                if not found:
                    raise LookupError(f"none of {fn_name} was launched")
            except Exception as e:  # noqa: BLE001  (a candidate that does not compile is the finding)
                error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
                found = [{"error": error}]
            for part in found:
                row = {"kernel": name, "bucket": bucket, "changed": changed, **part}
                row["seconds"] = round(time.perf_counter() - t0, 1)
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        import triton

        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        meta = {
            "what": f"every tune candidate compiled for sm_90 on the CPU (tests/sm90.py's H100 stand-in), "
            f"{args.preset} decode",
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "commit": commit or None,
            "triton": triton.__version__,
            "command": " ".join(["python", "benchmarks/compile_candidates.py", *sys.argv[1:]]),
        }
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

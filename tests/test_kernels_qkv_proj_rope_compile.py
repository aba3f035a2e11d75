"""The qkv_proj_rope kernels compile for an H100 (sm_90) with the installed Triton, no GPU needed.

The interpreter runs kernel source as Python and accepts things the compiler rejects, so the three
kernels are also lowered to cubins, with the tiles the launchers pick at flash decode (T=128: paired
q-heads programs, programmatic dependent launch), at T=1, at T=256 (one program per head) and for
``pro`` (QL=1536, not a power of two; 128 heads). The q heads' accumulators are the register hog:
no cubin may spill (no local memory), each must fit the SM's shared memory, and the streaming main
loops must be pipelined (``cp.async``) (``sm90.run_compile_script`` runs the script).
"""

from __future__ import annotations

from sm90 import run_compile_script

COMPILE = r"""
import importlib
import os
import re
import subprocess
import tempfile

import triton

from dsv4.model.config import get_config
from dsv4.kernels import launch, projection as pj, split_k as sk

qk = importlib.import_module("dsv4.kernels.qkv_proj_rope")
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
H100_SHARED = 232448  # bytes of shared memory one block may use on sm_90


def compile_checked(fn, signature, constexprs, num_warps, num_stages):
    # compile_sm90, then: within the SM's shared memory, no spills to local memory, and (with
    # num_stages > 1) a main loop that copies global to shared memory asynchronously (pipelined).
    kernel = compile_sm90(fn, signature, constexprs, num_warps, num_stages=num_stages)
    assert kernel.metadata.shared <= H100_SHARED, (fn.__name__, kernel.metadata.shared)
    usage = ""
    if os.path.exists(CUOBJDUMP):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        local = re.search(r"LOCAL:(\d+)", usage)
        assert local and int(local.group(1)) == 0, (fn.__name__, "spills to local memory", usage)
    ptx = kernel.asm["ptx"]
    pipelined = "cp.async" in ptx or "cp.async.bulk" in ptx
    assert num_stages == 1 or pipelined, (fn.__name__, "main loop not pipelined")
    if constexprs.get("PDL"):
        assert "griddepcontrol" in ptx, (fn.__name__, "no griddepcontrol")
    regs = re.search(r"REG:(\d+)", usage)
    print("  shared", kernel.metadata.shared, "regs", regs.group(1) if regs else "?", "pipelined", pipelined)


def compile_op(cfg, t, pdl):
    d, ql, hd, h, r = cfg.hidden_size, cfg.q_lora_rank, cfg.head_dim, cfg.num_attention_heads, cfg.qk_rope_head_dim
    tiles = pj.projection_tiles(t, d, ql, hd, launch.H100_SMS)
    block_m, paired = qk.q_heads_tiles(t, h, launch.H100_SMS)
    print(cfg.name, "T", t, "projection", tiles, "q heads", block_m, "paired" if paired else "whole heads")
    compile_checked(pj._split_k_projection_kernel,
                    {"x_ptr": "*bf16", "w0_ptr": "*bf16", "w1_ptr": "*bf16", "partial_ptr": "*fp32", "T": "i32"},
                    {"D": d, "N0": ql, "N1": hd, "BLOCK_M": tiles.block_m, "BLOCK_N": tiles.block_n,
                     "BLOCK_K": sk.BLOCK_K, "SPLITS": tiles.splits, "PDL": pdl}, pj.NUM_WARPS, pj.NUM_STAGES)
    compile_checked(qk._qr_kv_rows_kernel,
                    {"partial_ptr": "*fp32", "gamma_cq_ptr": "*bf16", "gamma_ckv_ptr": "*bf16",
                     "positions_ptr": "*i64", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "qr_ptr": "*i8",
                     "qr_scale_ptr": "*fp32", "kv_ptr": "*bf16", "sumsq_ptr": "*fp32", "T": "i32", "eps": "fp32"},
                    {"QL": ql, "HD": hd, "R": r, "BLOCK_QL": triton.next_power_of_2(ql), "SPLITS": tiles.splits,
                     "PAIRED": paired, "PAIR_SLOTS": 2 * h, "PAIR_BLOCK": triton.next_power_of_2(2 * h), "PDL": pdl},
                    qk.ROWS_NUM_WARPS, 1)
    compile_checked(qk._q_heads_kernel,
                    {"qr_ptr": "*i8", "qr_scale_ptr": "*fp32", "wq_b_ptr": "*i8", "wq_b_scale_ptr": "*fp32",
                     "positions_ptr": "*i32", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "q_ptr": "*bf16",
                     "sumsq_ptr": "*fp32", "T": "i32", "eps": "fp32"},
                    {"QL": ql, "H": h, "HD": hd, "R": r, "BLOCK_M": block_m,
                     "BLOCK_K": launch.pow2_divisor(ql, qk.Q_BLOCK_K_MAX), "PAIRED": paired, "PDL": pdl},
                    qk.Q_NUM_WARPS, qk.Q_NUM_STAGES)


compile_op(get_config("flash"), 128, True)
compile_op(get_config("flash"), 1, False)
compile_op(get_config("flash"), 256, True)
compile_op(get_config("pro"), 128, True)
"""


def test_qkv_proj_rope_kernels_compile_for_sm90() -> None:
    out = run_compile_script(COMPILE, timeout=900)
    assert out.count("compiled") == 12, out

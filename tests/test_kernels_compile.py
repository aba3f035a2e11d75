"""The indexer's kernels compile for an H100 (sm_90) with the installed Triton, no GPU needed.

The interpreter runs kernel source as Python and accepts things the compiler rejects (a named
constexpr reassigned in a static loop, a shape computed at run time), so CI also lowers every
kernel to a cubin (``sm90.run_compile_script``).
"""

from __future__ import annotations

import pytest

from sm90 import run_compile_script

SCORE_TOPK = r"""
from dsv4.kernels import index_score as isc, topk as tk

score_args = {"q8_ptr": "*i8", "q_scale_ptr": F32, "weights_ptr": F32, "cache_ptr": "*bf16", "start_ptr": I64,
              "score_ptr": F32, "seq": "i32", "n_keys": "i32", "cache_stride_b": "i64", "cache_stride_row": "i32"}
for heads in (4, 64):
    compile_sm90(isc._index_score_kernel, score_args,
                 {"HEADS": heads, "HEADS_PAD": max(isc.MIN_DOT_WIDTH, heads), "HEAD_DIM": 128,
                  "KEYS": isc.KEYS_PER_PROGRAM}, isc.SCORE_WARPS)
radix = {"BITS": tk.RADIX_BITS, "PASSES": tk.RADIX_PASSES}
compile_sm90(tk._select_row_kernel,
             {"score_ptr": F32, "start_ptr": I64, "cand_ptr": I64, "out_ptr": I32, "seq": "i32", "n": "i32",
              "topk": "i32", "offset": "i32"},
             {"ROW": tk.ROW_IN_REGISTERS, "TOPK_PAD": 1024, "LOG_TOPK_PAD": 10, **radix}, tk.SELECT_WARPS)
for p in (0, tk.RADIX_PASSES - 1):
    compile_sm90(tk._radix_pass_kernel,
                 {"score_ptr": F32, "start_ptr": I64, "hist_ptr": I32, "level_ptr": I64, "chunk_hist_ptr": I32,
                  "seq": "i32", "n": "i32", "topk": "i32", "n_chunks": "i32"},
                 {"PASS": p, "CHUNK": tk.CHUNK, **radix}, tk.SELECT_WARPS)
compile_sm90(tk._gather_kernel,
             {"score_ptr": F32, "start_ptr": I64, "hist_ptr": I32, "level_ptr": I64, "chunk_hist_ptr": I32,
              "taken_ptr": I32, "cand_ptr": I64, "seq": "i32", "n": "i32", "topk": "i32", "n_chunks": "i32"},
             {"CHUNK": tk.CHUNK, "CHUNKS_PAD": 64, "TOPK_PAD": 1024, **radix}, tk.SELECT_WARPS)
compile_sm90(tk._sort_rows_kernel,
             {"cand_ptr": I64, "start_ptr": I64, "out_ptr": I32, "seq": "i32", "topk": "i32", "offset": "i32"},
             {"TOPK_PAD": 1024, "LOG_TOPK_PAD": 10}, 4)
"""


# The x-side projection (both K plans and the slice sum), the compressor step and the query kernel,
# at the flash dims (HID 128, R 64) with the launchers' tiles and options.
FRONT = r"""
from dsv4.kernels import compressor as cp, index_query as iq, split_k as sk, x_proj as xp

x_args = {"x_ptr": "*bf16", "wkv_ptr": "*bf16", "wgate_ptr": "*bf16", "wproj_ptr": "*bf16", "ape_ptr": F32,
          "start_ptr": I64, "kvg_ptr": F32, "weights_ptr": F32, "partial_ptr": F32, "T": "i32", "D": "i32",
          "S": "i32", "HI": "i32", "weights_scale": "fp32"}
tiles = {"TWO_HID": 256, "BLOCK_M": xp.BLOCK_M, "BLOCK_N": xp.BLOCK_N}
for split in (1, 4):
    compile_sm90(xp._x_proj_kernel, x_args, {**tiles, "BLOCK_K": sk.BLOCK_K, "SPLIT_K": split}, xp.NUM_WARPS)
compile_sm90(xp._sum_splits_kernel,
             {"partial_ptr": F32, "ape_ptr": F32, "start_ptr": I64, "kvg_ptr": F32, "weights_ptr": F32, "T": "i32",
              "S": "i32", "HI": "i32", "weights_scale": "fp32"}, {**tiles, "SPLIT_K": 4}, xp.NUM_WARPS)
head = {"HID": 128, "NOPE": 64, "HALF_R": 32}
for norm_w in ("*bf16", "*fp32"):
    compile_sm90(cp._compressor_step_kernel,
                 {"kvg_ptr": F32, "start_ptr": I64, "kv_state_ptr": F32, "score_state_ptr": F32, "cache_ptr": "*bf16",
                  "norm_w_ptr": norm_w, "cos_ptr": F32, "sin_ptr": F32, "signs_ptr": F32, "S": "i32",
                  "cache_rows": "i32", "eps": "fp32", "hadamard_scale": "fp32"},
                 {**head, "BLOCKS": cp.BLOCKS_PER_PROGRAM}, cp.NUM_WARPS, enable_fp_fusion=False)
compile_sm90(iq._index_query_kernel,
             {"qr_ptr": "*i8", "qr_scale_ptr": F32, "wq_b_ptr": "*i8", "wq_b_scale_ptr": F32, "start_ptr": I64,
              "cos_ptr": F32, "sin_ptr": F32, "signs_ptr": F32, "q8_ptr": "*i8", "q_scale_ptr": F32, "T": "i32",
              "S": "i32", "QL": "i32", "HI": "i32", "hadamard_scale": "fp32"},
             {**head, "BLOCK_M": iq.BLOCK_M, "BLOCK_K": iq.BLOCK_K}, iq.NUM_WARPS, enable_fp_fusion=False)
"""


@pytest.mark.parametrize(("script", "kernels"), [(SCORE_TOPK, 7), (FRONT, 6)], ids=["score-topk", "front"])
def test_kernels_compile_for_sm90(script: str, kernels: int) -> None:
    out = run_compile_script(script, timeout=600)
    assert out.count("compiled") == kernels, out

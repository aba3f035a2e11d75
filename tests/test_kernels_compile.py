"""The score and top-k kernels compile for an H100 (sm_90) with the installed Triton, no GPU needed.

The interpreter runs kernel source as Python and accepts things the compiler rejects (a named
constexpr reassigned in a static loop, a shape computed at run time), so CI also lowers every
kernel to a cubin. It runs in a subprocess because kernels defined under ``TRITON_INTERPRET=1``
cannot be compiled.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dsv4.kernels import index_score as isc, topk as tk

F32, I64, I32 = "*fp32", "*i64", "*i32"


def compile_sm90(fn, signature, constexprs, num_warps):
    full = {**signature, **{name: "constexpr" for name in constexprs}}
    # As a launch specializes them: pointers from torch allocations and row strides are 16-aligned.
    aligned = [name for name, kind in signature.items() if kind.startswith("*") or "stride" in name]
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    src = ASTSource(fn=fn, signature=full, constexprs=constexprs, attrs=attrs)
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    print("compiled", fn.__name__, constexprs)


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


def test_score_and_topk_kernels_compile_for_sm90() -> None:
    pytest.importorskip("triton.backends.nvidia", reason="Triton without its NVIDIA backend cannot target sm_90")
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(SRC)}
    result = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("compiled") == 7, result.stdout

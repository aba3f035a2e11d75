"""The indexer's kernels compile for an H100 (sm_90) as its launches specialize them, no GPU needed.

The interpreter runs kernel source as Python and accepts things the compiler rejects (a named
constexpr reassigned in a static loop, a shape computed at run time), so CI also lowers every
kernel variant the launchers run at flash decode (2048 and 262144 cache rows), for a prefill chunk
and for ``indexer_compressor`` alone (``sm90.compile_plans``), and checks what ``docs/DESIGN.md``
says of them: the launch plans and grids, no spills, the shared memory, the pipelined loops.
"""

from __future__ import annotations

import pytest

from sm90 import H100_SHARED, Plan, Variant, compile_plans

LONG = 262144  # cache rows at 1M tokens
# Two groups compiled side by side; the decode plans share their compressor and score variants,
# and the B=1 ones their x-projection and query variants.
PLANS = [
    [
        Plan("decode-2048", "indexer", "flash", batch=64, seq=2, start_pos=4 * 2048 - 2),
        Plan("decode-262144", "indexer", "flash", batch=1, seq=2, start_pos=4 * LONG - 2, max_position=4 * LONG),
        # the longest row the top-k selects in one program (ROW_IN_REGISTERS)
        Plan("decode-4096", "indexer", "flash", batch=1, seq=2, start_pos=4 * 4096 - 2, max_position=4 * 4096),
    ],
    [
        Plan("prefill-1024", "indexer", "flash", batch=1, seq=1024),
        Plan("compressor-decode", "indexer_compressor", "flash", batch=64, seq=2, start_pos=4 * 2048 - 2),
        Plan("compressor-decode-fp32-norm", "indexer_compressor", "flash", 64, 2, 4 * 2048 - 2, fp32=("norm_w",)),
    ],
]

# Launches per plan and their grids, as docs/DESIGN.md ("Launches", "Two launch plans") gives them:
# D split 4 ways at T=128 and 14 at T=2, not at all at T=1024; top-k in one program per row up to
# 4096 keys, in 4096-key chunks beyond (the first-digit histogram built by the top-k itself).
TOP_K_CHUNKED = {"_first_digit_kernel": (2, 64), "_select_chunks_kernel": (2, 64)}
GRIDS = {
    "decode-2048": {
        "_x_proj_kernel": (9, 2, 4), "_sum_splits_kernel": (9, 2), "_compressor_step_kernel": (64, 1),
        "_index_query_kernel": (2, 64), "_index_score_kernel": (16, 64), "_select_row_kernel": (128,),
    },
    "decode-262144": {
        "_x_proj_kernel": (9, 1, 14), "_sum_splits_kernel": (9, 1), "_compressor_step_kernel": (1, 1),
        "_index_query_kernel": (1, 64), "_index_score_kernel": (2048, 1), **TOP_K_CHUNKED,
    },
    "decode-4096": {
        "_x_proj_kernel": (9, 1, 14), "_sum_splits_kernel": (9, 1), "_compressor_step_kernel": (1, 1),
        "_index_query_kernel": (1, 64), "_index_score_kernel": (32, 1), "_select_row_kernel": (2,),
    },
    "prefill-1024": {
        "_x_proj_kernel": (9, 16, 1), "_compressor_step_kernel": (1, 16), "_index_query_kernel": (16, 64),
        "_index_score_kernel": (2, 1), "_select_row_kernel": (1024,),
    },
    "compressor-decode": {
        "_x_proj_kernel": (8, 2, 4), "_sum_splits_kernel": (8, 2), "_compressor_step_kernel": (64, 1),
    },
}  # fmt: skip
GRIDS["compressor-decode-fp32-norm"] = GRIDS["compressor-decode"]

# Kernels whose main loop streams operands through shared memory with cp.async (docs/DESIGN.md).
PIPELINED = {"_x_proj_kernel", "_index_query_kernel", "_index_score_kernel"}
# Launched with enable_fp_fusion=False, so that a*b - c*d rounds each product as the reference does.
UNFUSED = {"_compressor_step_kernel", "_index_query_kernel"}
# Programs per SM that docs/DESIGN.md counts on: three 128-key score programs share an SM.
MIN_BLOCKS_PER_SM = {"_index_score_kernel": 3}


@pytest.fixture(scope="module")
def variants() -> list[Variant]:
    return compile_plans(PLANS)


def test_each_plan_launches_the_documented_kernels_and_grids(variants: list[Variant]) -> None:
    for plan, grids in GRIDS.items():
        launched = {}
        for v in variants:
            for p, grid in v.launches:
                if p == plan:
                    assert launched.setdefault(v.kernel, grid) == grid, (plan, v.kernel)
        assert launched == grids, plan


def test_no_spills_and_each_block_fits_an_sm(variants: list[Variant]) -> None:
    for v in variants:
        assert v.local_bytes == 0, (v.kernel, v.launches, "spills", v.local_bytes)
        assert v.shared_bytes <= H100_SHARED, (v.kernel, v.launches, v.shared_bytes)
        assert v.blocks_per_sm() >= MIN_BLOCKS_PER_SM.get(v.kernel, 1), (v.kernel, v.registers, v.shared_bytes)


def test_streaming_loops_are_pipelined(variants: list[Variant]) -> None:
    for v in variants:
        if v.kernel in PIPELINED:
            assert v.pipelined, (v.kernel, v.launches, "loads are not pipelined through shared memory")
    assert {v.kernel for v in variants} >= PIPELINED


def test_unfused_kernels_have_no_fma(variants: list[Variant]) -> None:
    for v in variants:
        if v.kernel in UNFUSED:
            assert v.fma == 0, (v.kernel, v.launches, v.fma)
    assert {v.kernel for v in variants} >= UNFUSED

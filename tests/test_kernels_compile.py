"""The indexer's kernels compile for an H100 (sm_90) as its launches specialize them, no GPU needed.

The interpreter runs kernel source as Python and accepts things the compiler rejects (a named
constexpr reassigned in a static loop, a shape computed at run time), so CI also lowers every
kernel variant the launchers run at flash decode (2048 and 262144 cache rows), for a prefill chunk
and for ``indexer_compressor`` alone (``sm90.compile_plans``), and checks what ``docs/DESIGN.md``
says of them: the launch plans and grids, the spills (none but the score kernel's documented bound),
the shared memory, the pipelined loops.
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

# Launches per plan and their grids, as docs/DESIGN.md ("Launches") gives them: the front launch (x-projection
# programs over 5 column tiles with D split 4 ways at T=128 (5 x 4 = 20), 26 at T=2 (132 SMs // 5 tiles:
# 5 x 26 = 130), not at all at T=1024 (5 x 8 token tiles = 40), then one query program per head and token
# tile), the persistent score launch (one program per SM, fewer when there are fewer items), and the top-k:
# one program per row up to 4096 keys, 4096-key chunks beyond.
GRIDS = {
    "decode-2048": {"_front_kernel": (84,), "_score_kernel": (132,), "_select_row_kernel": (128,)},
    "decode-262144": {"_front_kernel": (194,), "_score_kernel": (132,), "_select_chunks_kernel": (2, 64)},
    "decode-4096": {"_front_kernel": (194,), "_score_kernel": (34,), "_select_row_kernel": (2,)},
    "prefill-1024": {"_front_kernel": (552,), "_score_kernel": (4,), "_select_row_kernel": (1024,)},
    "compressor-decode": {"_front_kernel": (16,), "_compressor_step_kernel": (64, 1)},
}
GRIDS["compressor-decode-fp32-norm"] = GRIDS["compressor-decode"]

# Kernels whose main loop streams operands through shared memory with cp.async (docs/DESIGN.md).
PIPELINED = {"_front_kernel", "_score_kernel"}
# Launched with enable_fp_fusion=False, so that a*b - c*d rounds each product as the reference does.
UNFUSED = {"_front_kernel", "_score_kernel", "_compressor_step_kernel"}
# Local memory the score kernel is known to use (docs/DESIGN.md, "sm_90 build"): its close phase runs
# the compressor's close tile at the edge of the register file; every other kernel has none.
SPILL_BYTES_AT_MOST = {"_score_kernel": 1024}  # Triton 3.9: at most 464 B, 3.6: 872 B


@pytest.fixture(scope="session")
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


def test_spills_and_each_block_fits_an_sm(variants: list[Variant]) -> None:
    for v in variants:
        assert v.local_bytes <= SPILL_BYTES_AT_MOST.get(v.kernel, 0), (v.kernel, v.launches, "spills", v.local_bytes)
        assert v.shared_bytes <= H100_SHARED, (v.kernel, v.launches, v.shared_bytes)
        assert v.blocks_per_sm() >= 1, (v.kernel, v.registers, v.shared_bytes)


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

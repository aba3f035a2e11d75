"""The qkv_proj_rope kernels compile for an H100 (sm_90) as its launches specialize them, no GPU needed.

The interpreter runs kernel source as Python and accepts things the compiler rejects, so the
three kernels are also lowered to cubins, exactly the variants the launcher runs at flash decode
(T=128), at T=1, for ``pro`` (QL=1536, not a power of two) and for a prefill chunk (T=1024, where D
is not split) (``sm90.compile_plans``). The whole-head q accumulator is the register hog: no variant
may spill (no local memory), each must fit the SM's shared memory, and the two GEMM loops must
stream their operands through shared memory (cp.async), as ``docs/DESIGN.md`` says they do.
"""

from __future__ import annotations

import pytest

from sm90 import H100_SHARED, Plan, Variant, compile_plans

PLANS = [  # two groups, compiled side by side
    [
        Plan("flash-decode", "qkv_proj_rope", "flash", batch=64, seq=2),
        Plan("pro-decode", "qkv_proj_rope", "pro", 64, 2),
    ],
    [Plan("flash-t1", "qkv_proj_rope", "flash", 1, 1), Plan("flash-prefill-1024", "qkv_proj_rope", "flash", 1, 1024)],
]
# Grids as docs/DESIGN.md gives them: 12 column tiles x 11 K-slices fill 132 SMs at T=128; at T=1024
# the 96 output tiles alone do (one slice); q heads: ceil(T / 64) M-tiles x H heads.
KERNELS = ("_split_k_projection_kernel", "_qr_kv_rows_kernel", "_q_heads_kernel")
GRIDS = {
    "flash-decode": ((12, 1, 11), (128,), (2, 64)),
    "flash-t1": ((12, 1, 11), (1,), (1, 64)),
    "pro-decode": ((16, 1, 8), (128,), (2, 128)),
    "flash-prefill-1024": ((12, 8, 1), (1024,), (16, 64)),
}
PIPELINED = {"_split_k_projection_kernel", "_q_heads_kernel"}  # 3 and 2 stages of cp.async
WGMMA_PLANS = {"flash-decode", "pro-decode", "flash-prefill-1024"}  # 64- and 128-row tiles; T=1 has 16 (mma.sync)


@pytest.fixture(scope="module")
def variants() -> list[Variant]:
    return compile_plans(PLANS)


def test_each_plan_launches_the_documented_grids(variants: list[Variant]) -> None:
    for plan, grids in GRIDS.items():
        launched = {v.kernel: grid for v in variants for p, grid in v.launches if p == plan}
        assert launched == dict(zip(KERNELS, grids, strict=True)), plan


def test_no_spills_and_each_block_fits_an_sm(variants: list[Variant]) -> None:
    for v in variants:
        assert v.local_bytes == 0, (v.kernel, v.launches, "spills", v.local_bytes)
        assert v.shared_bytes <= H100_SHARED, (v.kernel, v.launches, v.shared_bytes)
        assert v.blocks_per_sm() >= 1, (v.kernel, v.registers, v.shared_bytes)


def test_gemm_loops_are_pipelined_on_tensor_cores(variants: list[Variant]) -> None:
    for v in variants:
        if v.kernel in PIPELINED:
            assert v.pipelined, (v.kernel, v.launches, "loads are not pipelined through shared memory")
            assert v.mma == ("wgmma" if v.plans <= WGMMA_PLANS else "mma.sync"), (v.kernel, v.launches, v.mma)
    assert {v.kernel for v in variants} >= PIPELINED

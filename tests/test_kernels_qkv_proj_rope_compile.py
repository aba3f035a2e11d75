"""The qkv_proj_rope kernels compile for an H100 (sm_90) as its launches specialize them, no GPU needed.

The interpreter runs kernel source as Python and accepts things the compiler rejects, so the
three kernels are also lowered to cubins, exactly the variants the launcher runs at flash decode
(T=128: paired half-head q programs), at T=1, at T=256 and for ``pro`` (one program per head: the
pairs would not fit one wave), and for a prefill chunk (T=1024, where D is not split)
(``sm90.compile_plans``). The q accumulators are the register hog: no variant may spill (no local
memory), each must fit the SM's shared memory, the two GEMM loops must stream their operands through
shared memory (cp.async), and every kernel takes part in programmatic dependent launch
(``griddepcontrol``), each letting its successor start before it waits for its predecessor, and the q
heads asking L2 for their ``wq_b`` rows before their wait, as ``docs/DESIGN.md`` says.
"""

from __future__ import annotations

import pytest

import sm90
from sm90 import H100_SHARED, Plan, Variant, approx_math_faults, atomic_order_faults, compile_plans

PLANS = [  # two groups, compiled side by side
    [
        Plan("flash-decode", "qkv_proj_rope", "flash", batch=64, seq=2),
        Plan("pro-decode", "qkv_proj_rope", "pro", 64, 2),
    ],
    [
        Plan("flash-t1", "qkv_proj_rope", "flash", 1, 1),
        Plan("flash-t256", "qkv_proj_rope", "flash", 128, 2),
        Plan("flash-prefill-1024", "qkv_proj_rope", "flash", 1, 1024),
        Plan("flash-tp8-decode", "qkv_proj_rope", "flash/tp8", 64, 2),  # one of 8 tensor-parallel ranks
    ],
]
# Grids as docs/DESIGN.md gives them: the projection's K split fills one wave of 132 SMs (12 column tiles
# x 11 K-slices at T <= 128, 24 tiles x 5 at T=256, 16 x 8 for pro); at T=1024 the 96 output tiles alone
# fill the SMs (one slice); rows: a program per token and path (qr, kv); q heads: one M-tile of all
# T <= 128 tokens x 2H half heads when that fits one wave, else ceil(T / 64) x H heads. A rank of 8 has
# the whole layer's projection and rows, and 8 heads: 16 half-head programs.
KERNELS = ("_split_k_projection_kernel", "_qr_kv_rows_kernel", "_q_heads_kernel")
GRIDS = {
    "flash-decode": ((12, 1, 11), (128, 2), (1, 128)),
    "flash-t1": ((12, 1, 11), (1, 2), (1, 128)),
    "flash-t256": ((12, 2, 5), (256, 2), (4, 64)),
    "pro-decode": ((16, 1, 8), (128, 2), (2, 128)),
    "flash-prefill-1024": ((12, 8, 1), (1024, 2), (16, 64)),
    "flash-tp8-decode": ((12, 1, 11), (128, 2), (1, 16)),
}
PIPELINED = {"_split_k_projection_kernel", "_q_heads_kernel"}  # 5 and 3 stages of cp.async
# PDL steps in program order: each launch lets its successor start, then waits; the q heads (no successor
# in the op) ask L2 for their wq_b rows first (projection.py, qkv_proj_rope.py)
PDL_ORDER = {
    "_split_k_projection_kernel": ("launch_dependents", "wait"),
    "_qr_kv_rows_kernel": ("launch_dependents", "wait"),
    "_q_heads_kernel": ("prefetch", "wait"),
}
# 64/128-row tiles; T=1: 16 (mma.sync)
WGMMA_PLANS = {"flash-decode", "flash-t256", "pro-decode", "flash-prefill-1024", "flash-tp8-decode"}


@pytest.fixture(scope="session")
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


def test_every_kernel_takes_part_in_dependent_launch(variants: list[Variant]) -> None:
    """Launched with PDL on an sm_90 GPU, each kernel waits for its predecessor's results in the
    kernel (``gdc_wait``), not at the launch boundary, and lets its successor launch before that wait;
    the q heads' wq_b stream starts before theirs (an L2 prefetch: no kernel loads a value before its
    wait, since a kernel launched before the op may still be writing the op's inputs)."""
    assert all(v.dependent_launch for v in variants), [v.kernel for v in variants if not v.dependent_launch]
    for v in variants:
        assert v.pdl_order == PDL_ORDER[v.kernel], (v.kernel, v.launches, v.pdl_order)
        assert v.loads_before_wait == 0, (v.kernel, v.launches, v.loads_before_wait)


def test_atomics_keep_runs_deterministic_and_pairs_ordered(variants: list[Variant]) -> None:
    """No floating-point atomic; the paired q heads' arrival word is ``acq_rel`` at ``gpu`` scope in the PTX."""
    assert atomic_order_faults(variants, {"_q_heads_kernel"}) == []
    assert any(".acq_rel." in a for v in variants if v.kernel == "_q_heads_kernel" for a in v.atomics)


def test_only_the_softmax_exponentials_are_approximate(variants: list[Variant]) -> None:
    """No ``div.full``/``sqrt.approx`` and the like where the interpreter computes exactly: only the
    ``ex2.approx`` of the softmax exponentials that ``sm90.APPROX_MATH`` allows."""
    assert approx_math_faults(variants) == []


def test_no_kernel_contracts_products_into_fma(variants: list[Variant]) -> None:
    """The RMSNorm's squares, the RoPE's ``a*b - c*d`` and the dequant scales round each product as the
    reference does (``sm90.fused_math_faults``)."""
    assert sm90.fused_math_faults(variants) == []

"""The sparse_attn kernel compiles for an H100 (sm_90) as its launcher specializes it, no GPU needed.

The variants the launcher runs at flash dims (H 64, HD 512, a CSA layer) for a decode step with
multi-token prediction (S=2), for S=1 (a program per token and 32 heads either way) and for
``sparse_attn_write``'s decode step (the same launch storing the window rows), at 4 slots (the keys
split in two, then the combine launch) and 64 (one launch), and an HCA layer's step at one
slot (8 splits; a 64-token chunk of prefill: none) are lowered to cubins (``sm90.compile_plans``):
no variant may spill (no local memory), each block must fit an SM, the grid depends on the shapes
alone (slot x token block x head block, 1, splits), and each kernel lets its dependents launch and
waits for its predecessor inside (programmatic dependent launch), as the module docstring of
``dsv4.kernels.sparse_attn`` says.
"""

from __future__ import annotations

import pytest

import sm90
from sm90 import H100_SHARED, Plan, Variant, approx_math_faults, atomic_order_faults, compile_plans

START = 4 * 2048 - 2  # 2048 compressed rows, the window's 128 rows from the pool
MAX = 4 * 2048
HCA_MAX = 128 * 2048  # an HCA layer (ratio 128) at 2048 compressed rows: a 256K-token context
HCA_START = HCA_MAX - 2
PLANS = [
    [
        Plan("flash-decode", "sparse_attn", "flash", batch=4, seq=2, start_pos=START, max_position=MAX),
        Plan("flash-t1", "sparse_attn", "flash", batch=4, seq=1, start_pos=START, max_position=MAX),
        Plan("flash-decode-write", "sparse_attn_write", "flash", batch=4, seq=2, start_pos=START, max_position=MAX),
        Plan("flash-decode-b64", "sparse_attn", "flash", batch=64, seq=2, start_pos=START, max_position=MAX),
        Plan("flash-hca-b1", "sparse_attn", "flash", 1, 2, start_pos=HCA_START, max_position=HCA_MAX, kind="hca"),
        Plan("flash-hca-chunk", "sparse_attn", "flash", 1, 64, start_pos=MAX - 64, max_position=MAX, kind="hca"),
        # flash-decode with a compressed pool one 64-row block wider a slot (33 blocks, not 32)
        Plan("flash-decode-wide-table", "sparse_attn", "flash", 4, 2, start_pos=START, max_position=MAX + 256),
    ]
]
# (B x S x ceil(H / heads), 1, splits): one token and 32 heads a program, head blocks fastest; the key
# splits by key_splits (8 programs a token at B=4, 32 list tiles: 2; B=64: none; B=1 HCA over its
# 2048 compressed rows, 128 tiles: 8), then the combine launch (B x S x ceil(H / heads), 1)
GRIDS = {
    "flash-decode": [("_attn_kernel", (16, 1, 2)), ("_combine_kernel", (16, 1))],
    "flash-t1": [("_attn_kernel", (8, 1, 2)), ("_combine_kernel", (8, 1))],
    "flash-decode-write": [("_attn_kernel", (16, 1, 2)), ("_combine_kernel", (16, 1))],
    "flash-decode-b64": [("_attn_kernel", (256, 1, 1))],
    "flash-hca-b1": [("_attn_kernel", (4, 1, 8)), ("_combine_kernel", (4, 1))],
    "flash-hca-chunk": [("_attn_kernel", (128, 1, 1))],  # 64 tokens at once: 128 programs, about a wave, unsplit
}


@pytest.fixture(scope="session")
def variants() -> list[Variant]:
    return compile_plans(PLANS)


def test_the_documented_launches(variants: list[Variant]) -> None:
    for plan, launches in GRIDS.items():
        launched = [(v.kernel, g) for v in variants for p, g in v.launches if p == plan]
        assert sorted(launched) == launches, plan


def test_no_spills_and_each_block_fits_an_sm(variants: list[Variant]) -> None:
    for v in variants:
        assert v.local_bytes == 0, (v.kernel, v.launches, "spills", v.local_bytes)
        assert v.shared_bytes <= H100_SHARED, (v.kernel, v.launches, v.shared_bytes)
        assert v.blocks_per_sm() >= 1, (v.kernel, v.registers, v.shared_bytes)
        print(f"{v.kernel} {sorted(v.plans)}: {v.registers} registers, {v.shared_bytes} B shared, {v.mma}")


def test_dependent_launch(variants: list[Variant]) -> None:
    """Each launch lets its successor be scheduled, then waits for its predecessor before it reads
    anything, its slot's start included (a kernel launched before the op may still be writing it)."""
    for v in variants:
        assert v.pdl_order == ("launch_dependents", "wait"), (v.kernel, v.launches, v.pdl_order)
        assert v.loads_before_wait == 0, (v.kernel, v.launches, v.loads_before_wait)


def test_a_key_tile_waits_for_one_round_of_loads(variants: list[Variant]) -> None:
    """Each key loop looks up its next tiles' slots (and a CSA list's entries two tiles ahead) while it
    reads this tile's rows: one iteration's loads need no value another of its loads brings (the row
    loads use slots looked up an iteration before), so a tile waits for one round of loads, not the
    two or three of entry -> block table -> row. The same for the combine's walk over the splits
    (each split's ``(m, l)`` read a split ahead of the ``acc`` they mask) and the window rows
    ``sparse_attn_write`` stores."""
    for v in variants:
        assert v.loop_load_chains and max(v.loop_load_chains) == 1, (v.kernel, v.launches, v.loop_load_chains)


def test_one_variant_serves_every_block_table_width(variants: list[Variant]) -> None:
    """The block tables' widths (pool sizes the caller picks) are not specialized on: a wider table
    launches flash-decode's variants."""
    wide = [v for v in variants if "flash-decode-wide-table" in v.plans]
    assert {v.kernel for v in wide} == {"_attn_kernel", "_combine_kernel"}
    for v in wide:
        assert "flash-decode" in v.plans, (v.kernel, "compiled again for a wider block table", v.launches)


def test_no_floating_point_atomics(variants: list[Variant]) -> None:
    """The key split's partials are combined in split order by a launch of their own, not by atomics."""
    assert atomic_order_faults(variants, set()) == []


def test_only_the_softmax_exponentials_are_approximate(variants: list[Variant]) -> None:
    """No ``div.full``/``sqrt.approx`` and the like where the interpreter computes exactly: only the
    ``ex2.approx`` of the softmax exponentials that ``sm90.APPROX_MATH`` allows."""
    assert approx_math_faults(variants) == []


def test_no_kernel_contracts_products_into_fma(variants: list[Variant]) -> None:
    """The dequant scales, the softmax's rescaling and the inverse RoPE's ``a*b - c*d`` round each product
    as the reference does (``sm90.fused_math_faults``)."""
    assert sm90.fused_math_faults(variants) == []

"""The indexer's and ``o_proj``'s kernels compile for an H100 (sm_90) as their launches specialize
them, no GPU needed.

The interpreter runs kernel source as Python and accepts things the compiler rejects (a named
constexpr reassigned in a static loop, a shape computed at run time), so CI also lowers every
kernel variant the launchers run at flash decode (2048 and 262144 cache rows), for a prefill chunk,
for ``indexer_compressor`` alone and for ``o_proj`` at flash decode (T=128 and T=2)
(``sm90.compile_plans``), and checks what ``docs/DESIGN.md`` says of them: the launch plans and
grids, no spills, the shared memory, the pipelined loops, the score loop's keys in flight and its
SASS per key tile, programmatic dependent launch on every launch after the first, and grids that
fill the SMs at flash decode (the indexer's streaming launches).
"""

from __future__ import annotations

import ast

import pytest

import sm90
from dsv4.harness.cases import DEFAULT_MAX_POSITION
from dsv4.kernels.index_score import KEYS_AHEAD
from dsv4.kernels.launch import H100_SMS
from sm90 import H100_SHARED, Plan, Variant, approx_math_faults, atomic_order_faults, compile_plans
from subprocesses import ROOT

LONG = 262144  # cache rows at 1M tokens
WIDE_TABLE_POSITIONS = DEFAULT_MAX_POSITION + 4 * 64  # one 64-row pool block more than a case's default
# Two groups compiled side by side; the decode plans share their compressor and score variants,
# and the B=1 ones their x-projection and query variants.
PLANS = [
    [
        Plan("decode-2048", "indexer", "flash", batch=64, seq=2, start_pos=4 * 2048 - 2),
        Plan("decode-262144", "indexer", "flash", batch=1, seq=2, start_pos=4 * LONG - 2, max_position=4 * LONG),
        # the longest row the top-k selects in one program (ROW_IN_REGISTERS)
        Plan("decode-4096", "indexer", "flash", batch=1, seq=2, start_pos=4 * 4096 - 2, max_position=4 * 4096),
        # decode-2048 with a pool one block wider per row (33 blocks a row, not 32): the same variants
        Plan("decode-2048-wide-table", "indexer", "flash", 64, 2, 4 * 2048 - 2, max_position=WIDE_TABLE_POSITIONS),
    ],
    [
        Plan("prefill-1024", "indexer", "flash", batch=1, seq=1024),
        Plan("compressor-decode", "indexer_compressor", "flash", batch=64, seq=2, start_pos=4 * 2048 - 2),
        Plan("compressor-decode-fp32-norm", "indexer_compressor", "flash", 64, 2, 4 * 2048 - 2, fp32=("norm_w",)),
        # a prefill row of 128 tokens: its 33 K-slices added by a launch of their own (split_k.sum_slices)
        Plan("compressor-prefill-128", "indexer_compressor", "flash", batch=1, seq=128),
        Plan("o-proj-decode", "o_proj", "flash", batch=64, seq=2),
        Plan("o-proj-decode-b1", "o_proj", "flash", batch=1, seq=2),
        # the attention's compressor on the same step kernel (FP8 rows): CSA and HCA (ratio 128) layers
        Plan("kv-compressor-csa", "kv_compressor", "flash", batch=4, seq=2, start_pos=4 * 2048 - 2),
        Plan("kv-compressor-hca", "kv_compressor", "flash", batch=4, seq=2, start_pos=128 * 16 - 2, kind="hca"),
        Plan("window-kv-write", "window_kv_write", "flash", batch=64, seq=2, start_pos=4 * 2048 - 2),
        Plan("window-kv-write-wide-table", "window_kv_write", "flash", 64, 2, 4 * 2048 - 2, WIDE_TABLE_POSITIONS),
    ],
]

# Launches per plan and their grids, as docs/DESIGN.md ("Launches") gives them: the front launch (x-projection
# programs over 5 column tiles with D split so that the launch, query programs included, fills the 132 SMs:
# 5 x 14 + 64 = 134 at T=128, 5 x 26 + 64 = 194 at T=2 (the split-K floor, split_k.k_splits); none split at
# T=1024 (5 x 8 token tiles = 40), then one query program per head and token tile), the compressor step (one
# program per row and chunk of 16 closing blocks, one tile), the persistent score launch (one program per SM, fewer
# when there are fewer (token pair, 128-key tile) items), and the top-k: one program per row up to 4096 keys,
# 4096-key chunks beyond. `indexer_compressor` alone: the x-projection split 33 ways over its 4 tiles.
GRIDS = {
    "decode-2048": {
        "_front_kernel": (134,),
        "_compressor_step_kernel": (64, 1),
        "_score_kernel": (132,),
        "_select_row_kernel": (128,),
    },
    "decode-262144": {
        "_front_kernel": (194,),
        "_compressor_step_kernel": (1, 1),
        "_score_kernel": (132,),
        "_select_chunks_kernel": (2, 64),
    },
    "decode-4096": {
        "_front_kernel": (194,),
        "_compressor_step_kernel": (1, 1),
        "_score_kernel": (32,),
        "_select_row_kernel": (2,),
    },
    "prefill-1024": {
        "_front_kernel": (552,),
        "_compressor_step_kernel": (1, 16),
        "_score_kernel": (132,),
        "_select_row_kernel": (1024,),
    },
    "compressor-decode": {"_front_kernel": (132,), "_compressor_step_kernel": (64, 1)},
}
GRIDS["compressor-decode-fp32-norm"] = GRIDS["compressor-decode"]
# 128 x 512 sums of 33 slices, 128 values a program (split_k.sum_block at 4 warps), then the row's 32 closing
# blocks in 2 step programs
GRIDS["compressor-prefill-128"] = {
    "_front_kernel": (132,), "_sum_slices_kernel": (512,), "_compressor_step_kernel": (1, 2),
}  # fmt: skip
# o_proj: 64 wo_a column tiles x 2 K-slices, one quant program per 128-block and 32 tokens, 32 wo_b column
# tiles x 4 K-slices (split_k's one wave of 132 SMs).
GRIDS["o-proj-decode"] = {"_wo_a_kernel": (64, 1, 2), "_act_quant_kernel": (64, 4), "_wo_b_kernel": (32, 1, 4)}
GRIDS["o-proj-decode-b1"] = {**GRIDS["o-proj-decode"], "_act_quant_kernel": (64, 1)}
# kv_compressor at B=4: the x-projection over 2*COFF*HD/128 column tiles (16 CSA, 8 HCA) split to fill the
# SMs, then one step program per row (one chunk of COFF closing blocks: a decode row closes at most one).
GRIDS["kv-compressor-csa"] = {"_front_kernel": (144,), "_compressor_step_kernel": (4, 1)}
GRIDS["kv-compressor-hca"] = {"_front_kernel": (136,), "_compressor_step_kernel": (4, 1)}
GRIDS["window-kv-write"] = {"_window_kv_write_kernel": (64, 1)}  # one program per slot (4 tokens each)
# The flash-decode shapes of the performance targets: every streaming launch (the weights, the key pool)
# has at least one program per SM.
# (o_proj's GEMMs run 128 programs: one wave of whole K-slices, split_k.k_splits; a third slice would make 192
# programs of one block per SM, two waves.)
FILL_PLANS = ("decode-2048", "decode-262144", "compressor-decode")
STREAMING = {"_front_kernel", "_score_kernel"}
# Programmatic dependent launch on sm_90, in the PTX's order: every launch lets its successor be scheduled
# before it waits for its predecessor; the front launch asks L2 for its weights and the score launch for its
# first key rows before either.
PDL_ORDER = {
    "_front_kernel": ("prefetch", "launch_dependents", "wait"),
    "_compressor_step_kernel": ("launch_dependents", "wait"),
    "_sum_slices_kernel": ("launch_dependents", "wait"),
    "_score_kernel": ("prefetch", "launch_dependents", "wait"),
    "_select_row_kernel": ("launch_dependents", "wait"),
    "_select_chunks_kernel": ("launch_dependents", "wait"),
    "_wo_a_kernel": ("launch_dependents", "wait"),
    "_act_quant_kernel": ("launch_dependents", "wait"),
    "_wo_b_kernel": ("launch_dependents", "wait"),
    "_window_kv_write_kernel": ("launch_dependents", "wait"),
}

# Kernels whose main loop streams operands through shared memory with cp.async (docs/DESIGN.md).
PIPELINED = {"_front_kernel", "_score_kernel", "_wo_a_kernel", "_wo_b_kernel"}
# SASS instructions of one iteration of the score loop (a 128-key tile), one warp: the target of the
# streaming layout (at ~4.3 TB/s an SM has ~700 issue slots per warp for each 16.5 KB tile it reads),
# rows past ROW_IN_REGISTERS that also count the first digit (HIST) included: 454 / 519 without it and
# 503 / 620 with it on Triton 3.9 / 3.6, whose tl.histogram is built from warp ballots (docs/DESIGN.md).
# The smallest loop holding the MMA is measured: the common one (the rare spec-order loop is longer).
SCORE_TILE_SASS_AT_MOST = 700


@pytest.fixture(scope="session")
def variants() -> list[Variant]:
    return compile_plans(PLANS)


def test_each_plan_launches_the_documented_kernels_and_grids(variants: list[Variant]) -> None:
    for plan, grids in GRIDS.items():
        launched: dict[str, tuple[int, ...]] = {}
        for v in variants:
            for p, grid in v.launches:
                if p == plan:
                    assert launched.setdefault(v.kernel, grid) == grid, (plan, v.kernel)
        assert launched == grids, plan


def test_spills_and_each_block_fits_an_sm(variants: list[Variant]) -> None:
    for v in variants:
        assert v.local_bytes == 0, (v.kernel, v.launches, "spills", v.local_bytes)
        assert v.shared_bytes <= H100_SHARED, (v.kernel, v.launches, v.shared_bytes)
        assert v.blocks_per_sm() >= 1, (v.kernel, v.registers, v.shared_bytes)


def test_streaming_loops_are_pipelined(variants: list[Variant]) -> None:
    for v in variants:
        if v.kernel in PIPELINED:
            assert v.pipelined, (v.kernel, v.launches, "loads are not pipelined through shared memory")
    assert {v.kernel for v in variants} >= PIPELINED


def test_no_kernel_contracts_products_into_fma(variants: list[Variant]) -> None:
    """``a*b - c*d`` rounds each product as the reference does (``sm90.fused_math_faults``)."""
    assert sm90.fused_math_faults(variants) == []


def test_every_launch_forbids_fp_fusion() -> None:
    """Each launch in the package, the variants no plan compiles included, passes
    ``enable_fp_fusion=False`` (``sm90.fused_math_faults`` says why), and every ``@triton.jit`` kernel
    is launched somewhere."""
    kernels: set[str] = set()
    launched: set[str] = set()
    faults: list[str] = []
    for path in sorted((ROOT / "src" / "dsv4").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.FunctionDef)
                and node.name.endswith("_kernel")
                and any("jit" in ast.unparse(d) for d in node.decorator_list)
            ):
                kernels.add(node.name)
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Subscript)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id.endswith("_kernel")
            ):
                launched.add(node.func.value.id)
                fusion = [k.value for k in node.keywords if k.arg == "enable_fp_fusion"]
                if not (len(fusion) == 1 and isinstance(fusion[0], ast.Constant) and fusion[0].value is False):
                    faults.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.func.value.id}")
    assert faults == []
    assert kernels and launched == kernels


def test_the_h100_stand_in_turns_on_every_launchers_pdl() -> None:
    """Every kernel module whose launcher asks ``pdl_supported`` (imported by name) is one that the
    compile-only H100 stand-in patches, so its sm_90 builds are the PDL ones the GPU runs."""
    asking = {
        path.stem
        for path in (ROOT / "src" / "dsv4" / "kernels").glob("*.py")
        if path.stem != "launch" and "pdl_supported(" in path.read_text()
    }
    assert asking and asking == set(sm90._PDL_LAUNCHERS)


def test_score_loop_keeps_key_tiles_in_flight(variants: list[Variant]) -> None:
    """The score loop's steady state waits for its oldest key tile only (no wait for every copy), from a
    ring of ``KEYS_AHEAD + 1`` buffers, and issues at most ``SCORE_TILE_SASS_AT_MOST`` SASS per tile."""
    scores = [v for v in variants if v.kernel == "_score_kernel"]
    assert {v.constants["HIST"] for v in scores} == {False, True}  # both loops are held to the target
    for v in scores:
        assert v.loop_waits and min(v.loop_waits) > 0, (v.launches, "waits for every copy", v.loop_waits)
        assert v.ring >= KEYS_AHEAD + 1, (v.launches, v.ring)
        assert 0 < v.mma_loop_sass <= SCORE_TILE_SASS_AT_MOST, (v.launches, v.mma_loop_sass)


def test_dependent_launches_use_pdl(variants: list[Variant]) -> None:
    """Every launch after an op's first waits for its predecessor inside the kernel (``griddepcontrol.wait``:
    launched with PDL), and each lets its successor be scheduled early (``griddepcontrol.launch_dependents``)."""
    for v in variants:
        assert v.pdl_order == PDL_ORDER[v.kernel], (v.kernel, v.launches, v.pdl_order)


# Global loads a launch issues before its PDL wait. Each launch releases its successor as it starts, so a
# launch may run while a kernel launched before the op (an engine's, which may write the positions) still
# does: nothing that decides a result is read before the wait. The score launch's two are its first
# tiles' row start and table entries, which only aim its L2 prefetch of old key rows.
LOADS_BEFORE_WAIT = {"_score_kernel": 2}


def test_atomics_keep_runs_deterministic_and_hand_offs_ordered(variants: list[Variant]) -> None:
    """No floating-point atomic; the split ``wo_b`` tiles' counter and the long rows' selection tickets are
    ``acq_rel`` at ``gpu`` scope in the PTX (``sm90.atomic_order_faults``)."""
    assert atomic_order_faults(variants, {"_wo_b_kernel", "_select_chunks_kernel"}) == []
    released = {v.kernel for v in variants if any(".acq_rel." in a for a in v.atomics)}
    assert released == {"_wo_b_kernel", "_select_chunks_kernel"}


def test_no_result_depends_on_a_read_before_the_wait(variants: list[Variant]) -> None:
    for v in variants:
        if v.dependent_launch:
            assert v.loads_before_wait == LOADS_BEFORE_WAIT.get(v.kernel, 0), (v.kernel, v.launches)


def test_streaming_launches_fill_the_sms(variants: list[Variant]) -> None:
    for v in variants:
        for plan, grid in v.launches:
            if plan in FILL_PLANS and v.kernel in STREAMING:
                assert grid[0] * (grid[1] if len(grid) > 1 else 1) >= H100_SMS, (plan, v.kernel, grid)


# Chunk 0 of the compressor step adds its row's K-slices ``SUM_BLOCK`` values a step, each step one round trip
# before the closes can start: a decode row (S=2) is 2 x 2048 values for the attention's CSA compressor (9
# slices at B=4) and 2 x (512 + 64) for the indexer's (14 slices); each takes at most 2 steps (16 and 5 at 256).
SUM_STEPS_AT_MOST = {"kv-compressor-csa": (2 * 2048, 2), "decode-2048": (2 * 576, 2)}


def test_decode_rows_add_their_slices_in_few_steps(variants: list[Variant]) -> None:
    seen = set()
    for v in variants:
        for plan, _ in v.launches:
            if v.kernel == "_compressor_step_kernel" and plan in SUM_STEPS_AT_MOST:
                values, most = SUM_STEPS_AT_MOST[plan]
                steps = -(-values // v.constants["SUM_BLOCK"])
                assert steps <= most, (plan, v.constants["SPLITS"], v.constants["SUM_BLOCK"], steps)
                seen.add(plan)
    assert seen == set(SUM_STEPS_AT_MOST)


# Kernels that read a block table, whose width (a pool size the caller picks) the JIT does not specialize on:
# the plans of a wider table launch the variants the plans beside them do (decode-2048: 32 blocks a row,
# divisible by 16; its wide twin: 33).
WIDE_TABLE_TWINS = {"decode-2048-wide-table": "decode-2048", "window-kv-write-wide-table": "window-kv-write"}
TABLE_KERNELS = {"_compressor_step_kernel", "_score_kernel", "_window_kv_write_kernel"}


def test_one_variant_serves_every_block_table_width(variants: list[Variant]) -> None:
    seen = set()
    for v in variants:
        for wide, twin in WIDE_TABLE_TWINS.items():
            if wide in v.plans:
                assert twin in v.plans, (v.kernel, "compiled again for a wider block table", v.launches)
                seen.add(v.kernel)
    assert seen >= TABLE_KERNELS


def test_only_the_softmax_exponentials_are_approximate(variants: list[Variant]) -> None:
    """No ``div.full``/``sqrt.approx`` and the like where the interpreter computes exactly: only the
    ``ex2.approx`` of the softmax exponentials that ``sm90.APPROX_MATH`` allows."""
    assert approx_math_faults(variants) == []

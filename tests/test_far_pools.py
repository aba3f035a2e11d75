"""The Triton kernels address every pool block with 64-bit offsets: blocks past 4 GiB read and write as
blocks at the start do (``tests/far_pools.py``).

A kernel that multiplied an int32 block id by its row bytes would wrap past 2 GiB and touch another row,
in a pool of the size a serving engine runs (a CSA layer's compressed rows for 64 sequences at 1M tokens:
9.8 GB). The tests' pools are small, so every other test passes with such a kernel. Here each op with a
paged pool runs on its case as made, and again with every pool re-based so that its blocks in use lie past
4 GiB (the pages in front are never touched); the outputs and every byte of state must be the same bits.
A wrapped address lands in the empty blocks in front (read as zeros there, or written where no block in
use is compared: the state's blocks in use then miss the write) or outside the pool, where the bounds
check the suite runs every launch under (``bounds_checked``) refuses it.
"""

from __future__ import annotations

import pytest

import dsv4
from conftest import DEVICE, FULL
from dsv4.harness.cases import clone_args, make_case, mutated_args, record_outputs
from dsv4.harness.golden import bit_identical
from dsv4.ops.api import call_op
from dsv4.ops.registry import get_op
from far_pools import extra_blocks, far, near, pools

# On a GPU each case would hold its pools in device memory (a CSA sparse_attn case's two are 12.5 GiB), with
# the suite's workers side by side; the interpreter computes the kernels' int32 and int64 offsets with the
# compiled kernels' widths, and the host's pages in front of the blocks in use are never taken.
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda", reason="pools past 4 GiB: device memory a worker each")

TINY = dsv4.get_config("tiny")


# the ops whose arguments hold a paged pool (checked below against their cases)
POOL_OPS = ("indexer_compressor", "indexer", "kv_compressor", "sparse_attn", "window_kv_write", "sparse_attn_write")
CASES = [
    pytest.param(op, mode, kind, marks=FULL if mode == "prefill" and kind != (get_op(op).kinds or (None,))[0] else ())
    for op in POOL_OPS
    for mode in ("decode", "prefill")
    for kind in (get_op(op).kinds or (None,))
]


def test_every_op_with_a_pool_is_here() -> None:
    with_pools = {op for op in dsv4.ops.op_names() if any(pools(v) for v in make_case(TINY, op).args.values())}
    assert with_pools == set(POOL_OPS)


@pytest.mark.parametrize(("op", "mode", "kind"), CASES)
def test_blocks_past_4_gib_give_the_same_bits(op: str, mode: str, kind: str | None) -> None:
    case = make_case(TINY, op, mode=mode, seed=5, device=DEVICE, kind=kind)
    args = clone_args(case.args, op)
    try:
        moved = {name: far(v) if pools(v) else v for name, v in case.args.items()}
    except RuntimeError as e:  # a host that commits address space up front (vm.overcommit_memory=2)
        if "allocate" not in str(e):
            raise
        pytest.skip(f"the pools' address space (GiBs, untouched) could not be reserved here: {e}")
    for value in moved.values():
        for pool in pools(value):  # every block in use past the empty ones, so past BEYOND bytes
            used = pool.block_table[pool.block_table >= 0]
            assert used.numel() and int(used.min()) >= extra_blocks(pool)

    want = call_op(op, "triton", **args)
    got = call_op(op, "triton", **moved)
    if want is not None:
        for name, t in want._asdict().items():
            assert bit_identical(getattr(got, name), t, name)
    updated = mutated_args(op)
    want_state = record_outputs({n: args[n] for n in updated if n in args})
    got_state = record_outputs({n: near(moved[n]) for n in updated if n in moved})
    assert got_state.keys() == want_state.keys()
    for name, t in want_state.items():
        assert bit_identical(got_state[name], t, name)

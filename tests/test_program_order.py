"""The Triton kernels give the same bits whichever of a launch's programs runs first.

A GPU schedules a launch's programs in any order; Triton's interpreter runs them in grid order. The
programs that meet through memory — the split GEMMs' last-arriver counters (``o_proj``, the split-K
projections), the q heads' pair exchange, the score launch's histograms and the chunked selection's
candidate lists — must not depend on that order. Each op runs here with its programs in grid order
and in seeded random orders (``program_order``), and every output and every byte of
state it updates must be the same. On a GPU the order is the hardware's; the repeat tests of each
kernel module stand there.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import dsv4
from conftest import DEVICE
from dsv4.harness.cases import make_case, run_case
from dsv4.harness.golden import bit_identical
from dsv4.kernels.interpreter import interpreted
from dsv4.kernels.topk import ROW_IN_REGISTERS
from op_cases import long_row_indexer_case
from program_order import in_order, program_orders

pytestmark = pytest.mark.skipif(not interpreted(), reason="reorders the interpreter's programs")

TINY = dsv4.get_config("tiny")


def _same_in_every_order(run: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``run()``'s outputs in grid order, checked equal bit for bit to those of the shuffled orders."""
    want = run()
    for order in program_orders()[1:]:
        with in_order(order):
            got = run()
        assert got.keys() == want.keys()
        assert all(bit_identical(got[k], want[k], f"{k} (order {order})") for k in want)
    return want


@pytest.mark.parametrize("mode", ["decode", "prefill"])
@pytest.mark.parametrize("op", dsv4.ops.op_names())
def test_op_independent_of_program_order(op: str, mode: str) -> None:
    """Every output and the state after, in grid order and two random orders: the same bits."""
    case = make_case(TINY, op, mode=mode, seed=11, device=DEVICE)
    _same_in_every_order(lambda: run_case(case, "triton"))


def test_long_indexer_rows_independent_of_program_order() -> None:
    """A row past ``ROW_IN_REGISTERS`` keys (the score launch's first-digit histograms, added by integer
    atomics from every program that scores the row, then the chunked selection's candidate lists and
    last-arriver finish) next to a short row that closes a block, in the persistent score grid."""
    case = long_row_indexer_case()
    got = _same_in_every_order(lambda: run_case(case, "triton"))
    assert got["score"].shape[-1] > ROW_IN_REGISTERS

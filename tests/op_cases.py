"""Op cases at chosen start positions, and the check of the Triton backend against the reference on one."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from conftest import DEVICE
from dsv4.harness.cases import Case, make_case, run_case
from dsv4.harness.golden import compare
from dsv4.kernels import tuning
from dsv4.model.config import DeepSeekV4Config, get_config

Start = int | list[int] | None
TINY = get_config("tiny")


def case_at(
    cfg: DeepSeekV4Config,
    op: str,
    batch: int,
    seq: int,
    start: Start = None,
    seed: int = 0,
    max_position: int | None = None,
) -> Case:
    """A decode ``case`` of ``op`` on the test device with every row at ``start`` (an int, passed to
    the op as an int) or row ``b`` at ``start[b]``, the state prefilled up to there; ``start`` None
    keeps ``make_case``'s random per-row starts."""
    case = make_case(
        cfg, op, seed=seed, device=DEVICE, batch=batch, seq=seq, max_position=max_position, start_pos=start
    )
    if isinstance(start, int):
        case.args["start_pos"] = start  # the op's int form
    return case


def assert_matches_reference(case: Case) -> dict[str, torch.Tensor]:
    """Run ``case`` on both backends and compare them with the spec §6 rules -> the Triton outputs."""
    got = run_case(case, "triton")
    expected = run_case(case, "reference")
    report = compare(case.op, got, expected, case.compare_inputs())
    assert report, str(report)
    return got


def long_row_indexer_case(seed: int = 12) -> Case:
    """A ``tiny`` indexer step of two slots: a row past ``ROW_IN_REGISTERS`` keys (the score launch's
    first-digit histograms, the chunked selection's candidate lists and last-arriver finish) beside a
    short row that closes a block."""
    cfg = TINY.replace(max_position_embeddings=16512)
    return case_at(cfg, "indexer", 2, 2, [16410, 37], seed=seed, max_position=16512)


# o_lora_rank 128: two 128-blocks in wo_b's reduction axis, so under ``split_o_proj`` both GEMMs split in two
# (``tiny``'s splits neither) and their programs meet at the split counters
SPLIT_O_PROJ = TINY.replace(o_lora_rank=128)


@contextlib.contextmanager
def split_o_proj() -> Iterator[None]:
    """``o_proj``'s ``wo_a`` and ``wo_b`` launches forced to two K-slices each."""
    with tuning.forced("o_proj.wo_a", {"splits": 2}), tuning.forced("o_proj.wo_b", {"splits": 2}):
        yield

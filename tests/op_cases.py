"""Op cases at chosen start positions, and the check of the Triton backend against the reference on one."""

from __future__ import annotations

import torch

from conftest import DEVICE
from dsv4.harness.cases import Case, make_case, run_case
from dsv4.harness.golden import compare
from dsv4.model.config import DeepSeekV4Config

Start = int | list[int] | None


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

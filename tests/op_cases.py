"""Op cases at chosen start positions, and the check of the Triton backend against the reference on one."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch

import dsv4
from conftest import DEVICE
from dsv4.harness.cases import Case, expected_outputs, make_case, run_case
from dsv4.harness.golden import bit_identical, compare
from dsv4.kernels import tuning
from dsv4.kernels.launch import H100_SMS
from dsv4.kernels.qkv_proj_rope import launch_q_heads, pair_words, park_shape, q_heads_tiles
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
    """Run ``case`` on Triton and compare it with the reference by the spec §6 rules (``expected_outputs``)
    -> the Triton outputs."""
    got = run_case(case, "triton")
    report = compare(case.op, got, expected_outputs(case, got), case.compare_inputs())
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


def _paired_q_heads() -> None:
    """The paired q heads, a first-arriving half parking its values for its partner (``spins=0``)."""
    case = make_case(TINY, "qkv_proj_rope", seed=4, device=DEVICE)
    a = case.args
    got = dsv4.qkv_proj_rope(**a, backend="triton")
    t, h, hd = got.q.shape
    block_m, paired = q_heads_tiles(t, h, H100_SMS)
    assert paired
    words = torch.full((pair_words(t, h),), -1, dtype=torch.int64, device=DEVICE)
    park = torch.full(park_shape(t, h, hd, block_m), float("nan"), device=DEVICE)
    q = torch.empty_like(got.q)
    launch_q_heads(got.qr, got.qr_scale, a["w"], a["positions"], a["rope"], TINY.rms_norm_eps, q, words, park,
                   block_m, True, spins=0)  # fmt: skip
    assert bit_identical(q, got.q, "q")


def hand_off_cases() -> Iterator[tuple[str, Callable[[], object]]]:
    """``(name, run)`` of every op (``tiny``, decode and prefill) and of the cases that take the kernels'
    hand-offs between programs: a long indexer row, split ``o_proj`` GEMMs (run them under
    ``split_o_proj``), paired q heads."""
    for op in dsv4.ops.op_names():
        for mode in ("decode", "prefill"):
            case = make_case(TINY, op, mode=mode, seed=11, device=DEVICE)
            yield f"{op} {mode}", functools.partial(run_case, case, "triton")
    case = long_row_indexer_case()
    yield "indexer, a long row", lambda: run_case(case, "triton")
    split = make_case(SPLIT_O_PROJ, "o_proj", seed=11, device=DEVICE)
    yield "o_proj, both GEMMs split", lambda: run_case(split, "triton")
    yield "q heads, paired", _paired_q_heads

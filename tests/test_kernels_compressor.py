"""The fused compressor (x-side projection GEMM + compressor step kernel) against the reference,
with the spec §6 tolerances: block closes on the first / last / no token of a step, several blocks
in one step, per-row start positions, prefill-sized steps and decode steps with state carried."""

from __future__ import annotations

import pytest
import torch

import dsv4
from conftest import DEVICE, INTERPRETER_TRAFFIC
from dsv4.bench.interp_traffic import count_traffic
from dsv4.harness.cases import make_case, run_case
from dsv4.harness.golden import compare, ratio_allclose, step_inputs, tolerance
from dsv4.kernels import compressor, tuning
from dsv4.kernels.index_front import front
from dsv4.model.config import PRESETS
from dsv4.model.weights import synthetic_activations
from dsv4.ops.case_inputs import prefilled_state
from dsv4.ops.validate import step_positions
from dsv4.reference.common import linear
from launches import kernels_of
from op_cases import Start, assert_matches_reference, case_at

TINY = PRESETS["tiny"]


# (batch, seq, start): positions start..start+S-1 close a block where (p + 1) % 4 == 0.
STEPS: dict[str, tuple[int, int, int | list[int]]] = {
    "B1-S1-closes-first": (1, 1, 3),
    "B1-S1-closes-none": (1, 1, 4),
    "B1-S2-closes-none": (1, 2, 4),
    "B1-S3-closes-first": (1, 3, 3),
    "B3-S1-closes-first": (3, 1, 11),
    "B3-S2-closes-first": (3, 2, 7),
    "B3-S2-closes-last": (3, 2, 2),
    "B3-S3-closes-last": (3, 3, 5),
    "B3-S3-closes-none-empty-state": (3, 3, 0),
    "B1-S9-three-blocks-from-3": (1, 9, 3),
    "B1-S9-two-blocks-from-5": (1, 9, 5),
    "B3-S3-rows-first-none-middle": (3, 3, [3, 0, 6]),
    "B3-S2-rows-none-last-first": (3, 2, [1, 2, 3]),
    "B3-S1-rows-far-apart": (3, 1, [4091, 2, 1027]),
}


@pytest.mark.parametrize("name", STEPS)
def test_compressor_step(name: str) -> None:
    batch, seq, start = STEPS[name]
    assert_matches_reference(case_at(TINY, "indexer_compressor", batch, seq, start, seed=len(name)))


@pytest.mark.parametrize(("batch", "seq", "start"), [(1, 64, 0), (2, 67, [0, 5]), (1, 131, 6)])
def test_compressor_prefill(batch: int, seq: int, start: Start) -> None:
    """Many blocks close in one step: up to 33 per row, pooled by several programs in parallel."""
    assert_matches_reference(case_at(TINY, "indexer_compressor", batch, seq, start, seed=seq))


def test_state_rows_past_batch_untouched() -> None:
    """A state with more rows than the step's batch: rows >= B and their pool blocks stay bit-identical."""
    case = case_at(TINY, "indexer_compressor", 2, 3, [1, 6], seed=3)
    extra = prefilled_state(TINY, 4, case.meta["max_position"], torch.tensor([1, 6, 9, 13]), 3, DEVICE)
    case.args["state"] = extra
    got = run_case(case, "triton")
    expected = run_case(case, "reference")
    for name in ("kv_state", "score_state", "block_table"):
        assert torch.equal(got[name][2:], getattr(extra, name)[2:]), f"{name} rows 2..3 changed"
    report = compare("indexer_compressor", got, expected, step_inputs(case.args["x"], [1, 6], extra))
    assert report, str(report)  # the pool rule: every pool row slots 0..1 do not write is unchanged


def test_decode_steps_state_carried() -> None:
    """Consecutive decode steps of uneven sizes: each step from the same pre-step state, and a run
    where each backend carries its own state from step to step."""
    starts = [0, 2, 5]
    case = case_at(TINY, "indexer_compressor", 3, 1, starts, seed=21)
    w, rope = case.args["w"], case.args["rope"]
    ref_state = case.state().clone()
    carried = case.state().clone()
    done = 0
    for step, seq in enumerate([1, 2, 3]):  # every row closes a block (positions 3, 7)
        x = synthetic_activations((3, seq, TINY.hidden_size), seed=100 + step, device=DEVICE)
        start = torch.tensor([p + done for p in starts], device=DEVICE)
        same_start = ref_state.clone()
        dsv4.indexer_compressor(x, w, same_start, start, rope, backend="triton")
        before_ref = ref_state.clone()
        dsv4.indexer_compressor(x, w, ref_state, start, rope, backend="reference")
        report = compare("indexer_compressor", same_start.tensors(), ref_state.tensors(),
                         step_inputs(x, start, before_ref))  # fmt: skip
        assert report, f"step {step} from the reference's state:\n{report}"
        before_carried = carried.clone()
        dsv4.indexer_compressor(x, w, carried, start, rope, backend="triton")
        report = compare("indexer_compressor", carried.tensors(), ref_state.tensors(),
                         step_inputs(x, start, before_carried))  # fmt: skip
        assert report, f"step {step} carried:\n{report}"
        done += seq


@pytest.mark.parametrize("splits", [1, 3, None])  # None: the launcher's own split (4 K-steps of tiny D)
@pytest.mark.parametrize(("batch", "seq"), [(3, 3), (1, 70)])
def test_x_projection(batch: int, seq: int, splits: int | None) -> None:
    """kv, gate + ape[p % 4] at each token's own position, scaled head weights, from the front launch's
    raw K-slices added up; one tile or several along T, split over D or not."""
    case = make_case(TINY, "indexer", seed=seq, device=DEVICE, batch=batch, seq=seq)
    a = case.args
    x, w = a["x"], a["w"]
    pos = step_positions(a["start_pos"], batch, seq, DEVICE)
    scale = TINY.index_weights_scale
    with tuning.forced("index.front", {"splits": splits}):
        xp, _, _ = front(x, w.compressor, pos, w, a["qr"], a["qr_scale"], a["rope"])
    assert xp.shape[0] == (splits or xp.shape[0]), "the config sets the split"
    sums = xp.sum(0)
    p = pos.token_positions().reshape(-1)
    expected = {
        "kv": linear(x, w.compressor.wkv).view(batch * seq, -1),
        "gate": linear(x, w.compressor.wgate).view(batch * seq, -1) + w.compressor.ape[p % 4],
        "weights": linear(x, w.weights_proj).view(batch * seq, -1) * scale,
    }
    two_hid = 2 * TINY.index_head_dim
    got = {"kv": sums[:, :two_hid], "gate": sums[:, two_hid : 2 * two_hid] + w.compressor.ape[p % 4]}
    got["weights"] = sums[:, 2 * two_hid :] * scale
    tol = tolerance("kv_state", "indexer_compressor")  # the projections are what the ring stores
    for name, e in expected.items():
        check = ratio_allclose(got[name], e, tol.atol, tol.rtol, 0.0, name)
        assert check, f"{name}: {check.detail} (max_abs {check.max_abs:.3g})"


LONG_ROWS = [("indexer_compressor", 1, 16, 61), ("indexer", 1, 16, 61), ("kv_compressor", 2, 37, [3, 9])]


@pytest.mark.parametrize(("op", "batch", "seq", "start"), LONG_ROWS)
def test_long_rows_add_their_slices_in_a_launch_of_their_own(op: str, batch: int, seq: int, start: Start, monkeypatch):
    """A row whose K-slices the step program would add in more than ``SUM_STEPS_MAX`` steps (a prefill's)
    gets them added by ``split_k.sum_slices``, spread over many programs: the outputs match the reference
    and are bit for bit those of the step program adding them itself."""
    case = case_at(TINY, op, batch, seq, start)
    spread = assert_matches_reference(case)
    monkeypatch.setattr(compressor, "SUM_STEPS_MAX", 1 << 30)
    alone = run_case(case, "triton")
    assert spread.keys() == alone.keys()
    for name, t in spread.items():
        assert torch.equal(t.view(torch.uint8), alone[name].view(torch.uint8)), name


@INTERPRETER_TRAFFIC
@pytest.mark.parametrize(("op", "batch", "seq", "start"), LONG_ROWS)
def test_the_slice_sum_launch_reads_each_slice_once(op: str, batch: int, seq: int, start: Start) -> None:
    """The long rows' step takes one launch more, between the front and the step, reading each K-slice
    value once and writing each sum once; a decode row (S=2) adds its own (no such launch)."""
    for s, expect in ((seq, True), (2, False)):
        case = case_at(TINY, op, batch, s, start)
        with count_traffic() as log:
            run_case(case, "triton")
        names = [launch.kernel for launch in log.launches]
        assert (names[1] == "_sum_slices_kernel") == expect, names
        assert names.count("_sum_slices_kernel") == expect, names
        if expect:
            w = case.args["w"]
            width = 2 * (w.compressor if op == "indexer" else w).wkv.shape[0]
            width += w.weights_proj.shape[0] if op == "indexer" else 0
            sums = batch * s * width * 4  # fp32 [T, 2 * rows of wkv (+ the head weights)]
            front, summed = log.launches[:2]
            splits, rest = divmod(summed.load_bytes, sums)
            assert summed.store_bytes == sums and rest == 0 and splits > 1, (summed, sums)
            assert front.store_bytes >= splits * sums  # the slices the front wrote, each read once


# (op, kind, batch, seq, start): steps that close blocks at the first, last and no token of a row, and a
# prefill chunk whose closed blocks take a chunk of their own (CLOSE_TILE)
ONE_SLICE = [
    ("indexer_compressor", None, 3, 3, [3, 0, 6]),
    ("indexer_compressor", None, 1, 70, 3),
    ("indexer", None, 2, 5, [3, 9]),
    ("kv_compressor", "csa", 2, 5, [3, 9]),
    ("kv_compressor", "hca", 2, 37, [3, 9]),
]


@pytest.mark.parametrize(("op", "kind", "batch", "seq", "start"), ONE_SLICE)
def test_one_k_slice_is_read_in_place(op: str, kind: str | None, batch: int, seq: int, start: Start) -> None:
    """The front launch's x-projection in one K-slice (``index.front`` ``splits`` 1: what ``fill_splits``
    gives a prefill chunk whose tiles alone fill the GPU): the step reads the slice itself, with no
    slice-sum launch, and the outputs match the reference."""
    case = make_case(TINY, op, seed=seq, device=DEVICE, batch=batch, seq=seq, start_pos=start, kind=kind)
    with tuning.forced("index.front", {"splits": 1}):
        assert_matches_reference(case)
        names = kernels_of(lambda: run_case(case, "triton"))
    assert names[:2] == ["_front_kernel", "_compressor_step_kernel"], names

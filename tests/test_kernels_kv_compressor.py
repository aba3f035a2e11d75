"""``kv_compressor``'s Triton backend beyond the attention-op matrix (``test_attention_ops.py``): a
state with more slots than the step's batch, a prefill whose blocks spread over several programs with
a ring that a step reads and overwrites, and the full-size rows (HD 512: CSA, and HCA's ring of 128
slots x 512) against the reference with attention spec §8's rules."""

from __future__ import annotations

import pytest
import torch

import dsv4
from conftest import DEVICE, FULL
from dsv4.harness.cases import record_outputs
from dsv4.harness.golden import compare
from dsv4.model.attention_state import CompressorState, compressor_dims
from dsv4.model.weights import synthetic_compressor

pytest.importorskip("dsv4.kernels")


def _setup(cfg: dsv4.DeepSeekV4Config, ratio: int, start: list[int], seq: int, slots: int, seed: int):
    """Weights, a state of ``slots`` slots whose ring holds random projection-sized values for each
    slot's last ``COFF*RC`` positions before ``start`` (the rest empty) and random stale pool rows, x, rope."""
    g = torch.Generator().manual_seed(seed)
    hd, r = cfg.head_dim, cfg.qk_rope_head_dim
    coff, ring = compressor_dims(ratio, hd)
    end = max(start) + seq
    state = CompressorState.dense(slots, ratio, hd, r, max_position=-(-end // ratio) * ratio + ratio, block_size=16)
    for b, p0 in enumerate(start):
        for q in range(max(0, p0 - ring), p0):
            state.kv_state[b, q % ring] = torch.randn(coff * hd, generator=g)
            state.score_state[b, q % ring] = torch.randn(coff * hd, generator=g)
    pool = state.pool
    pool.nope.view(torch.uint8).copy_(torch.randint(0, 0x7E, pool.nope.shape, generator=g, dtype=torch.uint8))
    pool.scale[..., : (hd - r) // 64] = torch.randint(100, 140, (*pool.scale.shape[:2], (hd - r) // 64), generator=g)
    pool.rope.copy_(torch.randn(pool.rope.shape, generator=g))
    for b in range(len(start), slots):  # slots past the batch: their ring holds values too
        state.kv_state[b] = torch.randn(state.kv_state.shape[1:], generator=g)
    w = synthetic_compressor(cfg, ratio, seed)
    x = torch.randn(len(start), seq, cfg.hidden_size, generator=g).to(torch.bfloat16)
    rope = dsv4.rope_table(cfg, "compressed", max_position=end)
    return w, state, x, torch.tensor(start), rope


def _both_backends(w, state: CompressorState, x: torch.Tensor, start: torch.Tensor, rope) -> tuple[dict, dict]:
    """The state's tensors before the step, and after it per backend (each from a copy of ``state``)."""
    before = record_outputs({"state": state})
    results = {}
    for backend in ("reference", "triton"):
        s = state.clone().to(DEVICE)
        dsv4.kv_compressor(x.to(DEVICE), w.to(DEVICE), s, start.to(DEVICE), rope.to(DEVICE), backend=backend)
        results[backend] = record_outputs({"state": s.to("cpu")})
    return before, results


def _check(cfg, ratio: int, start: list[int], seq: int, slots: int | None = None, seed: int = 0) -> None:
    w, state, x, start_t, rope = _setup(cfg, ratio, start, seq, slots or len(start), seed)
    before, results = _both_backends(w, state, x, start_t, rope)
    report = compare("kv_compressor", results["triton"], results["reference"], {"before": before})
    assert report, str(report)
    written = results["reference"]["pool.nope"].view(torch.uint8) != before["pool.nope"].view(torch.uint8)
    assert bool(written.any())  # the step closes blocks
    for name, t in before.items():  # slots past the batch, and their pool blocks, untouched
        if name.endswith(("kv_state", "score_state")):
            assert torch.equal(results["triton"][name][len(start) :], t[len(start) :]), name


def test_slots_past_the_batch_are_untouched() -> None:
    _check(dsv4.get_config("tiny"), 16, [15, 30], 2, slots=4, seed=1)


@pytest.mark.parametrize("ratio", [4, 16])
def test_prefill_over_several_programs(ratio: int) -> None:
    """CSA: 70 tokens close 17-18 blocks a row, 2 a program; HCA: 4-5 blocks, one a program, with the ring's
    16 slots read by the first and rewritten by the step."""
    _check(dsv4.get_config("tiny"), ratio, [2, ratio + 3], 70, seed=ratio)


@FULL
@pytest.mark.parametrize("ratio", [4, 128])
def test_full_size_rows(ratio: int) -> None:
    """HD 512 rows (NOPE 448: seven 64-blocks and the rope block), a block closing on the first and on the
    last token of a decode step."""
    _check(dsv4.get_config("demo"), ratio, [ratio - 1, 3 * ratio - 2], 2, seed=ratio)


def test_a_ratio_that_is_not_a_power_of_two() -> None:
    """RC 12: the last candidate tile is partly empty (those candidates weigh 0)."""
    _check(dsv4.get_config("tiny"), 12, [11, 22, 5], 2, seed=3)


@pytest.mark.parametrize("ratio", [0, -4, True, 4.0])
def test_synthetic_compressor_refuses_a_ratio_no_compressor_has(ratio: object) -> None:
    """A compressor closes a row every ``ratio >= 1`` positions: 0 (an SWA layer has no compressor), a
    negative, a bool or a float is a ``ValueError`` naming ``ratio``, not weights with an empty ``ape``."""
    with pytest.raises(ValueError, match="ratio: expected a compress ratio >= 1"):
        synthetic_compressor(dsv4.get_config("tiny"), ratio)  # type: ignore[arg-type]


@pytest.mark.parametrize("ratio", [4, 16])
def test_very_large_activations_give_the_spec_rows(ratio: int) -> None:
    """x times 2^100 (exactly: the projections scale with it): the pooled rows' squares overflow fp32, so
    the RMSNorm scales a row by a power of two before it squares it (``dsv4.model.rms``), and the stored
    rows are still the reference's. (The rings are compared apart: at this size ``atol`` is nothing, and
    an fp32 sum in another order differs by more than their ``rtol`` 1e-4 here and there.)"""
    w, state, x, start, rope = _setup(dsv4.get_config("tiny"), ratio, [ratio - 1, 2 * ratio - 2], 2, 2, seed=5)
    x = (x.float() * 2.0**100).to(torch.bfloat16)
    before, results = _both_backends(w, state, x, start, rope)
    report = compare("kv_compressor", results["triton"], results["reference"], {"before": before})
    pool = [check for check in report.checks if check.name.startswith("pool")]
    assert pool and all(check.passed for check in pool), str(report)
    for name in ("kv_state", "score_state"):
        torch.testing.assert_close(results["triton"][name], results["reference"][name], rtol=1e-3, atol=0)

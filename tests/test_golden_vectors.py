"""Every backend against the fixed golden vectors, with the spec §6 tolerances."""

from __future__ import annotations

import pytest

import dsv4
from conftest import BACKENDS, DEVICE
from dsv4.harness.golden import compare, step_inputs
from golden_vectors import INDEXER_CASES, QKV_CASES, Vectors, expected_pool, ring_by_position


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", QKV_CASES)
def test_qkv_proj_rope_golden(name: str, backend: str) -> None:
    v = Vectors(name, DEVICE)
    out = dsv4.qkv_proj_rope(v.t("x", True), v.attn_weights(), v.t("positions"), v.rope(), backend=backend)
    expected = {k: v.t(f"expected_{k}", k in ("q", "kv")) for k in ("q", "kv", "qr", "qr_scale")}  # q, kv: bf16
    report = compare("qkv_proj_rope", out._asdict(), expected)
    assert report, str(report)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", INDEXER_CASES)
def test_indexer_golden(name: str, backend: str) -> None:
    """All steps in order, carrying this backend's own state from step to step; the ring is compared
    position by position (the vectors hold it in the v2 layout)."""
    v = Vectors(name, DEVICE)
    m = v.meta
    w, rope, state = v.indexer_weights(), v.rope(), v.empty_state()
    for k in range(m["steps"]):
        x, start = v.t(f"step{k}_x", True), v.t(f"step{k}_start_pos")
        before = state.clone()
        out = dsv4.indexer(
            x, v.t(f"step{k}_qr"), v.t(f"step{k}_qr_scale"), w, state, start, m["offset"], rope,
            topk=m["index_topk"], backend=backend,
        )  # fmt: skip
        expected = {n: v.t(f"step{k}_expected_{n}") for n in ("score", "topk_idxs", "kv_state", "score_state")}
        expected.update(expected_pool(before, v.t(f"step{k}_expected_idx_kv_cache", True), start, x.shape[1]))
        got = {**out._asdict(), **state.tensors()}
        for ring in ("kv_state", "score_state"):
            got[ring], expected[ring] = ring_by_position(got[ring], expected[ring], start + x.shape[1])
        report = compare("indexer", got, expected, step_inputs(x, start, before, m["offset"]))
        assert report, f"step {k} (start_pos {start.tolist()}):\n{report}"

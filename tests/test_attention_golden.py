"""Every backend of the attention ops against the fixed golden vectors, with attention spec §8's rules."""

from __future__ import annotations

import pytest
import torch

import dsv4
from attention_vectors import AttnVectors, cases
from conftest import DEVICE, backends_of
from dsv4.harness.cases import record_outputs
from dsv4.harness.golden import compare
from dsv4.io.fp8 import e8m0_bytes_to_float32


@pytest.mark.parametrize("backend", backends_of("kv_compressor"))
@pytest.mark.parametrize("name", cases("kv_compressor"))
def test_kv_compressor_golden(name: str, backend: str) -> None:
    v = AttnVectors(name, DEVICE)
    w = dsv4.CompressorWeights(v.bf16("wkv"), v.bf16("wgate"), v.t("ape"), v.bf16("norm_w"))
    state = dsv4.CompressorState(v.t("kv_state").clone(), v.t("score_state").clone(), v.pool("cmp"))
    before = record_outputs({"state": state.clone()})
    dsv4.kv_compressor(v.bf16("x"), w, state, v.t("start_pos"), v.rope(), backend=backend)
    expected_state = dsv4.CompressorState(v.t("expected_kv_state"), v.t("expected_score_state"), v.pool("cmp", True))
    written = v.written_mask("written_rows_b_j_block_offset")
    inputs = {"before": before, "written": {"pool": written}}
    report = compare(
        "kv_compressor", record_outputs({"state": state}), record_outputs({"state": expected_state}), inputs
    )
    assert report, str(report)
    assert bool(written.any()) or name.endswith("S1"), "each case with S > 1 closes blocks"


@pytest.mark.parametrize("backend", backends_of("window_kv_write"))
@pytest.mark.parametrize("name", cases("window_kv_write"))
def test_window_kv_write_golden(name: str, backend: str) -> None:
    v = AttnVectors(name, DEVICE)
    pool = v.pool("win")
    dsv4.window_kv_write(v.bf16("kv"), pool, v.t("start_pos"), window=v.meta["sliding_window"], backend=backend)
    got = record_outputs({"pool": pool})
    report = compare("window_kv_write", got, record_outputs({"pool": v.pool("win", True)}))
    assert report, str(report)


@pytest.mark.parametrize("backend", backends_of("sparse_attn"))
@pytest.mark.parametrize("name", cases("sparse_attn"))
def test_sparse_attn_golden(name: str, backend: str) -> None:
    v = AttnVectors(name, DEVICE)
    m = v.meta
    kind = m["kind"]
    out = dsv4.sparse_attn(
        v.bf16("q"), v.bf16("kv"), v.t("start_pos"), v.pool("win"), v.t("attn_sink"), v.rope(), kind=kind,
        window=m["sliding_window"], compress_ratio=m.get("compress_ratio", 0),
        compressed_pool=v.pool("cmp") if kind != "swa" else None,
        topk_idxs=v.t("topk_idxs") if kind == "csa" else None, topk_offset=m.get("topk_offset", 0), backend=backend,
    )  # fmt: skip
    report = compare("sparse_attn", out._asdict(), {"o": v.bf16("expected_o")})
    assert report, str(report)


@pytest.mark.parametrize("backend", backends_of("o_proj"))
@pytest.mark.parametrize("name", cases("o_proj"))
def test_o_proj_golden(name: str, backend: str) -> None:
    v = AttnVectors(name, DEVICE)
    e4m3 = torch.float8_e4m3fn
    w = dsv4.OProjWeights(v.t("wo_a").view(e4m3), v.t("wo_a_scale"), v.t("wo_b").view(e4m3), v.t("wo_b_scale"))
    out = dsv4.o_proj(v.bf16("o"), w, backend=backend)
    report = compare("o_proj", out._asdict(), {"y": v.bf16("expected_y")})
    assert report, str(report)
    for part in ("wo_a_scale", "wo_b_scale"):  # the checkpoint's UE8M0 bytes are the scales as load_layer reads them
        assert torch.equal(e8m0_bytes_to_float32(v.t(f"{part}_e8m0")), v.t(part))

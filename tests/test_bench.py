"""``dsv4 bench``: the bytes model against hand counts, timing and report helpers, the traffic
path end to end, and the CLI smoke run (``dsv4 bench --preset tiny --cpu``)."""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import pytest
import torch

import bench_kernels
import dsv4.reference
from conftest import INTERPRETER_TRAFFIC
from dsv4.bench import report, runner, timing
from dsv4.bench.calls import BoundCall, bind
from dsv4.bench.runner import _time_backend, bench_cost, floors_us, make_bench_case, run_bench, shape_grid
from dsv4.bench.timing import DeviceSpec, Timing, _reps_for, device_spec, time_cpu
from dsv4.bench.trace import trace_decode_step
from dsv4.bench.traffic import measure_traffic
from dsv4.cli import main
from dsv4.harness.cases import make_case
from dsv4.harness.golden import bit_identical
from dsv4.model.config import get_config
from dsv4.model.structs import OProjOut
from dsv4.ops import get_op, op_names
from dsv4.ops.backends import available_backends
from dsv4.ops.costs import OpCost, blocks_spanned, closed_rows, ring_traffic

FLASH = get_config("flash")
TINY = get_config("tiny")

# flash decode: B=64 sequences, S=2 tokens each, T=128 (spec §1); dims written out from spec §1.
B, S, T = 64, 2, 128
D, H, HD, R, QL, HI, HID, TOPK = 4096, 64, 512, 64, 1024, 64, 128, 512
ROPE_ROW = 2 * (R // 2) * 4  # cos + sin of one position, fp32


def qkv_proj_rope_cost(cfg, tokens: int) -> OpCost:
    """The bytes model of ``qkv_proj_rope`` on ``tokens`` tokens (one per row, each at its own position)."""
    return get_op("qkv_proj_rope").cost(cfg, list(range(tokens)), 1)


def indexer_compressor_cost(cfg, starts: list[int], seq: int) -> OpCost:
    return get_op("indexer_compressor").cost(cfg, starts, seq)


def indexer_cost(cfg, starts: list[int], seq: int) -> OpCost:
    return get_op("indexer").cost(cfg, starts, seq)


def test_qkv_proj_rope_bytes_and_flops_at_flash_decode() -> None:
    reads = (
        T * D * 2  # x bf16
        + T * 8  # positions int64
        + T * ROPE_ROW  # rope rows: one per distinct position, T of them
        + QL * D * 2  # wq_a bf16: 1024 x 4096
        + QL * 2  # gamma_cq bf16
        + H * HD * QL * 1  # wq_b int8: 32768 x 1024
        + H * HD * 4  # wq_b_scale fp32
        + HD * D * 2  # wkv bf16: 512 x 4096
        + HD * 2  # gamma_ckv bf16
    )
    writes = T * H * HD * 2 + T * HD * 2 + T * QL * 1 + T * 4  # q, kv, qr, qr_scale
    cost = qkv_proj_rope_cost(FLASH, T)
    assert (cost.read_bytes, cost.write_bytes) == (reads, writes)
    assert cost.bytes == 56_005_120
    assert abs(cost.bytes / 56e6 - 1) < 0.01  # the issue's ~56 MB
    assert cost.flops == {"bf16": 2 * T * D * QL + 2 * T * D * HD, "int8": 2 * T * QL * H * HD}
    # B=64 rows of S=2 tokens, all from one start: 2 distinct positions, so 2 RoPE rows, not T
    shared = get_op("qkv_proj_rope").cost(FLASH, [1024] * B, S)
    assert cost.read_bytes - shared.read_bytes == (T - 2) * ROPE_ROW and shared.write_bytes == writes


@pytest.mark.parametrize(
    ("start", "expected"),
    [
        (1024, (0, 4, 0)),  # slots 0, 1 written (both halves); no block closes
        (1025, (0, 4, 0)),  # slots 1, 2
        # slot 2, then 3 closes block 256: the pool reads slots 4-7 first half (block 255) and slots
        # 0, 1 second half (2, 3 are on chip); writes slots 2, 3 (both halves)
        (1026, (6, 4, 1)),
        # slot 3 closes: the pool reads slots 4-7 first half and 0-2 second half; writes slot 3, then
        # slot 4 for the next token (block 255's slot: read before it is overwritten)
        (1027, (7, 4, 1)),
    ],
)
def test_ring_traffic_by_hand(start: int, expected: tuple[int, int, int]) -> None:
    assert ring_traffic(start, 2) == expected


def test_ring_traffic_long_step_counts_each_half_once() -> None:
    # 16 blocks close; no pool needs a pre-step value (block 0 has no previous block, every later
    # candidate was written in the step); every half is written, each counted once
    assert ring_traffic(0, 64) == (0, 16, 16)


@pytest.mark.parametrize(
    ("start", "seq", "expected"),
    [
        (5, 3, (5, 3, 1)),  # slots 5-7 written, block 0 closes at 7 and reads slots 0-4
        (8, 16, (0, 8, 2)),  # blocks 1 and 2 written whole in the step: nothing read
        # 13-15 close block 1 (slots 0-4 read), 16-23 rewrite every slot and close block 2, 24 writes slot 0
        (13, 12, (5, 8, 2)),
        (3, 2, (0, 2, 0)),  # no block closes
    ],
)
def test_a_disjoint_ring_of_ratio_slots_by_hand(start: int, seq: int, expected: tuple[int, int, int]) -> None:
    """An HCA compressor's ring (``coff`` 1) holds ``ratio`` slots, one a position modulo ``ratio``."""
    assert ring_traffic(start, seq, ratio=8, coff=1) == expected


def test_closed_rows_are_the_blocks_whose_last_position_the_step_holds() -> None:
    for ratio in (4, 16):
        for start in range(3 * ratio):
            for seq in range(2 * ratio + 2):
                last = range(start, start + seq)
                want = [j for j in range(start // ratio + seq + 1) if ratio * j + ratio - 1 in last]
                assert list(closed_rows(start, seq, ratio)) == want, (ratio, start, seq)


def test_blocks_spanned_counts_the_distinct_blocks_of_the_rows() -> None:
    for lo in range(20):
        for hi in range(24):
            assert blocks_spanned(lo, hi, 8) == len({r // 8 for r in range(lo, hi)}), (lo, hi)


def test_compressor_bytes_at_flash_decode() -> None:
    starts = [1026] * B  # each row closes one block at its second token
    half = HID * 4  # one ring slot half, fp32
    reads = (
        B * S * D * 2  # x
        + B * 8  # start_pos int64
        + 2 * HID * D * 2 * 2  # wkv and wgate bf16: 256 x 4096 each
        + 2 * 2 * HID * 4  # ape rows for p % 4 in {2, 3}
        + HID * 2  # norm_w
        + 1 * ROPE_ROW  # every row closes block 256: one distinct position (its first, 1024), one RoPE row
        + B * 6 * half * 2  # ring halves read, both state tensors
        + B * 4  # each row's one closed row lies in one block: one block-table entry per row, int32
    )
    writes = B * 4 * half * 2 + B * (HID + 4)  # ring halves written; one INT8 pool row + fp32 scale per row
    cost = indexer_compressor_cost(FLASH, starts, S)
    assert (cost.read_bytes, cost.write_bytes) == (reads, writes)
    assert cost.flops == {"bf16": 2 * B * S * D * 2 * HID * 2, "fp32": B * 2 * HID * HID}


def test_indexer_bytes_at_flash_decode() -> None:
    starts = [1026] * B  # 256 cache rows before the step, 257 after
    comp = indexer_compressor_cost(FLASH, starts, S)
    extra_reads = (
        T * QL  # qr int8
        + T * 4  # qr_scale
        + HI * HID * QL  # wq_b int8: 8192 x 1024
        + HI * HID * 4  # wq_b_scale
        + HI * D * 2  # weights_proj bf16
        + 3 * ROPE_ROW  # distinct positions: the queries' 1026 and 1027, and the new key's block at 1024
        + B * 256 * (HID + 4)  # old pool rows (INT8 + fp32 scale), read once per batch row
        + B * 5 * 4  # block-table entries: 257 rows (256 read, 1 written) in blocks of 64 are 5 blocks per row
    )
    extra_writes = B * S * 257 * 4 + T * TOPK * 4  # score fp32 [64, 2, 257], topk_idxs int32
    cost = indexer_cost(FLASH, starts, S)
    # x is read once, shared with the compressor; the compressor's RoPE row (1024) and block-table entries
    # (row 256's block, one per batch row) are among the indexer's own, counted once
    assert cost.read_bytes == comp.read_bytes - ROPE_ROW - B * 4 + extra_reads
    assert cost.write_bytes == comp.write_bytes + extra_writes
    visible = B * (1027 // 4 + 1028 // 4)  # rows each token scores: (p + 1) // 4
    assert cost.flops["int8"] == 2 * T * QL * HI * HID + 2 * HI * HID * visible
    assert cost.flops["bf16"] == comp.flops["bf16"] + 2 * T * D * HI
    assert cost.flops["fp32"] == comp.flops["fp32"] + 2 * T * HI * HID * HID


def test_rope_rows_and_block_table_entries_are_counted_once_per_op() -> None:
    """``dsv4.ops.costs``: one RoPE row per distinct position an op rotates at; one block-table entry
    per pool block (64 rows) that a slot's rows read or written span, once per op."""
    entry = 4  # int32
    # the window below start 8190: pool rows 8063..8189 straddle blocks 125, 126 and 127
    swa = get_op("sparse_attn").cost(FLASH, [8190], 2, kind="swa")
    assert swa.reads["block_table (rows read)"] == 3 * entry
    # CSA adds the blocks of the rows it selects at the floor: 512 of the 2048 it sees, packed, 8 blocks
    csa = get_op("sparse_attn").cost(FLASH, [8190], 2, kind="csa")
    assert csa.reads["block_table (rows read)"] == (3 + 8) * entry
    # HCA (ratio 128) reads every compressed row it sees: 8192 // 128 = 64 rows, one block
    hca = get_op("sparse_attn").cost(FLASH, [8190], 2, kind="hca")
    assert hca.reads["block_table (rows read)"] == (3 + 1) * entry
    # the fused write reads 127's entry once: the rows written, 8190 and 8191, share the last block read
    fused = get_op("sparse_attn_write").cost(FLASH, [8190, 8192], 2, kind="swa")
    assert fused.reads["block_table (rows read)"] == (3 + 2) * entry  # 8192's window: 8065..8191, blocks 126-127
    assert fused.reads["block_table (rows written, blocks not read)"] == (0 + 1) * entry  # 8192, 8193: block 128
    # prefill T=1024 from 0: the window keeps the last W = 128 rows, positions 896..1023: blocks 14 and 15
    assert get_op("window_kv_write").cost(FLASH, [0], 1024).reads["block_table (written rows)"] == 2 * entry
    # the indexer at prefill T=1024 writes and scores key rows 0..255 (blocks 0..3), each entry once; its
    # 1024 tokens sit at 1024 distinct positions, which hold the new keys' (0, 4, ..., 1020)
    idx = get_op("indexer").cost(FLASH, [0], 1024)
    small = {k: v for k, v in idx.reads.items() if "rope" in k or "block_table" in k}
    assert small == {
        "rope rows (tokens and new keys)": 1024 * ROPE_ROW,
        "block_table (rows read or written)": 4 * entry,
    }
    # an HCA compressor (ratio 128) over the same tokens closes rows 0..7 (block 0), rotated at 0, 128, ..., 896
    hca = get_op("kv_compressor").cost(FLASH, [0], 1024, kind="hca", ratio=128)
    assert hca.reads["block_table (written rows)"] == 1 * entry and hca.reads["rope rows (blocks)"] == 8 * ROPE_ROW


def listed(name: str) -> DeviceSpec:
    """The device table's entry for ``name``, which it has."""
    spec = device_spec(name)
    assert spec is not None, name
    return spec


def test_floors_take_the_larger_of_memory_and_compute() -> None:
    h100 = listed("NVIDIA H100 80GB HBM3")
    cost = qkv_proj_rope_cost(FLASH, T)
    f = floors_us(cost, h100.bandwidth, h100)
    assert f["memory"] == pytest.approx(56_005_120 / 3.35e12 * 1e6)  # ~16.7 µs
    assert f["compute"] == pytest.approx((2 * T * D * (QL + HD) / 989e12 + 2 * T * QL * H * HD / 1979e12) * 1e6)
    assert f["floor"] == f["memory"]  # decode is memory-bound
    prefill = qkv_proj_rope_cost(FLASH, 8192)
    assert floors_us(prefill, h100.bandwidth, h100)["floor"] == floors_us(prefill, None, h100)["compute"]
    assert floors_us(cost, None, None) == {"memory": None, "compute": None, "floor": None}


def test_device_table() -> None:
    assert listed("NVIDIA H100 80GB HBM3").bandwidth == 3.35e12
    assert listed("NVIDIA H100 SXM5 80GB").bandwidth == 3.35e12
    assert listed("NVIDIA H200").bandwidth == 4.8e12
    assert listed("NVIDIA H100 PCIe").name == "H100 PCIe"
    assert device_spec("NVIDIA A100-SXM4-80GB") is None
    # names that hold another part's: a Grace Hopper's "GH200" holds "H200", an NVL card's its SXM name
    assert listed("NVIDIA GH200 480GB").bandwidth == 4.0e12
    assert listed("NVIDIA GH200 144G HBM3e").bandwidth == 4.9e12
    assert listed("NVIDIA H200 NVL").peak_flops["bf16"] == pytest.approx(835e12)
    assert listed("NVIDIA H100 NVL").name == "H100 NVL"


def test_shape_grid_follows_the_issue() -> None:
    labels = [(s.op, s.label) for s in shape_grid(FLASH, ["decode", "prefill"])]
    assert ("qkv_proj_rope", "decode B=64 S=2") in labels
    for rows, batch in ((2048, 64), (65536, 1), (262144, 1)):
        assert ("indexer", f"decode B={batch} S=2 cache={rows}") in labels
    for op in ("qkv_proj_rope", "indexer_compressor", "indexer"):
        for t in (128, 1024, 8192):
            assert (op, f"prefill T={t}") in labels
    demo = {s.label for s in shape_grid(get_config("demo"), ["decode"])}  # 4096 positions: 1024 rows at most
    assert not any("cache=2048" in label or "cache=65536" in label for label in demo)


def test_shape_grid_runs_each_layer_kind_of_an_attention_op() -> None:
    """``kv_compressor`` and ``sparse_attn`` at every decode shape of their CSA rows in each other kind
    too, after every op's default rows (the targets' rows come first); the bytes model follows the kind."""
    shapes = shape_grid(FLASH, ["decode"], ["sparse_attn", "kv_compressor", "o_proj"])
    labels = [(s.op, s.label) for s in shapes]
    caches = ["decode B=64 S=2 cache=2048", "decode B=1 S=2 cache=65536", "decode B=1 S=2 cache=262144"]
    assert labels == [
        *[("sparse_attn", c) for c in caches],
        ("kv_compressor", "decode B=64 S=2"),
        ("o_proj", "decode B=64 S=2"),
        *[("sparse_attn", c + " kind=hca") for c in caches],
        ("kv_compressor", "decode B=64 S=2 kind=hca"),
        *[("sparse_attn", c + " kind=swa") for c in caches[::2]],  # 65536 rows: the window's work at 262144
    ]
    starts = [8190] * 64
    cost = {(s.op, s.kind): bench_cost(FLASH, s, starts) for s in shapes if s.label.startswith("decode B=64")}
    weights = "w.wkv + w.wgate"  # COFF x HD rows each: 2 x 512 for CSA's overlapping windows, 512 for HCA's
    assert cost["kv_compressor", "hca"].reads[weights] * 2 == cost["kv_compressor", None].reads[weights]
    rows = "compressed rows (FP8)"
    assert cost["sparse_attn", "swa"].reads[rows] == 0 < cost["sparse_attn", "hca"].reads[rows]
    assert cost["sparse_attn", "hca"].reads[rows] < cost["sparse_attn", None].reads[rows]  # 64 rows a slot, not 512
    assert cost["sparse_attn", "hca"].bytes == get_op("sparse_attn").cost(FLASH, starts, 2, kind="hca").bytes


def test_shapes_keeps_the_shapes_whose_op_or_label_holds_a_text(tmp_path, capsys) -> None:
    """``dsv4 bench --shapes``: the shapes whose op and label hold one of the texts, in the grid's order;
    a filter that keeps none is a user error naming ``shapes``, before anything is measured."""
    out = tmp_path / "bench.json"
    argv = ["bench", "--preset", "tiny", "--cpu", "--model-only", "--ops", "sparse_attn,o_proj", "--json", str(out)]
    assert main([*argv, "--shapes", "kind=swa,o_proj"]) == 0
    result = json.loads(out.read_text())
    assert [(s["op"], s["shape"]) for s in result["shapes"]] == [
        ("o_proj", "decode B=4 S=2"),
        ("sparse_attn", "decode B=4 S=2 cache=16 kind=swa"),
        ("sparse_attn", "decode B=1 S=2 cache=512 kind=swa"),
    ]
    assert result["settings"]["shapes"] == ["kind=swa", "o_proj"]
    assert main([*argv, "--mode", "prefill"]) == 0
    shapes = [s["shape"] for s in json.loads(out.read_text())["shapes"]]
    assert shapes and all(s.startswith("prefill ") for s in shapes)  # --mode prefill: no decode shape
    model = result["shapes"][0]["model"]  # o_proj at B=4, S=2: it writes y, bf16, and reads the rest
    assert model["write_bytes"] == sum(model["writes"].values()) == 4 * 2 * TINY.hidden_size * 2
    assert model["read_bytes"] == sum(model["reads"].values()) == model["bytes"] - model["write_bytes"]
    assert "--shapes kind=swa,o_proj" in result["meta"]["command"]
    capsys.readouterr()
    with pytest.raises(ValueError, match=r"^shapes: none of B=128 is in an op or shape of tiny"):
        run_bench(TINY, ops=["o_proj"], shapes=["B=128"], backends=[], traffic=False)


def test_the_indexer_check_scores_the_key_pool_the_checked_call_wrote() -> None:
    """``dsv4 bench``'s check of an indexer call judges its scores and top-k against the reference's
    scores of the key pool that call wrote (spec §6: from the same inputs), not against the scores of
    the reference's own run: expected scores off by one everywhere change nothing, while the keys the
    call wrote are still held to the reference's."""
    case = make_case(TINY, "indexer", seed=0, max_position=64, batch=2, seq=2, start_pos=[6, 9])
    reference = bind(case, "reference")
    expected = {k: v.clone() for k, v in reference.outputs(reference()).items()}
    off = {**expected, "score": expected["score"] + 1.0}
    assert runner._check("indexer", bind(case, "reference"), off, case).startswith("ok")
    keys = next(k for k in expected if expected[k].dtype == torch.int8)  # the INT8 key pool
    wrong_keys = {**expected, keys: expected[keys] ^ 1}
    assert not runner._check("indexer", bind(case, "reference"), wrong_keys, case).startswith("ok")


def test_each_reference_device_floor_is_at_that_devices_bandwidth() -> None:
    """The floors printed for the reference devices (on any machine) divide the shape's bytes by each
    device's own bandwidth: the H200's memory floor is below the H100's by their bandwidths' ratio."""
    result = run_bench(TINY, ops=["o_proj"], backends=[], traffic=False, progress=False)
    specs = {spec.name: spec for _, spec in timing.DEVICE_TABLE}
    assert result["shapes"]
    for shape in result["shapes"]:
        floors = shape["floor_us_reference_devices"]
        assert set(floors) == {"H100 SXM", "H200"}
        for name, floor in floors.items():
            assert floor["memory"] == pytest.approx(shape["model"]["bytes"] / specs[name].bandwidth * 1e6, rel=1e-12)
        assert floors["H200"]["memory"] < floors["H100 SXM"]["memory"]


def test_a_tensor_parallel_rank_is_a_preset(tmp_path, capsys) -> None:
    """``dsv4 bench --preset flash/tp8``: one of 8 ranks, the flash shapes with the rank's 8 q heads. Its
    ``qkv_proj_rope`` moves the whole layer's bytes less 7/8 of ``wq_b`` (INT8), its scales (fp32) and
    ``q`` (bf16), counted here from the dims."""
    out, moved = tmp_path / "bench.json", {}
    for preset in ("flash", "flash/tp8"):
        argv = ["bench", "--preset", preset, "--cpu", "--model-only", "--ops", "qkv_proj_rope", "--json", str(out)]
        assert main(argv) == 0
        result = json.loads(out.read_text())
        assert result["settings"]["preset"] == preset and [s["shape"] for s in result["shapes"]] == ["decode B=64 S=2"]
        moved[preset] = result["shapes"][0]["model"]["bytes"]
    rows, t = 64 * 512, 128  # H * HD rows of wq_b, B * S tokens
    others = 7 * rows // 8 * (1024 + 4 + 2 * t)  # the other ranks' rows: QL int8 weights, a scale, a column of q
    assert moved["flash/tp8"] == moved["flash"] - others
    capsys.readouterr()


def test_a_case_is_made_for_the_kind_asked() -> None:
    """``make_case``'s ``kind`` builds the op's arguments of that layer kind; an op that has no such kind
    is refused with the argument named, before anything is drawn."""
    hca = make_bench_case(TINY, shape_grid(TINY, ["decode"], ["kv_compressor"])[1], 0, "cpu")
    assert hca.meta["kind"] == "hca" and hca.args["w"].ape.shape[0] == TINY.kind_ratio("hca")
    swa = make_bench_case(TINY, shape_grid(TINY, ["decode"], ["sparse_attn"])[-1], 0, "cpu")  # B=1, cache 512
    assert (swa.meta["kind"], swa.args["kind"], swa.args["compress_ratio"]) == ("swa", "swa", 0)
    assert "compressed_pool" not in swa.args
    default = make_case(TINY, "sparse_attn", max_position=256)
    assert (default.meta["kind"], default.args["kind"]) == ("csa", "csa")
    assert "kind" not in make_case(TINY, "o_proj").meta
    with pytest.raises(ValueError, match=r"^kind: o_proj takes no kind"):
        make_case(TINY, "o_proj", kind="hca")
    with pytest.raises(ValueError, match=r"^kind: kv_compressor takes one of csa, hca, got 'swa'"):
        make_case(TINY, "kv_compressor", kind="swa")


def test_a_case_of_a_kind_the_config_has_no_layer_of_is_refused() -> None:
    """A config whose ``compress_ratios`` hold no HCA layer has no HCA ratio to build a case with: the kind
    is refused naming ``kind`` and the config's list."""
    no_hca = TINY.replace(compress_ratios=(0, 4, 0))
    for op in ("kv_compressor", "sparse_attn"):
        with pytest.raises(ValueError, match=r"^kind: tiny has no 'hca' layer \(compress_ratios \[0, 4, 0\]\)$"):
            make_case(no_hca, op, kind="hca")
    assert make_case(no_hca, "kv_compressor", kind="csa").meta["kind"] == "csa"


def test_time_cpu_reports_quantiles() -> None:
    t = time_cpu(lambda: time.sleep(0.002), reps=5, budget_s=10.0)
    assert t.reps == 5 and t.launch == "host clock"
    assert 2000 <= t.p10_us <= t.median_us <= t.p90_us
    assert _reps_for(0.5, reps=100, budget_s=2.0, min_reps=5) == 5
    assert _reps_for(0.001, reps=100, budget_s=2.0, min_reps=5) == 100


def test_time_cpu_gives_the_median_and_the_10th_and_90th_percentiles(monkeypatch) -> None:
    """Five timed calls of 5, 1, 2, 3 and 100 µs after a warm-up: the median, not the mean, and the 10th and
    90th percentiles (linear between samples, as numpy takes them)."""
    now = [0.0]
    durations = iter([1e-6, 5e-6, 1e-6, 2e-6, 3e-6, 100e-6])  # the warm-up, then the timed calls

    def call() -> None:
        now[0] += next(durations)

    monkeypatch.setattr(timing, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: now[0])}))
    t = timing.time_cpu(call, reps=5, budget_s=1.0)
    p10, p90 = np.percentile([5.0, 1.0, 2.0, 3.0, 100.0], [10, 90])
    assert t.reps == 5 and (t.median_us, t.p10_us, t.p90_us) == pytest.approx((3.0, p10, p90))


def test_reps_below_the_minimum_run_the_minimum_and_say_so(capsys) -> None:
    """``--reps 1`` on a CPU runs 3 repetitions (a median and p10-p90 need a few): each timing records the
    3 it ran, the settings the 1 asked and the minimum, and ``--help`` says so rather than "fewer"."""
    result = run_bench(
        TINY, ops=["o_proj"], backends=["reference"], traffic=False, reps=1, budget_s=0.1, progress=False
    )
    assert (result["settings"]["reps"], result["settings"]["min_reps"]) == (1, 3)
    (timing,) = result["timings"]
    assert timing["status"] == "ok" and timing["reps"] == 3
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "never fewer than 5 on a GPU, 3 on a CPU" in " ".join(capsys.readouterr().out.split())


@INTERPRETER_TRAFFIC
def test_measure_traffic_counts_kernels_and_torch_ops() -> None:
    src = torch.randn(1000)
    dst = torch.empty_like(src)

    def op() -> None:
        bench_kernels.masked_copy_kernel[(8,)](src, dst, 1000, BLOCK=128)
        dst.add_(1.0)  # a PyTorch op between kernels: read and write 4000 B (estimate: every tensor once)

    traffic, _ = measure_traffic(BoundCall("copy", "triton", op, (), None))
    assert traffic.launches == 1 and traffic.kernels == {"masked_copy_kernel": 1}
    assert (traffic.load_bytes, traffic.store_bytes) == (4000, 4000)
    assert traffic.torch_ops == {"add_": 1}
    assert traffic.torch_op_bytes == 8000
    assert traffic.requested_bytes == 16000
    assert torch.equal(dst, src + 1.0)


@INTERPRETER_TRAFFIC
def test_measure_traffic_totals_each_kind_of_bytes_apart() -> None:
    """Loads and stores apart; sectors and unique sectors apart (four programs read the same RoPE rows:
    four times the sectors, once unique); both with the PyTorch op's estimate added, as requested bytes."""
    half = 32
    positions, cos, sin = torch.zeros(4, dtype=torch.int64), torch.randn(1, half), torch.randn(1, half)
    sink, src = torch.empty(4), torch.randn(1000)
    dst = torch.empty_like(src)

    def op() -> None:
        bench_kernels.rope_rows_kernel[(4,)](positions, cos, sin, sink, HALF=half)  # reads only
        bench_kernels.masked_copy_kernel[(8,)](src, dst, 1000, BLOCK=128)
        dst.add_(1.0)  # 8000 B by the estimate

    traffic, _ = measure_traffic(BoundCall("rows", "triton", op, (), None))
    per_program = 32 + 2 * 4 * 32  # a position's sector, then 4 sectors of cos and 4 of sin
    assert (traffic.load_bytes, traffic.store_bytes) == (4 * (8 + 2 * 4 * half) + 4000, 4000)
    assert traffic.sector_bytes == 4 * per_program + 8000 + 8000
    assert traffic.unique_bytes == per_program + 8000 + 8000
    row = traffic.to_dict()
    assert (row["load_bytes"], row["store_bytes"]) == (traffic.load_bytes, 4000)
    assert (row["sector_bytes"], row["unique_bytes"]) == (traffic.sector_bytes, traffic.unique_bytes)
    assert row["requested_bytes"] == traffic.load_bytes + 4000 + 8000


@pytest.fixture(scope="session")
def touching_qkv_result() -> dict:
    """The bench at the tiny preset with ``bench_kernels.touching_qkv_proj_rope`` as the Triton qkv_proj_rope."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(get_op("qkv_proj_rope")._impls, "triton", bench_kernels.touching_qkv_proj_rope)  # the entry point
        result = {"meta": report.provenance("bench --preset tiny --cpu --ops qkv_proj_rope", "cpu")}
        result.update(run_bench(TINY, ops=["qkv_proj_rope"], reps=2, budget_s=0.1, progress=False))
    return result


@INTERPRETER_TRAFFIC
def test_traffic_of_a_kernel_moving_exactly_the_minimal_bytes_is_1x(touching_qkv_result: dict) -> None:
    (row,) = touching_qkv_result["traffic"]
    assert row["status"] == "ok", row
    assert row["launches"] == bench_kernels.TOUCHING_QKV_LAUNCHES == len(row["per_launch"])
    assert sum(launch["load_bytes"] + launch["store_bytes"] for launch in row["per_launch"]) == row["minimal_bytes"]
    assert row["requested_bytes"] == row["minimal_bytes"] == touching_qkv_result["shapes"][0]["model"]["bytes"]
    assert row["requested_over_minimal"] == 1.0
    assert row["sector_over_minimal"] >= 1.0 and row["unique_over_minimal"] >= 1.0
    assert row["check"].startswith("MISMATCH")  # it computes nothing: the bench's check says so


@INTERPRETER_TRAFFIC
def test_table_and_plot_of_traffic_ratios(touching_qkv_result: dict, tmp_path) -> None:
    text = report.render(touching_qkv_result)
    assert "requested/min" in text and "1.00" in text and "CPU host clock" in text
    report.plot(touching_qkv_result, tmp_path / "traffic.png")
    assert (tmp_path / "traffic.png").stat().st_size > 1000


@INTERPRETER_TRAFFIC
def test_cli_bench_tiny_cpu(tmp_path) -> None:
    """The CI smoke run: traffic mode on the CPU. Every op with a Triton kernel has finite ratios
    >= 1 and matches the reference; an op whose kernel module does not exist yet says so."""
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    assert main(["bench", "--preset", "tiny", "--cpu", "--reps", "2", "--budget-s", "0.1",
                 "--json", str(out), "--plot", str(png)]) == 0  # fmt: skip
    result = json.loads(out.read_text())
    assert result["meta"]["command"].startswith("dsv4 bench --preset tiny --mode decode")
    assert result["meta"]["command"].endswith("--cpu")
    assert set(result["meta"]["versions"]) >= {"torch", "triton", "python", "dsv4"}
    ops = {s["op"] for s in result["shapes"]}
    assert ops == set(op_names())
    assert all(s["model"]["bytes"] > 0 for s in result["shapes"])
    assert [t["backend"] for t in result["timings"]] == ["reference"] * len(result["shapes"])
    assert all(t["status"] == "ok" and t["median_us"] > 0 for t in result["timings"])
    assert len(result["traffic"]) == len(result["shapes"])
    for row in result["traffic"]:
        if row["status"] == "error":  # allowed only while the op's kernel module is not written yet
            assert "No module named 'dsv4.kernels." in row["error"], row
            continue
        if row["status"] == "skipped":  # an op with no Triton implementation yet says so
            assert "triton" not in get_op(row["op"]).implementations and "no triton implementation" in row["error"]
            continue
        assert row["status"] == "ok", row
        assert row["check"] == "ok", row
        assert row["launches"] >= 1
        for key in ("requested_over_minimal", "sector_over_minimal", "unique_over_minimal"):
            assert math.isfinite(row[key]) and row[key] >= 1.0, (key, row)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _o_proj_5_percent_off(*args, **kwargs) -> OProjOut:
    out = dsv4.reference.o_proj(*args, **kwargs)
    return OProjOut((out.y.float() * 1.05).to(torch.bfloat16))


def _o_proj_raises(*args, **kwargs) -> OProjOut:
    raise RuntimeError("a kernel that fails")


@INTERPRETER_TRAFFIC
@pytest.mark.parametrize(
    ("impl", "verdict"), [(_o_proj_5_percent_off, "MISMATCH y"), (_o_proj_raises, "a kernel that fails")],
    ids=["mismatch", "error"],
)  # fmt: skip
def test_bench_exits_1_when_a_check_fails(impl, verdict, tmp_path, monkeypatch, capsys) -> None:
    """A Triton ``o_proj`` whose ``y`` is 5% off (or that raises): the table and ``--json`` still say so
    row by row, and then ``dsv4 bench`` exits 1, its last line naming the rows, as ``run`` does."""
    monkeypatch.setitem(get_op("o_proj")._impls, "triton", impl)
    out = tmp_path / "bench.json"
    argv = ["bench", "--preset", "tiny", "--cpu", "--ops", "o_proj", "--backends", "reference,triton"]
    assert main([*argv, "--reps", "2", "--budget-s", "0.1", "--json", str(out)]) == 1
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("dsv4 bench: 2 row(s) not ok") and "o_proj decode B=4 S=2 triton" in last
    assert verdict in last
    result = json.loads(out.read_text())
    triton = [r for r in result["timings"] + result["traffic"] if r["backend"] == "triton"]
    assert len(triton) == 2 and all(verdict in r.get("check", r.get("error", "")) for r in triton)
    monkeypatch.setitem(get_op("o_proj")._impls, "triton", dsv4.reference.o_proj)  # the same run, every check ok
    assert main([*argv, "--reps", "2", "--budget-s", "0.1"]) == 0


def _shape(op: str, label: str, memory: float, compute: float) -> dict:
    """A shape of a bench record whose floors on both reference devices are ``memory`` and ``compute`` µs."""
    floors = {"memory": memory, "compute": compute, "floor": max(memory, compute)}
    none = {"memory": None, "compute": None, "floor": None}
    model = {"bytes": 3_000_000, "read_bytes": 2_000_000, "write_bytes": 1_000_000, "flops": {"bf16": 4_000_000_000}}
    return {
        "op": op, "shape": label, "model": model, "floor_us_device_table": none, "floor_us_measured_copy": none,
        "floor_us_reference_devices": {"H100 SXM": floors, "H200": floors},
    }  # fmt: skip


def _record(device_type: str = "cpu") -> dict:
    """A bench record of known figures, laid out as ``dsv4 bench --json`` writes it."""
    timing = {
        "op": "o_proj", "shape": "decode B=4 S=2", "backend": "triton", "status": "ok", "launch": "cuda graph",
        "median_us": 100.0, "p10_us": 90.0, "p90_us": 110.0, "zero_point_us": None, "gb_per_s": 30.0,
        "pct_of_floor_device_table": 50.0, "pct_of_floor_measured_copy": 40.0, "speedup_vs": {}, "check": "ok",
        "kernels": [{"kernel": "_wo_a_kernel", "us_per_call": 60.0, "us_after_previous_per_call": 25.0,
                     "launches_per_call": 1.0}],
    }  # fmt: skip
    return {
        "meta": {"device": "a device", "device_type": device_type, "commit": None, "commit_dirty": None},
        "bandwidth": {"device_table": None, "measured_copy_bytes_per_s": None},
        "settings": {
            "preset": "tiny",
            "modes": ["decode"],
            "skipped_backends": {},
            "traffic_skipped": "not requested",
            "l2": "n/a",
        },
        "shapes": [_shape("o_proj", "decode B=4 S=2", 2.0, 5.0), _shape("indexer", "decode B=4 S=2", 5.0, 2.0)],
        "timings": [timing],
        "traffic": [],
    }


def _line(text: str, *words: str) -> list[str]:
    (line,) = [row for row in text.splitlines() if all(w in row for w in words)]
    return line.split()


def test_the_tables_put_each_figure_under_its_heading() -> None:
    """The tables of a record of known figures: the bound is the larger floor's (floors = max(bytes /
    bandwidth, FLOPs / peak)), the spread reads p10-p90, and a kernel's share is a percentage of the median."""
    record = _record()
    models = report.model_table(record)
    assert _line(models, "o_proj")[-1] == "compute"  # its compute floor (5 µs) is above its memory floor (2 µs)
    assert _line(models, "indexer")[-1] == "memory"
    assert "90.0-110.0" in _line(report.timing_table(record), "o_proj")
    assert _line(report.kernel_table(record), "_wo_a_kernel")[-1] == "25.0"  # 25 µs after the others, of 100 µs
    assert _line(models, "o_proj")[4:8] == ["3.00", "2.00", "1.00", "4.00"]  # minimal, read, write MB (1e6 B); GFLOP
    timing = _line(report.timing_table(record), "o_proj")
    assert timing[timing.index("30") + 1 : timing.index("30") + 3] == ["50.0", "40.0"]  # GB/s, % floor table, copy
    assert "(dirty)" not in report.render(record).splitlines()[0]
    for dirty in (False, True):
        record["meta"].update(commit="0123456789abcdef", commit_dirty=dirty)
        header = report.render(record).splitlines()[0]
        assert "commit=0123456789ab" in header and ("(dirty)" in header) == dirty


def test_failed_rows_are_those_that_raised_or_whose_check_is_not_ok() -> None:
    from dsv4.bench.runner import failed_rows

    def row(status: str, **fields: str) -> dict:
        return {"op": "o_proj", "shape": "decode B=4 S=2", "backend": fields.pop("backend", "triton"),
                "status": status, **fields}  # fmt: skip

    result = {
        "timings": [row("ok", check="ok"), row("ok", backend="reference", check="is the reference"),
                    row("skipped", error="no triton implementation"), row("error", error="RuntimeError: x"),
                    row("ok", check="MISMATCH y: 3/100 off")],
        "traffic": [row("ok"), row("ok", check="ok")],
    }  # fmt: skip
    assert failed_rows(result) == [
        "o_proj decode B=4 S=2 triton: RuntimeError: x",
        "o_proj decode B=4 S=2 triton: MISMATCH y: 3/100 off",
        "o_proj decode B=4 S=2 triton: not checked",
    ]


def test_provenance_names_the_device_the_run_used_and_the_date_in_utc(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine running the bench with --cpu
    meta = report.provenance("bench --cpu", "cpu")
    assert meta["device_type"] == "cpu" and meta["device"].startswith("CPU")
    assert meta["date"].endswith("+00:00") and meta["command"] == "dsv4 bench --cpu"


def test_write_json_stopped_mid_write_leaves_the_last_file(tmp_path, monkeypatch) -> None:
    path = tmp_path / "bench.json"
    report.write_json({"run": 1}, path)

    real_fdopen = os.fdopen

    class Stopped:  # the file the write goes to: half of the data, then Ctrl-C
        def __init__(self, fd: int, mode: str) -> None:
            self.f = real_fdopen(fd, mode)

        def __enter__(self) -> Stopped:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

        def write(self, data: bytes) -> None:
            self.f.write(data[: len(data) // 2])
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "fdopen", Stopped)
    with pytest.raises(KeyboardInterrupt):
        report.write_json({"run": 2, "rows": list(range(100))}, path)
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"run": 1} and sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]


def test_a_gpu_plot_shows_the_percent_of_the_measured_copy_floor(tmp_path, monkeypatch) -> None:
    """The GPU plot's bars are the % of the floor at the measured copy bandwidth, as its title says; the
    device table's floor only where the copy's is missing."""
    import matplotlib.axes

    heights: list[list[float]] = []
    real = matplotlib.axes.Axes.bar

    def bar(self, x, height, *args, **kwargs):
        heights.append(list(height))
        return real(self, x, height, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", bar)
    record = _record("cuda")
    report.plot(record, tmp_path / "a.png")
    record["timings"][0]["pct_of_floor_measured_copy"] = None
    report.plot(record, tmp_path / "b.png")
    assert heights == [[40.0], [50.0]]


def test_percent_of_floor_and_speed_ups_are_of_the_measured_time(monkeypatch) -> None:
    """% of floor = floor / measured time x 100 (100% = at the floor), GB/s = minimal bytes / time, and
    ``speedup_vs[b]`` = b's median / this row's median (how many times faster than b)."""
    medians = {"reference": 300.0, "triton": 100.0}

    def timer(call, **kwargs) -> Timing:
        us = medians[call.backend]
        return Timing(us, us, us, reps=3, launch="host clock", l2="n/a")

    monkeypatch.setattr("dsv4.bench.runner.time_cpu", timer)
    monkeypatch.setitem(get_op("o_proj")._impls, "triton", dsv4.reference.o_proj)
    result = run_bench(TINY, ops=["o_proj"], backends=["reference", "triton"], traffic=False, progress=False)
    rows = {r["backend"]: r for r in result["timings"]}
    assert rows["triton"]["speedup_vs"] == {"reference": 3.0}
    assert rows["reference"]["speedup_vs"] == {}  # the baselines: reference, compile, library

    (shape,) = shape_grid(TINY, ["decode"], ["o_proj"])
    case = make_bench_case(TINY, shape, 0, "cpu")
    call = bind(case, "reference")
    cost = get_op("o_proj").cost(TINY, case.meta["start_pos"], shape.seq)
    table: dict[str, float | None] = {"floor": 50.0}  # µs, at the device table's bandwidth
    copy: dict[str, float | None] = {"floor": 25.0}  # µs, at the measured copy's
    row = _time_backend(
        case, shape, "reference", call, {}, cost, (table, copy), lambda _: Timing(100.0, 80.0, 130.0, 3, "", "")
    )  # median 100 µs: the % of floor and GB/s are the median's
    assert row["pct_of_floor_device_table"] == 50.0 and row["pct_of_floor_measured_copy"] == 25.0
    assert row["gb_per_s"] == pytest.approx(cost.bytes / 100e-6 / 1e9)


def test_trace_of_one_decode_step(tmp_path, monkeypatch) -> None:
    """The first backend that runs the step is traced (the kernels under the interpreter), the indexer on
    the activations and positions of the traced ``qkv_proj_rope``."""
    from dsv4.bench import trace

    cases = []
    real = trace.make_case

    def make_case(*args, **kwargs):
        cases.append(real(*args, **kwargs))
        return cases[-1]

    monkeypatch.setattr(trace, "make_case", make_case)
    path = tmp_path / "trace.json"
    backend = trace_decode_step(TINY, path, "cpu")
    assert backend == available_backends("cpu")[0]
    names = {e.get("name") for e in json.loads(path.read_text())["traceEvents"]}
    assert {"qkv_proj_rope", "indexer", f"decode step ({backend})"} <= names
    qkv, idx = (c.args for c in cases)
    assert torch.equal(qkv["x"], idx["x"].reshape(qkv["x"].shape))
    seq = idx["x"].shape[1]
    assert qkv["positions"].tolist() == [p + s for p in idx["start_pos"].tolist() for s in range(seq)]


@pytest.mark.parametrize("op", ["indexer", "kv_compressor", "window_kv_write", "sparse_attn_write"])
def test_a_bound_call_runs_on_its_own_copy_of_the_records_it_updates(op: str) -> None:
    """``bind`` copies every record the op updates (a window pool too): the call's outputs hold the state
    it wrote, as ``run_case``'s do, and the case's own records stay as they were for the next backend."""
    from dsv4.harness.cases import mutated_args, record_outputs, run_case

    case = make_case(TINY, op, seed=2, batch=2, seq=2, start_pos=[6, 13])
    records = {name: case.args[name] for name in mutated_args(op)}
    before = {k: t.clone() for k, t in record_outputs(records).items()}
    call = bind(case, "reference")
    got, want = call.outputs(call()), run_case(case, "reference")
    assert got.keys() == want.keys() and all(bit_identical(got[k], want[k], k) for k in want)
    assert any(not bit_identical(got[k], before[k], k) for k in before)  # the step wrote something
    assert all(bit_identical(t, before[k], k) for k, t in record_outputs(records).items())


def test_the_baselines_run_where_the_reference_runs() -> None:
    from dsv4.bench.calls import COMPILED, LIBRARY, backend_reason

    assert backend_reason(LIBRARY, "cpu") is None and backend_reason(COMPILED, "cpu") is None
    assert backend_reason("bogus", "cpu") is not None


def test_baselines_and_tune_take_the_ops_with_a_fused_kernel() -> None:
    """``compile`` and ``library`` are baselines of a fused kernel, and ``dsv4 tune`` tunes kernels: an
    op on the reference alone is skipped there with its reason, not run or tuned; ``library`` also skips
    a fused op that has no library composition (``baseline``), with its reason, instead of failing."""
    from dsv4.acceptance.plan import OPS
    from dsv4.bench import baseline
    from dsv4.bench.runner import _missing
    from dsv4.cli import build_parser

    fused = op_names("triton")
    assert fused == tuple(op for op in op_names() if "triton" in get_op(op).implementations) == OPS
    assert build_parser().parse_args(["tune"]).ops == list(fused)
    composed = [op for op in fused if hasattr(baseline, op)]
    assert {"qkv_proj_rope", "indexer_compressor", "indexer"} <= set(composed)
    for op in op_names():
        reason = _missing(op, "compile")
        assert (reason is None) == (op in fused), (op, reason)
        assert reason is None or f"no triton implementation of {op}" in reason
        reason = _missing(op, "library")
        assert (reason is None) == (op in composed), (op, reason)
        assert reason is None or f"no triton implementation of {op}" in reason or "no library composition" in reason
        assert _missing(op, "reference") is None


def test_a_kernels_share_of_the_span_leaves_out_its_wait_for_the_one_before() -> None:
    """Launches of one call: the second starts early (PDL) and ends 3 µs after the first; a kernel that
    ends before the others did takes nothing, and the one after it counts from the latest end so far
    (13), not from that kernel's (12); the last starts after a 1 µs gap. The shares add up to the span
    less the gap."""
    from dsv4.bench.timing import after_previous

    events = [("front", 0.0, 10.0), ("step", 2.0, 13.0), ("inner", 4.0, 12.0), ("tail", 12.5, 14.0),
              ("score", 15.0, 20.0)]  # fmt: skip
    assert after_previous(events) == [10.0, 3.0, 0.0, 1.0, 5.0]
    assert sum(after_previous(events)) == 20.0 - 1.0

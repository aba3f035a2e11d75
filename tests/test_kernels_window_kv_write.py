"""``window_kv_write``'s Triton kernel against the reference, pool bytes equal: rows with every kind of
64-block the FP8 row format has (scales across the range, zeros, NaN, infinities), rows of bf16
subnormals, a slot whose blocks are unallocated, and the full-size row (HD 512) over a prefill longer
than the window."""

from __future__ import annotations

import pytest
import torch

import dsv4
from conftest import DEVICE, FULL
from dsv4.harness.cases import record_outputs
from dsv4.harness.golden import bit_identical

pytest.importorskip("dsv4.kernels")


def _edge_rows(b: int, s: int, hd: int, g: torch.Generator) -> torch.Tensor:
    """``[b, s, hd]`` bf16 rows whose 64-blocks are scaled by powers of two from 2^-40 to 2^40, with
    all-zero, -0, NaN and infinite blocks among them."""
    v = torch.randn(b, s, hd, generator=g)
    scale = 2.0 ** torch.randint(-40, 41, (b, s, hd // 64, 1), generator=g).float()
    v = (v.view(b, s, hd // 64, 64) * scale).view(b, s, hd)
    flat = v.view(-1, 64)
    flat[1] = 0.0
    flat[2] = -0.0
    flat[3, 7] = float("nan")
    flat[5, 0] = float("inf")
    flat[6, 63] = -float("inf")
    return v.to(torch.bfloat16)


def _run_both(kv: torch.Tensor, pool: dsv4.KVPool, start: torch.Tensor, window: int) -> None:
    results = []
    for backend in ("reference", "triton"):
        p = pool.clone().to(DEVICE)
        dsv4.window_kv_write(kv.to(DEVICE), p, start.to(DEVICE), window=window, backend=backend)
        results.append(record_outputs({"pool": p.to("cpu")}))
    ref, got = results
    assert all(bit_identical(got[k], ref[k], k) for k in ref)


@pytest.mark.parametrize("seq", [2, 21])
def test_edge_rows_are_bit_identical(seq: int) -> None:
    cfg = dsv4.get_config("tiny")
    hd, r, window = cfg.head_dim, cfg.qk_rope_head_dim, cfg.sliding_window
    g = torch.Generator().manual_seed(seq)
    b = 3
    pool = dsv4.KVPool.dense(b, 64, hd, r, block_size=16)
    pool.nope.view(torch.uint8).copy_(torch.randint(0, 256, pool.nope.shape, generator=g, dtype=torch.uint8))
    pool.scale.copy_(torch.randint(0, 256, pool.scale.shape, generator=g, dtype=torch.uint8))
    pool.block_table[2, 1] = -1  # slot 2's rows 16..31 are skipped
    start = torch.tensor([0, 17, 13])
    _run_both(_edge_rows(b, seq, hd, g), pool, start, window)


def test_subnormal_rows_are_bit_identical() -> None:
    """Rows of bf16 subnormals (about 2^-130, down to 0x0001: 9.2e-41) store the rope tail as given, bit for bit:
    the values are widened to fp32 and the tail rounded back to bf16 exactly, as on a GPU."""
    cfg = dsv4.get_config("tiny")
    hd, r, window = cfg.head_dim, cfg.qk_rope_head_dim, cfg.sliding_window
    g = torch.Generator().manual_seed(5)
    b, seq = 2, 3
    kv = (torch.randn(b, seq, hd, generator=g) * 2.0**-130).to(torch.bfloat16)
    kv.view(-1)[-4:] = (
        torch.tensor([0x0001, 0x8001, 0x007F, 0x0080], dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    )
    tail = kv[..., hd - r :].float()
    assert ((tail != 0) & (tail.abs() < torch.finfo(torch.float32).tiny)).float().mean() > 0.8  # subnormals
    pool = dsv4.KVPool.dense(b, 64, hd, r, block_size=16)
    _run_both(kv, pool, torch.tensor([0, 21]), window)


def test_a_head_dim_that_is_not_a_power_of_two() -> None:
    """HD 192 (NOPE 128 + R 64), which the op takes: the kernel's tile is padded to 256 columns, and each
    token's row is still read at its own stride of 192."""
    hd, r = 192, 64
    g = torch.Generator().manual_seed(7)
    b, seq = 2, 3
    pool = dsv4.KVPool.dense(b, 64, hd, r, block_size=16)
    _run_both(_edge_rows(b, seq, hd, g), pool, torch.tensor([0, 21]), 16)


@FULL
def test_full_size_rows_over_a_prefill_longer_than_the_window() -> None:
    cfg = dsv4.get_config("demo")
    hd, r, window = cfg.head_dim, cfg.qk_rope_head_dim, cfg.sliding_window
    g = torch.Generator().manual_seed(0)
    b, s = 2, window + 3
    pool = dsv4.KVPool.dense(b, 512, hd, r)
    _run_both(_edge_rows(b, s, hd, g), pool, torch.tensor([0, 300]), window)

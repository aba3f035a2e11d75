"""The register-tile per-row INT8 quantization (``dsv4.kernels.epilogue.quantize_int8_rows``: the qkv rows'
``qr``, the indexer's queries and keys) against spec §2's rule, bit for bit: ``s = 127/amax`` and the
stored scale ``1/s``, each a correctly rounded fp32 division. The ops' comparators allow ``qr_scale`` and the
key scales a relative 5e-3 and 1/128, so a scale one ulp off passes them; here it does not."""

from __future__ import annotations

import pytest
import torch

kernels = pytest.importorskip("dsv4.kernels")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from conftest import DEVICE  # noqa: E402
from dsv4.harness.golden import bit_identical  # noqa: E402
from dsv4.kernels.epilogue import quantize_int8_rows  # noqa: E402

ROWS, COLS = 64, 128


@triton.jit
def _int8_rows_kernel(v_ptr, q_ptr, scale_ptr, ROWS: tl.constexpr, COLS: tl.constexpr):
    at = tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :]
    q, scale = quantize_int8_rows(tl.load(v_ptr + at))
    tl.store(q_ptr + at, q)
    tl.store(scale_ptr + tl.arange(0, ROWS), scale)


def test_int8_rows_are_the_spec_rule_bit_for_bit() -> None:
    """Rows of amax from 2^-20 to 2^20 (some below the 1e-4 floor): codes and scales bit for bit
    ``s = fp32(127 / amax)``, ``scale = fp32(1 / s)``, ``q = round_half_even(v * s)``."""
    g = torch.Generator().manual_seed(11)
    v = torch.randn(ROWS, COLS, generator=g) * 2.0 ** torch.randint(-20, 21, (ROWS, 1), generator=g).float()
    q = torch.empty(ROWS, COLS, dtype=torch.int8, device=DEVICE)
    scale = torch.empty(ROWS, dtype=torch.float32, device=DEVICE)
    _int8_rows_kernel[(1,)](v.to(DEVICE), q, scale, ROWS=ROWS, COLS=COLS)

    amax = v.abs().amax(dim=1).clamp_min(1e-4)
    s = torch.full_like(amax, 127.0) / amax  # fp32 divisions, correctly rounded on the CPU
    want_scale = torch.full_like(s, 1.0) / s
    assert not torch.equal(want_scale, amax / 127.0), "rows where amax/127 is not 1/s: the rule shows"
    assert bit_identical(scale.cpu(), want_scale, "scale")
    want_q = torch.round(v * s[:, None]).clamp(-127, 127).to(torch.int8)
    assert torch.equal(q.cpu(), want_q)

"""The register-tile roundings (``dsv4.kernels.epilogue``) bit for bit: bf16 against torch's fp32 -> bf16 cast,
INT8 rows against ``dsv4.quantize_int8_per_row``."""

from __future__ import annotations

import pytest
import torch

kernels = pytest.importorskip("dsv4.kernels")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from conftest import DEVICE  # noqa: E402
from dsv4.kernels.epilogue import from_bf16, quantize_int8_rows, round_bf16, to_bf16  # noqa: E402
from dsv4.model.quant import quantize_int8_per_row  # noqa: E402


@triton.jit
def _bf16_kernel(v_ptr, round_ptr, cast_ptr, N: tl.constexpr):
    at = tl.arange(0, N)
    v = tl.load(v_ptr + at)
    tl.store(round_ptr + at, round_bf16(v))
    tl.store(cast_ptr + at, to_bf16(v))


def _values() -> torch.Tensor:
    """fp32 values just below, exactly at and just above a bf16 rounding tie (low half 0x7FFF,
    0x8000, 0x8001) for even and odd bf16 neighbours of either sign, one whose rounding carries into
    the exponent (0x3FFF) and one whose tie rounds to infinity (0x7F7F); the same about subnormals (0x0000,
    0x0001, 0x8079) and the largest one, whose rounding carries into the normals (0x007F); subnormals that
    are bf16 values already; then +-inf, NaN, a NaN whose payload lies in the low half alone and +-0."""
    his = (0x3F80, 0x3F81, 0xBF80, 0xBF81, 0x3FFF, 0x7F7F, 0x0000, 0x0001, 0x8079, 0x007F)
    bits = [(hi << 16) | lo for hi in his for lo in (0x7FFF, 0x8000, 0x8001)]
    bits += [0x00010000, 0x00790000, 0x807F0000, 0x00800000]
    bits += [0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0x00000000, 0x80000000]
    bits += [0x3F800000] * ((1 << (len(bits) - 1).bit_length()) - len(bits))  # to a power of two
    return torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)


def test_round_bf16_rounds_ties_to_even_as_torch_does() -> None:
    """A tie goes to the even bf16 (0x3F808000 -> 0x3F80, 0x3F818000 -> 0x3F82), a carry reaches the
    exponent and the largest tie becomes infinity, as torch's cast gives; infinities and zeros keep
    their sign and NaN stays NaN. Rounding ties away from zero would differ on every even tie."""
    v = _values()
    n = v.numel()
    rounded = torch.empty(n, device=DEVICE)
    cast = torch.empty(n, dtype=torch.bfloat16, device=DEVICE)
    _bf16_kernel[(1,)](v.to(DEVICE), rounded, cast, n)
    rounded, cast = rounded.cpu(), cast.cpu().float()
    want = v.to(torch.bfloat16).float()
    nan = want.isnan()
    assert torch.equal(rounded.isnan(), nan)
    assert torch.equal(rounded[~nan].view(torch.int32), want[~nan].view(torch.int32))
    assert torch.equal(cast.isnan(), nan)
    assert torch.equal(cast[~nan].view(torch.int32), want[~nan].view(torch.int32))


@triton.jit
def _widen_kernel(v_ptr, out_ptr, N: tl.constexpr):
    at = tl.arange(0, N)
    tl.store(out_ptr + at, from_bf16(tl.load(v_ptr + at)))


def test_from_bf16_widens_every_bf16_exactly() -> None:
    """Every bf16 (all 2^16 bit patterns) widens to the fp32 torch gives, bit for bit: subnormals
    (0x0001 is 9.2e-41, not 0), zeros of either sign, infinities; NaN stays NaN."""
    v = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    out = torch.empty(v.numel(), device=DEVICE)
    _widen_kernel[(1,)](v.to(DEVICE), out, v.numel())
    out, want = out.cpu(), v.float()
    nan = want.isnan()
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(out[~nan].view(torch.int32), want[~nan].view(torch.int32))


@triton.jit
def _int8_rows_kernel(v_ptr, q_ptr, scale_ptr, M: tl.constexpr, N: tl.constexpr):
    rows, cols = tl.arange(0, M), tl.arange(0, N)
    q, scale = quantize_int8_rows(tl.load(v_ptr + rows[:, None] * N + cols[None, :]))
    tl.store(q_ptr + rows[:, None] * N + cols[None, :], q)
    tl.store(scale_ptr + rows, scale)


def test_int8_rows_round_exact_ties_to_even_as_the_model_does() -> None:
    """Rows whose ``v * s`` lands exactly on a half (``s`` = 1, 1/2 and 2: amax 127, 254 and 63.5): the
    codes go to the even neighbour (2.5 -> 2, -3.5 -> -4, 0.5 -> 0, 126.5 -> 126), bit for bit
    ``dsv4.quantize_int8_per_row``; rounding halves up or away from zero differs on each."""
    ties = torch.tensor([2.5, -3.5, 0.5, 1.5, -0.5, 126.5, -2.5])
    v = torch.stack([torch.cat([torch.tensor([127.0]), ties]), torch.cat([torch.tensor([254.0]), 2 * ties]),
                     torch.cat([torch.tensor([-63.5]), ties / 2])])  # fmt: skip
    v = torch.cat([v, torch.zeros(1, 8)])  # to a power of two: a zero row (amax at the floor)
    q = torch.empty(4, 8, dtype=torch.int8, device=DEVICE)
    scale = torch.empty(4, device=DEVICE)
    _int8_rows_kernel[(1,)](v.to(DEVICE), q, scale, 4, 8)
    want_q, want_scale = quantize_int8_per_row(v)
    assert torch.equal(q.cpu(), want_q), (q, want_q)
    assert torch.equal(scale.cpu().view(torch.int32), want_scale.reshape(-1).view(torch.int32))
    assert q[0, 1:].tolist() == [2, -4, 0, 2, 0, 126, -2]


def test_int8_row_scales_are_the_models_bit_for_bit() -> None:
    """The stored scale is ``1/s`` with ``s = 127/amax`` (spec §2), not ``amax/127``: 256 rows whose amax
    spans twelve binades, among them rows where the two differ by an fp32 ulp, each scale bit for bit
    ``dsv4.quantize_int8_per_row``'s, and the codes too."""
    g = torch.Generator().manual_seed(7)
    v = torch.randn(256, 16, generator=g) * torch.logspace(-6, 6, 256, base=2.0)[:, None]
    amax = v.abs().amax(1)
    assert (amax / 127 != 1 / (127 / amax)).sum() > 10  # rows on which the two formulas differ
    q = torch.empty(256, 16, dtype=torch.int8, device=DEVICE)
    scale = torch.empty(256, device=DEVICE)
    _int8_rows_kernel[(1,)](v.to(DEVICE), q, scale, 256, 16)
    want_q, want_scale = quantize_int8_per_row(v)
    assert torch.equal(q.cpu(), want_q)
    assert torch.equal(scale.cpu().view(torch.int32), want_scale.reshape(-1).view(torch.int32))

"""The traffic counter against kernels whose traffic is known exactly.

``dsv4.bench.interp_traffic`` hooks into Triton's interpreter internals; if a Triton release moves
them, these counts stop matching (or the hook check raises) and this file fails loudly.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import triton
import triton.language as tl
import triton.runtime.interpreter as interp
from triton.runtime.errors import InterpreterError

from bench_kernels import masked_copy_kernel
from conftest import INTERPRETER_TRAFFIC
from dsv4.bench.interp_traffic import SECTOR, bounds_checked, count_traffic, dots_checked

pytestmark = INTERPRETER_TRAFFIC


@triton.jit
def strided_gather_kernel(src, dst, n, STRIDE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(dst + offs, tl.load(src + offs * STRIDE, mask=mask), mask=mask)


@triton.jit
def atomic_add_kernel(dst, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.atomic_add(dst + offs, 1.0, mask=offs < n)


@triton.jit
def descriptor_copy_kernel(src, dst, rows, cols, BR: tl.constexpr, BC: tl.constexpr):
    src_desc = tl.make_tensor_descriptor(src, shape=[rows, cols], strides=[cols, 1], block_shape=[BR, BC])
    dst_desc = tl.make_tensor_descriptor(dst, shape=[rows, cols], strides=[cols, 1], block_shape=[BR, BC])
    r0 = tl.program_id(0) * BR
    dst_desc.store([r0, 0], src_desc.load([r0, 0]))


def test_masked_copy_counts_exact_bytes_and_launches() -> None:
    n, block = 1000, 128
    src = torch.randn(n)
    dst = torch.zeros(n)
    with count_traffic() as log:
        masked_copy_kernel[(triton.cdiv(n, block),)](src, dst, n, BLOCK=block)
        masked_copy_kernel[(triton.cdiv(n, block),)](src, dst, n, BLOCK=block)
    assert torch.equal(dst, src)  # the counted kernel still computes
    assert len(log.launches) == 2
    launch = log.launches[0]
    assert launch.kernel == "masked_copy_kernel"
    assert launch.grid == (8, 1, 1)
    assert (launch.load_bytes, launch.store_bytes) == (4 * n, 4 * n)  # the 24 masked-off lanes excluded
    assert launch.accesses == 2 * 8
    assert launch.sector_bytes == 2 * 4 * n  # contiguous and 32 B-aligned: sectors == requested
    assert launch.unique_bytes == 2 * 4 * n
    assert log.total("requested_bytes") == 4 * 4 * n


def test_strided_access_pays_whole_sectors() -> None:
    """Every 8th fp32 (a 32 B stride): 4 B requested per 32 B sector moved — the 8x over-fetch."""
    n, stride = 64, 8
    src = torch.randn(n * stride)
    dst = torch.empty(n)
    with count_traffic() as log:
        strided_gather_kernel[(1,)](src, dst, n, STRIDE=stride, BLOCK=64)
    (launch,) = log.launches
    assert torch.equal(dst, src[::stride])
    assert launch.load_bytes == 4 * n
    assert launch.sector_bytes == n * SECTOR + 4 * n  # loads: one sector each; the store is contiguous
    assert launch.sector_bytes - launch.store_bytes == 8 * launch.load_bytes


def test_atomics_count_a_read_and_a_write_and_unique_bytes_dedupe_programs() -> None:
    dst = torch.zeros(32)
    with count_traffic() as log:
        atomic_add_kernel[(2,)](dst, 30, BLOCK=32)  # both programs hit the same 30 floats
    (launch,) = log.launches
    assert torch.equal(dst[:30], torch.full((30,), 2.0)) and dst[30:].eq(0).all()
    assert (launch.load_bytes, launch.store_bytes) == (2 * 30 * 4, 2 * 30 * 4)
    assert launch.sector_bytes == 2 * 2 * 4 * SECTOR  # 120 B touch 4 sectors; read + write; 2 programs
    assert launch.unique_bytes == 2 * 4 * SECTOR  # the same 4 sectors, read once and written once


def test_tensor_descriptor_accesses_are_counted_within_bounds() -> None:
    rows, cols = 10, 48  # a 4 x 64 block: rows past 10 and columns past 48 are out of bounds
    src = torch.randn(rows, cols)
    dst = torch.zeros(rows, cols)
    with count_traffic() as log:
        descriptor_copy_kernel[(triton.cdiv(rows, 4),)](src, dst, rows, cols, BR=4, BC=64)
    (launch,) = log.launches
    assert torch.equal(dst, src)
    assert (launch.load_bytes, launch.store_bytes) == (rows * cols * 4, rows * cols * 4)


def test_hooks_are_removed_and_not_reentrant() -> None:
    real_ext, real_call = interp._interpreter, interp.GridExecutor.__call__
    src, dst = torch.randn(16), torch.empty(16)
    with count_traffic() as log, pytest.raises(RuntimeError, match="already active"), count_traffic():
        pass
    assert interp._interpreter is real_ext and interp.GridExecutor.__call__ is real_call
    masked_copy_kernel[(1,)](src, dst, 16, BLOCK=16)  # after the block: not recorded
    assert log.launches == []
    assert "set_grid_dim" not in vars(interp.interpreter_builder)  # the per-launch shim is gone
    with count_traffic() as again:
        masked_copy_kernel[(1,)](src, dst, 16, BLOCK=16)
    assert len(again.launches) == 1 and again.launches[0].requested_bytes == 2 * 16 * 4


def test_address_hooks_are_removed() -> None:
    """``addresses=True`` shadows more of the interpreter's builder (program starts, barriers, atomics'
    semantics); none of it outlives its launch."""
    src, dst = torch.randn(16), torch.empty(16)
    with count_traffic(addresses=True) as log:
        masked_copy_kernel[(2,)](src, dst, 16, BLOCK=16)
        shims = {"set_grid_idx", "create_barrier", "create_atomic_rmw", "create_atomic_cas"} & set(
            vars(interp.interpreter_builder)
        )
    assert shims == set() and log.launches[0].unordered == []
    assert log.launches[0].shared == {"write": 0, "read": 0, "atomic": 0}  # program 1 is masked off


@triton.jit
def _past_the_end_kernel(src, dst, n, READ_PAST: tl.constexpr, WRITE_PAST: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    v = tl.load(src + offs, mask=offs < n + READ_PAST, other=0.0)
    tl.store(dst + offs, v, mask=offs < n + WRITE_PAST)


@pytest.mark.parametrize(
    ("where", "what"),
    [("past the buffer", "load"), ("past the view", "load"), ("past the output", "store"), ("inside", None)],
)
def test_bounds_checked_refuses_an_access_past_a_tensor(where: str, what: str | None) -> None:
    """A mask one lane too wide reads or writes the element after a tensor: refused, naming the kernel,
    both at the end of a buffer and where a view ends inside a larger one (another view's bytes: the
    suite runs under ``bounds_checked`` already; nesting it changes nothing). Masked-off lanes past the
    end are not accesses."""
    base, dst = torch.zeros(16), torch.zeros(8)
    src = base[8:] if where == "past the buffer" else base[:8]
    n, read_past, write_past = (6, 2, 0) if where == "inside" else (8, int(what == "load"), int(what == "store"))
    refused = pytest.raises(InterpreterError, match=f"OutOfBounds.*_past_the_end_kernel: a {what} of 1 x 4 B")
    with bounds_checked(), refused if what else contextlib.nullcontext():
        _past_the_end_kernel[(1,)](src, dst, n, READ_PAST=read_past, WRITE_PAST=write_past, BLOCK=16)


@triton.jit
def _fp32_dot_kernel(a, b, out, IEEE: tl.constexpr, N: tl.constexpr):
    offs = tl.arange(0, N)
    x = tl.load(a + offs[:, None] * N + offs[None, :])
    y = tl.load(b + offs[:, None] * N + offs[None, :])
    z = tl.dot(x, y, input_precision="ieee") if IEEE else tl.dot(x, y)  # the default: tf32 on a GPU
    tl.store(out + offs[:, None] * N + offs[None, :], z)


@pytest.mark.parametrize(
    ("values", "ieee", "refused"),
    [
        ("bf16", False, False),
        ("bf16 and a NaN with payload bits", False, False),
        ("fp32", False, True),
        ("fp32", True, False),
    ],
)
def test_dots_checked_refuses_fp32_operands_tf32_would_round(values: str, ieee: bool, refused: bool) -> None:
    """fp32 operands that are bf16 values multiply the same in tf32 as in the interpreter; others do not
    (refused, naming the kernel) unless the dot asks for ``ieee`` (the suite runs under ``dots_checked``)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, 16, generator=g), torch.randn(16, 16, generator=g)
    if values.startswith("bf16"):
        a, b = a.bfloat16().float(), b.bfloat16().float()
    if values.endswith("payload bits"):  # a NaN stays a NaN in tf32: its dropped bits change nothing
        a.view(torch.int32)[3, 5] = 0x7FC00123
    out = torch.empty(16, 16)
    check = pytest.raises(InterpreterError, match="InexactDot.*_fp32_dot_kernel: a tl.dot's first operand")
    with dots_checked(), check if refused else contextlib.nullcontext():
        _fp32_dot_kernel[(1,)](a, b, out, IEEE=ieee, N=16)
    if not refused:
        assert torch.allclose(out, a @ b, atol=1e-5, equal_nan=True)

"""The traffic counter against kernels whose traffic is known exactly.

``dsv4.bench.interp_traffic`` hooks into Triton's interpreter internals; if a Triton release moves
them, these counts stop matching (or the hook check raises) and this file fails loudly.
"""

from __future__ import annotations

import contextlib
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
import triton.runtime.interpreter as interp
from triton.runtime.errors import InterpreterError

from bench_kernels import masked_copy_kernel
from conftest import INTERPRETER_TRAFFIC
from dsv4.bench import interp_traffic
from dsv4.bench.interp_traffic import SECTOR, Launch, bounds_checked, count_traffic, dots_checked

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


def test_unique_bytes_count_a_sector_once_across_merges(monkeypatch: pytest.MonkeyPatch) -> None:
    """A launch's sector ids are deduplicated in batches (so a large launch's memory stays bounded); a
    sector touched before a merge and again after it still counts once, and no batch is lost. Here the
    merge threshold is 4 sectors, not millions."""
    monkeypatch.setattr(interp_traffic, "_MERGE_EVERY", 4)
    launch = Launch("k", (1, 1, 1), _merge_at=4)
    first = np.arange(0, 64 * SECTOR, 4, dtype=np.uint64)  # 64 sectors of fp32
    second = first + np.uint64(64 * SECTOR)  # 64 more
    for rows in (first, second, first):
        launch._touch(rows, 4, 1, 0)
    launch._touch(first[8:16], 4, 0, 1)  # one sector written
    launch._finish()
    assert launch.unique_bytes == (64 + 64 + 1) * SECTOR
    assert launch.sector_bytes == (3 * 64 + 1) * SECTOR


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


@pytest.mark.parametrize(("owner", "name"), [("_interpreter", "atomic_cas"), ("interpreter_builder", "create_dot")])
def test_an_interpreter_without_a_hook_point_is_named_before_counting(
    owner: str, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Triton whose interpreter lost a function the counter patches (a future release's rename): the
    counter refuses to start, naming the release and what it did not find, instead of counting wrong."""
    import triton.runtime.interpreter as interp

    real = getattr(interp, owner)
    kept = {n: getattr(real, n) for n in dir(real) if not n.startswith("__") and n != name}
    monkeypatch.setattr(interp, owner, SimpleNamespace(**kept))
    words = rf"^Triton {re.escape(triton.__version__)} changed its interpreter: {owner}\.{name} not found;"
    with pytest.raises(RuntimeError, match=words), count_traffic():
        pass


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
def _word_read_kernel(src, dst, WORDS: tl.constexpr):
    offs = tl.arange(0, WORDS)
    tl.store(dst + offs, tl.load(src.to(tl.pointer_type(tl.int32)) + offs))


def test_bounds_checked_refuses_a_wide_access_that_runs_past_a_tensor() -> None:
    """A load wider than the tensor's elements (its bytes read as int32 words) is in bounds only when
    all of its bytes are: of 6 bytes, the second word's last two lie past the tensor."""
    src, dst = torch.arange(8, dtype=torch.uint8), torch.zeros(2, dtype=torch.int32)
    with bounds_checked():
        _word_read_kernel[(1,)](src, dst, WORDS=2)
        assert torch.equal(dst.view(torch.uint8), src)
        refused = pytest.raises(InterpreterError, match="OutOfBounds.*_word_read_kernel: a load of 1 x 4 B")
        with refused:
            _word_read_kernel[(1,)](src[:6], dst, WORDS=2)


def test_bounds_checked_refuses_every_access_of_a_launch_given_no_bytes() -> None:
    """A launch whose tensors are all empty may touch nothing."""
    refused = pytest.raises(InterpreterError, match="OutOfBounds.*_past_the_end_kernel: a load of 1 x 4 B")
    with bounds_checked(), refused:
        _past_the_end_kernel[(1,)](torch.zeros(0), torch.zeros(0), 0, READ_PAST=1, WRITE_PAST=0, BLOCK=16)


@triton.jit
def _copy_beside_a_view_kernel(src, view, dst, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(dst + offs, tl.load(src + offs))


@triton.jit
def _copy_pair_kernel(pair, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(pair[1] + offs, tl.load(pair[0] + offs))


def test_bounds_checked_takes_every_tensor_a_launch_is_given() -> None:
    """The bytes a launch may touch are each tensor's, however its tensors are passed: a view that lies
    inside another argument leaves the rest of that argument in bounds, and tensors inside a tuple
    argument are the launch's too."""
    src, dst = torch.randn(64), torch.zeros(64)
    with bounds_checked():
        _copy_beside_a_view_kernel[(1,)](src, src[8:16], dst, BLOCK=64)
        assert torch.equal(dst, src)
        _copy_pair_kernel[(1,)]((src, dst.zero_()), BLOCK=64)
    assert torch.equal(dst, src)


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
        ("bf16 and one value of 11 mantissa bits", False, True),
        ("bf16 and a second operand in fp32", False, True),
        ("fp32", False, True),
        ("fp32", True, False),
    ],
)
def test_dots_checked_refuses_fp32_operands_tf32_would_round(values: str, ieee: bool, refused: bool) -> None:
    """fp32 operands that are bf16 values multiply the same in tf32 as in the interpreter; others do not,
    down to one value with a mantissa bit past tf32's ten, in either operand (refused, naming the kernel
    and the operand) unless the dot asks for ``ieee`` (the suite runs under ``dots_checked``)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, 16, generator=g), torch.randn(16, 16, generator=g)
    if values.startswith("bf16"):
        a, b = a.bfloat16().float(), b.bfloat16().float()
    if values.endswith("payload bits"):  # a NaN stays a NaN in tf32: its dropped bits change nothing
        a.view(torch.int32)[3, 5] = 0x7FC00123
    if values.endswith("11 mantissa bits"):  # tf32 keeps 10
        a[2, 3] = 1 + 2**-11
    operand = "first"
    if values.endswith("second operand in fp32"):
        b, operand = torch.randn(16, 16, generator=g), "second"
    out = torch.empty(16, 16)
    check = pytest.raises(InterpreterError, match=f"InexactDot.*_fp32_dot_kernel: a tl.dot's {operand} operand")
    with dots_checked(), check if refused else contextlib.nullcontext():
        _fp32_dot_kernel[(1,)](a, b, out, IEEE=ieee, N=16)
    if not refused:
        assert torch.allclose(out, a @ b, atol=1e-5, equal_nan=True)

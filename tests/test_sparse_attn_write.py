"""``sparse_attn_write``: ``sparse_attn`` and ``window_kv_write`` as one op (one launch on Triton).

On each backend, over the kinds, S in {1, 2, 19} and §8's start positions (one slot's written block
unallocated): ``o`` and every pool byte equal those of the two ops called one after the other on the
same backend, bit for bit (on Triton the fused launch stores the rows from the tiles the attention
holds, a different code path from ``window_kv_write``'s), and ``o`` is within §8 of the float64
expectation. A block table that would make the launch write a row it reads (a ring of W rows) is
refused, naming the argument, with the pool untouched; the two ops still run on it."""

from __future__ import annotations

import re

import pytest
import torch

import dsv4
from conftest import DEVICE, FULL, backends_of
from device_assert import assert_stops_on_device
from dsv4.harness.cases import make_case, record_outputs
from dsv4.harness.golden import bit_identical, compare
from dsv4.kernels import tuning
from dsv4.ops import validate
from test_attention_ops import BS, GARBAGE, SEQS, W, attn_setup, on_device


def same_pool(a, b) -> bool:
    return all(bit_identical(x, y) for x, y in zip(a.tensors().values(), b.tensors().values(), strict=True))


def two_ops(args: dict, backend: str) -> tuple[torch.Tensor, object]:
    """``o`` and the window pool after ``sparse_attn``, then ``window_kv_write``, on a copy of the pool."""
    args = {**args, "window_pool": args["window_pool"].clone()}
    o = dsv4.sparse_attn(**args, backend=backend).o
    dsv4.window_kv_write(args["kv"], args["window_pool"], args["start_pos"], window=args["window"], backend=backend)
    return o, args["window_pool"]


def with_unallocated_write_block(args: dict) -> dict:
    """The slot starting at W writes its rows in a block it does not read: unallocated (-1), skipped."""
    b = args["start_pos"].tolist().index(W)
    args["window_pool"].block_table[b, W // BS] = -1
    return args


@pytest.mark.parametrize("backend", backends_of("sparse_attn_write"))
@pytest.mark.parametrize("kind,seq", [(k, s) for k in ("swa", "csa", "hca") for s in SEQS[:2]] + [("swa", SEQS[2])])
def test_equals_the_two_ops(kind: str, seq: int, backend: str) -> None:
    args = on_device(with_unallocated_write_block(attn_setup(kind, seq, seed=11)))
    o_two, pool_two = two_ops(args, backend)
    o = dsv4.sparse_attn_write(**args, backend=backend).o
    assert bit_identical(o, o_two)
    assert same_pool(args["window_pool"], pool_two)


@pytest.mark.parametrize("kind,seq,params", [("swa", SEQS[2], {"tokens": 2, "heads": 8}), ("hca", 2, {"splits": 4})])
def test_the_writing_program_of_other_tiles(kind: str, seq: int, params: dict) -> None:
    """With token pairs (S=19 > W: the last pair's window reaches one row below the rows written) and with
    a key split (split 0 writes), the pool is the same."""
    backend = "triton"
    args = on_device(attn_setup(kind, seq, seed=12))
    with tuning.forced("sparse_attn", params):
        o_two, pool_two = two_ops(args, backend)
        o = dsv4.sparse_attn_write(**args, backend=backend).o
    assert bit_identical(o, o_two)
    assert same_pool(args["window_pool"], pool_two)


def test_subnormal_rows_are_stored_as_the_reference_stores_them() -> None:
    """kv rows of bf16 subnormals (kv * 1e-40): the fused launch's pool bytes equal the reference's
    ``window_kv_write``'s, bit for bit (the rope tails as given)."""
    args = attn_setup("swa", 2, seed=13)
    args["kv"] = (args["kv"].float() * 1e-40).to(torch.bfloat16)
    _, pool_ref = two_ops(args, "reference")
    args = on_device(args)
    dsv4.sparse_attn_write(**args, backend="triton")
    assert same_pool(args["window_pool"].to("cpu"), pool_ref)


@pytest.mark.parametrize("kind", ["swa", "csa"])
def test_a_window_of_one_row_reads_no_pool_row(kind: str) -> None:
    """``window=1``, the smallest window a layer may have: each token attends to its own row (and, CSA,
    its selected compressed rows), so no window-pool row is read and none can be the row the step writes.
    On each backend ``o`` and the pool are the two ops', ``o`` is the same whatever the pool holds, and
    Triton's is within §8 of the reference's."""
    got = {}
    for backend in backends_of("sparse_attn_write"):
        args = {**on_device(attn_setup(kind, 2, seed=14)), "window": 1}
        o_two, pool_two = two_ops(args, backend)
        garbled = args["window_pool"].clone()
        garbled.rope.fill_(GARBAGE)
        o_garbled = dsv4.sparse_attn_write(**{**args, "window_pool": garbled}, backend=backend).o
        assert bit_identical(o_garbled, o_two), backend
        o = dsv4.sparse_attn_write(**args, backend=backend).o
        assert bit_identical(o, o_two) and same_pool(args["window_pool"], pool_two), backend
        got[backend] = {"o": o, **record_outputs({"window_pool": args["window_pool"]})}
    report = compare("sparse_attn_write", got["triton"], got["reference"])
    assert report, str(report)


RING_REFUSED = "window_pool.block_table: a row this step writes is a pool row it reads"


def ring_args(device: torch.device = DEVICE) -> dict:
    """The slot at start W - 1 (S = 3) maps its block of rows [W, 2W) onto that of rows [0, W), a ring of
    W rows: the rows W and W + 1 it writes are the pool rows of rows 0 and 1, which its first token
    reads."""
    args = attn_setup("swa", 3, seed=13)
    b = args["start_pos"].tolist().index(W - 1)
    table = args["window_pool"].block_table
    table[b, 1] = table[b, 0]
    return on_device(args, device)


def test_a_ring_is_refused_by_the_device_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check's device branch (``torch._assert_async``, which raises at once on the CPU: the
    arguments stay there, also beside a GPU, where the assert would stop the process's stream)."""
    monkeypatch.setattr(validate, "HOST_DEVICE_TYPES", ())
    args = ring_args(torch.device("cpu"))
    before = args["window_pool"].clone()
    with pytest.raises(RuntimeError, match="a row this step writes is a pool row it reads"):
        dsv4.sparse_attn_write(**args, backend="reference")
    assert same_pool(args["window_pool"], before)


def last_row_args(device: torch.device = DEVICE) -> dict:
    """Slot 1 at 2W + 3 (S = 1) writes its row 2W + 3 (column 2, offset 3); its column 2 maps slot 0's
    column 1, where slot 0 at W + 4 reads its last window row W + 3 (offset 3), and no other row."""
    start = [W + 4, 2 * W + 3]
    args = attn_setup("swa", 1, seed=13, start=start)
    assert (start[1] // BS, start[1] % BS) == (2, (start[0] - 1) % BS) and (start[0] - 1) // BS == 1
    table = args["window_pool"].block_table
    table[1, 2] = table[0, 1]
    return on_device(args, device)


# a row the step writes that a slot reads: the slot's own first rows (a ring of W rows), or another
# slot's last window row
READ_ROW_WRITES = {"ring": ring_args, "last_row": last_row_args}


def refused_call(case: str, backend: str) -> None:
    """The refused call of the test below on the device (for a child process: see ``device_assert``)."""
    dsv4.sparse_attn_write(**READ_ROW_WRITES[case](), backend=backend)


@pytest.mark.parametrize("backend", backends_of("sparse_attn_write"))
@pytest.mark.parametrize("case", READ_ROW_WRITES)
def test_a_write_onto_a_row_the_step_reads_is_refused(case: str, backend: str) -> None:
    """A ring of W rows (``ring_args``), or a row one slot writes that another reads as the last row
    below its start (``last_row_args``: the first row a step writes, the last a step reads, the ends of
    both spans): refused before anything runs (on a GPU by a device-side assert, which leaves the
    process's CUDA context unusable: in a child), the pool untouched; the two ops, attention first,
    run on the same table."""
    args = READ_ROW_WRITES[case]()
    if DEVICE.type == "cuda":
        child = f"import test_sparse_attn_write as t\nt.refused_call({case!r}, {backend!r})"
        assert_stops_on_device(child, (RING_REFUSED,))
    else:
        before = args["window_pool"].clone()
        with pytest.raises(ValueError, match=re.escape(RING_REFUSED)):
            dsv4.sparse_attn_write(**args, backend=backend)
        assert same_pool(args["window_pool"], before)
    two_ops(args, backend)


@FULL
def test_demo_decode() -> None:
    """Full-size dims (H 64, HD 512, NOPE 448), a CSA decode step: the fused launch's pool rows and ``o``
    against the two Triton ops', bit for bit."""
    args = make_case(dsv4.get_config("demo"), "sparse_attn_write", seed=2, device=DEVICE, batch=2, seq=2).args
    o_two, pool_two = two_ops(args, "triton")
    o = dsv4.sparse_attn_write(**args, backend="triton").o
    assert bit_identical(o, o_two)
    assert same_pool(args["window_pool"], pool_two)

"""The library baseline (``dsv4 bench --backends library``) against the reference, spec §6 rules.

On the CPU its GEMMs take the exact fallbacks (fp32 products of the bf16 operands; ``torch._int_mm``
where it has a CPU kernel); the vectorized compressor and the batched scores and top-k are what a
GPU runs too. Starts cover every offset in a block of 4, steps that close no block, one and two.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dsv4.bench import baseline
from dsv4.bench.calls import LIBRARY, bind
from dsv4.bench.runner import make_bench_case, shape_grid
from dsv4.harness.cases import Case, make_case
from dsv4.harness.golden import compare
from dsv4.model.config import get_config

TINY = get_config("tiny")


def _check(op: str, mode: str = "decode", **shape) -> None:
    _check_case(make_case(TINY, op, mode, seed=3, **shape))


def _check_case(case: Case) -> dict[str, torch.Tensor]:
    outputs = {}
    for backend in ("reference", "library"):
        call = bind(case, backend)
        outputs[backend] = call.outputs(call())
    report = compare(case.op, outputs["library"], outputs["reference"], case.compare_inputs())
    assert report, str(report)
    return outputs["library"]


@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_qkv_proj_rope(mode: str) -> None:
    _check("qkv_proj_rope", mode, **({"seq": 17} if mode == "prefill" else {}))


@pytest.mark.parametrize(
    "batch, seq, start",
    [
        (4, 2, [60, 61, 62, 63]),  # every offset in a block: rows 2 and 3 close one
        (3, 5, [0, 3, 6]),  # a fresh row; two closes in a step; a block the ring began
        (2, 1, [127, 128]),  # one token: a close, then the first token of the next block
    ],
)
def test_indexer_compressor(batch: int, seq: int, start: list[int]) -> None:
    _check("indexer_compressor", batch=batch, seq=seq, start_pos=start)


def test_indexer_compressor_prefill() -> None:
    _check("indexer_compressor", "prefill", seq=17)


@pytest.mark.parametrize("batch, seq, start", [(4, 2, None), (2, 3, [4 * 40 - 1, 5])])
def test_indexer(batch: int, seq: int, start: list[int] | None) -> None:
    _check("indexer", batch=batch, seq=seq, start_pos=start)


def test_capturable_writes_leave_other_rows_alone() -> None:
    """A step in which no row closes a block writes no pool row (the no-op rewrite keeps every bit)."""
    case = make_case(TINY, "indexer_compressor", seed=1, batch=2, seq=1, start_pos=[8, 13])
    call = bind(case, "library")
    before = case.args["state"].clone()
    call()
    assert call.state is not None  # the op writes its state
    after = call.state["state"]
    assert torch.equal(after.keys, before.keys) and torch.equal(after.key_scale, before.key_scale)


def test_a_row_closed_into_an_unallocated_block_is_written_nowhere() -> None:
    """Slot 0's table entry is -1 where its step closes row 0: no row is written (not into block 0, where a
    clamped entry would put it), as the reference writes none."""
    case = make_case(TINY, "indexer_compressor", seed=1, batch=2, seq=1, start_pos=[3, 7])
    case.args["state"].block_table[0, 0] = -1
    before, other = case.args["state"].keys.clone(), int(case.args["state"].block_table[1, 0])
    keys = _check_case(case)["keys"]
    assert torch.equal(keys[0], before[0]) and not torch.equal(keys[other], before[other])  # slot 1's row written


# --- the attention ops -------------------------------------------------------------------------------


def test_csa_entries_below_the_offset_are_left_out() -> None:
    """Indices below ``topk_offset`` name no compressed row: the library leaves them out, as the reference does."""
    case = make_case(TINY, "sparse_attn", seed=3, batch=2, seq=2, start_pos=[40, 77], kind="csa")
    idx = case.args["topk_idxs"]
    assert case.args["topk_offset"] == TINY.sliding_window == 16
    idx[..., :12] = torch.arange(12, dtype=idx.dtype)  # twelve of each token's sixteen below topk_offset
    _check_case(case)


@pytest.mark.parametrize("seq", [1, 2, 5])
@pytest.mark.parametrize("kind", ["swa", "csa", "hca"])
def test_sparse_attn(kind: str, seq: int) -> None:
    """Every start of ``starts`` (a window's edge, a block's, position 8192, a slot with no compressed
    row yet), stale NaN rows beside the visible ones, a head without a sink, CSA lists with -1 and
    repeats: the library composition gives the reference's ``o``."""
    from dsv4.ops import get_op
    from dsv4.reference import sparse_attn
    from test_attention_ops import attn_setup

    call = get_op("sparse_attn").backend_args(attn_setup(kind, seq))
    report = compare("sparse_attn", baseline.sparse_attn(*call)._asdict(), sparse_attn(*call)._asdict())
    assert report, str(report)


@pytest.mark.parametrize("kind", ["csa", "hca"])
def test_sparse_attn_write(kind: str) -> None:
    """The attention and the window rows it writes: the same ``o`` and the same pool bytes as the reference."""
    from dsv4.ops import get_op
    from dsv4.reference import sparse_attn_write
    from test_attention_ops import attn_setup

    args = attn_setup(kind, 2)
    pools = {}
    outs = {}
    for name, fn in (("reference", sparse_attn_write), ("library", baseline.sparse_attn_write)):
        mine = {**args, "window_pool": args["window_pool"].clone()}
        outs[name] = fn(*get_op("sparse_attn_write").backend_args(mine))._asdict()
        pools[name] = mine["window_pool"]
    report = compare("sparse_attn", outs["library"], outs["reference"])  # o; the pool: bit for bit below
    assert report, str(report)
    for name, value in pools["library"].tensors().items():
        assert torch.equal(value.view(torch.uint8), pools["reference"].tensors()[name].view(torch.uint8)), name


@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_o_proj(mode: str) -> None:
    _check("o_proj", mode)


@pytest.mark.parametrize("seq", [1, 2, 130])
def test_window_kv_write(seq: int) -> None:
    """The window rows (at most ``W`` of a slot's step, the last slot's blocks unallocated): the
    reference's pool bytes, every other row left as it was."""
    from dsv4.ops import get_op
    from dsv4.reference import window_kv_write
    from test_attention_ops import attn_setup

    args = attn_setup("swa", seq)
    args["window_pool"].block_table[-1] = -1
    pools = {}
    for name, fn in (("reference", window_kv_write), ("library", baseline.window_kv_write)):
        pool = args["window_pool"].clone()
        call = {"kv": args["kv"], "pool": pool, "start_pos": args["start_pos"], "window": args["window"]}
        fn(*get_op("window_kv_write").backend_args(call))
        pools[name] = pool
    for name, value in pools["library"].tensors().items():
        assert torch.equal(value.view(torch.uint8), pools["reference"].tensors()[name].view(torch.uint8)), name


class _HostReads(TorchDispatchMode):
    """Counts the ATen calls that read a device value on the host: ``.item()``, ``bool()`` and 0-dim
    tensor indices (``_local_scalar_dense``), boolean-mask indexing (``nonzero``, ``masked_select``)."""

    SYNCS = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "repeat_interleave"})

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func.overloadpacket.__name__ in self.SYNCS:
            self.seen.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_the_library_calls_read_nothing_on_the_host(mode: str) -> None:
    """Every library composition the bench times, at every shape of its grid, runs without a host read,
    so that on a GPU it is captured in a CUDA graph as the kernels are (a host read would time the CPU's
    launch loop instead)."""
    for shape in shape_grid(TINY, [mode]):
        if not hasattr(baseline, shape.op):  # kv_compressor has no composition
            continue
        call = bind(make_bench_case(TINY, shape, 0, "cpu"), LIBRARY)
        call()  # the first call may set things up
        with _HostReads() as spy:
            call()
        assert not spy.seen, (shape, spy.seen)

"""Bad input to the attention ops (attention spec §9): a named error before anything changes (pools
and rings bit-identical after the raise), value checks of device tensors without a host read, and
non-finite values propagated by the formulas (NaN in, NaN out)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import pytest
import torch

import dsv4
import dsv4.ops.validate as validate
from conftest import DEVICE, backends_of
from dsv4.harness.cases import make_case, mutated_args, record_outputs
from dsv4.harness.golden import bit_identical
from dsv4.ops.backends import implementation
from dsv4.ops.registry import get_op
from test_attention_ops import BS, RATIOS, W, attn_setup
from test_bad_op_arguments import HostReadWatch

CFG = dsv4.get_config("tiny")
START = [6, 6]  # both slots close compressed block 1 (positions 6, 7)
E4M3 = torch.float8_e4m3fn


def _args(op: str) -> dict:
    return dict(make_case(CFG, op, seed=0, device=DEVICE, max_position=64, batch=2, seq=2, start_pos=START).args)


def _get(args: dict, path: str):
    head, *rest = path.split(".")
    obj = args.get(head)
    for part in rest:
        obj = getattr(obj, part)
    return obj


def _replaced(obj, parts: list[str], value):
    if not parts:
        return value
    return dataclasses.replace(obj, **{parts[0]: _replaced(getattr(obj, parts[0]), parts[1:], value)})


def _set(args: dict, path: str, value) -> None:
    head, *rest = path.split(".")
    args[head] = _replaced(args.get(head), rest, value)


def _two_writers(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t[1] = t[0]
    return t


def _unallocate(column: int) -> Callable:
    def edit(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[:, column] = -1
        return t

    return edit


# (op, argument path, how to break it, error type, words the message must contain)
BAD: list[tuple[str, str, Callable, type, tuple[str, ...]]] = [
    ("kv_compressor", "x", lambda t: t.float(), TypeError, ("x:", "bfloat16")),
    ("kv_compressor", "x", lambda t: torch.cat([t, t]), ValueError, ("x:", "batch", "state")),
    ("kv_compressor", "x", lambda t: t[:, :0], ValueError, ("x:", "S >= 1")),
    ("kv_compressor", "w.ape", lambda t: t[:, :-1].contiguous(), ValueError, ("w.ape", "shape")),
    ("kv_compressor", "w.wkv", lambda t: t[:128].contiguous(), ValueError, ("w.wkv", "shape")),
    ("kv_compressor", "w", lambda w: "weights", TypeError, ("w:", "CompressorWeights")),
    ("kv_compressor", "state.kv_state", lambda t: t[:, :4].contiguous(), ValueError, ("state.kv_state", "shape")),
    ("kv_compressor", "state.score_state", lambda t: t.double(), TypeError, ("state.score_state",)),
    ("kv_compressor", "state.pool.nope", lambda t: t.view(torch.uint8), TypeError, ("state.pool.nope", "float8")),
    ("kv_compressor", "state.pool.rope", lambda t: t[:-1].contiguous(), ValueError, ("state.pool.rope", "shape")),
    ("kv_compressor", "state.pool.scale", lambda t: t[..., :7].contiguous(), ValueError, ("state.pool.scale",)),
    ("kv_compressor", "state.pool.block_table", lambda t: t.long(), TypeError, ("state.pool.block_table", "int32")),
    ("kv_compressor", "state.pool.block_table", lambda t: t + 1000, ValueError, ("state.pool.block_table", "needs")),
    ("kv_compressor", "state.pool.block_table", _two_writers, ValueError, ("two slots write the same pool row",)),
    ("kv_compressor", "start_pos", lambda t: t + 60, ValueError, ("start_pos", "rope table")),
    ("kv_compressor", "start_pos", lambda t: -1, ValueError, ("start_pos", ">= 0")),
    ("kv_compressor", "eps", lambda e: 0.0, ValueError, ("eps",)),
    ("kv_compressor", "eps", lambda e: 1e-50, ValueError, ("eps", "fp32")),
    ("window_kv_write", "kv", lambda t: t[..., :96].contiguous(), ValueError, ("pool", "HD - R")),
    ("window_kv_write", "kv", lambda t: t.half(), TypeError, ("kv:", "bfloat16")),
    ("window_kv_write", "window", lambda w: 0, ValueError, ("window", ">= 1")),
    ("window_kv_write", "window", lambda w: 16.0, TypeError, ("window", "int")),
    ("window_kv_write", "window", lambda w: 2**31, ValueError, ("window", "<= 2147483647")),  # int32 in the kernels
    ("sparse_attn_write", "window", lambda w: 2**31, ValueError, ("window", "<= 2147483647")),  # before a span of W
    ("window_kv_write", "start_pos", lambda t: t + 60, ValueError, ("start_pos", "pool.block_table addresses")),
    ("window_kv_write", "pool.block_table", lambda t: t + 1000, ValueError, ("pool.block_table", "needs")),
    ("window_kv_write", "pool.block_table", _two_writers, ValueError, ("two slots write the same pool row",)),
    ("window_kv_write", "pool.nope", lambda t: t[:, :12].contiguous(), ValueError, ("pool.nope", "power of two")),
    ("sparse_attn_write", "window_pool.block_table", _two_writers, ValueError, ("two slots write the same pool row",)),
    ("sparse_attn", "kind", lambda k: "mla", ValueError, ("kind", "swa")),
    ("sparse_attn", "kind", lambda k: "hca", ValueError, ("topk_idxs", "takes no")),
    ("sparse_attn", "topk_idxs", lambda t: None, ValueError, ("topk_idxs", "needs")),
    ("sparse_attn", "topk_idxs", lambda t: t.long(), TypeError, ("topk_idxs", "int32")),
    ("sparse_attn", "topk_idxs", lambda t: t[..., :0].contiguous(), ValueError, ("topk_idxs.shape[2]", ">= 1")),
    ("sparse_attn", "topk_idxs", lambda t: t.repeat(1, 1, 257), ValueError, ("topk_idxs.shape[2]", "<= 4096")),
    ("sparse_attn", "topk_offset", lambda o: -1, ValueError, ("topk_offset", ">= 0")),
    ("sparse_attn", "topk_offset", lambda o: 2**31, ValueError, ("topk_offset", "<= 2147483647")),
    ("sparse_attn", "compress_ratio", lambda r: 2**62, ValueError, ("compress_ratio", "<= 2147483647")),
    ("sparse_attn", "compress_ratio", lambda r: 0, ValueError, ("compress_ratio", "ratio >= 1")),
    ("sparse_attn", "compressed_pool", lambda p: None, ValueError, ("compressed_pool", "needs")),
    ("sparse_attn", "q", lambda t: t[:, :, :3].contiguous(), ValueError, ("attn_sink", "shape")),
    ("sparse_attn", "kv", lambda t: t[:1].contiguous(), ValueError, ("kv:", "shape")),
    ("sparse_attn", "attn_sink", lambda t: t.bfloat16(), TypeError, ("attn_sink",)),
    ("sparse_attn", "start_pos", lambda t: t + 60, ValueError, ("start_pos", "rope table")),
    ("sparse_attn", "window_pool.block_table", _unallocate(0), ValueError, ("window_pool.block_table", "reads")),
    ("sparse_attn", "compressed_pool.block_table", _unallocate(0), ValueError, ("compressed_pool.block_table",)),
    ("sparse_attn", "compressed_pool.rope", lambda t: t[..., :32].contiguous(), ValueError, ("compressed_pool.rope",)),
    ("o_proj", "o", lambda t: t[:0], ValueError, ("o:", "T, H, HD >= 1")),
    ("o_proj", "o", lambda t: t[:, :0], ValueError, ("o:", "T, H, HD >= 1", "[4, 0, 128]")),
    ("o_proj", "o", lambda t: t[:, :, :0], ValueError, ("o:", "T, H, HD >= 1", "[4, 4, 0]")),
    ("o_proj", "o", lambda t: t[:, :3].contiguous(), ValueError, ("w.wo_a", "G*OL")),
    ("o_proj", "w.wo_a", lambda t: t.to(torch.bfloat16), TypeError, ("w.wo_a", "float8_e4m3fn")),
    ("o_proj", "w.wo_a", lambda t: t[:0], ValueError, ("w.wo_a", "positive multiple of 128", "got 0")),
    ("o_proj", "w.wo_a_scale", lambda t: t[:, :1].contiguous(), ValueError, ("w.wo_a_scale", "shape")),
    ("o_proj", "w.wo_b", lambda t: t[:, :64].contiguous(), ValueError, ("w.wo_b", "shape")),
    ("o_proj", "w.wo_b", lambda t: t.view(torch.uint8), TypeError, ("w.wo_b", "float8_e4m3fn")),
    ("o_proj", "w.wo_b_scale", lambda t: t[:1].contiguous(), ValueError, ("w.wo_b_scale", "shape")),
    # one step past a rule: a block of 24 rows (>= 16, no power of two), one batch row more than the
    # state's 2, w.wgate alone of another shape, 192 rows of w.wo_a (G*OL no multiple of 128)
    ("window_kv_write", "pool.nope", lambda t: t[:, :24].contiguous(), ValueError, ("pool.nope", "power of two")),
    ("kv_compressor", "x", lambda t: torch.cat([t, t[:1]]), ValueError, ("x:", "batch 3", "state")),
    ("kv_compressor", "w.wgate", lambda t: t[:128].contiguous(), ValueError, ("w.wgate", "shape")),
    ("o_proj", "w", lambda w: _wo_rows(w, 64), ValueError, ("w.wo_a", "positive multiple of 128", "got 192")),
    # a block table of fewer rows than the batch, one of no columns; weights with no ratio, no output rows
    (
        "window_kv_write",
        "pool.block_table",
        lambda t: t[:1].contiguous(),
        ValueError,
        ("pool.block_table", "[>= 2, >= 1]", "[1, "),
    ),
    (
        "kv_compressor",
        "state.pool.block_table",
        lambda t: t[:, :0].contiguous(),
        ValueError,
        ("state.pool.block_table", "[>= 2, >= 1]", "[2, 0]"),
    ),
    ("kv_compressor", "w.ape", lambda t: t[:0], ValueError, ("w.ape", "compress ratio (rows) >= 1", "got 0")),
    # a rope table of R 32 with the head dim 128 of the weights and pools: the table is named, not a pool
    (
        "kv_compressor",
        "rope",
        lambda r: _narrow_rope(r, 32),
        ValueError,
        ("rope: with head dim (w.norm_w) 128,", "R 32"),
    ),
    (
        "sparse_attn",
        "rope",
        lambda r: _narrow_rope(r, 32),
        ValueError,
        ("rope: with head dim (q) 128,", "HD - R", "R 32"),
    ),
    ("sparse_attn_write", "rope", lambda r: _narrow_rope(r, 32), ValueError, ("rope: with head dim (q) 128,", "R 32")),
    ("o_proj", "w.wo_b", lambda t: t[:0], ValueError, ("w.wo_b:", "at least one output row", "got 0")),
]


def _narrow_rope(rope: dsv4.RopeTable, rope_dim: int) -> dsv4.RopeTable:
    """``rope``'s first ``rope_dim / 2`` pairs: a table of rope dim ``rope_dim``."""
    half = rope_dim // 2
    return dsv4.RopeTable(rope.cos[:, :half].contiguous(), rope.sin[:, :half].contiguous())


def _wo_rows(w: dsv4.OProjWeights, n: int) -> dsv4.OProjWeights:
    """``w`` with ``n`` more rows of ``wo_a`` (its first ``n`` again) and as many more columns of ``wo_b``."""
    wo_a, wo_b = torch.cat([w.wo_a, w.wo_a[:n]]), torch.cat([w.wo_b, w.wo_b[:, :n]], 1).contiguous()
    return dataclasses.replace(w, wo_a=wo_a, wo_b=wo_b)


@pytest.mark.parametrize(
    ("op", "path", "breaker", "exc", "words"), BAD, ids=[f"{b[0]}-{b[1]}-{i}" for i, b in enumerate(BAD)]
)
def test_bad_input_is_named_and_nothing_changes(op, path, breaker, exc, words) -> None:
    args = _args(op)
    _set(args, path, breaker(_get(args, path)))
    records = {name: args[name] for name in mutated_args(op)}
    before = {k: v.clone() for k, v in record_outputs(records).items() if v.device.type != "meta"}
    with pytest.raises(exc) as info:
        getattr(dsv4, op)(**args, backend="reference")
    message = str(info.value)
    assert all(w in message for w in words), f"{message!r} lacks {words}"
    after = record_outputs(records)
    assert all(bit_identical(after[k], t, k) for k, t in before.items())


@pytest.mark.parametrize("backend", backends_of("sparse_attn"))
def test_no_heads_are_named_on_every_backend(backend: str) -> None:
    """``q`` and ``attn_sink`` of 0 heads agree with each other: refused naming ``q``, before the
    reference would return an empty ``o`` and the kernel's grid divide by the 0 heads."""
    args = _args("sparse_attn")
    args.update(q=args["q"][:, :, :0], attn_sink=args["attn_sink"][:0])
    with pytest.raises(ValueError, match=r"q: expected at least one head \(H >= 1\), got shape \[2, 2, 0, 128\]"):
        dsv4.sparse_attn(**args, backend=backend)


def test_every_op_runs_unbroken() -> None:
    """The calls above differ from a valid one in one argument only."""
    for op in ("kv_compressor", "window_kv_write", "sparse_attn", "sparse_attn_write", "o_proj"):
        getattr(dsv4, op)(**_args(op), backend="reference")


@pytest.mark.parametrize(("op", "field"), [("sparse_attn", "o"), ("sparse_attn_write", "o"), ("o_proj", "y")])
def test_an_out_buffer_of_another_two_byte_dtype_is_refused(op: str, field: str) -> None:
    """float16 is bf16's size, not its format: ``out`` of float16 is refused naming it, before anything runs."""
    args = _args(op)
    good = getattr(dsv4, op)(**args, backend="reference")
    out = type(good)(torch.empty_like(getattr(good, field), dtype=torch.float16))
    with pytest.raises(TypeError, match=f"out.{field}:.*bfloat16"):
        getattr(dsv4, op)(**_args(op), out=out, backend="reference")


def test_an_out_buffer_that_overlaps_an_input_is_refused() -> None:
    args = _args("sparse_attn")
    with pytest.raises(ValueError, match="out.o: shares memory with q"):
        dsv4.sparse_attn(**args, out=dsv4.AttnOut(args["q"]))
    with pytest.raises(ValueError, match="out.y"):
        dsv4.o_proj(**_args("o_proj"), out=dsv4.OProjOut(torch.empty(4, 7, dtype=torch.bfloat16)))
    args = _args("o_proj")
    o, d = args["o"], args["w"].wo_b.shape[0]
    with pytest.raises(ValueError, match="out.y: shares memory with o"):  # y of the right shape, in o's bytes
        dsv4.o_proj(**args, out=dsv4.OProjOut(o.view(-1)[: o.shape[0] * d].view(o.shape[0], d)))


def test_o_proj_groups_must_divide_the_rows_of_wo_a() -> None:
    """3 heads of 128 in groups of 128 columns (G = 3): ``w.wo_a``'s 128 rows split into no 3 groups
    of ``OL`` rows, refused naming it."""
    args = _args("o_proj")
    w = args["w"]
    args["o"] = args["o"][:, :3].contiguous()
    args["w"] = dataclasses.replace(w, wo_a=w.wo_a[:, :128].contiguous(), wo_a_scale=w.wo_a_scale[:, :1].contiguous())
    with pytest.raises(ValueError, match=r"w.wo_a: expected \[G\*OL, HG\*HD\] .* got \[128, 128\]"):
        dsv4.o_proj(**args, backend="reference")


def test_a_sliding_window_layer_with_a_compress_ratio_is_refused() -> None:
    """``kind="swa"`` with every other argument of a sliding-window layer but a ratio of 4: refused
    naming ``compress_ratio``; with ratio 0 the call runs."""
    args = _args("sparse_attn")
    assert args["kind"] == "csa" and args["compress_ratio"] == 4
    args.update(kind="swa", compressed_pool=None, topk_idxs=None, topk_offset=0)
    with pytest.raises(ValueError, match="compress_ratio: a swa layer needs 0, got 4"):
        dsv4.sparse_attn(**args, backend="reference")
    dsv4.sparse_attn(**{**args, "compress_ratio": 0}, backend="reference")


def test_the_first_window_row_read_must_be_in_a_block() -> None:
    """Slot 0 at W + 14 reads rows 15..W + 13: row 15 alone in column 0 (rows 0..15). That column
    unallocated is refused naming it, before anything runs."""
    start = [W + 14, 3]
    args = attn_setup("swa", 1, seed=5, start=start)
    assert (start[0] - W + 1) % BS == BS - 1
    args["window_pool"].block_table[0, 0] = -1
    before = args["window_pool"].clone()
    words = "window_pool.block_table: slot 0 column 0 (rows 0..15, which the step reads) needs a pool block"
    with pytest.raises(ValueError, match=re.escape(words)):
        dsv4.sparse_attn(**args, backend="reference")
    kept = before.tensors()
    assert all(bit_identical(t, kept[k], k) for k, t in args["window_pool"].tensors().items())


@pytest.mark.parametrize("kind", ["csa", "hca"])
def test_a_compressed_row_closed_by_the_step_must_be_in_a_block(kind: str) -> None:
    """Slot 0 at 17*RC - 2 (S = 2) closes compressed row 16 (column 1) at its last token, which reads
    it (rows below vis(start + S - 1) = 17): that column unallocated is refused naming it."""
    ratio = RATIOS[kind]
    args = attn_setup(kind, 2, seed=5, start=[17 * ratio - 2, 10])
    args["compressed_pool"].block_table[0, 1] = -1
    with pytest.raises(ValueError, match=re.escape("compressed_pool.block_table: slot 0 column 1 (rows 16..31")):
        dsv4.sparse_attn(**args, backend="reference")


@pytest.mark.parametrize("op", ["kv_compressor", "window_kv_write", "sparse_attn", "sparse_attn_write", "o_proj"])
def test_a_backend_the_op_lacks_is_named(op: str) -> None:
    """The op registered with its reference alone (as a user's op may be): naming the Triton backend
    is a ``ValueError`` naming the op and the backend; ``auto`` takes the reference."""
    desc = get_op(op)
    reference_only = dataclasses.replace(desc, implementations={"reference": desc.implementations["reference"]})
    with pytest.raises(ValueError, match=f"{op} has no 'triton' implementation"):
        implementation(reference_only, "triton", DEVICE)
    assert implementation(reference_only, "auto", DEVICE) is desc.implementation("reference")


# --- value checks without a host read -------------------------------------------------------------


def _on_meta(args: dict) -> dict:
    return {k: v.to("meta") if hasattr(v, "to") else v for k, v in args.items()}


@pytest.mark.parametrize("op", ["kv_compressor", "window_kv_write", "sparse_attn", "sparse_attn_write"])
def test_device_tensors_are_checked_without_a_host_read(op: str) -> None:
    """On a device whose values cannot be read (meta), validation completes: start_pos and the block
    tables are checked by device-side asserts, nothing reads a value back (a GPU sync per call)."""
    args = _on_meta(_args(op))
    with HostReadWatch() as watch:
        get_op(op).backend_args(args)
    assert not watch.reads, watch.reads
    names = sorted({a.split(":")[0] for a in watch.asserts})
    expected = {
        "kv_compressor": ["start_pos", "state.pool.block_table"],
        "window_kv_write": ["pool.block_table", "start_pos"],
        "sparse_attn": ["compressed_pool.block_table", "start_pos", "window_pool.block_table"],
        "sparse_attn_write": ["compressed_pool.block_table", "start_pos", "window_pool.block_table"],
    }
    assert names == expected[op]


@pytest.mark.parametrize(
    ("op", "path", "breaker", "words"),
    [
        ("kv_compressor", "start_pos", lambda t: t + 60, "start_pos"),
        ("kv_compressor", "state.pool.block_table", _two_writers, "two slots write"),
        ("window_kv_write", "pool.block_table", lambda t: t + 1000, "pool.block_table"),
        # p + S would wrap int64 to a negative position that passes p + S <= n
        ("kv_compressor", "start_pos", lambda t: torch.full_like(t, 2**63 - 1), "start_pos"),
        ("sparse_attn", "start_pos", lambda t: torch.full_like(t, 2**63 - 1), "start_pos"),
        ("sparse_attn_write", "start_pos", lambda t: torch.full_like(t, 2**63 - 1), "start_pos"),
        ("sparse_attn", "window_pool.block_table", _unallocate(0), "window_pool.block_table"),
        ("kv_compressor", "start_pos", lambda t: t - 7, "start_pos"),  # -1: one below the first position
        # p + S = 65: one row past the 64 the table addresses (p = 62 is the last start it takes)
        ("window_kv_write", "start_pos", lambda t: torch.full_like(t, 63), "start_pos"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_device_checks_catch_bad_values(op, path, breaker, words, monkeypatch) -> None:
    """The device-side branch, run on the CPU (``torch._assert_async`` raises there at once)."""
    monkeypatch.setattr(validate, "HOST_DEVICE_TYPES", ())
    args = _args(op)
    _set(args, path, breaker(_get(args, path)))
    records = {name: args[name] for name in mutated_args(op)}
    before = {k: v.clone() for k, v in record_outputs(records).items()}
    with HostReadWatch() as watch, pytest.raises(RuntimeError, match=words):
        get_op(op).backend_args(args)
    assert watch.asserts and not watch.reads, watch.reads
    assert all(bit_identical(record_outputs(records)[k], t, k) for k, t in before.items())


def test_device_checks_take_the_last_start_the_table_addresses(monkeypatch) -> None:
    """The device-side branch takes a start ``p`` with ``p + S`` equal to the rows the table addresses
    (the row above it is refused: the case above)."""
    monkeypatch.setattr(validate, "HOST_DEVICE_TYPES", ())
    args = _args("window_kv_write")
    args["start_pos"] = torch.full_like(args["start_pos"], args["pool"].rows - args["kv"].shape[1])
    with HostReadWatch() as watch:
        get_op("window_kv_write").backend_args(args)
    assert watch.asserts and not watch.reads, watch.reads


# --- non-finite values -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backends_of("sparse_attn"))
def test_nan_in_a_query_or_a_key_stays_visible(backend: str) -> None:
    args = _args("sparse_attn")
    args["q"] = args["q"].clone()
    args["q"][0, 1, 2, 5] = float("nan")
    o = dsv4.sparse_attn(**args, backend=backend).o
    nan = o.isnan()
    assert nan[0, 1, 2].all() and int(nan.sum()) == o.shape[-1]  # that token's head only
    args = _args("sparse_attn")
    args["kv"] = args["kv"].clone()
    args["kv"][1, 0, 3] = float("inf")  # this call's row of slot 1's token 0: both its tokens see it
    o = dsv4.sparse_attn(**args, backend=backend).o
    assert o[1].isnan().all() and not o[0].isnan().any()


@pytest.mark.parametrize("backend", backends_of("sparse_attn"))
def test_a_sink_of_minus_inf_is_no_sink(backend: str) -> None:
    args = _args("sparse_attn")
    args["attn_sink"] = torch.full_like(args["attn_sink"], float("-inf"))
    without = dsv4.sparse_attn(**args, backend=backend).o
    args["attn_sink"] = torch.full_like(args["attn_sink"], -1e4)  # exp(-1e4 - m) == 0 in fp32
    assert bit_identical(dsv4.sparse_attn(**args, backend=backend).o, without)
    args["attn_sink"] = torch.full_like(args["attn_sink"], 5.0)  # a real sink shrinks every output
    assert bool((dsv4.sparse_attn(**args, backend=backend).o.float().abs() <= without.float().abs() + 1e-2).all())


@pytest.mark.parametrize("backend", backends_of("window_kv_write"))
def test_a_nan_row_is_stored_as_nan(backend: str) -> None:
    args = _args("window_kv_write")
    args["kv"] = args["kv"].clone()
    args["kv"][0, 1, 10] = float("nan")
    dsv4.window_kv_write(**args, backend=backend)
    pool, p = args["pool"], START[0] + 1
    block, offset = int(pool.block_table[0, p // pool.block_size]), p % pool.block_size
    assert int(pool.scale[block, offset, 0]) == 255 and (pool.nope[block, offset].view(torch.uint8) == 0x7F).all()
    assert torch.equal(pool.rope[block, offset], args["kv"][0, 1, 64:])  # the rope part as is


@pytest.mark.parametrize("backend", backends_of("kv_compressor"))
def test_nan_in_x_reaches_the_closed_row(backend: str) -> None:
    args = _args("kv_compressor")
    args["x"] = args["x"].clone()
    args["x"][1, 0, 7] = float("nan")  # slot 1's token at position 10
    args["start_pos"] = torch.tensor([6, 10])  # slot 0 closes block 1 (p = 7) clean; slot 1 closes block 2 (p = 11)
    dsv4.kv_compressor(**args, backend=backend)
    pool = args["state"].pool
    rows = dsv4.dequantize_fp8_rows(*(t[pool.block_table[:, 0].long()] for t in (pool.nope, pool.scale, pool.rope)))
    assert not rows[0, 1].isnan().any() and rows[1, 2].isnan().all()
    assert args["state"].kv_state[1, 10 % 8].isnan().all()


@pytest.mark.parametrize("backend", backends_of("o_proj"))
def test_nan_in_o_stays_in_its_token(backend: str) -> None:
    args = _args("o_proj")
    args["o"] = args["o"].clone()
    args["o"][2, 1, 0] = float("nan")
    y = dsv4.o_proj(**args, backend=backend).y
    assert y[2].isnan().all() and not y[[0, 1, 3]].isnan().any()


@pytest.mark.parametrize("op", ["kv_compressor", "window_kv_write", "sparse_attn", "sparse_attn_write"])
def test_a_strided_start_pos_reads_its_own_values(op: str) -> None:
    """A non-contiguous ``start_pos`` (an expanded tensor): every backend reads the values it shows, as
    from a contiguous copy (the kernels index positions densely)."""
    strided = torch.tensor(START[:1], device=DEVICE).expand(2)
    assert strided.stride() == (0,)
    for backend in backends_of(op):
        got = []
        for start in (strided, strided.contiguous()):
            args = {**_args(op), "start_pos": start}
            records = {name: args[name] for name in mutated_args(op)}
            out = getattr(dsv4, op)(**args, backend=backend)
            got.append((out, record_outputs(records)))
        (out, rec), (dense_out, dense_rec) = got
        assert all(bit_identical(rec[k], dense_rec[k], k) for k in rec), backend
        assert out is None or all(bit_identical(a, b) for a, b in zip(out, dense_out, strict=True)), backend

"""Op and module arguments that used to get through (spec §7): unbounded ``topk``, unchecked
``offset`` and ``eps``, ``DecodeFrontEnd``'s constructor and float positions; and value checks that
never read a device tensor on the host (no GPU stream synchronization)."""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dsv4
import dsv4.ops.validate as validate
from conftest import BACKENDS, DEVICE
from dsv4.bench.interp_traffic import count_traffic
from dsv4.harness.cases import clone_args, make_case, mutated_args, record_outputs
from dsv4.model.structs import QKV, IndexerOut
from dsv4.ops.registry import OpDescriptor
from frontends import tiny_frontend
from op_cases import case_at

CFG = dsv4.get_config("tiny")
ROWS = 16  # cache rows of the cases below (max_position 64)
CACHE_ROWS = 64  # rows each slot's block table addresses there: one pool block of 64 rows


def _case(op: str):
    return case_at(CFG, op, batch=2, seq=2, start=[5, 9], max_position=4 * ROWS)


def _snapshot(args: dict) -> dict[str, torch.Tensor]:
    state = args.get("state")
    return {} if state is None else {k: v.clone() for k, v in state.tensors().items()}


def _assert_unchanged(args: dict, before: dict[str, torch.Tensor]) -> None:
    for name, t in before.items():
        assert torch.equal(getattr(args["state"], name), t), f"state.{name} changed"


# (argument, value, error type, words of the message)
INDEXER_SCALARS = [
    ("topk", 2**31 - 1, ValueError, ("topk", "<=")),
    ("topk", 10**8, ValueError, ("topk", "<=")),
    ("topk", lambda: validate.MAX_TOPK + 1, ValueError, ("topk", "<=")),
    ("topk", 0, ValueError, ("topk", ">= 1")),
    ("topk", -5, ValueError, ("topk", ">= 1")),
    ("topk", True, TypeError, ("topk", "int")),
    ("topk", 16.0, TypeError, ("topk", "int")),
    ("topk", "16", TypeError, ("topk", "int")),
    ("topk", torch.tensor(16), TypeError, ("topk", "int")),
    ("offset", -1, ValueError, ("offset", ">= 0")),
    ("offset", -(2**40), ValueError, ("offset", ">= 0")),
    ("offset", 2**40, ValueError, ("offset", "2^31")),
    ("offset", 2**31 - CACHE_ROWS, ValueError, ("offset", "2^31")),
    ("offset", 2**64, ValueError, ("offset", "2^31")),
    ("offset", 16.0, TypeError, ("offset", "int")),
    ("offset", None, TypeError, ("offset", "int")),
    ("offset", False, TypeError, ("offset", "int")),
    ("eps", float("inf"), ValueError, ("eps", "finite")),
    ("eps", float("nan"), ValueError, ("eps",)),
    ("eps", 0.0, ValueError, ("eps",)),
    ("eps", -1e-6, ValueError, ("eps",)),
    ("eps", 1e-50, ValueError, ("eps", "fp32")),  # positive, but 0 in fp32: a zero row would normalize to NaN
    ("eps", 1e39, ValueError, ("eps", "fp32")),  # finite, but inf in fp32
    ("eps", 10**400, ValueError, ("eps", "finite")),  # an int past a float's range: not an OverflowError
    ("eps", True, TypeError, ("eps", "float", "bool")),  # the custom op's schema refuses it with the same words
    ("eps", "1e-6", TypeError, ("eps", "float", "str")),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("name", "value", "exc", "words"),
    INDEXER_SCALARS,
    ids=[f"{a}={'MAX_TOPK+1' if callable(b) else repr(b)}" for a, b, *_ in INDEXER_SCALARS],
)
def test_indexer_scalar_is_bounded_before_any_work(name, value, exc, words, backend) -> None:
    args = dict(_case("indexer").args)
    args[name] = value() if callable(value) else value
    before = _snapshot(args)
    with pytest.raises(exc) as info:
        dsv4.indexer(**args, backend=backend)
    assert all(w in str(info.value) for w in words), str(info.value)
    _assert_unchanged(args, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bounds_are_inclusive(backend) -> None:
    """The largest accepted ``offset`` (``offset + cache rows = 2^31 - 1``) and ``topk = MAX_TOPK`` run;
    every selected index stays a valid int32."""
    args = dict(_case("indexer").args)
    offset = 2**31 - 1 - CACHE_ROWS
    out = dsv4.indexer(**{**args, "offset": offset, "topk": validate.MAX_TOPK}, backend="reference")
    picked = out.topk_idxs[out.topk_idxs >= 0]
    assert picked.numel() and int(picked.min()) >= offset and int(picked.max()) <= 2**31 - 1
    assert out.topk_idxs.shape[-1] == validate.MAX_TOPK
    if backend == "triton":  # a small topk keeps the interpreter quick: the offset bound is what is checked
        got = dsv4.indexer(**{**dict(_case("indexer").args), "offset": offset}, backend="triton")
        assert int(got.topk_idxs.max()) <= 2**31 - 1 and int(got.topk_idxs[got.topk_idxs >= 0].min()) >= offset


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 0.0, 1e-50, 1e39])
def test_qkv_eps_must_be_finite_and_positive(value) -> None:
    with pytest.raises(ValueError, match="eps"):
        dsv4.qkv_proj_rope(**_case("qkv_proj_rope").args, eps=value, backend="reference")


# --- DecodeFrontEnd -------------------------------------------------------------------------------


def _frontend_args() -> tuple[dsv4.LayerWeights, dsv4.RopeTable, dict]:
    weights = dsv4.synthetic_weights(CFG, seed=0, device=DEVICE)
    rope = dsv4.rope_table(CFG, "compressed", max_position=64, device=DEVICE)
    return weights, rope, {"batch": 2, "max_position": 64, "topk": 16, "offset": 16}


CONSTRUCTOR = [
    ("batch", 0, ValueError),
    ("batch", -1, ValueError),
    ("batch", 2.0, TypeError),
    ("batch", True, TypeError),
    ("max_position", 0, ValueError),
    ("max_position", 3, ValueError),
    ("max_position", 128, ValueError),  # past the rope table's 64 rows
    ("max_position", 64.0, TypeError),
    ("topk", 0, ValueError),
    ("topk", 2**31, ValueError),
    ("topk", 16.5, TypeError),
    ("offset", -1, ValueError),
    ("offset", 2**31, ValueError),
    ("offset", "16", TypeError),
    ("eps", float("nan"), ValueError),
    ("eps", -1.0, ValueError),
    ("eps", 1e-50, ValueError),
    ("backend", "bogus", ValueError),
    ("backend", "cuda", ValueError),
    ("weights", "weights", TypeError),
    ("rope", (1, 2), TypeError),
    ("block_size", 0, ValueError),  # was a ZeroDivisionError
    ("block_size", -16, ValueError),
    ("block_size", 16.0, TypeError),
    ("block_size", 24, ValueError),
    ("block_size", True, TypeError),
    ("num_blocks", -1, ValueError),
    ("num_blocks", 0, ValueError),
    ("num_blocks", 2.5, TypeError),
    ("num_blocks", "4", TypeError),
    ("num_blocks", True, TypeError),
]


@pytest.mark.parametrize(("name", "value", "exc"), CONSTRUCTOR, ids=[f"{a}={b!r}" for a, b, _ in CONSTRUCTOR])
def test_frontend_constructor_checks_its_arguments(name, value, exc) -> None:
    weights, rope, kwargs = _frontend_args()
    kwargs = {"weights": weights, "rope": rope, **kwargs, name: value}
    with pytest.raises(exc) as info:
        dsv4.DecodeFrontEnd(kwargs.pop("weights"), kwargs.pop("rope"), **kwargs)
    assert name in str(info.value), str(info.value)


def _frontend_state(m: dsv4.DecodeFrontEnd) -> tuple[list, dict[str, torch.Tensor]]:
    """Positions and the allocator (host lists), and every state tensor (block table included)."""
    host = [list(m.next_pos), list(m.free_blocks), [list(b) for b in m.slot_blocks]]
    return host, {k: v.clone() for k, v in m.state.tensors().items()}


STEP_POSITIONS = [
    ("float-tensor", torch.tensor([1.7, 2.2]), TypeError),
    ("float-list", [1.7, 2.2], TypeError),
    ("float", 2.0, TypeError),
    ("bool-list", [True, 0], TypeError),
    ("bool", True, TypeError),
    ("bool-tensor", torch.tensor([True, False]), TypeError),
    ("2d-tensor", torch.tensor([[2], [2]]), TypeError),
    ("string", "2", TypeError),
    ("negative", [-4, 0], ValueError),
    ("past-the-cache", [63, 0], ValueError),
    ("too-few", [2], ValueError),
    ("meta-tensor", torch.tensor([2, 2], device="meta"), ValueError),
    ("beyond-int64", 2**70, ValueError),
    ("beyond-int64-list", [2**70, 2], ValueError),
    ("below-int64", -(2**70), ValueError),
]


@pytest.mark.parametrize(("what", "start_pos", "exc"), STEP_POSITIONS, ids=[s[0] for s in STEP_POSITIONS])
def test_frontend_refuses_positions_it_would_truncate(what, start_pos, exc) -> None:
    m = tiny_frontend("reference", 2, 64)
    x = dsv4.synthetic_activations((2, 2, CFG.hidden_size), seed=1, device=DEVICE)
    m(x)
    before_pos, before = _frontend_state(m)
    with pytest.raises(exc, match="start_pos"):
        m(x, start_pos=start_pos)
    after_pos, after = _frontend_state(m)
    assert after_pos == before_pos and all(torch.equal(after[k], before[k]) for k in before)


RESETS = [
    ("float-list", [1.7], TypeError),
    ("float-tensor", torch.tensor([1.7]), TypeError),
    ("float", 1.0, TypeError),
    ("bool", True, TypeError),
    ("string", "1", TypeError),
    ("outside", [2], ValueError),
    ("negative", [-1], ValueError),
    ("meta-tensor", torch.tensor([0], device="meta"), ValueError),
]


@pytest.mark.parametrize(("what", "rows", "exc"), RESETS, ids=[s[0] for s in RESETS])
def test_frontend_reset_refuses_what_it_would_truncate(what, rows, exc) -> None:
    m = tiny_frontend("reference", 2, 64)
    m(dsv4.synthetic_activations((2, 6, CFG.hidden_size), seed=1, device=DEVICE))
    before_pos, before = _frontend_state(m)
    with pytest.raises(exc, match="batch_rows"):
        m.reset(rows)
    after_pos, after = _frontend_state(m)
    assert after_pos == before_pos and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("x", ["text", torch.zeros(4, CFG.hidden_size, dtype=torch.bfloat16)], ids=["str", "2d"])
def test_frontend_x_must_be_3d(x) -> None:
    with pytest.raises(ValueError, match="x: expected a .B, S, D. tensor"):
        tiny_frontend("reference", 2, 64)(x)


def test_frontend_refuses_a_step_past_max_position() -> None:
    """``max_position=30`` with a rope table and block table that reach further: position 40 is refused."""
    weights, _, kwargs = _frontend_args()
    rope = dsv4.rope_table(CFG, "compressed", max_position=64, device=DEVICE)
    m = dsv4.DecodeFrontEnd(weights, rope, **{**kwargs, "max_position": 30}, block_size=16)
    x = dsv4.synthetic_activations((2, 2, CFG.hidden_size), seed=1, device=DEVICE)
    before_host, before = _frontend_state(m)
    for start in (40, 29, [28, 40]):
        with pytest.raises(ValueError, match="start_pos.*max_position=30"):
            m(x, start_pos=start)
    after_host, after = _frontend_state(m)
    assert after_host == before_host and all(torch.equal(after[k], before[k]) for k in before)
    m(dsv4.synthetic_activations((2, 28, CFG.hidden_size), seed=2, device=DEVICE))  # to position 28
    m(x, start_pos=28)  # the last step that fits
    assert m.next_pos == [30, 30]


def _bad_steps() -> list[tuple[str, object, type[Exception]]]:
    """Steps of 8 tokens (each would need a pool block) that the module refuses."""
    x = dsv4.synthetic_activations((2, 8, CFG.hidden_size), seed=1, device=DEVICE)
    return [
        ("fp32", x.float(), TypeError),
        ("int8", x.to(torch.int8), TypeError),
        ("wrong-hidden", x[..., : CFG.hidden_size // 2].contiguous(), ValueError),
        ("S=0", x[:, :0].contiguous(), ValueError),
        ("B=0", x[:0].contiguous(), ValueError),
        ("B-past-slots", torch.cat([x, x[:1]]), ValueError),
        ("non-contiguous", x.transpose(0, 1).contiguous().transpose(0, 1), ValueError),
        ("meta", x.to("meta"), ValueError),
    ]


BAD_STEPS = _bad_steps()


@pytest.mark.parametrize(("what", "x", "exc"), BAD_STEPS, ids=[s[0] for s in BAD_STEPS])
def test_a_refused_step_leaves_the_allocator_alone(what, x, exc) -> None:
    """A pool with exactly one block per slot: a refused step changes neither the block table, the free
    list nor the slots' blocks, so the next valid step still gets its blocks."""
    m = tiny_frontend("reference", 2, 64)  # num_blocks = 2: one block of 16 rows per slot
    before_host, before = _frontend_state(m)
    with pytest.raises(exc, match="x"):
        m(x)
    after_host, after = _frontend_state(m)
    assert after_host == before_host and all(torch.equal(after[k], before[k]) for k in before)
    m(dsv4.synthetic_activations((2, 8, CFG.hidden_size), seed=1, device=DEVICE))
    assert m.next_pos == [8, 8] and m.slot_blocks == [[0], [1]] and m.free_blocks == []


def test_a_step_the_op_refuses_gives_its_blocks_back(monkeypatch) -> None:
    """Blocks are reserved before the ops run; when an op raises anyway, they go back to the free list."""
    m = tiny_frontend("reference", 2, 64)
    before_host, before = _frontend_state(m)

    def refuse(*args, **kwargs):
        raise ValueError("state: refused by the op")

    real = OpDescriptor.implementation
    monkeypatch.setattr(OpDescriptor, "implementation", lambda d, b: refuse if d.name == "indexer" else real(d, b))
    with pytest.raises(ValueError, match="refused by the op"):
        m(dsv4.synthetic_activations((2, 8, CFG.hidden_size), seed=1, device=DEVICE))
    after_host, after = _frontend_state(m)
    assert after_host == before_host and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("op", ["indexer", "indexer_compressor"])
@pytest.mark.parametrize("start_pos", [2**63, 2**70, -(2**63) - 1, -(2**70)], ids=str)
def test_start_pos_beyond_int64_is_named(op, start_pos) -> None:
    """A Python int that no int64 holds: a named ``ValueError``, not torch's ``OverflowError``."""
    args = dict(_case(op).args)
    before = _snapshot(args)
    with pytest.raises(ValueError, match="start_pos.*int64"):
        getattr(dsv4, op)(**{**args, "start_pos": start_pos}, backend="reference")
    _assert_unchanged(args, before)


# --- value checks without a host read -------------------------------------------------------------


class HostReadWatch(TorchDispatchMode):
    """Records ATen ops that read a tensor's value on the host, and the device-side asserts queued."""

    READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default, torch.ops.aten.equal.default}

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []
        self.asserts: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.reads.append(str(func))
        if func.__name__.startswith("_assert_async"):
            self.asserts.append(args[1] if len(args) > 1 else "")
        return func(*args, **(kwargs or {}))


def _on_meta(args: dict) -> dict:
    """Every tensor of the arguments (weights, state, rope included) on the meta device: tensors
    without data, so any host read of a value raises."""
    return {k: v.to("meta") if hasattr(v, "to") else v for k, v in args.items()}


def _meta_out(args: dict, width: int) -> IndexerOut:
    b, s = args["x"].shape[:2]
    score = torch.empty(b, s, width, device="meta")
    return IndexerOut(score, torch.empty(b, s, args["topk"], dtype=torch.int32, device="meta"))


@pytest.mark.parametrize("op", ["qkv_proj_rope", "indexer_compressor", "indexer-out"])
def test_device_tensors_are_checked_without_a_host_read(op) -> None:
    """Arguments on a device whose values cannot be read on the host (meta) validate completely: the
    value checks of ``positions``/``start_pos`` (and ``out.score``'s width) are queued as device-side
    asserts, and nothing reads a value (``item``, ``tolist``, ``nonzero``) — which on a GPU would
    synchronize the stream on every call."""
    name = op.removesuffix("-out")
    args = _on_meta(dict(_case(name).args))
    check: Callable[[], object]
    out: object
    if name == "indexer_compressor":
        check = lambda: validate.check_compressor(**args, eps=1e-6)  # noqa: E731
    elif name == "indexer":
        out = _meta_out(args, ROWS)
        check = lambda: validate.check_indexer(**args, eps=1e-6, out=out)  # noqa: E731
    else:
        t, hd, ql = args["x"].shape[0], CFG.head_dim, CFG.q_lora_rank
        out = QKV(
            torch.empty(t, CFG.num_attention_heads, hd, dtype=torch.bfloat16, device="meta"),
            torch.empty(t, hd, dtype=torch.bfloat16, device="meta"),
            torch.empty(t, ql, dtype=torch.int8, device="meta"),
            torch.empty(t, 1, device="meta"),
        )
        check = lambda: validate.check_qkv_proj_rope(**args, eps=1e-6, out=out)  # noqa: E731
    with HostReadWatch() as watch:
        check()
    assert not watch.reads, watch.reads
    expected = {  # the block table: its entries in the pool, one writer per pool row, (indexer) no written row read
        "qkv_proj_rope": ["positions"],
        "indexer_compressor": ["start_pos", "state.block_table", "state.block_table"],
        "indexer": ["start_pos", "state.block_table", "state.block_table", "state.block_table", "out.score"],
    }
    assert [a.split(":")[0] for a in watch.asserts] == expected[name]
    assert (validate.TWO_WRITERS in watch.asserts) == (name != "qkv_proj_rope")
    assert (validate.READ_AS_ANOTHER_ROW in watch.asserts) == (name == "indexer")


@pytest.mark.parametrize(
    ("op", "path", "value", "words"),
    [
        ("qkv_proj_rope", "positions", lambda t: t + 64, "positions"),
        ("qkv_proj_rope", "positions", lambda t: t - 100, "positions"),
        ("indexer_compressor", "start_pos", lambda t: t + 64, "start_pos"),
        ("indexer_compressor", "start_pos", lambda t: t - 100, "start_pos"),
        ("indexer", "start_pos", lambda t: t + 62, "start_pos"),
        ("indexer", "out", lambda t: 1, "out.score"),
        # p + S would wrap int64 to a negative position that passes p + S <= n
        ("indexer_compressor", "start_pos", lambda t: torch.full_like(t, 2**63 - 1), "start_pos"),
        ("indexer", "start_pos", lambda t: torch.full_like(t, 2**63 - 1), "start_pos"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_device_checks_catch_bad_values(op, path, value, words, monkeypatch) -> None:
    """The device-side branch, run on the CPU (where ``torch._assert_async`` raises at once): out-of-range
    values are caught, named, and nothing has run."""
    monkeypatch.setattr(validate, "HOST_DEVICE_TYPES", ())
    args = dict(_case(op).args)
    if op == "indexer":  # out= keeps start_pos on the device; a narrow score buffer is caught there too
        b, s = args["x"].shape[:2]
        width = value(None) if path == "out" else ROWS
        args["out"] = IndexerOut(torch.empty(b, s, width), torch.empty(b, s, args["topk"], dtype=torch.int32))
        args["rope"] = dsv4.rope_table(CFG, "compressed", max_position=1024)
    if path != "out":
        args[path] = value(args[path])
    before = _snapshot(args)
    with HostReadWatch() as watch, pytest.raises(RuntimeError, match=words):
        getattr(dsv4, op)(**args, backend="reference")
    assert watch.asserts and not watch.reads, watch.reads
    _assert_unchanged(args, before)


def test_frontend_step_hands_its_host_positions_to_the_indexer(monkeypatch) -> None:
    """``DecodeFrontEnd`` keeps its slots' positions on the host and its step launches the ops without
    their checks: the indexer gets those positions with the step (``start_host``, and the cache length
    that sizes ``out``), so no backend needs to read the device copy."""
    m = tiny_frontend("reference", 2, 64)
    m(dsv4.synthetic_activations((2, 6, CFG.hidden_size), seed=1, device=DEVICE))
    seen = []
    real = OpDescriptor.implementation

    def watched(desc, backend):
        fn = real(desc, backend)
        if desc.name != "indexer":
            return fn

        def indexer(*args, out=None):
            seen.append((args[5], out.score.shape[2]))  # start_pos, in the op's parameter order
            return fn(*args, out=out)

        return indexer

    monkeypatch.setattr(OpDescriptor, "implementation", watched)
    m(dsv4.synthetic_activations((2, 3, CFG.hidden_size), seed=2, device=DEVICE), start_pos=[6, 5])
    ((pos, width),) = seen
    assert pos.start_host == (6, 5) and pos.start.tolist() == [6, 5] and pos.seq == 3
    assert pos.max_cache_len == width == (6 + 3) // 4 and m.next_pos == [9, 8]


STATE_RESETS = [
    ("float-list", [1.7], TypeError),
    ("float-tensor", torch.tensor([1.7]), TypeError),
    ("bool", True, TypeError),
    ("negative", [-1], ValueError),
    ("negative-tensor", torch.tensor([-1]), ValueError),
    ("past-the-batch", [2], ValueError),
]


@pytest.mark.parametrize("op", ["indexer", "kv_compressor"])
@pytest.mark.parametrize(("what", "rows", "exc"), STATE_RESETS, ids=[s[0] for s in STATE_RESETS])
def test_state_reset_refuses_what_it_would_truncate_or_wrap(op, what, rows, exc) -> None:
    """``IndexerState.reset`` and ``CompressorState.reset`` themselves: a float would be truncated to a
    slot, -1 would wrap to the last."""
    state = _case(op).args["state"]
    before = {k: v.clone() for k, v in state.tensors().items()}
    with pytest.raises(exc, match="rows"):
        state.reset(rows)
    assert all(torch.equal(state.tensors()[k], v) for k, v in before.items())


@pytest.mark.parametrize("op", dsv4.ops.op_names())
def test_what_an_op_writes_made_under_inference_mode_is_refused_outside_it(op: str) -> None:
    """A state (or ``out``) made under ``torch.inference_mode`` holds inference tensors, which torch lets be
    written in place only in that mode: called outside it, the op refuses, naming the tensor, before
    anything changes (the reference raised half way through the state; the Triton kernels wrote it
    anyway). Inside the mode it runs; inputs made there are only read, which torch allows anywhere."""
    desc = dsv4.ops.get_op(op)
    with torch.inference_mode():
        case = make_case(CFG, op, seed=3, device=DEVICE, batch=2, seq=2)
        out = None
        if not desc.mutates:
            assert desc.result is not None and desc.fake_result is not None  # an op that writes no state returns
            out = desc.result(*desc.fake_result(desc.bind(case.args)))
    args = dict(case.args)
    records = {name: args[name] for name in mutated_args(op)}
    written = {k: v.clone() for k, v in record_outputs(records).items()}
    with pytest.raises(ValueError, match=r"^(out|state|pool|window_pool)\.\S+: an inference tensor"):
        getattr(dsv4, op)(**args, out=out, backend="reference") if out is not None else getattr(dsv4, op)(**args)
    assert all(torch.equal(t, written[k]) for k, t in record_outputs(records).items())
    if out is not None:
        getattr(dsv4, op)(**args, backend="reference")  # no out=: nothing of the caller's written
    with torch.inference_mode():
        getattr(dsv4, op)(**args, backend="reference")


@pytest.mark.parametrize("op", [op for op in dsv4.ops.op_names() if dsv4.ops.get_op(op).mutates])
def test_each_tensor_an_op_writes_is_checked_for_inference_mode(op: str) -> None:
    """The first tensor the op writes made under ``torch.inference_mode``, the rest outside it, then the last
    alone; and, for an op that also returns, an ``out`` made there beside a state made outside: each is
    refused by name."""
    desc = dsv4.ops.get_op(op)
    args = dict(make_case(CFG, op, seed=3, device=DEVICE, batch=2, seq=2).args)

    def replaced(record: Any, fields: list[str]) -> Any:  # the field at the end of ``fields`` made there
        if not fields:
            with torch.inference_mode():
                return record.clone()
        return dataclasses.replace(record, **{fields[0]: replaced(getattr(record, fields[0]), fields[1:])})

    for path in dict.fromkeys((desc.mutates[0], desc.mutates[-1])):  # state.pool.scale: a record's record
        head, *fields = path.split(".")
        one = {**args, head: replaced(args[head], fields)}
        with pytest.raises(ValueError, match=f"^{re.escape(path)}: an inference tensor"):
            getattr(dsv4, op)(**one, backend="reference")
    head = desc.mutates[0].split(".")[0]
    if desc.result is not None:
        with torch.inference_mode():  # a result of the op's own shapes, made there
            out = getattr(dsv4, op)(**clone_args(args, op), backend="reference")
        before = {k: v.clone() for k, v in record_outputs({head: args[head]}).items()}
        with pytest.raises(ValueError, match=r"^out\.\S+: an inference tensor"):
            getattr(dsv4, op)(**args, out=out, backend="reference")
        assert all(torch.equal(t, before[k]) for k, t in record_outputs({head: args[head]}).items())


def _requiring_grad(record: object) -> object:
    """``record`` (a tensor, weights, nested records) with every fp32 and bf16 tensor an ``nn.Parameter``,
    which requires grad, as an engine's weights may be."""
    if isinstance(record, torch.Tensor):
        grads = record.dtype in (torch.float32, torch.bfloat16)
        return torch.nn.Parameter(record.clone()) if grads else record
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        return dataclasses.replace(
            record, **{f.name: _requiring_grad(getattr(record, f.name)) for f in dataclasses.fields(record)}
        )
    return record


@pytest.mark.parametrize("op", dsv4.ops.op_names())
def test_weights_that_require_grad_give_no_autograd_graph(op: str) -> None:
    """Weights and inputs that require grad (``nn.Parameter``s): the op runs without autograd, so
    neither its outputs nor the state it updates carry a graph (on the reference they did, and the
    state's graph grew every step), and the numbers are those of plain weights."""
    case = make_case(CFG, op, seed=4, device=DEVICE, batch=2, seq=2)
    plain = dsv4.harness.cases.clone_args(case.args, op)
    args = dsv4.harness.cases.clone_args(case.args, op)
    args = {k: v if k in mutated_args(op) else _requiring_grad(v) for k, v in args.items()}
    got, want = getattr(dsv4, op)(**args, backend="reference"), getattr(dsv4, op)(**plain, backend="reference")
    records = record_outputs({name: args[name] for name in mutated_args(op)})
    outputs = [*(got or ()), *records.values()]
    assert outputs and not any(t.requires_grad or t.grad_fn is not None for t in outputs)
    want_records = record_outputs({name: plain[name] for name in mutated_args(op)})
    assert all(torch.equal(a, b) for a, b in zip(got or (), want or (), strict=True))
    assert all(torch.equal(t, want_records[k]) for k, t in records.items())


@pytest.mark.parametrize("op", dsv4.ops.op_names())
def test_a_callers_autocast_changes_nothing(op: str) -> None:
    """Under a caller's ``torch.autocast`` (bf16) the op computes as without it: its torch ops run with
    autocast off (the reference's fp32 matmuls ran in bf16: ``sparse_attn``'s ``o`` off by 8 at ``tiny``,
    ``qkv_proj_rope``'s ``q`` by 0.02; the compressors raised half way through their state)."""
    case = make_case(CFG, op, seed=5, device=DEVICE, batch=2, seq=2)
    want = dsv4.harness.cases.run_case(case, "reference")
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        got = dsv4.harness.cases.run_case(case, "reference")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def _set_precision(setting: str) -> tuple[str, str, str]:
    """A caller's float32 matmul precision, from torch's defaults: ``"legacy <p>"`` through
    ``torch.set_float32_matmul_precision(p)``, ``"<generic>/<cuda>/<cpu>"`` through the per-backend
    settings; returns those settings as they then stand."""
    b: Any = torch.backends  # the per-backend settings are set at run time: torch's stubs do not list them
    torch.set_float32_matmul_precision("highest")
    b.fp32_precision, b.cuda.matmul.fp32_precision, b.mkldnn.matmul.fp32_precision = "none", "none", "none"
    if setting.startswith("legacy "):
        torch.set_float32_matmul_precision(setting.removeprefix("legacy "))
    else:
        b.fp32_precision, b.cuda.matmul.fp32_precision, b.mkldnn.matmul.fp32_precision = setting.split("/")
    return b.fp32_precision, b.cuda.matmul.fp32_precision, b.mkldnn.matmul.fp32_precision


@pytest.mark.parametrize("precision", ["legacy high", "legacy medium", "none/tf32/bf16", "tf32/none/none"])
@pytest.mark.parametrize("op", dsv4.ops.op_names())
def test_a_callers_float32_matmul_precision_changes_nothing(op: str, precision: str) -> None:
    """Under a caller's float32 matmul precision below IEEE (TF32 on a GPU, bf16 where the CPU has it),
    set through ``torch.set_float32_matmul_precision`` or the per-backend settings, the reference
    computes as without it, and the caller's settings are as they were after the call: its fp32
    matmuls run at IEEE precision (on this CPU "medium" moved the compressors' states and the
    indexer's scores by up to 1e-6 before)."""
    case = make_case(CFG, op, seed=5, device=DEVICE, batch=2, seq=2)
    want = dsv4.harness.cases.run_case(case, "reference")
    try:
        callers = _set_precision(precision)
        got = dsv4.harness.cases.run_case(case, "reference")
        b: Any = torch.backends
        assert (b.fp32_precision, b.cuda.matmul.fp32_precision, b.mkldnn.matmul.fp32_precision) == callers
    finally:
        _set_precision("none/none/none")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("precision", ["tf32/none/none", "none/ieee/bf16", "none/tf32/ieee"])
def test_a_reduced_precision_is_made_ieee_for_the_call(precision: str) -> None:
    """``torch.backends.fp32_precision = "tf32"`` with the per-backend settings at "none" (inheriting it),
    or one backend at IEEE and the other below it: inside the call each backend's float32 matmuls are
    IEEE, and the caller's settings come back after."""
    from dsv4.ops.device import spec_numerics

    b: Any = torch.backends
    try:
        callers = _set_precision(precision)
        with spec_numerics("cpu"):
            assert (b.cuda.matmul.fp32_precision, b.mkldnn.matmul.fp32_precision) == ("ieee", "ieee")
        assert (b.fp32_precision, b.cuda.matmul.fp32_precision, b.mkldnn.matmul.fp32_precision) == callers
    finally:
        _set_precision("none/none/none")


@pytest.mark.parametrize("op", ["indexer_compressor", "indexer"])
def test_a_strided_start_pos_reads_its_own_values(op: str) -> None:
    """A non-contiguous ``start_pos`` (an expanded or sliced tensor): every backend reads the values it
    shows, as from a contiguous copy (the kernels index positions densely)."""
    case = _case(op)
    strided = torch.tensor([5, 0, 9, 0], device=DEVICE)[::2]
    assert not strided.is_contiguous()
    results = {}
    for backend in BACKENDS:
        for name, start in (("strided", strided), ("dense", strided.contiguous())):
            args = {**case.args, "state": case.args["state"].clone(), "start_pos": start}
            out = getattr(dsv4, op)(**args, backend=backend)
            results[backend, name] = (out, args["state"].tensors())
    for backend in BACKENDS:
        (out, state), (dense_out, dense_state) = results[backend, "strided"], results[backend, "dense"]
        assert all(torch.equal(state[k], dense_state[k]) for k in state)
        assert out is None or all(torch.equal(a, b) for a, b in zip(out, dense_out, strict=True))


@pytest.mark.skipif("triton" not in BACKENDS, reason="the Triton backend's limit")
def test_a_score_row_longer_than_the_selection_takes_is_refused_before_any_write() -> None:
    """``out.score`` wider than the fused top-k's 2^24 keys: the Triton backend refuses it naming
    ``out.score`` before its first launch, the state unchanged (the reference takes any width)."""
    args = dict(_case("indexer").args)
    b, s = args["x"].shape[:2]
    score = torch.empty(b, s, 2**24 + 16, device=DEVICE)
    args["out"] = IndexerOut(score, torch.empty(b, s, args["topk"], dtype=torch.int32, device=DEVICE))
    before = _snapshot(args)
    with pytest.raises(ValueError, match="out.score: the Triton kernels need rows of at most 16777216 keys"):
        dsv4.indexer(**args, backend="triton")
    _assert_unchanged(args, before)


@pytest.mark.skipif("triton" not in BACKENDS, reason="the Triton backend's limit")
def test_a_score_row_of_exactly_the_selections_limit_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    """``out.score`` of exactly 2^24 keys passes the limit above: the indexer goes on to its first launch
    (stubbed here, to stop there: the interpreter over 64 MB rows would take minutes)."""
    import dsv4.kernels.lightning_indexer as lightning_indexer

    class Launched(Exception):
        pass

    def front(*args: object, **kwargs: object) -> None:
        raise Launched

    monkeypatch.setattr(lightning_indexer, "front", front)
    args = dict(_case("indexer").args)
    b, s = args["x"].shape[:2]
    score = torch.empty(b, s, 2**24, device=DEVICE)
    args["out"] = IndexerOut(score, torch.empty(b, s, args["topk"], dtype=torch.int32, device=DEVICE))
    with pytest.raises(Launched):
        dsv4.indexer(**args, backend="triton")


# (op, config changes, the Triton backend's words): dims the reference takes that the kernels' tiles do not
TRITON_DIMS = [
    (
        "qkv_proj_rope",
        {"head_dim": 8, "qk_rope_head_dim": 4},
        "w.wkv: the Triton backend needs projection widths (rows) that are multiples of 16, got 8",
    ),
    (
        "indexer_compressor",
        {"index_head_dim": 32, "qk_rope_head_dim": 32},
        "w.wkv: the Triton backend needs 2*HID rows that are a multiple of 128, got 64",
    ),
    (
        "indexer",
        {"qk_rope_head_dim": 16},
        "w, rope: HID - R = 112: the fused kernels need a power of two >= 16 (HID=128 from w, R=16 from rope)",
    ),
    (
        "indexer",
        {"index_head_dim": 32, "qk_rope_head_dim": 16},
        "w, rope: R/2 = 8: the fused kernels need a power of two >= 16 (HID=32 from w, R=16 from rope)",
    ),
    (
        "indexer_compressor",
        {"index_head_dim": 64, "qk_rope_head_dim": 16},
        "w, rope: HID - R = 48: the fused kernels need a power of two >= 16 (HID=64 from w, R=16 from rope)",
    ),
]


def launch_log() -> contextlib.AbstractContextManager[Any]:
    """The interpreter's log of a CPU run's launches; None on a GPU, whose launches it does not see."""
    return count_traffic() if DEVICE.type == "cpu" else contextlib.nullcontext()


@pytest.mark.skipif("triton" not in BACKENDS, reason="the Triton backend's limits")
@pytest.mark.parametrize(("op", "dims", "words"), TRITON_DIMS, ids=["hd8", "hid32", "r16", "hid32-r16", "hid64-r16"])
def test_dims_the_triton_kernels_cannot_take_are_refused_by_the_op(op: str, dims: dict, words: str) -> None:
    """A head dim of 8 (a projection tile of 16 columns), an indexer head dim of 32 (2*HID no whole
    128-column tile), a rope dim whose split of the indexer head is no power of two >= 16: the op on
    Triton refuses it naming what it cannot take, before any launch (counted on a CPU), the state
    unchanged; the reference runs the same case."""
    cfg = CFG.replace(name="odd-dims", **dims)
    args = dict(make_case(cfg, op, seed=0, device=DEVICE, batch=2, seq=2, max_position=64).args)
    before = _snapshot(args)
    with pytest.raises(ValueError, match="^" + re.escape(words) + "$"), launch_log() as log:
        getattr(dsv4, op)(**args, backend="triton")
    assert log is None or log.launches == [], log.launches
    _assert_unchanged(args, before)
    getattr(dsv4, op)(**args, backend="reference")


def test_zero_sized_projection_dims_are_named() -> None:
    args = dict(_case("qkv_proj_rope").args)
    w = args["w"]
    for field, words in (("wkv", "w.wkv: expected at least one row"), ("wq_a", "w.wq_a: expected at least one row")):
        empty = getattr(w, field)[:0]
        bad = dataclasses.replace(w, **{field: empty})
        with pytest.raises(ValueError, match=words):
            dsv4.qkv_proj_rope(**{**args, "w": bad})

"""``torch.ops.dsv4``: schemas, fake implementations and mutation annotations (opcheck), out-variants,
and ``torch.compile(fullgraph=True)`` over a decode step."""

from __future__ import annotations

import dataclasses
import re
from typing import NamedTuple

import pytest
import torch

import dsv4
import dsv4.library as lib
from conftest import BACKENDS, DEVICE, FULL
from dsv4.engine.custom_ops import _leaf_names
from dsv4.harness.cases import make_case
from dsv4.ops import OpDescriptor, Output, Tolerance, register_op
from dsv4.ops.costs import OpCost
from dsv4.ops.registry import get_op, op_names

CFG = dsv4.get_config("tiny")


def opcheck(op, args: tuple, backend: str) -> None:
    """``torch.library.opcheck``; on Triton only its checks of the backend's own run: the schema's
    mutation and alias annotations against what the kernels write, and the fake outputs' metadata
    against the real ones (registration and AOT tracing go through the one fake implementation of
    every backend: checked on the reference)."""
    if backend == "reference":
        torch.library.opcheck(op, args)
    else:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def _step_inputs():
    case = make_case(CFG, "indexer", "decode", seed=0, device=DEVICE, max_position=256, batch=2, seq=2)
    w = dsv4.synthetic_weights(CFG, seed=0, device=DEVICE)
    start = case.args["start_pos"]
    positions = (start[:, None] + torch.arange(2, device=DEVICE)).reshape(-1)
    return case.args["x"], w, positions, start, case.args["rope"], case.args["state"]


def _qkv_args(backend: str):
    x, w, positions, _, rope, _ = _step_inputs()
    return (x.view(4, -1), *lib.tensors_of(w.attn), positions, rope.cos, rope.sin, 1e-6, backend)


def _indexer_args(backend: str):
    x, w, positions, start, rope, state = _step_inputs()
    qkv = dsv4.qkv_proj_rope(x.view(4, -1), w.attn, positions, rope)
    return (
        x, qkv.qr, qkv.qr_scale, *lib.tensors_of(w.indexer), *state.tensors().values(), start, 16, rope.cos,
        rope.sin, CFG.index_topk, 1e-6, backend,
    )  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_qkv_proj_rope(backend: str) -> None:
    args = _qkv_args(backend)
    opcheck(torch.ops.dsv4.qkv_proj_rope.default, args, backend)
    outs = tuple(torch.empty_like(t) for t in torch.ops.dsv4.qkv_proj_rope(*args))
    opcheck(torch.ops.dsv4.qkv_proj_rope_out.default, args + outs, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_indexer(backend: str) -> None:
    args = _indexer_args(backend)
    opcheck(torch.ops.dsv4.indexer.default, args, backend)
    b, s = args[0].shape[:2]
    score = torch.empty(b, s, 64, device=DEVICE)  # padded: more columns than cache rows
    topk = torch.empty(b, s, CFG.index_topk, dtype=torch.int32, device=DEVICE)
    opcheck(torch.ops.dsv4.indexer_out.default, args + (score, topk), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_indexer_compressor(backend: str) -> None:
    x, w, _, start, rope, state = _step_inputs()
    args = (x, *lib.tensors_of(w.indexer.compressor), *state.tensors().values(), start, rope.cos, rope.sin, 1e-6)
    opcheck(torch.ops.dsv4.indexer_compressor.default, args + (backend,), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_variants_equal_plain_calls(backend: str) -> None:
    x, w, positions, start, rope, state = _step_inputs()
    plain = dsv4.qkv_proj_rope(x.view(4, -1), w.attn, positions, rope, backend=backend)
    out = dsv4.QKV(*(torch.full_like(t, 7) for t in plain))
    assert lib.qkv_proj_rope(x.view(4, -1), w.attn, positions, rope, backend=backend, out=out) is out
    assert all(torch.equal(a, b) for a, b in zip(out, plain, strict=True))

    s1, s2 = state.clone(), state.clone()
    ref = dsv4.indexer(x, plain.qr, plain.qr_scale, w.indexer, s1, start, 16, rope, topk=16, backend=backend)
    n = ref.score.shape[-1]
    padded = dsv4.IndexerOut(torch.zeros(2, 2, n + 5, device=DEVICE), torch.zeros_like(ref.topk_idxs))
    lib.indexer(x, plain.qr, plain.qr_scale, w.indexer, s2, start, 16, rope, topk=16, backend=backend, out=padded)
    assert torch.equal(padded.score[..., :n], ref.score) and torch.equal(padded.topk_idxs, ref.topk_idxs)
    assert (padded.score[..., n:] == torch.finfo(torch.float32).min).all()
    assert all(torch.equal(a, b) for a, b in zip(s1.tensors().values(), s2.tensors().values(), strict=True))


def test_out_buffers_are_validated() -> None:
    x, w, positions, start, rope, state = _step_inputs()
    bad = dsv4.QKV(*(torch.empty(1) for _ in range(4)))
    with pytest.raises(TypeError, match="out.q"):
        dsv4.qkv_proj_rope(x.view(4, -1), w.attn, positions, rope, out=bad)
    qkv = dsv4.qkv_proj_rope(x.view(4, -1), w.attn, positions, rope)
    short = dsv4.IndexerOut(
        torch.empty(2, 2, 1, device=DEVICE), torch.empty(2, 2, 16, dtype=torch.int32, device=DEVICE)
    )
    before = state.clone()
    with pytest.raises(ValueError, match="out.score"):  # start_pos on the host: checked there, also beside a GPU
        dsv4.indexer(x, qkv.qr, qkv.qr_scale, w.indexer, state, start.cpu(), 16, rope, topk=16, out=short)
    assert all(torch.equal(t, getattr(before, name)) for name, t in state.tensors().items())


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_buffers_one_size_off_are_refused_naming_the_field(backend: str) -> None:
    """``out`` buffers one head, one score column or one top-k slot off the op's outputs: refused naming
    the field, the state unchanged (a score row of ``max cache_len - 1`` columns would lose the last
    cache row); buffers of exactly the outputs' sizes run."""
    x, w, positions, start, rope, state = _step_inputs()
    qkv = dsv4.qkv_proj_rope(x.view(4, -1), w.attn, positions, rope, backend=backend)
    heads, hd = qkv.q.shape[1:]
    q = torch.empty(4, heads - 1, hd, dtype=torch.bfloat16, device=DEVICE)
    out = dsv4.QKV(q, torch.empty_like(qkv.kv), torch.empty_like(qkv.qr), torch.empty_like(qkv.qr_scale))
    with pytest.raises(ValueError, match=rf"out.q: expected shape \[4, {heads}, {hd}\]"):
        dsv4.qkv_proj_rope(x.view(4, -1), w.attn, positions, rope, out=out, backend=backend)
    start = start.cpu()  # on the host: the score width is checked there
    rows = int(((start + 2) // 4).max())  # the cache rows after the step: (start_pos + S) // 4

    def call(width: int, k: int) -> dsv4.IndexerOut:
        out = dsv4.IndexerOut(
            torch.empty(2, 2, width, device=DEVICE), torch.empty(2, 2, k, dtype=torch.int32, device=DEVICE)
        )
        return dsv4.indexer(
            x, qkv.qr, qkv.qr_scale, w.indexer, state, start, 16, rope, topk=16, out=out, backend=backend
        )

    before = state.clone()
    for width, k, words in (
        (rows - 1, 16, f"out.score: expected at least {rows} columns"),
        (rows, 15, "out.topk_idxs"),
    ):
        with pytest.raises(ValueError, match=words):
            call(width, k)
        assert all(torch.equal(t, getattr(before, name)) for name, t in state.tensors().items())
    assert call(rows, 16).score.shape == (2, 2, rows)


# The ops are opaque to the compiler: the graph and its guards do not depend on the backend argument.
@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=FULL)])
def test_compile_fullgraph_decode_step(backend: str) -> None:
    x, w, positions, start, rope, state = _step_inputs()
    eager_state = state.clone()

    def step(x, positions, start):
        q, kv, qr, qr_scale = lib.qkv_proj_rope(x.view(4, -1), w.attn, positions, rope, backend=backend)
        out = lib.indexer(x, qr, qr_scale, w.indexer, state, start, 16, rope, topk=16, backend=backend)
        return q, kv, out.score, out.topk_idxs

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    q, kv, score, topk = compiled(x, positions, start)
    eq = dsv4.qkv_proj_rope(x.view(4, -1), w.attn, positions, rope, backend=backend)
    eo = dsv4.indexer(x, eq.qr, eq.qr_scale, w.indexer, eager_state, start, 16, rope, topk=16, backend=backend)
    assert torch.equal(q, eq.q) and torch.equal(kv, eq.kv)
    assert torch.equal(score, eo.score) and torch.equal(topk, eo.topk_idxs)
    assert torch.equal(state.keys, eager_state.keys)  # the compiled step mutated the state


def test_a_meta_tensor_among_real_ones_is_refused() -> None:
    """One argument on ``meta`` sends the call to the fake implementation, which writes nothing: it
    refuses the call, naming the argument, as the real one does; the state is unchanged."""
    x, w, positions, start, rope, state = _step_inputs()
    qkv = dsv4.qkv_proj_rope(x.view(4, -1), w.attn, positions, rope)
    out = dsv4.QKV(torch.empty(qkv.q.shape, dtype=qkv.q.dtype, device="meta"), *(torch.empty_like(t) for t in qkv[1:]))
    with pytest.raises(ValueError, match=r"out\.q: expected device .*, got meta"):
        lib.qkv_proj_rope(x.view(4, -1), w.attn, positions, rope, out=out)
    before = state.clone()
    meta_w = dataclasses.replace(w.indexer, weights_proj=w.indexer.weights_proj.to("meta"))
    with pytest.raises(ValueError, match=r"w\.weights_proj: expected device .*, got meta"):
        lib.indexer(x, qkv.qr, qkv.qr_scale, meta_w, state, start, 16, rope, topk=16)
    with pytest.raises(ValueError, match=r"start_pos: expected device .*, got meta"):  # only the host may differ
        lib.indexer(x, qkv.qr, qkv.qr_scale, w.indexer, state, start.to("meta"), 16, rope, topk=16)
    assert all(torch.equal(t, getattr(before, name)) for name, t in state.tensors().items())


def test_a_record_of_another_kind_is_refused_by_name() -> None:
    x, w, positions, start, rope, state = _step_inputs()
    qkv = dsv4.qkv_proj_rope(x.view(4, -1), w.attn, positions, rope)
    with pytest.raises(TypeError, match="^w: expected IndexerWeights, got AttnWeights"):
        lib.indexer(x, qkv.qr, qkv.qr_scale, w.attn, state, start, 16, rope, topk=16)  # type: ignore[arg-type]


@pytest.mark.parametrize("op", op_names())
def test_each_tensor_an_op_writes_has_an_alias_set_of_its_own(op: str) -> None:
    """``Tensor(a0!) kv_state, Tensor(a1!) score_state, ...``: one set each, so that no two tensors an op
    writes (its state, its ``out``) are declared aliases of one another."""
    desc = get_op(op)
    written = {str(getattr(torch.ops.dsv4, op).default._schema): len(desc.mutates)}
    if desc.result is not None:
        out_schema = str(getattr(torch.ops.dsv4, f"{op}_out").default._schema)
        written[out_schema] = len(desc.mutates) + len(desc.result._fields)
    for schema, count in written.items():
        sets = re.findall(r"Tensor\((a\d+)!\)", schema)
        assert len(sets) == len(set(sets)) == count, schema


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"topk": True}, "topk: expected an int, got bool"),  # the schema would run top-1
        ({"eps": True}, "eps: expected a float, got bool"),
        ({"offset": 2.0}, "offset: expected an int, got float"),
        ({"offset": 2**70}, "offset: expected an int64"),
        ({"offset": 2**63}, "offset: expected an int64"),  # one past the largest
        ({"w": "weights"}, "w: expected IndexerWeights, got str"),
        ({"rope": None}, "rope: expected RopeTable, got NoneType"),
        ({"qr_scale": 1.0}, "qr_scale: expected a torch.Tensor, got float"),
        ({"start_pos": 5}, r"start_pos: torch.ops.dsv4.indexer takes an int tensor \[B\], got int"),
    ],
)
def test_arguments_of_another_kind_are_refused_by_name(change: dict, words: str) -> None:
    x, w, positions, start, rope, state = _step_inputs()
    qkv = dsv4.qkv_proj_rope(x.view(4, -1), w.attn, positions, rope)
    args = dict(x=x, qr=qkv.qr, qr_scale=qkv.qr_scale, w=w.indexer, state=state, start_pos=start, offset=16,
                rope=rope, topk=16)  # fmt: skip
    before = state.clone()
    with pytest.raises((TypeError, ValueError), match=words):
        lib.indexer(**{**args, **change})
    with pytest.raises(TypeError, match="out: expected IndexerOut, got Tensor"):
        lib.indexer(**args, out=torch.empty(1))  # type: ignore[arg-type]  # the wrong kind on purpose
    assert all(torch.equal(t, getattr(before, name)) for name, t in state.tensors().items())


def test_weights_that_require_grad_give_outputs_without_a_gradient() -> None:
    """An ``nn.Parameter`` weight: the outputs do not require grad (no op has a gradient), eagerly,
    through ``torch.ops.dsv4`` itself and compiled with grad enabled."""
    x, w, positions, _, rope, _ = _step_inputs()
    attn = dataclasses.replace(w.attn, wq_a=torch.nn.Parameter(w.attn.wq_a.clone()))
    expected = dsv4.qkv_proj_rope(x.view(4, -1), w.attn, positions, rope)
    out = lib.qkv_proj_rope(x.view(4, -1), attn, positions, rope)
    raw = torch.ops.dsv4.qkv_proj_rope(
        x.view(4, -1), *lib.tensors_of(attn), positions, rope.cos, rope.sin, 1e-6, "auto"
    )
    assert not any(t.requires_grad for t in (*out, *raw))
    torch._dynamo.reset()
    q = torch.compile(lambda x: lib.qkv_proj_rope(x, attn, positions, rope).q, fullgraph=True, backend="aot_eager")(
        x.view(4, -1)
    )
    assert not q.requires_grad and torch.equal(q, expected.q)


def test_an_op_that_updates_state_and_returns_gives_outputs_without_a_gradient() -> None:
    """The indexer updates its state, so its custom op has no autograd formula: with a weight that
    requires grad, neither its outputs nor the state it wrote require one."""
    x, w, positions, start, rope, state = _step_inputs()
    qkv = dsv4.qkv_proj_rope(x.view(4, -1), w.attn, positions, rope)
    indexer = dataclasses.replace(w.indexer, weights_proj=torch.nn.Parameter(w.indexer.weights_proj.clone()))
    out = lib.indexer(x, qkv.qr, qkv.qr_scale, indexer, state, start, 16, rope, topk=16)
    assert not any(t.requires_grad for t in (*out, *state.tensors().values()))


@dataclasses.dataclass
class _Gain:
    gain: torch.Tensor
    bias: torch.Tensor | None = None


class _Out(NamedTuple):
    y: torch.Tensor


def _toy(x: torch.Tensor, w: _Gain, *, backend: str = "auto", out: _Out | None = None) -> _Out:
    """A toy op."""
    raise NotImplementedError


def test_an_op_the_custom_ops_cannot_take_is_left_out_of_the_registry() -> None:
    """A record field of a kind no schema has (``Tensor | None``): registration fails naming it, and
    the op is in neither registry, so a corrected descriptor can be registered under the name."""
    desc = OpDescriptor(
        name="toy_unregistrable", signature=_toy, outputs=(Output("y", Tolerance(0, 0)),), mutates=(),
        validate=lambda args, out: {}, case_args=lambda case: {}, cost=lambda *a: OpCost("toy", {}, {}, {}),
        fake_result=lambda args: _Out(torch.empty_like(args["x"])), implementations={"reference": "builtins:print"},
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"toy_unregistrable.*w\.bias"):
        register_op(desc)
    assert "toy_unregistrable" not in op_names() and not hasattr(torch.ops.dsv4, "toy_unregistrable")


def test_flattened_arguments_are_named_by_their_last_field_or_else_their_whole_path() -> None:
    assert _leaf_names(["x", "w.compressor.wkv", "rope.cos"]) == ["x", "wkv", "cos"]
    assert _leaf_names(["pool.nope", "window_pool.nope"]) == ["pool_nope", "window_pool_nope"]
    with pytest.raises(ValueError, match=r"^flattened argument names repeat: \['w_a_b_c', 'w_a_b_c'\]"):
        _leaf_names(["w.a_b.c", "w_a.b.c"])  # both last fields c, both paths w_a_b_c

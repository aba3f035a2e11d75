"""The attention ops as ``torch.ops.dsv4`` custom ops: schemas with optional pools and mutated
records (opcheck, reference backend: the checks do not depend on the backend), the typed wrappers
equal to the plain calls, and a compiled attention step (``torch.compile(fullgraph=True)``)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import dsv4
import dsv4.library as lib
from conftest import DEVICE, backends_of
from dsv4.engine.custom_ops import flatten
from dsv4.harness.cases import make_case, mutated_args, record_outputs
from dsv4.harness.golden import bit_identical
from dsv4.ops.attention_cases import sparse_attn_args
from dsv4.ops.case_inputs import CaseInputs
from dsv4.ops.registry import get_op, op_names

CFG = dsv4.get_config("tiny")


def _args(op: str, kind: str | None = None) -> dict:
    case = make_case(CFG, op, seed=1, device=DEVICE, max_position=64, batch=2, seq=2, start_pos=[6, 13], kind=kind)
    args = dict(case.args)
    return {**args, "eps": 1e-6} if op == "kv_compressor" else args


# torch's schema check compares every argument before and after each aten call with allclose, which
# float8 tensors (the pools' codes, o_proj's weights) do not implement; the mutation annotations are
# checked here instead (test_schema_declares_what_changes).
CHECKS = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("op", ["kv_compressor", "window_kv_write", "sparse_attn", "sparse_attn_write", "o_proj"])
def test_opcheck(op: str) -> None:
    args = _args(op)
    flat = (*flatten(get_op(op), args), "reference")
    torch.library.opcheck(getattr(torch.ops.dsv4, op).default, flat, test_utils=CHECKS)


def test_opcheck_of_an_output_projection_wider_than_the_heads() -> None:
    """``o_proj``'s fake result is ``[T, D]`` where ``D`` is not the heads' ``HG*HD`` (384 against 256 here;
    ``pro``: 7168 against 4096), as the op's own result is."""
    cfg = CFG.replace(name="wide-d", hidden_size=384)
    case = make_case(cfg, "o_proj", seed=1, device=DEVICE, max_position=64, batch=2, seq=2, start_pos=[6, 13])
    assert case.args["w"].wo_b.shape[0] != case.args["w"].wo_a.shape[1]
    flat = (*flatten(get_op("o_proj"), dict(case.args)), "reference")
    torch.library.opcheck(torch.ops.dsv4.o_proj.default, flat, test_utils=CHECKS)


@pytest.mark.parametrize(
    ("op", "backend"),
    [
        (op, b)
        for op in ("kv_compressor", "window_kv_write", "sparse_attn", "sparse_attn_write", "o_proj")
        for b in backends_of(op)
    ],
)
def test_schema_declares_what_changes(op: str, backend: str) -> None:
    """Every argument the custom op changes is declared mutable in its schema, and the pool and ring
    tensors a step changes are among them (on each backend: a kernel writes nothing else)."""
    args = _args(op)
    flat = flatten(get_op(op), args)
    before = [t.clone() if isinstance(t, torch.Tensor) else t for t in flat]
    getattr(torch.ops.dsv4, op)(*flat, backend)
    schema = getattr(torch.ops.dsv4, op).default._schema
    mutable = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    names = [a.name for a in schema.arguments][: len(flat)]
    changed = {
        n
        for n, a, b in zip(names, flat, before, strict=True)
        if isinstance(a, torch.Tensor) and not bit_identical(a, b)
    }
    assert changed <= mutable, changed - mutable
    expected = {
        "kv_compressor": {"kv_state", "score_state", "nope", "scale"},
        "window_kv_write": {"nope", "rope", "scale"},
        "sparse_attn_write": {"window_pool_nope", "window_pool_rope", "window_pool_scale"},
    }
    assert changed >= expected.get(op, set())


@pytest.mark.parametrize("kind", ["swa", "hca"])
def test_optional_pools_and_indices_pass_as_none(kind: str) -> None:
    rope = dsv4.rope_table(CFG, "window" if kind == "swa" else "compressed", max_position=64)
    x = torch.zeros(2, 2, CFG.hidden_size, device=DEVICE)  # the case's batch and seq
    no_weights: Any = None  # sparse_attn's arguments read none
    c = CaseInputs(
        CFG, "decode", 2, DEVICE, 64, torch.tensor([6, 13]), no_weights, rope, x, torch.Generator().manual_seed(0)
    )
    args = sparse_attn_args(c, kind)
    flat = (*flatten(get_op("sparse_attn"), args), "reference")
    assert sum(v is None for v in flat) == (5 if kind == "swa" else 1)  # the compressed pool's 4 tensors, topk_idxs
    schema = torch.ops.dsv4.sparse_attn.default._schema
    optional = {a.name for a in schema.arguments if isinstance(a.type, torch.OptionalType)}
    assert optional == {"compressed_pool_nope", "compressed_pool_rope", "compressed_pool_scale",
                        "compressed_pool_block_table", "topk_idxs"}  # fmt: skip
    torch.library.opcheck(torch.ops.dsv4.sparse_attn.default, flat, test_utils=CHECKS)
    assert bit_identical(lib.sparse_attn(**args).o, dsv4.sparse_attn(**args).o)


@pytest.mark.parametrize("missing", ["nope", "scale"])  # the record's first tensor, and a later one
def test_an_optional_record_given_in_part_is_refused_naming_the_missing_tensor(missing: str) -> None:
    """Only a record whose tensors are all None is None; one None among tensors is that tensor missing."""
    flat = flatten(get_op("sparse_attn"), _args("sparse_attn", "csa"))
    names = [a.name for a in torch.ops.dsv4.sparse_attn.default._schema.arguments]
    flat[names.index(f"compressed_pool_{missing}")] = None
    with pytest.raises(TypeError, match=f"^compressed_pool.{missing}: expected a torch.Tensor, got NoneType"):
        torch.ops.dsv4.sparse_attn(*flat, "reference")


def test_start_pos_on_the_host_is_taken_by_the_fake_implementation() -> None:
    """Traced on ``meta`` (standing for a device the machine may lack), the step's tensors on one device
    and ``start_pos`` on the host, as the real op takes them (spec §7): the fake gives the output's shape."""
    args = _args("sparse_attn", "csa")
    on_meta: dict[str, Any] = {k: v if isinstance(v, int | str) else v.to("meta") for k, v in args.items()}
    o = lib.sparse_attn(**{**on_meta, "start_pos": torch.tensor([6, 13])}).o
    assert o.device.type == "meta" and o.shape == (2, 2, CFG.num_attention_heads, CFG.head_dim)


def test_typed_wrappers_equal_plain_calls_and_mutate_the_same() -> None:
    for op in ("kv_compressor", "window_kv_write"):
        args, plain = _args(op), _args(op)
        getattr(lib, op)(**args)
        getattr(dsv4, op)(**plain)
        name = "state" if op == "kv_compressor" else "pool"
        got, want = record_outputs({name: args[name]}), record_outputs({name: plain[name]})
        assert all(bit_identical(got[k], want[k], k) for k in want)
    out = dsv4.OProjOut(torch.empty(4, CFG.hidden_size, dtype=torch.bfloat16, device=DEVICE))
    assert lib.o_proj(**_args("o_proj"), out=out) is out
    assert bit_identical(out.y, dsv4.o_proj(**_args("o_proj")).y)


@pytest.mark.parametrize("op", sorted(set(lib.__all__) & set(op_names())))
def test_each_wrapper_runs_its_own_op(op: str) -> None:
    """``dsv4.library.<op>`` gives the outputs of ``dsv4.<op>`` and updates the same records (the window a
    ``sparse_attn_write`` writes included), on the same arguments."""
    kind = get_op(op).kinds[0] if get_op(op).kinds else None
    args, plain = _args(op, kind), _args(op, kind)
    got, want = getattr(lib, op)(**args), getattr(dsv4, op)(**plain)
    mutated = [name for name in mutated_args(op) if name in args]
    got_all = {**(got._asdict() if got is not None else {}), **record_outputs({n: args[n] for n in mutated})}
    want_all = {**(want._asdict() if want is not None else {}), **record_outputs({n: plain[n] for n in mutated})}
    assert got_all.keys() == want_all.keys() and got_all
    assert all(bit_identical(got_all[k], want_all[k], k) for k in want_all)


@pytest.mark.parametrize("kind", ["csa", "swa"])  # SWA: the compressed pool and the indices left out (None)
def test_compile_fullgraph_attention_ops(kind: str) -> None:
    s_args, o_args, w_args = _args("sparse_attn", kind), _args("o_proj"), _args("window_kv_write")
    eager_pool = w_args["pool"].clone()

    def step(q, kv):
        o = lib.sparse_attn(**{**s_args, "q": q, "kv": kv}).o
        lib.window_kv_write(kv, w_args["pool"], w_args["start_pos"], window=CFG.sliding_window)
        return lib.o_proj(o.view(4, *o.shape[2:]), o_args["w"]).y

    torch._dynamo.reset()
    y = torch.compile(step, fullgraph=True, dynamic=False)(s_args["q"], w_args["kv"])
    o = dsv4.sparse_attn(**{**s_args, "kv": w_args["kv"]}).o
    dsv4.window_kv_write(w_args["kv"], eager_pool, w_args["start_pos"], window=CFG.sliding_window)
    assert bit_identical(y, dsv4.o_proj(o.view(4, *o.shape[2:]), o_args["w"]).y)
    assert all(
        bit_identical(a, b)
        for a, b in zip(w_args["pool"].tensors().values(), eager_pool.tensors().values(), strict=True)
    )

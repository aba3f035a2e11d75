"""An op's description is checked when it is made, and the registry keeps its word: a signature stub
that breaks the rules of ``OpDescriptor`` (``backend``, ``out=``, the result, the annotations) is
refused naming the rule; ``bind`` and ``backend_args`` name the argument that is missing, unknown or
not one; ``register_op``, ``get_op``, ``op_names`` and ``op_function`` do what their docstrings say."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import pytest
import torch

import dsv4
import dsv4.library as lib
from conftest import DEVICE
from dsv4.harness.cases import make_case, mutated_args, record_outputs
from dsv4.ops import (
    OpDescriptor,
    Output,
    Param,
    Tolerance,
    backends,
    get_op,
    op_function,
    op_names,
    register_op,
    registry,
)
from dsv4.ops.costs import OpCost
from dsv4.ops.registry import INT_OR_TENSOR, NO_DEFAULT


@dataclass
class _Gain:
    gain: torch.Tensor


class _Out(NamedTuple):
    y: torch.Tensor


def _good(
    x: torch.Tensor,
    w: _Gain | None,
    start_pos: int | torch.Tensor,
    *,
    eps: float = 1e-6,
    backend: str = "auto",
    out: _Out | None = None,
) -> _Out:
    """A toy op."""


def _no_backend(x: torch.Tensor, *, out: _Out | None = None) -> _Out:
    """No backend."""


def _positional_backend(x: torch.Tensor, backend: str = "auto", *, out: _Out | None = None) -> _Out:
    """``backend`` not keyword-only."""


def _other_default_backend(x: torch.Tensor, *, backend: str = "reference", out: _Out | None = None) -> _Out:
    """``backend`` defaulting to another backend."""


def _no_out(x: torch.Tensor, *, backend: str = "auto") -> _Out:
    """A result but no ``out=``."""


def _out_without_result(x: torch.Tensor, *, backend: str = "auto", out: _Out | None = None) -> None:
    """``out=`` on an op that only updates state."""


def _out_not_none(x: torch.Tensor, *, backend: str = "auto", out: _Out | None = 0) -> _Out:  # type: ignore[assignment]
    """``out=`` defaulting to something."""


def _positional_out(x: torch.Tensor, out: _Out | None = None, *, backend: str = "auto") -> _Out:
    """``out`` not keyword-only."""


def _plain_tuple(x: torch.Tensor, *, backend: str = "auto", out: tuple | None = None) -> tuple:
    """A tuple without field names."""


def _tensor_result(x: torch.Tensor, *, backend: str = "auto", out: torch.Tensor | None = None) -> torch.Tensor:
    """A bare tensor."""


def _optional_int(x: torch.Tensor, n: int | None, *, backend: str = "auto", out: _Out | None = None) -> _Out:
    """An optional int."""


def _int_or_float(x: torch.Tensor, n: int | float, *, backend: str = "auto", out: _Out | None = None) -> _Out:
    """An int or a float."""


def _tensor_or_str(x: torch.Tensor, n: torch.Tensor | str, *, backend: str = "auto", out: _Out | None = None) -> _Out:
    """A tensor or a str."""


def _tensor_int_or_none(
    x: torch.Tensor, n: torch.Tensor | int | None, *, backend: str = "auto", out: _Out | None = None
) -> _Out:
    """A tensor, an int or None."""


def _int_list(x: torch.Tensor, n: list[int], *, backend: str = "auto", out: _Out | None = None) -> _Out:
    """A list."""


def _reference(x: torch.Tensor, w: Any, start_pos: Any, eps: float, out: _Out | None = None) -> _Out:
    return _Out(x * 2)


def _describe(signature: Callable[..., Any], **changes: Any) -> OpDescriptor:
    fields: dict[str, Any] = dict(
        name="toy_described",
        signature=signature,
        outputs=(Output("y", Tolerance(0, 0)),),
        mutates=(),
        validate=lambda args, out: {},
        case_args=lambda case: {},
        cost=lambda *a, **k: OpCost("toy", {}, {}, {}),
        implementations={"reference": f"{__name__}:_reference"},
    )
    return OpDescriptor(**(fields | changes))


@pytest.mark.parametrize(
    ("stub", "words"),
    [
        (_no_backend, "keyword-only backend: str = 'auto'"),
        (_positional_backend, "keyword-only backend: str = 'auto'"),
        (_other_default_backend, "keyword-only backend: str = 'auto'"),
        (_no_out, "keyword-only out=None when"),
        (_out_without_result, "keyword-only out=None when"),
        (_out_not_none, "keyword-only out=None when"),
        (_positional_out, "keyword-only out=None when"),
        (_plain_tuple, "expected a NamedTuple or None"),
        (_tensor_result, "expected a NamedTuple or None"),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else None,
)
def test_a_stub_breaking_the_rules_of_backend_out_or_the_result_is_refused(stub: Callable, words: str) -> None:
    with pytest.raises(ValueError, match=f"^toy_described: .*{words}"):
        _describe(stub)


@pytest.mark.parametrize(
    ("stub", "arg"),
    [(_optional_int, "n"), (_int_or_float, "n"), (_tensor_or_str, "n"), (_int_list, "n"), (_tensor_int_or_none, "n")],
    ids=lambda v: v.__name__.strip("_") if callable(v) else None,
)
def test_an_annotation_no_op_takes_is_refused_naming_the_argument(stub: Callable, arg: str) -> None:
    """Only a tensor or a record of tensors may be optional; ``int | Tensor`` is the one union of two kinds."""
    with pytest.raises(ValueError, match=f"^toy_described: argument '{arg}' is annotated"):
        _describe(stub)


def test_the_params_are_the_stubs_arguments_but_backend_and_out() -> None:
    desc = _describe(_good)
    assert desc.params == (
        Param("x", torch.Tensor),
        Param("w", _Gain, NO_DEFAULT, False, True),
        Param("start_pos", INT_OR_TENSOR),
        Param("eps", float, 1e-6, True, False),
    )
    assert desc.result is _Out


def test_an_output_rule_no_comparator_has_is_refused() -> None:
    with pytest.raises(ValueError, match="^rule: expected one of .*'allclose'.*got 'nearly'"):
        Output("y", Tolerance(0, 0), "nearly")


def test_the_default_share_of_elements_past_the_tolerance_is_half_a_percent() -> None:
    """Spec §6: all but 0.5% of the elements within ``atol + rtol*|e|``."""
    assert Tolerance(1e-3, 1e-2).max_error_ratio == 0.005


def test_bind_fills_defaults_and_names_an_unknown_or_missing_argument() -> None:
    desc = _describe(_good)
    x = torch.zeros(2)
    assert desc.bind({"x": x, "w": None, "start_pos": 3}) == {"x": x, "w": None, "start_pos": 3, "eps": 1e-6}
    with pytest.raises(TypeError, match=r"^toy_described\(\) got an unexpected argument 'shift'"):
        desc.bind({"x": x, "w": None, "start_pos": 3, "shift": 1})
    with pytest.raises(TypeError, match=r"^toy_described\(\) missing the argument 'start_pos'"):
        desc.bind({"x": x, "w": None})


def test_validate_may_replace_arguments_and_nothing_else() -> None:
    x = torch.zeros(2)
    args = {"x": x, "w": None, "start_pos": 3}
    replacing = _describe(_good, validate=lambda args, out: {"start_pos": 4})
    assert replacing.backend_args(args) == (x, None, 4, 1e-6)
    adding = _describe(_good, validate=lambda args, out: {"start_pos": 4, "positions": 5})
    with pytest.raises(ValueError, match=r"^toy_described: validate returned \['positions'\], not arguments"):
        adding.backend_args(args)


def test_a_backend_the_op_lacks_is_named_with_those_it_has() -> None:
    desc = _describe(_good)
    assert desc.implementation("reference") is _reference
    lacks = r"^backend: toy_described has no 'triton' implementation \(it has: reference\)"
    with pytest.raises(ValueError, match=lacks):
        desc.implementation("triton")


def test_auto_takes_the_reference_for_an_op_without_the_backend_it_would_pick() -> None:
    """``backend='auto'`` on a CUDA device picks Triton (whose launchers would run there), and for an op
    that has no Triton implementation, its reference; naming Triton for it is refused. Nothing runs: the
    choice is made from the device's type."""
    desc = _describe(_good)
    assert backends.resolve("auto", "cuda") == "triton"
    assert backends.implementation(desc, "auto", "cuda") is _reference
    assert backends.op_backend(desc, "auto", "cuda") == "reference"
    with pytest.raises(ValueError, match=r"^backend: toy_described has no 'triton' implementation"):
        backends.implementation(desc, "triton", "cuda")
    assert backends.op_backend(get_op("indexer"), "auto", "cuda") == "triton"


def test_a_kind_is_taken_only_by_an_op_that_runs_differently_for_it() -> None:
    assert _describe(_good).kind_args(None) == {}
    no_kind = r"^kind: toy_described takes no kind \(it runs the same in every layer\), got 'csa'"
    with pytest.raises(ValueError, match=no_kind):
        _describe(_good).kind_args("csa")
    kinds = _describe(_good, kinds=("csa", "hca"))
    assert kinds.kind_args("hca") == {"kind": "hca"}
    assert kinds.kind_args("csa") == {"kind": "csa"}  # the first kind, named, as any other
    with pytest.raises(ValueError, match="^kind: toy_described takes one of csa, hca, got 'swa'"):
        kinds.kind_args("swa")


def test_an_output_the_op_lacks_is_a_key_error_naming_it() -> None:
    desc = _describe(_good)
    assert desc.output("y") is desc.outputs[0]
    with pytest.raises(KeyError, match="toy_described has no output 'q'"):
        desc.output("q")


def test_the_public_function_has_the_stubs_name_signature_annotations_and_doc() -> None:
    desc = _describe(_good)
    seen: list[tuple] = []

    def run(name: str, backend: str, out: Any, **args: Any) -> None:
        seen.append((name, backend, out, args))

    fn: Callable[..., Any] = op_function(desc, run, "toy.module")
    assert (fn.__name__, fn.__qualname__, fn.__module__) == ("toy_described", "toy_described", "toy.module")
    assert inspect.signature(fn) == inspect.signature(_good, eval_str=True)
    assert fn.__annotations__["start_pos"] == int | torch.Tensor and fn.__annotations__["return"] is _Out
    assert fn.__doc__ == "A toy op."
    assert op_function(desc, print, "toy.module", "Another doc.").__doc__ == "Another doc."
    x = torch.zeros(2)
    fn(x, None, 5, backend="reference")
    assert seen == [("toy_described", "reference", None, {"x": x, "w": None, "start_pos": 5, "eps": 1e-6})]


def test_a_name_is_registered_once() -> None:
    first = get_op("o_proj")
    with pytest.raises(ValueError, match="^op 'o_proj' is already registered"):
        register_op(dataclasses.replace(first))
    assert get_op("o_proj") is first


def test_an_unknown_op_is_named_with_those_there_are() -> None:
    with pytest.raises(ValueError, match=r"^op: expected one of qkv_proj_rope, .*o_proj.*, got 'qkv'"):
        get_op("qkv")


def test_op_names_with_a_backend_lists_the_ops_implemented_there() -> None:
    everything = op_names()
    assert {"qkv_proj_rope", "indexer", "o_proj", "sparse_attn"} <= set(everything)
    assert op_names("reference") == everything  # the reference implements every built-in op
    assert op_names("no_such_backend") == ()
    assert dsv4.ops.get_op("qkv_proj_rope").implementations.keys() >= {"reference", "triton"}


def test_a_listener_hears_of_the_ops_registered_before_it() -> None:
    heard: list[str] = []
    registry.on_register(lambda desc: heard.append(desc.name))
    try:
        assert heard == list(op_names())
    finally:
        registry._LISTENERS.pop()


@pytest.mark.parametrize("call", [dsv4.ops.call_op, lib.call], ids=["call_op", "library.call"])
def test_out_given_to_an_op_that_only_updates_state_is_refused_before_it_runs(call: Callable) -> None:
    """``indexer_compressor`` returns nothing: an ``out=`` would be dropped, so it is refused, naming
    ``out``, and the state is as it was."""
    case = make_case(dsv4.get_config("tiny"), "indexer_compressor", seed=5, device=DEVICE, batch=2, seq=3)
    records = {name: case.args[name] for name in mutated_args("indexer_compressor")}
    before = {k: v.clone() for k, v in record_outputs(records).items()}
    out = dsv4.QKV(*(torch.empty(1) for _ in range(4)))
    with pytest.raises(TypeError, match=r"^out: indexer_compressor takes no out= \(it updates its state in place\)"):
        call("indexer_compressor", "reference", out, **case.args)
    assert all(torch.equal(t, before[k]) for k, t in record_outputs(records).items())


def test_library_call_refuses_an_out_of_another_result_type() -> None:
    case = make_case(dsv4.get_config("tiny"), "o_proj", seed=5, device=DEVICE, batch=1, seq=2)
    y = dsv4.ops.o_proj(**case.args, backend="reference").y
    wrong = dsv4.QKV(torch.empty_like(y), y, y, y)
    with pytest.raises(TypeError, match="^out: expected OProjOut, got QKV"):
        lib.call("o_proj", "reference", wrong, **case.args)


@dataclass
class _Totals:
    """``total [N] fp32``, ``count [1] int64``."""

    total: torch.Tensor
    count: torch.Tensor


def _accumulate(x: torch.Tensor, state: _Totals, *, backend: str = "auto") -> None:
    """``state.total += x``, ``state.count += 1``: ``x [N] fp32``."""


def _accumulate_reference(x: torch.Tensor, state: _Totals) -> None:
    state.total += x
    state.count += 1


ACCUMULATE = _describe(
    _accumulate,
    name="toy_accumulate",
    outputs=(Output("state", Tolerance(0, 0), "exact"),),
    mutates=("state",),  # the whole record: each of its tensors
    implementations={"reference": f"{__name__}:_accumulate_reference"},
)


@pytest.fixture(scope="module")
def accumulate() -> Iterator[OpDescriptor]:
    """``toy_accumulate`` registered for the tests that use it (``torch.ops.dsv4.toy_accumulate`` stays
    defined: torch.library has no undefine)."""
    if not hasattr(torch.ops.dsv4, ACCUMULATE.name):
        register_op(ACCUMULATE)
    else:
        registry._REGISTRY[ACCUMULATE.name] = ACCUMULATE
    yield ACCUMULATE
    registry._REGISTRY.pop(ACCUMULATE.name)


def _totals() -> _Totals:
    return _Totals(torch.zeros(3, device=DEVICE), torch.zeros(1, dtype=torch.int64, device=DEVICE))


def test_an_op_updating_a_whole_record_declares_each_of_its_tensors_mutable(accumulate: OpDescriptor) -> None:
    schema = str(torch.ops.dsv4.toy_accumulate.default._schema)
    assert "Tensor(a0!) total, Tensor(a1!) count" in schema, schema
    state, x = _totals(), torch.arange(3.0, device=DEVICE)
    lib.call("toy_accumulate", "reference", None, x=x, state=state)
    dsv4.ops.call_op("toy_accumulate", "reference", x=x, state=state)
    assert state.total.tolist() == [0.0, 2.0, 4.0] and state.count.item() == 2


def test_a_record_the_op_updates_made_under_inference_mode_is_refused_outside_it(accumulate: OpDescriptor) -> None:
    with torch.inference_mode():
        state = _totals()
    with pytest.raises(ValueError, match="^state.total: an inference tensor .* toy_accumulate writes in place"):
        dsv4.ops.call_op("toy_accumulate", "reference", x=torch.ones(3, device=DEVICE), state=state)
    assert state.total.tolist() == [0.0, 0.0, 0.0] and state.count.item() == 0


def test_a_library_function_says_which_ints_it_takes_as_tensors() -> None:
    """``start_pos`` (``int | Tensor``) must be a tensor through ``torch.ops.dsv4``: its doc says so, first."""
    assert (lib.indexer.__doc__ or "").startswith(
        "``dsv4.indexer`` through ``torch.ops.dsv4.indexer``; ``start_pos`` must be an int tensor ``[B]``.\n\n"
        "Lightning indexer"
    )
    assert (lib.o_proj.__doc__ or "").startswith("``dsv4.o_proj`` through ``torch.ops.dsv4.o_proj``.\n\nGrouped FP8")

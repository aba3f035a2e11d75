"""One signature per op: an argument added to an op's description reaches every face of the op.

A copy of the indexer's descriptor gets one more argument, ``shift: int = 0`` (added to every
selected index after ``offset``), in one place: its signature stub (``with_argument``). Besides
that it needs what any new argument needs: its check (``_validate``) and its use in the backends
(``_reference``, ``_triton``). The test then finds the argument in the public function (signature,
default, keyword-only, docstring), the custom op's schema, the ``dsv4.library`` function, validation
and both backends, and its effect in the results."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pydoc
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import dsv4
from conftest import BACKENDS
from dsv4.library import library_function
from dsv4.ops import call_op, get_op, op_function, register_op, registry
from dsv4.ops.defs import INDEXER
from dsv4.ops.validate import check_int
from op_cases import case_at

CFG = dsv4.get_config("tiny")
NAME = "indexer_shifted"
SEEN: list[tuple[str, int]] = []  # (backend, shift) of every backend call


def with_argument(stub: Callable[..., Any], name: str, kind: type, default: Any, doc: str) -> Callable[..., Any]:
    """``stub`` with one more keyword-only argument ``name: kind = default`` before ``backend``: the
    edit a new argument makes to an op's signature stub."""
    sig = inspect.signature(stub, eval_str=True)
    params = list(sig.parameters.values())
    at = [p.name for p in params].index("backend")
    params.insert(at, inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=kind))

    def amended(*args: Any, **kwargs: Any) -> Any:
        """Replaced by ``stub``'s docstring below."""

    amended.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    # cleaned first: Python 3.13 strips a docstring's common indentation when it compiles it, 3.11 does not
    text = inspect.cleandoc(stub.__doc__ or "")
    amended.__doc__ = text.replace("\n    backend:", f"\n    {name}: {doc}\n    backend:", 1)
    return amended


def _validate(args: dict[str, Any], out: Any) -> dict[str, Any]:
    check_int("shift", args["shift"], 0)
    return INDEXER.validate({k: v for k, v in args.items() if k != "shift"}, out)


OFFSET = [p.name for p in INDEXER.params].index("offset")


def _shifted(backend: str, args: tuple[Any, ...], out: Any) -> Any:
    """The indexer of ``backend`` with ``shift`` added to ``offset`` (``args``: the shifted op's, in order)."""
    *rest, shift = args
    SEEN.append((backend, shift))
    rest[OFFSET] += shift
    return INDEXER.implementation(backend)(*rest, out=out)


def _reference(*args: Any, out: Any = None) -> Any:
    return _shifted("reference", args, out)


def _triton(*args: Any, out: Any = None) -> Any:
    return _shifted("triton", args, out)


SHIFTED = dataclasses.replace(
    INDEXER,
    name=NAME,
    signature=with_argument(INDEXER.signature, "shift", int, 0, "added to every selected index after ``offset``."),
    validate=_validate,
    implementations={"reference": f"{__name__}:_reference", "triton": f"{__name__}:_triton"},
)


@pytest.fixture(scope="module", autouse=True)
def shifted_op() -> Iterator[None]:
    """The shifted copy registered for this module's tests, then taken out of the registry
    (``torch.ops.dsv4.indexer_shifted`` stays defined: torch.library has no undefine)."""
    if not hasattr(torch.ops.dsv4, NAME):
        register_op(SHIFTED)
    else:
        registry._REGISTRY[NAME] = SHIFTED
    yield
    registry._REGISTRY.pop(NAME)


def shifted_function() -> Callable[..., Any]:
    """The public function of the shifted op: the indexer's signature with ``shift`` (so untyped here)."""
    return op_function(SHIFTED, call_op, __name__)


def _args() -> dict[str, Any]:
    return dict(case_at(CFG, "indexer", batch=2, seq=2, start=[5, 9], max_position=256).args)


def test_the_argument_is_in_the_public_function() -> None:
    shifted = shifted_function()
    p = inspect.signature(shifted).parameters["shift"]
    assert (p.kind, p.default, p.annotation) == (inspect.Parameter.KEYWORD_ONLY, 0, int)
    assert list(inspect.signature(shifted).parameters)[-3:] == ["shift", "backend", "out"]
    assert "shift: added to every selected index" in pydoc.render_doc(shifted)
    assert get_op(NAME).params[-1] == registry.Param("shift", int, 0, keyword_only=True)


def test_the_argument_is_in_the_custom_op_schema() -> None:
    for op in (torch.ops.dsv4.indexer_shifted, torch.ops.dsv4.indexer_shifted_out):
        assert "int topk, float eps, int shift, str backend" in str(op.default._schema)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_argument_reaches_the_backend(backend: str) -> None:
    args = _args()
    plain = dsv4.indexer(**{**args, "state": args["state"].clone(), "offset": args["offset"] + 3}, backend=backend)
    SEEN.clear()
    got = shifted_function()(**args, shift=3, backend=backend)
    assert [(backend, 3)] == SEEN
    assert torch.equal(got.topk_idxs, plain.topk_idxs) and torch.equal(got.score, plain.score)


def test_the_argument_reaches_dsv4_library_and_its_default_applies() -> None:
    args = _args()
    args["start_pos"] = args["start_pos"].clone()  # the custom op takes a tensor
    plain = dsv4.indexer(**{**args, "state": args["state"].clone()}, backend="reference")
    SEEN.clear()
    got = library_function(SHIFTED)(**args, backend="reference")  # shift left at its default
    assert SEEN == [("reference", 0)]
    assert torch.equal(got.topk_idxs, plain.topk_idxs)


@pytest.mark.parametrize(("value", "exc"), [(-1, ValueError), (1.5, TypeError)])
def test_the_argument_is_validated_before_any_work(value: Any, exc: type[Exception]) -> None:
    args = _args()
    before = args["state"].clone()
    SEEN.clear()
    with pytest.raises(exc, match="shift"):
        shifted_function()(**args, shift=value, backend="reference")
    assert not SEEN
    assert all(torch.equal(t, getattr(before, n)) for n, t in args["state"].tensors().items())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["qkv_proj_rope", "indexer_compressor", "indexer"])
def test_backends_take_the_descriptors_arguments_in_order(name: str, backend: str) -> None:
    """Each backend function takes the validated arguments positionally, in the order of the op's
    signature (``start_pos`` arrives validated, as ``pos``), then ``out=`` for ops with a result."""
    desc = get_op(name)
    got = list(inspect.signature(desc.implementation(backend)).parameters)
    expected = [{"start_pos": "pos"}.get(p.name, p.name) for p in desc.params]
    assert got[: len(expected)] == expected
    assert ("out" in got) == (desc.result is not None)


def test_the_public_functions_keep_their_signatures() -> None:
    """Keyword-only ``topk``, ``eps=1e-6``, ``backend="auto"``, ``out=None`` where the op returns."""
    sig = inspect.signature(dsv4.indexer)
    assert str(sig).startswith("(x: torch.Tensor, qr: torch.Tensor, qr_scale: torch.Tensor, w: ")
    kw = {n: p.default for n, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY}
    assert kw == {"topk": inspect.Parameter.empty, "eps": 1e-6, "backend": "auto", "out": None}
    compressor = inspect.signature(dsv4.indexer_compressor).parameters.values()
    assert [p.name for p in compressor if p.kind is p.KEYWORD_ONLY] == ["eps", "backend"]
    for fn in (dsv4.qkv_proj_rope, dsv4.indexer_compressor, dsv4.indexer):
        lib = getattr(dsv4.library, fn.__name__)
        assert fn.__doc__ is not None and lib.__doc__ is not None
        assert inspect.signature(lib) == inspect.signature(fn) and fn.__doc__ in lib.__doc__
        assert "[" in fn.__doc__ and "bf16" in fn.__doc__  # shapes and dtypes, for help()
    with pytest.raises(TypeError, match="too many positional"):  # topk, then eps, by position
        indexer: Callable[..., Any] = dsv4.indexer  # called as its signature forbids
        indexer(*INDEXER.bind(_args()).values(), backend="reference")


def test_dsv4_library_is_a_module() -> None:
    library = importlib.import_module("dsv4.library")
    assert library is dsv4.library is sys.modules["dsv4.library"] and str(library.__file__).endswith("library.py")
    for name in ("qkv_proj_rope", "indexer_compressor", "indexer", "call", "tensors_of"):
        assert callable(getattr(library, name)), name

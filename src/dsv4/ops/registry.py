"""One description per op, and the registry that every harness reads.

An ``OpDescriptor`` says everything about an op that is not its math: its public signature, its
outputs with the spec §6 tolerance of each, how its arguments are checked, how a seeded case of it
is built, what it must move through memory (the bytes model), and where each backend implements it.
The public functions (``dsv4.ops``), the custom ops (``torch.ops.dsv4``), ``dsv4.library``,
``dsv4 run``, ``dsv4 golden`` and ``dsv4 bench`` all read the registry instead of listing ops, so
adding an op is one reference function, one kernels module and one descriptor passed to ``register_op``.

**One signature per op.** The descriptor's ``signature`` is a typed stub, its body the docstring
alone: its parameters (names, annotations, defaults, which are keyword-only) and its docstring are
the op's public signature, once.
``params`` and ``result`` are read from it; ``op_function`` makes the public function (``dsv4.indexer``)
and the ``dsv4.library`` one from it; the custom op's schema is ``params`` flattened; validation gets
the bound arguments by name and the backends get them in ``params`` order (``backend_args``). Adding an
argument is one line in the stub, its check in ``validate``, and its use in the implementations.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, ParamSpec, TypeVar

import torch

from .case_inputs import CaseInputs
from .costs import OpCost


@dataclass(frozen=True)
class Tolerance:
    """``|a - e| <= atol + rtol*|e|`` for all but ``max_error_ratio`` of the elements."""

    atol: float
    rtol: float
    max_error_ratio: float = 0.005

    def __str__(self) -> str:
        return f"atol={self.atol:g} rtol={self.rtol:g} ratio={self.max_error_ratio:g}"


RULES = ("allclose", "score", "topk", "cache", "fp8_rows", "exact")


@dataclass(frozen=True)
class Output:
    """One output of an op, by name, with its spec §6 rule.

    ``rule``: ``allclose`` (the tolerance over the whole tensor), ``score`` (visible entries within
    the tolerance, masked entries -inf-like), ``topk`` (tie-tolerant indices, judged by the
    reference's ``score`` output within this tolerance), ``cache`` (rows the step wrote within the
    tolerance, every other row bit-identical), ``fp8_rows`` (a pool of FP8 KV rows, its tensors under
    ``name.``: the rows the step wrote decoded within the tolerance, the rest within one e4m3 step, scale
    bytes within 1; every other row bit-identical), ``exact`` (the tensor ``name``, or every tensor
    under ``name.``, bit-identical).
    """

    name: str
    tolerance: Tolerance
    rule: str = "allclose"

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"rule: expected one of {RULES}, got {self.rule!r}")


NO_DEFAULT = inspect.Parameter.empty  # a Param without a default
INT_OR_TENSOR = "int | Tensor"  # a Param kind: a custom op takes it as an int tensor
RESERVED = ("backend", "out")  # the stub's parameters every op function has that are not the op's arguments


@dataclass(frozen=True)
class Param:
    """A public argument, as the signature stub declares it: its name, its kind (``torch.Tensor``,
    ``int``, ``float``, ``str``, a dataclass of tensors such as the weights, ``RopeTable`` or
    ``IndexerState``, or ``INT_OR_TENSOR``: an int for every batch row or an int tensor ``[B]``), its
    default (``NO_DEFAULT`` when it has none), whether it is keyword-only, and whether it may be None
    (``optional``: annotated ``X | None``; a custom op takes each of its tensors as ``Tensor?``)."""

    name: str
    kind: Any
    default: Any = NO_DEFAULT
    keyword_only: bool = False
    optional: bool = False


def _kind(op: str, name: str, annotation: Any) -> tuple[Any, bool]:
    """``(the Param kind, optional)`` of an annotation of the signature stub of ``op``: a tensor or a
    dataclass of tensors may be optional (``X | None``)."""
    args = set(typing.get_args(annotation)) if isinstance(annotation, types.UnionType) else set()
    if len(args) == 2 and type(None) in args:
        (inner,) = args - {type(None)}
        if inner is torch.Tensor or dataclasses.is_dataclass(inner):
            return inner, True
    if annotation in (torch.Tensor, int, float, str) or dataclasses.is_dataclass(annotation):
        return annotation, False
    if args == {int, torch.Tensor}:
        return INT_OR_TENSOR, False
    raise ValueError(
        f"{op}: argument {name!r} is annotated {annotation!r}; an op takes tensors, int, float, str, "
        "dataclasses of tensors (either may be optional: X | None) and int | Tensor"
    )


def _keyword_default(p: inspect.Parameter | None, default: Any) -> bool:
    """Whether ``p`` is a keyword-only parameter with ``default``."""
    return p is not None and p.kind is p.KEYWORD_ONLY and p.default == default


P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class OpDescriptor(Generic[P, R]):
    """Everything the harnesses need to know about one op.

    Attributes:
        name: the op's name (``dsv4.ops.<name>``, ``torch.ops.dsv4.<name>``).
        signature: the op's public signature, as a typed stub (its body is never run): the op's
            arguments in order with their annotations, defaults and keyword-only marks, then
            ``backend: str = "auto"`` and, for an op that returns a result, ``out: <result> | None =
            None``, both keyword-only; the return annotation is the result ``NamedTuple`` (None when
            the op only updates state); the docstring is the public function's, with shapes and dtypes.
        outputs: every output by name with its rule: the result's fields, then the state tensors
            the op updates in place.
        mutates: what the op updates in place: params, or dotted paths of their tensors
            (``"state.keys"``).
        validate: ``(args, out) -> {name: value}``: spec §7 checks of the bound public ``args`` (a
            dict by name, defaults filled in) and of a preallocated ``out`` (None when not given),
            raising before anything runs; returns what the backends get in place of a public argument
            (``{"start_pos": StepPositions}``), ``{}`` when they get the arguments as they came.
        case_args: ``(CaseInputs) -> args``: the public arguments of a seeded case.
        cost: ``(cfg, start_pos, seq) -> OpCost``: minimal bytes and FLOPs for batch rows starting
            at ``start_pos`` with ``seq`` tokens each.
        kinds: the attention layer kinds (``"csa"``, ``"hca"``, ``"swa"``) the op runs differently
            for, the default first; ``case_args`` and ``cost`` then take ``kind=`` one of them
            (``kind_args``). Empty for an op that runs the same in every layer.
        implementations: backend name -> ``"module:function"``; each function takes the validated
            arguments positionally in ``params`` order (``backend_args``), and ``out=`` when the op
            has a result.
        fake_result: ``(args) -> result`` of empty tensors of the right shapes for the bound public
            ``args`` (the custom op's fake implementation); None when ``result`` is None.
        cache_bound: the op's cost grows with the key cache, so the benchmark runs it at several
            cache lengths.
        params: the public arguments in order, ``backend`` and ``out`` excluded (from ``signature``).
            The custom op's schema is these, each dataclass flattened to its tensors.
        result: the ``NamedTuple`` the op returns (its fields are the first outputs), or None (from
            ``signature``'s return annotation).
    """

    name: str
    signature: Callable[P, R]
    outputs: tuple[Output, ...]
    mutates: tuple[str, ...]
    validate: Callable[[dict[str, Any], Any], dict[str, Any]]
    case_args: Callable[[CaseInputs], dict[str, Any]]
    cost: Callable[..., OpCost]
    implementations: Mapping[str, str]
    fake_result: Callable[[dict[str, Any]], tuple[torch.Tensor, ...]] | None = None
    cache_bound: bool = False
    kinds: tuple[str, ...] = ()
    params: tuple[Param, ...] = field(init=False)
    result: type[Any] | None = field(init=False)
    _sig: inspect.Signature = field(init=False, compare=False, repr=False)
    _impls: dict[str, Callable[..., Any]] = field(default_factory=dict, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        sig = inspect.signature(self.signature, eval_str=True)
        result = None if sig.return_annotation in (None, type(None)) else sig.return_annotation
        if result is not None and not (
            isinstance(result, type) and issubclass(result, tuple) and getattr(result, "_fields", None)
        ):
            raise ValueError(f"{self.name}: the signature returns {result!r}; expected a NamedTuple or None")
        stub = sig.parameters
        if not _keyword_default(stub.get("backend"), "auto"):
            raise ValueError(f"{self.name}: the signature needs a keyword-only backend: str = 'auto'")
        if ("out" in stub) != (result is not None) or ("out" in stub and not _keyword_default(stub["out"], None)):
            raise ValueError(
                f"{self.name}: the signature needs a keyword-only out=None when (and only when) it returns"
            )
        params = []
        for p in stub.values():
            if p.name not in RESERVED:
                kind, optional = _kind(self.name, p.name, p.annotation)
                params.append(Param(p.name, kind, p.default, p.kind is p.KEYWORD_ONLY, optional))
        object.__setattr__(self, "params", tuple(params))
        object.__setattr__(self, "result", result)
        object.__setattr__(self, "_sig", sig)

    def kind_args(self, kind: str | None) -> dict[str, str]:
        """The keyword arguments that put ``case_args`` and ``cost`` in a layer of ``kind``: ``{}`` for
        None (the op's default), else ``{"kind": kind}``; a ``ValueError`` naming ``kind`` when the op
        does not run differently for it."""
        if kind is None:
            return {}
        if kind not in self.kinds:
            takes = f"one of {', '.join(self.kinds)}" if self.kinds else "no kind (it runs the same in every layer)"
            raise ValueError(f"kind: {self.name} takes {takes}, got {kind!r}")
        return {"kind": kind}

    def output(self, name: str) -> Output:
        """The output called ``name``."""
        for o in self.outputs:
            if o.name == name:
                return o
        raise KeyError(f"{self.name} has no output {name!r}")

    def bind(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """The public ``args`` (by name) in ``params`` order with the defaults filled in; ``TypeError``
        naming an argument that is missing or that the op does not take."""
        names = [p.name for p in self.params]
        unknown = [n for n in args if n not in names]
        if unknown:
            raise TypeError(f"{self.name}() got an unexpected argument {unknown[0]!r}")
        bound = {}
        for p in self.params:
            if p.name in args:
                bound[p.name] = args[p.name]
            elif p.default is NO_DEFAULT:
                raise TypeError(f"{self.name}() missing the argument {p.name!r}")
            else:
                bound[p.name] = p.default
        return bound

    def backend_args(self, args: Mapping[str, Any], out: Any = None) -> tuple[Any, ...]:
        """``validate`` the public ``args`` (and ``out``) -> the backends' positional arguments, in
        ``params`` order (the validated form of an argument in its place)."""
        bound = self.bind(args)
        replaced = self.validate(dict(bound), out)
        if not set(replaced) <= set(bound):
            raise ValueError(f"{self.name}: validate returned {sorted(set(replaced) - set(bound))}, not arguments")
        bound.update(replaced)
        return tuple(bound.values())

    def implementation(self, backend: str) -> Callable[..., Any]:
        """The function of ``backend`` (imported on first use: a backend may be an optional dependency)."""
        fn = self._impls.get(backend)
        if fn is None:
            if backend not in self.implementations:
                raise ValueError(
                    f"backend: {self.name} has no {backend!r} implementation (it has: "
                    f"{', '.join(self.implementations)}); pass backend='auto' or one of those"
                )
            module, _, attr = self.implementations[backend].partition(":")
            fn = getattr(importlib.import_module(module), attr)
            self._impls[backend] = fn
        return fn


def op_function(
    desc: OpDescriptor[P, R], run: Callable[..., Any], module: str, doc: str | None = None
) -> Callable[P, R]:
    """A function with ``desc``'s public signature (``__signature__``, annotations) and docstring (or
    ``doc``): it binds its arguments as Python would and returns ``run(desc.name, backend, out,
    **args)`` with the op's public ``args`` by name. ``module`` is where it is documented."""
    sig = desc._sig

    def op(*args: P.args, **kwargs: P.kwargs) -> R:
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
        backend, out = values.pop("backend"), values.pop("out", None)
        return run(desc.name, backend, out, **values)

    op.__name__ = op.__qualname__ = desc.name
    op.__module__ = module
    op.__doc__ = inspect.cleandoc(desc.signature.__doc__ or "") if doc is None else doc
    op.__signature__ = sig  # type: ignore[attr-defined]
    op.__annotations__ = {p.name: p.annotation for p in sig.parameters.values()} | {"return": sig.return_annotation}
    return op


_REGISTRY: dict[str, OpDescriptor] = {}
_LISTENERS: list[Callable[[OpDescriptor], None]] = []


def register_op(desc: OpDescriptor) -> OpDescriptor:
    """Add ``desc`` to the registry (its name must be new) and tell every listener
    (``torch.ops.dsv4`` registers its custom ops this way); a listener that raises leaves it out."""
    if desc.name in _REGISTRY:
        raise ValueError(f"op {desc.name!r} is already registered")
    _REGISTRY[desc.name] = desc
    try:
        for listen in _LISTENERS:
            listen(desc)
    except BaseException:
        del _REGISTRY[desc.name]
        raise
    return desc


def on_register(listen: Callable[[OpDescriptor], None]) -> None:
    """Call ``listen`` for every op registered so far and every op registered later."""
    _LISTENERS.append(listen)
    for desc in list(_REGISTRY.values()):
        listen(desc)


def get_op(name: str) -> OpDescriptor:
    """The descriptor of ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"op: expected one of {', '.join(_REGISTRY)}, got {name!r}") from None


def op_names(backend: str | None = None) -> tuple[str, ...]:
    """Every registered op, in registration order; with ``backend``, those implemented there."""
    return tuple(n for n, d in _REGISTRY.items() if backend is None or backend in d.implementations)

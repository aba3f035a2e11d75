"""One description per op, and the registry that every harness reads.

An ``OpDescriptor`` says everything about an op that is not its math: its public arguments, its
outputs with the spec §6 tolerance of each, how its arguments are checked, how a seeded case of it
is built, what it must move through memory (the bytes model), and where each backend implements it.
The public functions (``dsv4.ops``), the custom ops (``torch.ops.dsv4``), ``dsv4 run``,
``dsv4 golden`` and ``dsv4 bench`` all read the registry instead of listing ops, so adding an op is
one reference function, one kernels module and one descriptor passed to ``register_op``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..model.config import DeepSeekV4Config
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
    ``name.``: the rows the step wrote decoded within the tolerance and within one e4m3 step, scale
    bytes within 1; every other row bit-identical), ``exact`` (the tensor ``name``, or every tensor
    under ``name.``, bit-identical).
    """

    name: str
    tolerance: Tolerance
    rule: str = "allclose"

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"rule: expected one of {RULES}, got {self.rule!r}")


@dataclass(frozen=True)
class Param:
    """A public argument: its name and kind (``torch.Tensor``, ``int``, ``float``, ``str``, a
    dataclass of tensors such as the weights, ``RopeTable`` or ``IndexerState``, or
    ``INT_OR_TENSOR``: an int for every batch row or an int tensor ``[B]``). ``optional``: the
    argument may be None (a custom op takes each of its tensors as ``Tensor?``)."""

    name: str
    kind: Any
    optional: bool = False


INT_OR_TENSOR = "int | Tensor"  # a Param kind: a custom op takes it as an int tensor


@dataclass(frozen=True)
class OpDescriptor:
    """Everything the harnesses need to know about one op.

    Attributes:
        name: the op's name (``dsv4.ops.<name>``, ``torch.ops.dsv4.<name>``).
        params: the public arguments in order, ``backend`` and ``out`` excluded; ``eps`` last when
            the op has one. The custom op's schema is these, each dataclass flattened to its tensors.
        outputs: every output by name with its rule: the result's fields, then the state tensors
            the op updates in place.
        result: the ``NamedTuple`` the op returns (its fields are the first outputs), or None when
            the op only updates state.
        mutates: what the op updates in place: params, or dotted paths of their tensors
            (``"state.keys"``).
        validate: ``(**args, out=None) -> backend kwargs``: spec §7 checks of every public argument
            and of a preallocated ``out`` (ops with a ``result`` take one), raising before anything
            runs; returns the keyword arguments of the backend functions (``out`` not included).
        case_args: ``(CaseInputs) -> args``: the public arguments of a seeded case.
        cost: ``(cfg, start_pos, seq) -> OpCost``: minimal bytes and FLOPs for batch rows starting
            at ``start_pos`` with ``seq`` tokens each.
        fake_result: ``(**args) -> tuple of tensors``: empty outputs of the right shapes (the custom
            op's fake implementation); None when ``result`` is None.
        implementations: backend name -> ``"module:function"``; each function takes the backend
            kwargs (and ``out=`` when the op has a ``result``).
        cache_bound: the op's cost grows with the key cache, so the benchmark runs it at several
            cache lengths.
    """

    name: str
    params: tuple[Param, ...]
    outputs: tuple[Output, ...]
    result: type | None
    mutates: tuple[str, ...]
    validate: Callable[..., dict[str, Any]]
    case_args: Callable[[CaseInputs], dict[str, Any]]
    cost: Callable[[DeepSeekV4Config, Sequence[int], int], OpCost]
    implementations: Mapping[str, str]
    fake_result: Callable[..., tuple[torch.Tensor, ...]] | None = None
    cache_bound: bool = False
    _impls: dict[str, Callable[..., Any]] = field(default_factory=dict, compare=False, repr=False)

    def output(self, name: str) -> Output:
        """The output called ``name``."""
        for o in self.outputs:
            if o.name == name:
                return o
        raise KeyError(f"{self.name} has no output {name!r}")

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


_REGISTRY: dict[str, OpDescriptor] = {}
_LISTENERS: list[Callable[[OpDescriptor], None]] = []


def register_op(desc: OpDescriptor) -> OpDescriptor:
    """Add ``desc`` to the registry (its name must be new) and tell every listener
    (``torch.ops.dsv4`` registers its custom ops this way)."""
    if desc.name in _REGISTRY:
        raise ValueError(f"op {desc.name!r} is already registered")
    _REGISTRY[desc.name] = desc
    for listen in _LISTENERS:
        listen(desc)
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


def op_names() -> tuple[str, ...]:
    """Every registered op, in registration order."""
    return tuple(_REGISTRY)

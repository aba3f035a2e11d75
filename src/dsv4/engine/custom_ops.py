"""Every registered op as a ``torch.library`` custom op, so ``torch.compile`` and CUDA graphs take it whole.

``torch.ops.dsv4.<op>`` takes the op's public arguments with every dataclass (weights, RoPE table,
state) flattened to its tensors, in field order, and ``start_pos`` as an int tensor ``[B]`` (never a
Python int, which would specialize a compiled graph on every step); then ``backend``. The schema is
derived from the op's descriptor: the tensors of the arguments the op updates in place are declared
mutable, and ops that take ``out=`` also get ``torch.ops.dsv4.<op>_out``, which writes into
preallocated outputs. Each op has a fake implementation (shapes only), from its descriptor.

``call`` runs an op through them with the dataclass arguments of ``dsv4``; ``dsv4.library`` has a
typed function per op made from it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..model.fields import build, leaf_kinds, leaves
from ..ops.api import call_op
from ..ops.registry import INT_OR_TENSOR, OpDescriptor, get_op, on_register

_SCALARS = {int: "int", float: "float", str: "str"}


def _flat_params(desc: OpDescriptor) -> list[tuple[str, str, bool]]:
    """``(leaf name, schema type, mutable)`` of every flattened public argument of ``desc``; the
    tensors of an optional argument are ``Tensor?``."""
    flat = []
    for p in desc.params:
        for path, kind in leaf_kinds(p.kind, p.name):
            schema_type = "Tensor" if kind in (Tensor, INT_OR_TENSOR) else _SCALARS[kind]
            if p.optional:
                schema_type += "?"
            mutable = any(path == m or path.startswith(m + ".") for m in desc.mutates)
            flat.append((path, schema_type, mutable))
    names = _leaf_names([path for path, _, _ in flat])
    return [(name, t, m) for name, (_, t, m) in zip(names, flat, strict=True)]


def _leaf_names(paths: list[str]) -> list[str]:
    """Custom-op argument names: the last field of each dotted path (``w.compressor.wkv`` -> ``wkv``),
    or, where two arguments would share it, the whole path (``window_pool.nope`` -> ``window_pool_nope``)."""
    last = [path.rsplit(".", 1)[-1] for path in paths]
    names = [n if last.count(n) == 1 else path.replace(".", "_") for n, path in zip(last, paths, strict=True)]
    if len(set(names)) != len(names):
        raise ValueError(f"flattened argument names repeat: {names}")
    return names


def _in_order(items: list[Any]) -> Any:
    """A ``build`` leaf function handing out ``items`` in order."""
    it = iter(items)
    return lambda _: next(it)


def _leaf_count(kind: object, name: str) -> int:
    return sum(1 for _ in leaf_kinds(kind, name))


def _schema(desc: OpDescriptor, out: bool) -> str:
    """The custom-op schema of ``desc`` (or of its ``_out`` variant)."""
    flat = _flat_params(desc) + [("backend", "str", False)]
    if out and desc.result is not None:
        flat += [(f, "Tensor", True) for f in desc.result._fields]
    args, alias = [], 0
    for name, schema_type, mutable in flat:
        if mutable:
            schema_type, alias = f"Tensor(a{alias}!)", alias + 1
        args.append(f"{schema_type} {name}")
    returns = "()" if out or desc.result is None else _returns(len(desc.result._fields))
    return f"({', '.join(args)}) -> {returns}"


def _returns(n: int) -> str:
    """The schema's return type for ``n`` tensors (a single tensor is not a tuple)."""
    return "Tensor" if n == 1 else "(" + ", ".join(["Tensor"] * n) + ")"


def _as_returned(result: Any) -> Any:
    """A result ``NamedTuple`` as the custom op returns it: None, one tensor, or a tuple."""
    if result is None:
        return None
    return result[0] if len(result) == 1 else tuple(result)


def _unflatten(desc: OpDescriptor, flat: tuple[Any, ...]) -> tuple[dict[str, Any], str, tuple[Any, ...]]:
    """``(public args, backend, the rest)`` from a custom op's flat arguments (an optional argument
    whose tensors are all None is None)."""
    values = iter(flat)
    args: dict[str, Any] = {}
    for p in desc.params:
        mine = [next(values) for _ in range(_leaf_count(p.kind, p.name))]
        if p.optional and all(v is None for v in mine):
            args[p.name] = None
            continue
        args[p.name] = build(p.kind, p.name, _in_order(mine))
    backend = next(values)
    return args, backend, tuple(values)


def flatten(desc: OpDescriptor, args: dict[str, Any]) -> list[Any]:
    """The flat arguments of ``torch.ops.dsv4.<op>`` for public ``args`` (by name, defaults filled in
    from the op's signature; ``backend`` not included; an optional argument that is None is None in
    each of its places)."""
    bound = desc.bind(args)
    for p in desc.params:
        # `is`, not `==`: a kind may be a dataclass (the weights), and Dynamo on torch 2.11 traces
        # `kind == ...` into that class's `__eq__` as an instance method (and fails); an identity test
        # it decides at trace time
        if p.kind is INT_OR_TENSOR and not isinstance(bound[p.name], Tensor):
            got = type(bound[p.name]).__name__
            raise TypeError(f"{p.name}: torch.ops.dsv4.{desc.name} takes an int tensor [B], got {got}")
    flat: list[Any] = []
    for p in desc.params:
        if bound[p.name] is None and p.optional:
            flat += [None] * _leaf_count(p.kind, p.name)
        else:
            flat += [leaf for _, leaf in leaves(bound[p.name], p.name)]
    return flat


def _register(desc: OpDescriptor) -> None:
    """Define ``torch.ops.dsv4.<op>`` (and ``<op>_out`` when the op takes ``out=``) for ``desc``."""

    def impl(*flat: Any) -> Any:
        args, backend, _ = _unflatten(desc, flat)
        return _as_returned(call_op(desc.name, backend, **args))

    def fake(*flat: Any) -> Any:
        args, _, _ = _unflatten(desc, flat)
        return None if desc.fake_result is None else _as_returned(desc.fake_result(args))

    mutated = [n for n, _, m in _flat_params(desc) if m]
    op = torch.library.custom_op(f"dsv4::{desc.name}", impl, mutates_args=mutated, schema=_schema(desc, False))
    op.register_fake(fake)
    result = desc.result
    if result is None:
        return

    def impl_out(*flat: Any) -> None:
        args, backend, out = _unflatten(desc, flat)
        call_op(desc.name, backend, result(*out), **args)

    outs = list(result._fields)
    op_out = torch.library.custom_op(
        f"dsv4::{desc.name}_out", impl_out, mutates_args=mutated + outs, schema=_schema(desc, True)
    )
    op_out.register_fake(lambda *flat: None)


on_register(_register)


def call(name: str, backend: str = "auto", out: Any = None, **args: Any) -> Any:
    """Op ``name`` through ``torch.ops.dsv4`` on its public ``args`` (as ``dsv4.ops.call_op`` takes
    them, with ``start_pos`` an int tensor ``[B]``). Returns the op's result (written into ``out``
    when given)."""
    desc = get_op(name)
    if out is not None and desc.result is None:
        raise TypeError(f"out: {name} takes no out= (it updates its state in place)")
    flat = [*flatten(desc, args), backend]
    if out is not None:
        getattr(torch.ops.dsv4, f"{name}_out")(*flat, *out)
        return out
    result = getattr(torch.ops.dsv4, name)(*flat)
    if desc.result is None:
        return None
    return desc.result(result) if len(desc.result._fields) == 1 else desc.result(*result)


def tensors_of(value: Any) -> list[Tensor]:
    """The tensors of a dataclass argument (weights, RoPE table, state) in the custom ops' order."""
    return [leaf for _, leaf in leaves(value, "")]

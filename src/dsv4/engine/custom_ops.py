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
from ..ops.registry import INT_OR_TENSOR, OpDescriptor, Param, get_op, on_register
from ..ops.validate import same_device

_SCALARS = {int: "int", float: "float", str: "str"}
_KIND_NAMES = {int: "an int", float: "a float", str: "a str"}

# the dotted leaf paths of each registered op's public arguments, worked out once at registration:
# a traced call looks them up (walking a dataclass's type hints there is not traceable)
_PATHS: dict[str, tuple[tuple[str, ...], ...]] = {}


def _flat_params(desc: OpDescriptor) -> list[tuple[str, str, bool]]:
    """``(leaf name, schema type, mutable)`` of every flattened public argument of ``desc``; the
    tensors of an optional argument are ``Tensor?``."""
    flat = []
    for p in desc.params:
        for path, kind in leaf_kinds(p.kind, p.name):
            if kind not in (Tensor, INT_OR_TENSOR, *_SCALARS):
                raise ValueError(
                    f"op {desc.name!r}: {path} is {kind!r}; a custom op's arguments are tensors, ints, floats, "
                    "strs and dataclasses of them"
                )
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


def _leaf_paths(desc: OpDescriptor) -> tuple[tuple[str, ...], ...]:
    """The dotted leaf paths of each of ``desc``'s public arguments, in order."""
    return tuple(tuple(path for path, _ in leaf_kinds(p.kind, p.name)) for p in desc.params)


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
    for p, paths in zip(desc.params, _PATHS[desc.name], strict=True):
        mine = [next(values) for _ in paths]
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
        _check_kind(desc, p, bound[p.name])
    flat: list[Any] = []
    for p, paths in zip(desc.params, _PATHS[desc.name], strict=True):
        if bound[p.name] is None and p.optional:
            flat += [None] * len(paths)
        else:
            flat += [leaf for _, leaf in leaves(bound[p.name], p.name)]
    return flat


def _check_kind(desc: OpDescriptor, p: Param, value: Any) -> None:
    """``TypeError`` naming ``p`` unless ``value`` is of its kind: the schema would turn a bool into an
    int or a float, and spread a record of another class over the wrong arguments."""
    # `is`, not `==` or `in`: a kind may be a dataclass (the weights), and Dynamo on torch 2.11 traces
    # `kind == ...` into that class's `__eq__` as an instance method (and fails); an identity test it
    # decides at trace time
    kind, got = p.kind, type(value).__name__
    if value is None and p.optional:
        return
    if kind is INT_OR_TENSOR:
        if not isinstance(value, Tensor):
            raise TypeError(f"{p.name}: torch.ops.dsv4.{desc.name} takes an int tensor [B], got {got}")
    elif kind is Tensor:
        if not isinstance(value, Tensor):
            raise TypeError(f"{p.name}: expected a torch.Tensor, got {got}")
    elif kind is int or kind is float or kind is str:
        number = isinstance(value, int) or (kind is float and isinstance(value, float))
        if isinstance(value, bool) or not (isinstance(value, str) if kind is str else number):
            raise TypeError(f"{p.name}: expected {_KIND_NAMES[kind]}, got {got}")
        if kind is int and not -(2**63) <= value < 2**63:
            raise ValueError(f"{p.name}: expected an int64 (the schema's int), got {value}")
    elif not isinstance(value, kind):
        raise TypeError(f"{p.name}: expected {kind.__name__}, got {got}")


def _check_one_device(desc: OpDescriptor, flat: tuple[Any, ...], out_names: tuple[str, ...] = ()) -> None:
    """The fake implementations' device check: every tensor on the device of the first one, ``start_pos``
    there or on the CPU (spec §7). A call holding a ``meta`` tensor among real ones reaches the fake
    implementation, which writes nothing; the real implementation would have refused it."""
    names = [path for paths in _PATHS[desc.name] for path in paths]
    host_ok = {path for p, paths in zip(desc.params, _PATHS[desc.name], strict=True) if p.kind is INT_OR_TENSOR
               for path in paths}  # fmt: skip
    values = [*flat[: len(names)], *flat[len(names) + 1 :]]  # the backend's name between args and outs
    device = None
    for name, value in zip([*names, *out_names], values, strict=True):
        if not isinstance(value, Tensor):
            continue
        if device is None and name not in host_ok:
            device = value.device
        elif device is not None and not same_device(value.device, device):
            if name in host_ok and value.device.type == "cpu":
                continue
            raise ValueError(f"{name}: expected device {device}, got {value.device}")


def _register(desc: OpDescriptor) -> None:
    """Define ``torch.ops.dsv4.<op>`` (and ``<op>_out`` when the op takes ``out=``) for ``desc``."""

    def impl(*flat: Any) -> Any:
        args, backend, _ = _unflatten(desc, flat)
        return _as_returned(call_op(desc.name, backend, **args))

    def fake(*flat: Any) -> Any:
        _check_one_device(desc, flat)
        args, _, _ = _unflatten(desc, flat)
        return None if desc.fake_result is None else _as_returned(desc.fake_result(args))

    params = _flat_params(desc)
    schemas = _schema(desc, False), _schema(desc, True)
    _PATHS[desc.name] = _leaf_paths(desc)
    mutated = [n for n, _, m in params if m]
    op = torch.library.custom_op(f"dsv4::{desc.name}", impl, mutates_args=mutated, schema=schemas[0])
    op.register_fake(fake)
    result = desc.result
    if result is None:
        return
    if not mutated:  # outputs without a gradient (a mutating op cannot take an autograd formula)
        op.register_autograd(_no_gradient, setup_context=_outputs_not_differentiable)

    def impl_out(*flat: Any) -> None:
        args, backend, out = _unflatten(desc, flat)
        call_op(desc.name, backend, result(*out), **args)

    outs = list(result._fields)
    out_names = tuple(f"out.{f}" for f in outs)
    op_out = torch.library.custom_op(f"dsv4::{desc.name}_out", impl_out, mutates_args=mutated + outs, schema=schemas[1])
    op_out.register_fake(lambda *flat: _check_one_device(desc, flat, out_names))


def _outputs_not_differentiable(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    ctx.mark_non_differentiable(*(output if isinstance(output, tuple) else (output,)))
    ctx.inputs = len(inputs)


def _no_gradient(ctx: Any, *grads: Any) -> tuple[None, ...]:
    return (None,) * ctx.inputs


on_register(_register)


def call(name: str, backend: str = "auto", out: Any = None, **args: Any) -> Any:
    """Op ``name`` through ``torch.ops.dsv4`` on its public ``args`` (as ``dsv4.ops.call_op`` takes
    them, with ``start_pos`` an int tensor ``[B]``). Returns the op's result (written into ``out``
    when given)."""
    desc = get_op(name)
    if out is not None:
        if desc.result is None:
            raise TypeError(f"out: {name} takes no out= (it updates its state in place)")
        if not isinstance(out, desc.result):
            raise TypeError(f"out: expected {desc.result.__name__}, got {type(out).__name__}")
    flat = [*flatten(desc, args), backend]
    with torch.no_grad():  # no op has a gradient: weights that require one give outputs that do not
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

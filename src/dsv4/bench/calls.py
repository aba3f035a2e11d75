"""One op of a ``Case`` bound to one backend, ready to be called again and again.

The arguments are validated once (as ``dsv4.ops`` would) and the backend function is called
directly, so what is timed or counted is the backend's work, not the argument checks. Each bound
call owns a copy of the caller state. The stateful ops (``indexer_compressor``, ``indexer``) are
measured by applying the same step to that state repeatedly: every call writes the same ring
slots and cache rows and reads the same cache rows, so each repetition does the same work (the
values drift; sizes and addresses do not).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..harness.cases import Case, clone_args, mutated_args, record_outputs
from ..ops.backends import BACKENDS, unavailable_reason
from ..ops.registry import get_op

COMPILED = "compile"  # torch.compile of the reference backend
LIBRARY = "library"  # the op composed of library calls (cuBLAS GEMMs, torch.topk): ``baseline.py``
BENCH_BACKENDS = (*BACKENDS, COMPILED, LIBRARY)
GPU_BACKENDS = ("triton", "reference", COMPILED, LIBRARY)  # what dsv4 bench times on a GPU by default


@dataclass
class BoundCall:
    """``op`` of a case on ``backend``: call it to run one step on its own ``state`` (the records the
    op updates, by argument name; None when it updates none)."""

    op: str
    backend: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]  # the backend's arguments, validated (``OpDescriptor.backend_args``)
    state: dict[str, Any] | None

    def __call__(self) -> Any:
        return self.fn(*self.args)

    def outputs(self, result: Any) -> dict[str, torch.Tensor]:
        """``result`` of a call and the state after it, by output name (as ``golden.compare`` wants)."""
        out: dict[str, torch.Tensor] = {} if result is None else dict(result._asdict())
        if self.state:
            out.update(record_outputs(self.state))
        return out


def backend_reason(backend: str, device: torch.device | str) -> str | None:
    """Why ``backend`` cannot run on ``device`` (None when it can); ``compile`` and ``library`` follow the reference."""
    if backend in (COMPILED, LIBRARY):
        return unavailable_reason("reference", device)
    return unavailable_reason(backend, device)


# The reference's loops index rows by a Python int, which Dynamo specializes: each row index would
# compile its frame again (seconds each; at B=64 the indexer's compile ran past its step's 90 s). Past
# this many compiles a frame runs eagerly, as it does past Dynamo's default of 8.
COMPILE_RECOMPILE_LIMIT = 2


def compiled_reference(op: str) -> Callable[..., Any]:
    """``torch.compile`` of ``op``'s reference for one shape: compiled on its first call, reused by the
    calls after it (the check, the warm-up, the timing). Dynamo's caches are cleared first, so each
    shape starts with the whole recompile allowance (``COMPILE_RECOMPILE_LIMIT``)."""
    torch.compiler.reset()
    torch._dynamo.config.cache_size_limit = COMPILE_RECOMPILE_LIMIT
    return torch.compile(get_op(op).implementation("reference"), options={"emulate_precision_casts": True})


def bind(case: Case, backend: str) -> BoundCall:
    """``case``'s op on ``backend`` with validated arguments and a private copy of the state."""
    if backend not in BENCH_BACKENDS:
        raise ValueError(f"backend: expected one of {BENCH_BACKENDS}, got {backend!r}")
    desc = get_op(case.op)
    if backend == COMPILED:
        fn = compiled_reference(case.op)
    elif backend == LIBRARY:
        from . import baseline

        fn = getattr(baseline, case.op)
    else:
        fn = desc.implementation(backend)
    args = clone_args(case.args, case.op)
    state = {name: args[name] for name in mutated_args(case.op) if name in args}
    return BoundCall(case.op, backend, fn, desc.backend_args(args), state or None)

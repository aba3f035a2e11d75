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

from ..harness.cases import Case
from ..model.state import IndexerState
from ..ops.backends import BACKENDS, unavailable_reason
from ..ops.registry import get_op

COMPILED = "compile"  # torch.compile of the reference backend
LIBRARY = "library"  # the op composed of library calls (cuBLAS GEMMs, torch.topk): ``baseline.py``
BENCH_BACKENDS = (*BACKENDS, COMPILED, LIBRARY)


@dataclass
class BoundCall:
    """``op`` of a case on ``backend``: call it to run one step on its own ``state``."""

    op: str
    backend: str
    fn: Callable[..., Any]
    kwargs: dict[str, Any]
    state: IndexerState | None

    def __call__(self) -> Any:
        return self.fn(**self.kwargs)

    def outputs(self, result: Any) -> dict[str, torch.Tensor]:
        """``result`` of a call and the state after it, by output name (as ``golden.compare`` wants)."""
        out: dict[str, torch.Tensor] = {} if result is None else dict(result._asdict())
        if self.state is not None:
            out.update(self.state.tensors())
        return out


def backend_reason(backend: str, device: torch.device | str) -> str | None:
    """Why ``backend`` cannot run on ``device`` (None when it can); ``compile`` and ``library`` follow the reference."""
    if backend in (COMPILED, LIBRARY):
        return unavailable_reason("reference", device)
    return unavailable_reason(backend, device)


_COMPILED: dict[str, Callable[..., Any]] = {}  # op -> torch.compile of its reference, reused across shapes


def compiled_reference(op: str) -> Callable[..., Any]:
    """``torch.compile`` of ``op``'s reference, made once per op: each shape compiles on its first call
    and later calls at that shape reuse it. Ints that differ between calls (a row index in the
    reference's loops) become symbolic after the first change instead of recompiling each value."""
    fn = _COMPILED.get(op)
    if fn is None:
        reference = get_op(op).implementation("reference")
        fn = _COMPILED[op] = torch.compile(reference, options={"emulate_precision_casts": True})
    return fn


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
    args = dict(case.args)
    state = args["state"].clone() if "state" in args else None
    if state is not None:
        args["state"] = state
    return BoundCall(case.op, backend, fn, desc.validate(**args), state)

"""Every op changes only what its descriptor says it writes (``mutates``): the weights, activations,
rope table, block tables and pools it only reads are bit-identical after a call on every backend.
``compare`` judges outputs and written state, so a backend that scribbled on an input it reads would
otherwise pass."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

import dsv4
from conftest import DEVICE, backends_of
from dsv4.harness.cases import make_case
from dsv4.harness.golden import bit_identical
from dsv4.ops.api import call_op
from dsv4.ops.registry import get_op, op_names

TINY = dsv4.get_config("tiny")
CASES = [(op, kind) for op in op_names() for kind in get_op(op).kinds or (None,)]


def tensors_of(value: Any, path: str) -> dict[str, torch.Tensor]:
    """Every tensor reachable from ``value`` (a tensor, a record of tensors, nested), by field path."""
    if isinstance(value, torch.Tensor):
        return {path: value}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        found: dict[str, torch.Tensor] = {}
        for f in dataclasses.fields(value):
            found |= tensors_of(getattr(value, f.name), f"{path}.{f.name}")
        return found
    return {}


@pytest.mark.parametrize(("op", "kind"), CASES, ids=[f"{op}-{kind}" if kind else op for op, kind in CASES])
def test_an_op_leaves_every_tensor_it_only_reads_bit_identical(op: str, kind: str | None) -> None:
    """A decode step at starts that close a compressed block (6, 7 with S=2) and cross a pool block
    (63, 64), on each backend: every argument tensor outside the ``mutates`` paths (the state's block
    table included) keeps its bytes; every path ``mutates`` names is a tensor of the arguments."""
    for backend in backends_of(op):
        case = make_case(TINY, op, seed=3, device=DEVICE, batch=2, seq=2, start_pos=[6, 63], kind=kind)
        written = get_op(op).mutates
        found = {k: t for name, v in case.args.items() for k, t in tensors_of(v, name).items()}
        read = {k: t for k, t in found.items() if not any(k == m or k.startswith(m + ".") for m in written)}
        assert set(found) - set(read) == set(written), (sorted(found), written)
        before = {k: t.clone() for k, t in read.items()}
        call_op(op, backend, **case.args)
        for k, t in before.items():
            check = bit_identical(read[k], t, k)
            assert check, f"{backend} changed {k}: {check.detail}"

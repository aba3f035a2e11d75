"""A process whose default float dtype is not float32 gets the same modules, seeded cases and numbers:
nothing in the library takes the dtype of a float tensor from that default. Engines build their
models under the model's dtype as the default (bfloat16), and some scientific code runs in float64."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

import dsv4
from conftest import DEVICE
from dsv4.harness.cases import make_case
from dsv4.harness.golden import bit_identical

CFG = dsv4.get_config("tiny")


OTHERS = [torch.float64, torch.bfloat16]


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _tensors(args: dict) -> dict[str, torch.Tensor]:
    out = {}
    for name, v in args.items():
        if isinstance(v, torch.Tensor):
            out[name] = v
        elif hasattr(v, "tensors"):
            out.update({f"{name}.{k}": t for k, t in v.tensors().items()})
    return out


@pytest.mark.parametrize("dtype", OTHERS, ids=str)
@pytest.mark.parametrize("op", dsv4.ops.op_names())
def test_seeded_cases_and_results_ignore_the_default_dtype(op: str, dtype: torch.dtype) -> None:
    """``make_case`` draws the same inputs, and the reference gives the same outputs, whatever the default
    float dtype (a draw in the default dtype would have drawn other numbers, and made states float64)."""
    want_case = make_case(CFG, op, seed=6, device=DEVICE, batch=2, seq=2)
    want = dsv4.harness.cases.run_case(want_case, "reference")
    with default_dtype(dtype):
        case = make_case(CFG, op, seed=6, device=DEVICE, batch=2, seq=2)
        got = dsv4.harness.cases.run_case(case, "reference")
    expected = _tensors(want_case.args)
    assert all(bit_identical(t, expected[k], k) for k, t in _tensors(case.args).items())
    assert got.keys() == want.keys() and all(bit_identical(got[k], want[k], k) for k in want)


@pytest.mark.parametrize("dtype", OTHERS, ids=str)
def test_modules_build_and_step_under_another_default(dtype: torch.dtype) -> None:
    """The modules' build-time checks probe the ops with tensors of their own; a probe's fp32 scale made
    in the default dtype was refused ("qr_scale: expected dtype float32, got bfloat16"), so neither
    module could be built inside an engine's model construction."""
    with default_dtype(dtype):
        w = dsv4.synthetic_weights(CFG, seed=0, device=DEVICE, layer=1)
        x = dsv4.synthetic_activations((2, 2, CFG.hidden_size), device=DEVICE)
        rope = dsv4.rope_table(CFG, "compressed", max_position=64, device=DEVICE)
        fe = dsv4.DecodeFrontEnd(
            w, rope, batch=2, max_position=64, topk=CFG.index_topk, offset=CFG.sliding_window, backend="reference"
        )
        layer_rope = dsv4.layer_rope_table(CFG, 1, 64, DEVICE)
        m = dsv4.DecodeAttention(w, layer_rope, CFG, batch=2, max_position=64, backend="reference")
        q, y = fe(x)[0], m(x)
    assert q.dtype == y.dtype == torch.bfloat16

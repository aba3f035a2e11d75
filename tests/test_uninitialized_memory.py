"""The Triton backend reads no memory it has not written: outputs and scratch come from ``torch.empty``,
which on a GPU hands back whatever the caching allocator last held there, where on the CPU it often
gives fresh zeroed pages. Every tensor the library allocates uninitialized during a call is filled
here with one byte pattern, then with another; the outputs and the state after must be the same bits
both times, and the same as without filling.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import dsv4
from conftest import DEVICE, FULL
from dsv4.harness.cases import make_case, run_case
from dsv4.harness.golden import bit_identical
from frontends import tiny_frontend
from op_cases import SPLIT_O_PROJ, long_row_indexer_case, split_o_proj

TINY = dsv4.get_config("tiny")
PATTERNS = (0xFF, 0x7F)  # bytes: NaN in every float width and -1 in every int; a large finite bf16 / fp32


@contextlib.contextmanager
def empty_filled_with(byte: int) -> Iterator[None]:
    """``torch.empty`` and ``torch.empty_like`` return tensors whose every byte is ``byte``."""
    real_empty, real_like = torch.empty, torch.empty_like

    def fill(t: torch.Tensor) -> torch.Tensor:
        real_empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage()).fill_(byte)
        return t

    def empty(*args: Any, **kwargs: Any) -> torch.Tensor:
        return fill(real_empty(*args, **kwargs))

    def empty_like(*args: Any, **kwargs: Any) -> torch.Tensor:
        return fill(real_like(*args, **kwargs))

    torch.empty, torch.empty_like = empty, empty_like
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_like


def _same_whatever_was_there(run: Callable[[], dict[str, torch.Tensor]]) -> None:
    want = run()
    for byte in PATTERNS:
        with empty_filled_with(byte):
            got = run()
        assert got.keys() == want.keys()
        assert all(bit_identical(got[k], want[k], f"{k} (empty bytes {byte:#x})") for k in want)


@pytest.mark.parametrize("mode", ["decode", "prefill"])
@pytest.mark.parametrize("op", dsv4.ops.op_names())
def test_op_reads_nothing_it_did_not_write(op: str, mode: str) -> None:
    case = make_case(TINY, op, mode=mode, seed=21, device=DEVICE)
    _same_whatever_was_there(lambda: run_case(case, "triton"))


def test_long_indexer_row_and_split_o_proj_read_nothing_they_did_not_write() -> None:
    """The chunked selection's lists, histograms and counters (a row past ``ROW_IN_REGISTERS`` keys), and
    ``o_proj``'s split partials and counters."""
    case = long_row_indexer_case()
    _same_whatever_was_there(lambda: run_case(case, "triton"))
    split = make_case(SPLIT_O_PROJ, "o_proj", seed=11, device=DEVICE)
    with split_o_proj():
        _same_whatever_was_there(lambda: run_case(split, "triton"))


@pytest.mark.parametrize("kind", ["csa", pytest.param("swa", marks=FULL), pytest.param("hca", marks=FULL)])
def test_attention_layer_reads_nothing_it_did_not_write(kind: str) -> None:
    """A ``DecodeAttention`` layer built, then run for a 9-token prefill and steps of 2 and 1 tokens, with
    every uninitialized allocation (the module's, its ops' scratch and outputs) filled: the same ``y``."""
    layer = {"swa": 0, "csa": 1, "hca": 2}[kind]

    def run() -> dict[str, torch.Tensor]:
        w = dsv4.synthetic_weights(TINY, seed=0, device=DEVICE, layer=layer)
        rope = dsv4.layer_rope_table(TINY, layer, 128, DEVICE)
        m = dsv4.DecodeAttention(w, rope, TINY, batch=3, max_position=128, backend="triton", block_size=16)
        ys = [m(dsv4.synthetic_activations((3, s, TINY.hidden_size), seed=s, device=DEVICE)) for s in (9, 2, 1)]
        return {f"y{i}": y for i, y in enumerate(ys)}

    _same_whatever_was_there(run)


def test_front_end_reads_nothing_it_did_not_write() -> None:
    """``DecodeFrontEnd`` built, then run for a 9-token prefill and steps of 2 and 1 tokens, with every
    uninitialized allocation filled: the same ``q``, ``kv`` and top-k indices."""

    def run() -> dict[str, torch.Tensor]:
        m = tiny_frontend("triton", 3, 256)
        out = {}
        for s in (9, 2, 1):
            q, kv, topk = m(dsv4.synthetic_activations((3, s, TINY.hidden_size), seed=s, device=DEVICE))
            out.update({f"q{s}": q, f"kv{s}": kv, f"topk{s}": topk})
        return out

    _same_whatever_was_there(run)

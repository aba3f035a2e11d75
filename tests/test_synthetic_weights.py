"""The seeded synthetic weights and activations (``dsv4.model.weights``): drawn as their docstrings say,
and at the largest seed the harnesses take (``MAX_SEED``) for every op's case: the generators seeded
from a product of it (the compressor's and the output projection's weights) wrap into the seeds
``torch.Generator`` takes instead of overflowing."""

from __future__ import annotations

import pytest
import torch

import dsv4
from dsv4.harness.cases import make_case, run_case
from dsv4.model.weights import MAX_SEED, synthetic_compressor, synthetic_o_proj
from dsv4.ops import get_op, op_names

TINY = dsv4.get_config("tiny")
CASES = [(op, kind) for op in op_names() for kind in (get_op(op).kinds or (None,))]


@pytest.mark.parametrize(("op", "kind"), CASES)
def test_every_op_runs_at_the_largest_seed(op: str, kind: str | None) -> None:
    out = run_case(make_case(TINY, op, seed=MAX_SEED, kind=kind), "reference")
    assert out and all(torch.isfinite(t.float()).all() for t in out.values() if t.is_floating_point())


def test_a_seed_past_the_largest_is_refused_naming_seed() -> None:
    with pytest.raises(ValueError, match="seed"):
        make_case(TINY, "o_proj", seed=MAX_SEED + 1)


def test_the_largest_seeds_draw_weights_of_their_own() -> None:
    a, b = synthetic_o_proj(TINY, seed=MAX_SEED), synthetic_o_proj(TINY, seed=MAX_SEED - 1)
    assert not torch.equal(a.wo_a.view(torch.uint8), b.wo_a.view(torch.uint8))
    c, d = synthetic_compressor(TINY, 4, seed=MAX_SEED), synthetic_compressor(TINY, 4, seed=MAX_SEED - 1)
    assert not torch.equal(c.wkv, d.wkv)


def test_synthetic_weights_are_drawn_as_documented() -> None:
    """``wo_a`` with std ``1/sqrt(in features)``; a whole layer's front end is ``synthetic_weights(cfg, seed)``'s;
    an outlier may fall on any channel, the last one too."""
    from dsv4.model.fp8_row import dequantize_fp8_weight
    from dsv4.model.weights import synthetic_activations, synthetic_weights

    w = synthetic_o_proj(TINY, seed=1)
    inner = TINY.num_attention_heads // TINY.o_groups * TINY.head_dim
    std = float(dequantize_fp8_weight(w.wo_a, w.wo_a_scale).std())
    assert abs(std * inner**0.5 - 1) < 0.05, std
    front, layer = synthetic_weights(TINY, seed=4), synthetic_weights(TINY, seed=4, layer=1)
    assert torch.equal(layer.attn.wq_a, front.attn.wq_a) and torch.equal(layer.attn.wkv, front.attn.wkv)
    x = synthetic_activations((4000, TINY.hidden_size), seed=2, outliers=2).float()
    assert x.abs().argmax(dim=-1).eq(TINY.hidden_size - 1).any()

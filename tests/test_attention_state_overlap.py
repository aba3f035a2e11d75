"""The attention ops' state (the pools and rings they write) sharing memory with one of their inputs is
refused, naming both, before anything changes (spec §7's rule, which ``tests/test_aliasing.py`` pins for
the indexer ops only): each fails with the ``check_no_overlap`` call of ``kv_compressor``,
``window_kv_write`` or ``sparse_attn_write`` dropped."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import dsv4
from conftest import DEVICE
from dsv4.harness.cases import make_case, mutated_args, record_outputs
from dsv4.harness.golden import bit_identical

CFG = dsv4.get_config("tiny")


def _args(op: str) -> dict:
    return dict(make_case(CFG, op, seed=0, device=DEVICE, max_position=64, batch=2, seq=2, start_pos=[6, 6]).args)


def _sharing(owner: torch.Tensor, guest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of ``owner`` and ``guest`` (same values) where ``guest``'s bytes are the first bytes of ``owner``'s."""
    assert owner.numel() * owner.element_size() >= guest.numel() * guest.element_size()
    buf = owner.clone()
    g = buf.view(-1).view(torch.uint8)[: guest.numel() * guest.element_size()].view(guest.dtype).view(guest.shape)
    g.copy_(guest)
    return buf, g


def _pool_over(args: dict, pool_name: str, field: str, arg_name: str) -> None:
    """Set ``args[pool_name].<field>`` and ``args[arg_name]`` to copies where the argument's bytes are
    the pool tensor's first bytes."""
    pool = args[pool_name]
    shared, arg = _sharing(getattr(pool, field), args[arg_name])
    args[pool_name] = dataclasses.replace(pool, **{field: shared})
    args[arg_name] = arg


def _refused_unchanged(op: str, args: dict, words: tuple[str, ...]) -> None:
    records = {name: args[name] for name in mutated_args(op)}
    before = {k: v.clone() for k, v in record_outputs(records).items()}
    inputs = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError) as info:
        getattr(dsv4, op)(**args, backend="reference")
    assert all(w in str(info.value) for w in words), f"{info.value!r} lacks {words}"
    after = record_outputs(records)
    assert all(bit_identical(after[k], t, k) for k, t in before.items())
    assert all(bit_identical(args[k], t, k) for k, t in inputs.items())


def test_kv_compressor_ring_over_its_weights_is_refused() -> None:
    """``state.score_state`` whose first bytes are ``w.ape``: the op would overwrite the bias it adds."""
    args = _args("kv_compressor")
    state, w = args["state"], args["w"]
    score, ape = _sharing(state.score_state, w.ape)
    args["state"] = dataclasses.replace(state, score_state=score)
    args["w"] = dataclasses.replace(w, ape=ape)
    _refused_unchanged("kv_compressor", args, ("state.score_state: shares memory with w.ape",))


def test_window_kv_write_pool_over_its_kv_is_refused() -> None:
    """``pool.rope`` whose first bytes hold ``kv``: the write would overwrite the rows it reads."""
    args = _args("window_kv_write")
    _pool_over(args, "pool", "rope", "kv")
    _refused_unchanged("window_kv_write", args, ("pool.rope: shares memory with kv",))


def test_sparse_attn_write_window_pool_over_an_input_is_refused() -> None:
    """``window_pool.scale`` whose first bytes are ``attn_sink``: only ``sparse_attn_write`` writes the
    window pool, and its reads (here the sink) must lie apart from it."""
    args = _args("sparse_attn_write")
    _pool_over(args, "window_pool", "scale", "attn_sink")
    _refused_unchanged("sparse_attn_write", args, ("window_pool.scale: shares memory with attn_sink",))
    dsv4.sparse_attn(**{k: v for k, v in args.items()}, backend="reference")  # reading both is fine

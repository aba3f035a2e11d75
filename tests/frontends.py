"""A ``tiny`` ``DecodeFrontEnd`` on the test device, for the module and CUDA-graph tests."""

from __future__ import annotations

import torch

import dsv4
from conftest import DEVICE

CFG = dsv4.get_config("tiny")


def tiny_frontend(backend: str, batch: int = 3, max_position: int = 256) -> dsv4.DecodeFrontEnd:
    """Seed-0 weights: two modules built alike hold the same weights. Pool blocks of 16 rows, so a
    slot's table covers exactly ``max_position // 4`` rows when ``max_position`` is a multiple of 64."""
    weights = dsv4.synthetic_weights(CFG, seed=0, device=DEVICE)
    rope = dsv4.rope_table(CFG, "compressed", max_position=max_position, device=DEVICE)
    return dsv4.DecodeFrontEnd(
        weights, rope, batch=batch, max_position=max_position, topk=CFG.index_topk, offset=CFG.sliding_window,
        backend=backend, block_size=16,
    )  # fmt: skip


def last_score(m: dsv4.DecodeFrontEnd) -> torch.Tensor:
    """The scores of ``m``'s last step (it has taken one)."""
    assert m.last_score is not None, "no step taken yet"
    return m.last_score

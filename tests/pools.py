"""Key pools in other layouts than the dense one, for the tests of the paged cache."""

from __future__ import annotations

import torch

import dsv4
from dsv4.model.state import UNALLOCATED


def relayout(state: dsv4.IndexerState, block_size: int, rows_needed: list[int], seed: int, spare: int = 3):
    """``state`` with each slot's rows moved into randomly placed blocks of ``block_size`` rows:
    slot ``b`` gets blocks for its first ``rows_needed[b]`` rows, ``-1`` past them; ``spare`` more
    blocks hold garbage that no step may touch."""
    g = torch.Generator().manual_seed(seed)
    batch, width = state.batch, -(-state.cache_rows // block_size)
    counts = [-(-n // block_size) for n in rows_needed]
    num_blocks = sum(counts) + spare
    perm = torch.randperm(num_blocks, generator=g).tolist()
    table = torch.full((batch, width), UNALLOCATED, dtype=torch.int32)
    for b, n in enumerate(counts):
        table[b, :n] = torch.tensor(perm[sum(counts[:b]) : sum(counts[: b + 1])], dtype=torch.int32)
    hid = state.keys.shape[2]
    paged = dsv4.IndexerState.paged(batch, num_blocks, block_size, hid, table, state.keys.device)
    paged.keys.copy_(torch.randint(-127, 128, paged.keys.shape, generator=g))  # garbage everywhere first
    paged.key_scale.copy_(torch.rand(paged.key_scale.shape, generator=g))
    paged.kv_state.copy_(state.kv_state)
    paged.score_state.copy_(state.score_state)
    for b, n in enumerate(rows_needed):
        k8, ks = state.dense_keys(b, n)
        rows = torch.arange(n)
        blocks = table[b, rows // block_size].long()
        paged.keys[blocks, rows % block_size], paged.key_scale[blocks, rows % block_size] = k8, ks
    return paged

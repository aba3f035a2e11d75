"""Loader for the fixed golden vectors in ``tests/data/golden_vectors`` (computed by an independent
float64 implementation of the spec; see the README there)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

import dsv4

FOLDER = Path(__file__).parent / "data" / "golden_vectors"
INDEX: dict[str, dict] = json.loads((FOLDER / "index.json").read_text())
QKV_CASES = sorted(k for k, v in INDEX.items() if v["op"] == "qkv_proj_rope")
INDEXER_CASES = sorted(k for k, v in INDEX.items() if v["op"] == "indexer")


class Vectors:
    """One ``.npz`` case; ``t(name)`` gives a tensor on ``device``, ``bf16=True`` for bf16 inputs."""

    def __init__(self, name: str, device: torch.device):
        self.meta = INDEX[name]
        self.data = np.load(FOLDER / f"{name}.npz")
        self.device = device

    def t(self, name: str, bf16: bool = False) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(self.data[name])).to(self.device)
        return x.to(torch.bfloat16) if bf16 else x

    def rope(self) -> dsv4.RopeTable:
        return dsv4.RopeTable(self.t("rope_cos"), self.t("rope_sin"))

    def attn_weights(self) -> dsv4.AttnWeights:
        t = self.t
        return dsv4.AttnWeights(
            t("wq_a", True), t("gamma_cq"), t("wq_b"), t("wq_b_scale"), t("wkv", True), t("gamma_ckv")
        )

    def indexer_weights(self) -> dsv4.IndexerWeights:
        t = self.t
        comp = dsv4.CompressorWeights(t("wkv", True), t("wgate", True), t("ape"), t("norm_w"))
        return dsv4.IndexerWeights(t("wq_b"), t("wq_b_scale"), t("weights_proj", True), comp)

    def empty_state(self) -> dsv4.IndexerState:
        m = self.meta
        return dsv4.IndexerState.fresh(m["B"], m["max_position"] // 4, m["index_head_dim"], self.device)


def expected_pool(before: dsv4.IndexerState, cache: torch.Tensor, start: torch.Tensor, seq: int) -> dict:
    """The key pool the golden vectors expect after a step, as ``compare`` takes it: the rows the step
    writes are the expected bf16 cache rows ``cache [B, rows, HID]`` quantized with the spec §2 rule,
    placed through the block table; every other pool row is as ``before`` the step."""
    keys, key_scale = before.keys.clone(), before.key_scale.clone()
    block_size = keys.shape[1]
    for b, p in enumerate(start.tolist()):
        for row in range(p // 4, (p + seq) // 4):
            k8, ks = dsv4.quantize_int8_per_row(cache[b, row])
            block = int(before.block_table[b, row // block_size])
            keys[block, row % block_size], key_scale[block, row % block_size] = k8, ks[0]
    return {"keys": keys, "key_scale": key_scale, "block_table": before.block_table}


def ring_by_position(got: torch.Tensor, v2: torch.Tensor, next_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A ring state ``got [B, 8, W]`` (spec v3: position ``q`` in slot ``q % 8``) and the golden vectors'
    ``v2`` ring (the open block in slots ``4 + q % 4``, the last closed one in ``q % 4``) as two tensors
    that hold the same values where the spec reads the ring, as the golden README says: after a step
    whose next position is ``n = next_pos[b]``, the positions ``q`` in ``[max(0, 4*(n//4) - 4), n)``.
    Every other slot (never read) is 0 in both, so ``compare`` checks exactly the positions read."""
    got_read, want = torch.zeros_like(got), torch.zeros_like(got)
    for b, n in enumerate(next_pos.tolist()):
        for q in range(max(0, 4 * (n // 4) - 4), n):
            got_read[b, q % 8] = got[b, q % 8]
            want[b, q % 8] = v2[b, 4 + q % 4 if q >= 4 * (n // 4) else q % 4]
    return got_read, want

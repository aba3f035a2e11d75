"""Loader for the attention golden vectors in ``tests/data/golden_vectors/attention`` (computed by an
independent float64 implementation of the attention spec; see the README there)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

import dsv4
from dsv4.model.structs import StepPositions

FOLDER = Path(__file__).parent / "data" / "golden_vectors" / "attention"
INDEX: dict[str, dict] = json.loads((FOLDER / "index.json").read_text())


def cases(op: str) -> list[str]:
    return sorted(k for k, v in INDEX.items() if v["op"] == op)


class AttnVectors:
    """One ``.npz`` case on ``device``: ``t(name)`` a tensor as stored, ``bf16(name)``, ``e4m3(name)``."""

    def __init__(self, name: str, device: torch.device):
        self.name, self.meta, self.device = name, INDEX[name], device
        self.data = np.load(FOLDER / f"{name}.npz")

    def t(self, name: str) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.data[name])).to(self.device)

    def bf16(self, name: str) -> torch.Tensor:
        return self.t(name).to(torch.bfloat16)

    def rope(self) -> dsv4.RopeTable:
        return dsv4.RopeTable(self.t("rope_cos"), self.t("rope_sin"))

    def pool(self, prefix: str, expected: bool = False) -> dsv4.KVPool:
        """Pool ``prefix`` (``win``/``cmp``) as the case gives it, or as expected after the call."""
        pre = "expected_" if expected else ""
        return dsv4.KVPool(
            nope=self.t(f"{pre}{prefix}_nope").view(torch.float8_e4m3fn),
            rope=self.bf16(f"{pre}{prefix}_rope"),
            scale=self.t(f"{pre}{prefix}_scale"),
            block_table=self.t(f"{prefix}_block_table"),
        )

    def written_mask(self, key: str) -> torch.Tensor:
        """``[NB, bs]`` bool of the pool rows the index lists as written (``(b, row, block, offset)``)."""
        nope = self.data["cmp_nope" if key.startswith("written_rows_b_j") else "win_nope"]
        mask = torch.zeros(nope.shape[:2], dtype=torch.bool)
        for _, _, block, offset in self.meta[key]:
            if block >= 0:
                mask[block, offset] = True
        return mask

    def positions(self) -> StepPositions:
        start = self.t("start_pos").long()
        return StepPositions.from_host(start, tuple(start.tolist()), self.meta["S"])

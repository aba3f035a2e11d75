"""Result and argument records shared by the public API and every backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .config import COMPRESS_RATIO


class QKV(NamedTuple):
    """Outputs of ``qkv_proj_rope``: ``q [T, H, HD] bf16``, ``kv [T, HD] bf16``, ``qr [T, QL] int8``,
    ``qr_scale [T, 1] fp32``."""

    q: torch.Tensor
    kv: torch.Tensor
    qr: torch.Tensor
    qr_scale: torch.Tensor


class IndexerOut(NamedTuple):
    """Outputs of ``indexer``: ``score [B, S, max cache_len] fp32``, ``topk_idxs [B, S, topk] int32``."""

    score: torch.Tensor
    topk_idxs: torch.Tensor


@dataclass(frozen=True)
class StepPositions:
    """Where each batch row of a step starts: ``start [B] int64`` on the op's device, the same
    values on the host, and ``seq`` (S) new tokens per row."""

    start: torch.Tensor
    start_host: tuple[int, ...]
    seq: int

    @property
    def batch(self) -> int:
        return len(self.start_host)

    @property
    def cache_lens(self) -> tuple[int, ...]:
        """Rows of the compressed cache that exist after the step, per batch row."""
        return tuple((p + self.seq) // COMPRESS_RATIO for p in self.start_host)

    @property
    def max_cache_len(self) -> int:
        return max(self.cache_lens)

    def token_positions(self) -> torch.Tensor:
        """``[B, S]`` int64 absolute position of every token of the step."""
        return self.start[:, None] + torch.arange(self.seq, device=self.start.device)

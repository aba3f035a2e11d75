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


def copy_into(result: QKV | IndexerOut, out: QKV | IndexerOut | None) -> QKV | IndexerOut:
    """``result`` written into the preallocated ``out`` (returned), or ``result`` when ``out`` is None.

    A ``score`` narrower than ``out.score`` fills the first columns; the rest are masked.
    """
    if out is None:
        return result
    for src, dst in zip(result, out, strict=True):
        if src.shape != dst.shape:  # a padded score buffer
            dst[..., : src.shape[-1]].copy_(src)
            dst[..., src.shape[-1] :].fill_(torch.finfo(torch.float32).min)
        else:
            dst.copy_(src)
    return out


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

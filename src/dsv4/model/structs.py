"""Result and argument records shared by the public API and every backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import torch

from .config import COMPRESS_RATIO

MASKED_SCORE = torch.finfo(torch.float32).min  # -3.4028235e38, the most negative finite fp32: "not visible"


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


class AttnOut(NamedTuple):
    """Output of ``sparse_attn``: ``o [B, S, H, HD] bf16``."""

    o: torch.Tensor


class OProjOut(NamedTuple):
    """Output of ``o_proj``: ``y [T, D] bf16``."""

    y: torch.Tensor


Result = TypeVar("Result", QKV, IndexerOut, AttnOut, OProjOut)


def copy_into(result: Result, out: Result | None) -> Result:
    """``result`` written into the preallocated ``out`` (returned), or ``result`` when ``out`` is None.

    A ``score`` narrower than ``out.score`` fills the first columns; the rest are masked.
    """
    if out is None:
        return result
    for src, dst in zip(result, out, strict=True):
        if src.shape != dst.shape:  # a padded score buffer
            dst[..., : src.shape[-1]].copy_(src)
            dst[..., src.shape[-1] :].fill_(MASKED_SCORE)
        else:
            dst.copy_(src)
    return out


@dataclass(frozen=True)
class StepPositions:
    """Where each batch row of a step starts: ``start [B] int64`` on the op's device, ``seq`` (S) new
    tokens per row, and ``max_cache_len``: the cache rows the longest row has after the step, which
    sizes the score output. Eager calls also carry the start positions on the host; a captured
    (CUDA-graph) step has none and uses a fixed ``max_cache_len`` that bounds every step it replays.
    """

    start: torch.Tensor
    seq: int
    max_cache_len: int
    start_host: tuple[int, ...] | None = None

    @classmethod
    def from_host(cls, start: torch.Tensor, start_host: tuple[int, ...], seq: int) -> StepPositions:
        """Positions known on the host: ``max_cache_len`` is exact."""
        return cls(start, seq, max((p + seq) // COMPRESS_RATIO for p in start_host), tuple(start_host))

    @property
    def batch(self) -> int:
        return self.start.shape[0]

    @property
    def cache_lens(self) -> tuple[int, ...]:
        """Rows of the compressed cache that exist after the step, per batch row (host positions only)."""
        if self.start_host is None:
            raise ValueError("cache_lens: the start positions are not known on the host")
        return tuple((p + self.seq) // COMPRESS_RATIO for p in self.start_host)

    @property
    def max_closing_blocks(self) -> int:
        """An upper bound of the blocks one row closes in the step: ceil(S/4), whatever the start."""
        return -(-self.seq // COMPRESS_RATIO)

    def token_positions(self) -> torch.Tensor:
        """``[B, S]`` int64 absolute position of every token of the step."""
        return self.start[:, None] + torch.arange(self.seq, device=self.start.device)

"""Caller-owned state of the indexer compressor and its compressed-key cache (spec §4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import COMPRESS_RATIO, DeepSeekV4Config

STATE_SLOTS = 2 * COMPRESS_RATIO  # slots 0..3: previous block, 4..7: the block being filled


@dataclass
class IndexerState:
    """Per-sequence state, updated in place by ``indexer_compressor`` / ``indexer``.

    ``kv_state [B, 8, 2*HID] fp32`` and ``score_state [B, 8, 2*HID] fp32``: the compressor's ring
    of projected rows and gate scores (slots 0..3 previous block, 4..7 current block).
    ``idx_kv_cache [B, max_position/4, HID] bf16``: one compressed key per closed block of 4 tokens.
    """

    kv_state: torch.Tensor
    score_state: torch.Tensor
    idx_kv_cache: torch.Tensor

    @classmethod
    def empty(
        cls,
        cfg: DeepSeekV4Config,
        batch: int,
        max_position: int | None = None,
        device: torch.device | str | None = None,
    ) -> IndexerState:
        """Fresh state: ``kv_state`` zeros, ``score_state`` -inf, ``idx_kv_cache`` zeros.

        ``max_position`` (default ``cfg.max_position_embeddings``) sets the cache to
        ``max_position // 4`` rows.
        """
        n = cfg.max_position_embeddings if max_position is None else int(max_position)
        if batch < 1 or n < COMPRESS_RATIO:
            raise ValueError(f"need batch >= 1 and max_position >= {COMPRESS_RATIO}, got {batch}, {n}")
        return cls.fresh(batch, n // COMPRESS_RATIO, cfg.index_head_dim, device)

    @classmethod
    def fresh(
        cls, batch: int, cache_rows: int, head_dim: int, device: torch.device | str | None = None
    ) -> IndexerState:
        """``empty`` by sizes: ``cache_rows`` compressed keys of ``head_dim`` (``index_head_dim``) per row."""
        width = 2 * head_dim
        return cls(
            kv_state=torch.zeros(batch, STATE_SLOTS, width, dtype=torch.float32, device=device),
            score_state=torch.full((batch, STATE_SLOTS, width), float("-inf"), dtype=torch.float32, device=device),
            idx_kv_cache=torch.zeros(batch, cache_rows, head_dim, dtype=torch.bfloat16, device=device),
        )

    @property
    def batch(self) -> int:
        return self.kv_state.shape[0]

    @property
    def cache_rows(self) -> int:
        return self.idx_kv_cache.shape[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The three state tensors by field name."""
        return {"kv_state": self.kv_state, "score_state": self.score_state, "idx_kv_cache": self.idx_kv_cache}

    def to(self, device: torch.device | str) -> IndexerState:
        return IndexerState(self.kv_state.to(device), self.score_state.to(device), self.idx_kv_cache.to(device))

    def clone(self) -> IndexerState:
        return IndexerState(self.kv_state.clone(), self.score_state.clone(), self.idx_kv_cache.clone())

    def reset(self, rows: torch.Tensor | list[int] | int) -> None:
        """Return batch ``rows`` to the empty state (a new sequence takes those slots).

        ``rows``: an int, a list of ints or an integer tensor, each in ``[0, batch)``; anything else
        (a float that would be truncated, a negative index that would wrap) raises before any change.
        A tensor on a GPU is range-checked there (a device-side assert, no host read)."""
        if isinstance(rows, torch.Tensor):
            if rows.is_floating_point() or rows.is_complex() or rows.dtype == torch.bool:
                raise TypeError(f"rows: expected an integer tensor, got {rows.dtype}")
            idx = rows.to(device=self.kv_state.device, dtype=torch.long).reshape(-1)
            ok = ((idx >= 0) & (idx < self.batch)).all()
            message = f"rows: expected slots in [0, {self.batch})"
            if idx.device.type != "cpu":
                torch._assert_async(ok, message)
            elif not ok:
                raise ValueError(f"{message}, got {idx.tolist()}")
        else:
            items = list(rows) if isinstance(rows, list | tuple) else [rows]
            if any(isinstance(r, bool) or not isinstance(r, int) for r in items):
                raise TypeError(f"rows: expected ints, got {items!r:.80}")
            if any(not 0 <= r < self.batch for r in items):
                raise ValueError(f"rows: expected slots in [0, {self.batch}), got {items}")
            idx = torch.tensor(items, dtype=torch.long, device=self.kv_state.device)
        self.kv_state[idx] = 0.0
        self.score_state[idx] = float("-inf")
        self.idx_kv_cache[idx] = 0

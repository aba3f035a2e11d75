"""RoPE cos/sin tables (spec §2), with DeepSeek's YaRN frequency correction."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .config import DeepSeekV4Config


@dataclass(frozen=True)
class RopeTable:
    """``cos``, ``sin``: ``[max_position, R/2]`` fp32; row ``p`` holds the angles of position ``p``."""

    cos: torch.Tensor
    sin: torch.Tensor

    @property
    def max_position(self) -> int:
        return self.cos.shape[0]

    @property
    def rope_dim(self) -> int:
        """R, the number of rotated entries (twice the table width)."""
        return 2 * self.cos.shape[1]

    def to(self, device: torch.device | str) -> RopeTable:
        return RopeTable(self.cos.to(device), self.sin.to(device))


def _correction_dim(rotations: float, dim: int, base: float, orig_len: int) -> float:
    """The rotary dimension whose wavelength fits ``rotations`` times into ``orig_len``."""
    return dim * math.log(orig_len / (rotations * 2 * math.pi)) / (2 * math.log(base))


def rope_frequencies(
    dim: int,
    theta: float,
    factor: float = 1.0,
    orig_len: int = 0,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
) -> torch.Tensor:
    """``[dim/2]`` float64 inverse frequencies; YaRN-corrected when ``orig_len > 0``."""
    freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    if orig_len > 0:
        low = max(math.floor(_correction_dim(beta_fast, dim, theta, orig_len)), 0)
        high: float = min(math.ceil(_correction_dim(beta_slow, dim, theta, orig_len)), dim - 1)
        if low == high:
            high += 0.001  # avoid a zero-width ramp, as upstream does
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        smooth = 1 - ramp
        freqs = freqs / factor * (1 - smooth) + freqs * smooth
    return freqs


def rope_table(
    cfg: DeepSeekV4Config,
    kind: Literal["compressed", "window"] = "compressed",
    max_position: int | None = None,
    device: torch.device | str | None = None,
) -> RopeTable:
    """The RoPE table of one layer kind.

    ``kind="compressed"``: layers with a compressor (ratio 4 or 128) use ``compress_rope_theta``
    with YaRN for q, kv, the indexer query and the compressed keys. ``kind="window"``:
    sliding-window-only layers use ``rope_theta`` without YaRN. Angles are computed in float64 and
    stored as fp32, so far positions (1M tokens) keep full fp32 accuracy.
    """
    n = cfg.max_position_embeddings if max_position is None else max_position
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"max_position: expected an int or None, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"max_position must be >= 1, got {n}")
    if kind == "compressed":
        freqs = rope_frequencies(
            cfg.qk_rope_head_dim,
            cfg.compress_rope_theta,
            cfg.rope_factor,
            cfg.original_max_position_embeddings,
            cfg.beta_fast,
            cfg.beta_slow,
        )
    elif kind == "window":
        freqs = rope_frequencies(cfg.qk_rope_head_dim, cfg.rope_theta)
    else:
        raise ValueError(f"kind must be 'compressed' or 'window', got {kind!r}")
    angles = torch.outer(torch.arange(n, dtype=torch.float64), freqs)
    return RopeTable(
        cos=torch.cos(angles).to(torch.float32).to(device).contiguous(),
        sin=torch.sin(angles).to(torch.float32).to(device).contiguous(),
    )


def layer_rope_table(
    cfg: DeepSeekV4Config, layer: int, max_position: int | None = None, device: torch.device | str | None = None
) -> RopeTable:
    """The RoPE table every op of ``layer`` uses: ``"window"`` on a sliding-window-only layer
    (compress ratio 0), ``"compressed"`` on the others (attention spec §1)."""
    return rope_table(cfg, "window" if cfg.layer_ratio(layer) == 0 else "compressed", max_position, device)

"""Model dimensions of the DeepSeek-V4 attention front end, as named presets.

Field names follow the upstream/HF configs so a ``config.json`` maps onto them directly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

COMPRESS_RATIO = 4  # tokens per compressed indexer key (the ratio-4 layers)


@dataclass(frozen=True)
class DeepSeekV4Config:
    """Dimensions and RoPE parameters of one attention front end (spec §1)."""

    name: str
    hidden_size: int  # D
    num_attention_heads: int  # H
    head_dim: int  # HD
    qk_rope_head_dim: int  # R
    q_lora_rank: int  # QL
    index_n_heads: int  # HI
    index_head_dim: int  # HID
    index_topk: int
    sliding_window: int
    max_position_embeddings: int
    rope_theta: float
    compress_rope_theta: float
    rope_factor: float
    original_max_position_embeddings: int  # 0: no YaRN
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    rms_norm_eps: float = 1e-6

    @property
    def qk_nope_head_dim(self) -> int:
        """HD - R: the head entries that RoPE leaves alone."""
        return self.head_dim - self.qk_rope_head_dim

    @property
    def index_nope_head_dim(self) -> int:
        """HID - R for the indexer heads."""
        return self.index_head_dim - self.qk_rope_head_dim

    @property
    def index_weights_scale(self) -> float:
        """HID^-0.5 * HI^-0.5, folded into the indexer head weights."""
        return self.index_head_dim**-0.5 * self.index_n_heads**-0.5

    @property
    def compress_ratio(self) -> int:
        return COMPRESS_RATIO

    def replace(self, **changes: Any) -> DeepSeekV4Config:
        """A copy with some fields changed (e.g. a smaller ``max_position_embeddings``)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FLASH_ROPE = dict(
    max_position_embeddings=1048576,
    rope_theta=10000.0,
    compress_rope_theta=160000.0,
    rope_factor=16.0,
    original_max_position_embeddings=65536,
    beta_fast=32.0,
    beta_slow=1.0,
)

PRESETS: dict[str, DeepSeekV4Config] = {
    "flash": DeepSeekV4Config(
        name="flash",
        hidden_size=4096,
        num_attention_heads=64,
        head_dim=512,
        qk_rope_head_dim=64,
        q_lora_rank=1024,
        index_n_heads=64,
        index_head_dim=128,
        index_topk=512,
        sliding_window=128,
        **_FLASH_ROPE,
    ),
    "pro": DeepSeekV4Config(
        name="pro",
        hidden_size=7168,
        num_attention_heads=128,
        head_dim=512,
        qk_rope_head_dim=64,
        q_lora_rank=1536,
        index_n_heads=64,
        index_head_dim=128,
        index_topk=1024,
        sliding_window=128,
        **_FLASH_ROPE,
    ),
    "demo": DeepSeekV4Config(
        name="demo",
        hidden_size=4096,
        num_attention_heads=64,
        head_dim=512,
        qk_rope_head_dim=64,
        q_lora_rank=1024,
        index_n_heads=64,
        index_head_dim=128,
        index_topk=512,
        sliding_window=128,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        compress_rope_theta=40000.0,
        rope_factor=40.0,
        original_max_position_embeddings=0,
        beta_fast=32.0,
        beta_slow=1.0,
    ),
    # Small enough for the Triton interpreter; keeps R=64 and HID=128 (and the flash RoPE/YaRN
    # parameters) so every code path of the full-size model runs.
    "tiny": DeepSeekV4Config(
        name="tiny",
        hidden_size=256,
        num_attention_heads=4,
        head_dim=128,
        qk_rope_head_dim=64,
        q_lora_rank=128,
        index_n_heads=4,
        index_head_dim=128,
        index_topk=16,
        sliding_window=16,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        compress_rope_theta=160000.0,
        rope_factor=16.0,
        original_max_position_embeddings=65536,
        beta_fast=32.0,
        beta_slow=1.0,
    ),
}


def get_config(name: str) -> DeepSeekV4Config:
    """The preset called ``name`` (one of ``PRESETS``)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}") from None


@dataclass(frozen=True)
class Shape:
    """A deployment shape: ``batch`` sequences with ``seq`` new tokens each."""

    batch: int
    seq: int

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


# Deployment shapes of the seeds: decode runs two tokens per sequence per step (multi-token
# prediction), prefill one prompt chunk. ``tiny`` shrinks the batch so the interpreter stays fast.
MODES: dict[str, Shape] = {"decode": Shape(batch=64, seq=2), "prefill": Shape(batch=1, seq=128)}
_TINY_MODES: dict[str, Shape] = {"decode": Shape(batch=4, seq=2), "prefill": Shape(batch=1, seq=64)}


def mode_shape(cfg: DeepSeekV4Config, mode: str) -> Shape:
    """The ``decode`` or ``prefill`` shape for a preset."""
    table = _TINY_MODES if cfg.name == "tiny" else MODES
    try:
        return table[mode]
    except KeyError:
        raise ValueError(f"unknown mode {mode!r}; expected one of {sorted(table)}") from None

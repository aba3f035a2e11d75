"""Model dimensions of the DeepSeek-V4 attention front end, as named presets.

Field names follow the upstream/HF configs so a ``config.json`` maps onto them directly.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from dataclasses import dataclass
from typing import Any

COMPRESS_RATIO = 4  # tokens per compressed indexer key (the ratio-4 layers)
LAYER_KINDS = ("swa", "csa", "hca")  # sliding window only (ratio 0), ratio 4 with the indexer, any other ratio
WEIGHT_BLOCK = 128  # rows and columns of an FP8 weight's scale block (the checkpoints' 128 x 128 tiles)
RANK_SUFFIX = "/tp"  # "flash/tp8": a rank of 8 tensor-parallel ranks of the preset "flash"


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
    # The rest of the attention layer (attention spec §1); 0 / () where a config does not say.
    o_groups: int = 0  # G: output-projection groups
    o_lora_rank: int = 0  # OL: rank of each group's wo_a
    compress_ratios: tuple[int, ...] = ()  # one per layer, then one per MTP layer: 0 SWA, 4 CSA, else HCA

    def __post_init__(self) -> None:
        """Every field checked: a ``ValueError`` naming the field for a value no model can have."""
        for name in _DIMENSIONS:
            _check_field(name, getattr(self, name), "int")
        _check_field("original_max_position_embeddings", self.original_max_position_embeddings, "int0")
        for name in ("rope_theta", "compress_rope_theta"):  # > 1: YaRN divides by log(theta)
            _check_field(name, getattr(self, name), "number", above=1.0)
        for name in ("rope_factor", "beta_fast", "beta_slow", "rms_norm_eps"):  # YaRN takes log(orig / beta)
            _check_field(name, getattr(self, name), "number", above=0.0)
        check_eps_value("rms_norm_eps", self.rms_norm_eps)
        r = self.qk_rope_head_dim
        if r % 2 or r > self.head_dim or r > self.index_head_dim:
            raise ValueError(
                f"qk_rope_head_dim: expected an even number of rotated entries (pairs) <= head_dim ({self.head_dim}) "
                f"and <= index_head_dim ({self.index_head_dim}), got {r}"
            )
        if self.index_head_dim < 2 or self.index_head_dim & (self.index_head_dim - 1):
            raise ValueError(f"index_head_dim: expected a power of two (Hadamard transform), got {self.index_head_dim}")
        if self.max_position_embeddings < COMPRESS_RATIO:
            raise ValueError(
                f"max_position_embeddings: expected >= {COMPRESS_RATIO} (one compressed block), "
                f"got {self.max_position_embeddings}"
            )
        for name in ("o_groups", "o_lora_rank"):  # 0: the config does not say (what uses them checks them)
            _check_field(name, getattr(self, name), "int0")
        ratios = self.compress_ratios
        if not isinstance(ratios, tuple) or any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in ratios):
            raise ValueError(f"compress_ratios: expected a tuple of non-negative ints, got {ratios!r:.80}")

    @property
    def qk_nope_head_dim(self) -> int:
        """HD - R: the head entries that RoPE leaves alone."""
        return self.head_dim - self.qk_rope_head_dim

    @property
    def index_weights_scale(self) -> float:
        """HID^-0.5 * HI^-0.5, folded into the indexer head weights."""
        return self.index_head_dim**-0.5 * self.index_n_heads**-0.5

    @property
    def compress_ratio(self) -> int:
        return COMPRESS_RATIO

    def layer_ratio(self, layer: int) -> int:
        """The compress ratio of ``layer`` (``compress_ratios[layer]``): 0 (SWA), 4 (CSA) or the HCA ratio."""
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layer: expected an int, got {type(layer).__name__}")
        if not 0 <= layer < len(self.compress_ratios):
            raise ValueError(
                f"layer: expected 0 <= layer < {len(self.compress_ratios)} ({self.name}'s compress_ratios), got {layer}"
            )
        return self.compress_ratios[layer]

    def layer_kind(self, layer: int) -> str:
        """``"swa"``, ``"csa"`` or ``"hca"``: the attention kind of ``layer`` (from its compress ratio)."""
        return kind_of_ratio(self.layer_ratio(layer))

    def first_layer(self, kind: str) -> int:
        """The first layer of ``kind`` (``"swa"``, ``"csa"`` or ``"hca"``)."""
        for layer in range(len(self.compress_ratios)):
            if self.layer_kind(layer) == kind:
                return layer
        raise ValueError(f"kind: {self.name} has no {kind!r} layer (compress_ratios {list(self.compress_ratios)})")

    def kind_ratio(self, kind: str) -> int:
        """The compress ratio of the first layer of ``kind``: 0 (SWA), 4 (CSA) or the preset's HCA ratio."""
        return self.layer_ratio(self.first_layer(kind))

    def rank(self, world: int) -> DeepSeekV4Config:
        """The config of one of ``world`` tensor-parallel ranks (README, "Tensor parallelism"): ``H / world``
        query heads and ``G / world`` output-projection groups, every other size the layer's; named
        ``"<name>/tp<world>"``, a name ``get_config`` takes. ``world`` must divide ``H`` and ``G``, and a
        rank's ``G / world * OL`` rows of ``wo_a`` must be whole ``WEIGHT_BLOCK``-row scale blocks, so that
        a rank's weights are slices of the layer's. ``world`` 1 is the layer itself."""
        if isinstance(world, bool) or not isinstance(world, int) or world < 1:
            raise ValueError(f"world: expected a positive int (the number of tensor-parallel ranks), got {world!r}")
        if world == 1:
            return self
        h, g, ol = self.num_attention_heads, self.o_groups, self.o_lora_rank
        if h % world or (g and (g % world or g // world * ol % WEIGHT_BLOCK)):
            raise ValueError(
                f"world: {self.name} splits over ranks that each hold whole heads (H={h}) and whole output-projection "
                f"groups (G={g}) of whole {WEIGHT_BLOCK}-row scale blocks (OL={ol}); {world} ranks do not"
            )
        return dataclasses.replace(
            self, name=f"{self.name}{RANK_SUFFIX}{world}", num_attention_heads=h // world, o_groups=g // world
        )

    @property
    def preset(self) -> str:
        """The name of the config this one is a rank of (``"flash"`` for ``"flash/tp8"``), else its own."""
        return self.name.split(RANK_SUFFIX)[0]

    def replace(self, **changes: Any) -> DeepSeekV4Config:
        """A copy with some fields changed (e.g. a smaller ``max_position_embeddings``)."""
        return dataclasses.replace(self, **changes)


def kind_of_ratio(ratio: int) -> str:
    """The attention kind of a layer with compress ratio ``ratio``: 0 SWA, 4 CSA (with the indexer), else HCA."""
    return "swa" if ratio == 0 else "csa" if ratio == COMPRESS_RATIO else "hca"


_DIMENSIONS = (  # fields that are positive ints
    "hidden_size", "num_attention_heads", "head_dim", "qk_rope_head_dim", "q_lora_rank", "index_n_heads",
    "index_head_dim", "index_topk", "sliding_window", "max_position_embeddings",
)  # fmt: skip


def finite(value: float) -> bool:
    """``math.isfinite`` that takes an int past a float's range as infinite, not as an ``OverflowError``."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def round_fp32(value: float) -> float:
    """``value`` rounded to the nearest fp32, on the host (an infinity past fp32's range)."""
    try:
        return float(struct.unpack("f", struct.pack("f", value))[0])
    except OverflowError:
        return math.copysign(math.inf, value)


def check_eps_value(name: str, eps: float) -> None:
    """A norm's ``eps`` (a number): positive and finite, also once rounded to fp32, where the kernels and the
    reference add it (a smaller one would be 0 there); else a ``ValueError`` naming ``name``."""
    if not (eps > 0 and finite(eps)):
        raise ValueError(f"{name}: expected a positive finite float, got {eps!r:.60}")
    eps32 = round_fp32(eps)  # a host value, no device read
    if not (eps32 > 0 and math.isfinite(eps32)):
        raise ValueError(f"{name}: expected a positive finite float in fp32, got {eps!r} (fp32: {eps32!r})")


def _check_field(name: str, value: object, kind: str, above: float = 0.0) -> None:
    """``kind``: "int" (an int >= 1), "int0" (an int >= 0) or "number" (a finite int or float > ``above``)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind != "number" and isinstance(value, float)):
        want = "an int" if kind != "number" else "a number"
        raise ValueError(f"{name}: expected {want}, got {value!r:.60} ({type(value).__name__})")
    if kind == "int" and value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value}")
    if kind == "int0" and value < 0:
        raise ValueError(f"{name}: expected an int >= 0, got {value}")
    if kind == "number" and not (finite(value) and value > above):
        raise ValueError(f"{name}: expected a finite number > {above:g}, got {value!r}")


_FLASH_ROPE: dict[str, Any] = dict(
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
        o_groups=8,
        o_lora_rank=1024,
        compress_ratios=(0, 0, *(4, 128) * 20, 4, 0),  # 43 layers + the MTP layer
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
        o_groups=16,
        o_lora_rank=1024,
        compress_ratios=(128, 128, *(4, 128) * 29, 4, 0),  # 61 layers + the MTP layer
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
        o_groups=8,
        o_lora_rank=1024,
        compress_ratios=(0, 0, 4, 128, 4, 128, 4, 0),  # 7 layers + the MTP layer
    ),
    # Small enough for the Triton interpreter; keeps R=64 and HID=128 (and the flash RoPE/YaRN
    # parameters) so every code path of the full-size model runs. One layer of each kind: SWA, CSA,
    # HCA (ratio 16, ours: 128 would need 128 tokens per compressed row), then an SWA MTP layer.
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
        o_groups=2,
        o_lora_rank=64,
        compress_ratios=(0, 4, 16, 0),
    ),
}


def get_config(name: str) -> DeepSeekV4Config:
    """The preset called ``name`` (one of ``PRESETS``), or one of ``N`` tensor-parallel ranks of it,
    ``"<preset>/tp<N>"`` (``DeepSeekV4Config.rank``)."""
    preset, suffix, world = name.partition(RANK_SUFFIX)
    if preset not in PRESETS or (suffix and not (world.isascii() and world.isdigit())):
        raise ValueError(
            f"unknown preset {name!r}; expected one of {sorted(PRESETS)}, or one of them with a rank suffix "
            f"'{RANK_SUFFIX}N' (one of N tensor-parallel ranks)"
        )
    return PRESETS[preset].rank(int(world)) if suffix else PRESETS[preset]


@dataclass(frozen=True)
class Shape:
    """A deployment shape: ``batch`` sequences with ``seq`` new tokens each."""

    batch: int
    seq: int


# Deployment shapes of the seeds: decode runs two tokens per sequence per step (multi-token
# prediction), prefill one prompt chunk. ``tiny`` shrinks the batch so the interpreter stays fast.
MODES: dict[str, Shape] = {"decode": Shape(batch=64, seq=2), "prefill": Shape(batch=1, seq=128)}
_TINY_MODES: dict[str, Shape] = {"decode": Shape(batch=4, seq=2), "prefill": Shape(batch=1, seq=64)}


def mode_shape(cfg: DeepSeekV4Config, mode: str) -> Shape:
    """The ``decode`` or ``prefill`` shape for a preset."""
    table = _TINY_MODES if cfg.preset == "tiny" else MODES
    try:
        return table[mode]
    except KeyError:
        raise ValueError(f"unknown mode {mode!r}; expected one of {sorted(table)}") from None

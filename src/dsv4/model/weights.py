"""Weights of one attention front end (``nn.Linear`` layout ``[out, in]``) and seeded synthetic ones."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Self

import torch

from .config import DeepSeekV4Config
from .fp8_row import quantize_fp8_weight
from .quant import quantize_weight_int8


class _Tensors:
    """Helpers shared by the weight dataclasses."""

    if TYPE_CHECKING:  # every subclass is a dataclass
        __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    def to(self, device: torch.device | str | None) -> Self:
        """A copy with every tensor on ``device`` (None: where it is; fields that are None stay None)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **{k: None if v is None else v.to(device) for k, v in values.items()})

    def nbytes(self) -> int:
        """Total bytes of every tensor held."""
        total = 0
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is not None:
                total += v.nbytes() if isinstance(v, _Tensors) else v.numel() * v.element_size()
        return total


@dataclass
class AttnWeights(_Tensors):
    """Weights of ``qkv_proj_rope``.

    ``wq_a [QL, D] bf16``, ``gamma_cq [QL] bf16|fp32``, ``wq_b [H*HD, QL] int8``,
    ``wq_b_scale [H*HD] fp32``, ``wkv [HD, D] bf16``, ``gamma_ckv [HD] bf16|fp32``.
    """

    wq_a: torch.Tensor
    gamma_cq: torch.Tensor
    wq_b: torch.Tensor
    wq_b_scale: torch.Tensor
    wkv: torch.Tensor
    gamma_ckv: torch.Tensor


@dataclass
class CompressorWeights(_Tensors):
    """Weights of a compressor: the indexer's (spec §4) or the attention's own (attention spec §3).

    ``wkv [COFF*W, D] bf16``, ``wgate [COFF*W, D] bf16``, ``ape [RC, COFF*W] fp32``,
    ``norm_w [W] bf16|fp32``, for rows of width ``W`` (the indexer: HID; the attention: HD) and
    ratio ``RC`` (the rows of ``ape``); ``COFF`` is 2 at ratio 4 (overlapping windows), else 1.
    The indexer's: ``wkv [2*HID, D]``, ``ape [4, 2*HID]``, ``norm_w [HID]``.
    """

    wkv: torch.Tensor
    wgate: torch.Tensor
    ape: torch.Tensor
    norm_w: torch.Tensor


@dataclass
class IndexerWeights(_Tensors):
    """Weights of the lightning indexer.

    ``wq_b [HI*HID, QL] int8``, ``wq_b_scale [HI*HID] fp32``, ``weights_proj [HI, D] bf16``, and the
    compressor's weights.
    """

    wq_b: torch.Tensor
    wq_b_scale: torch.Tensor
    weights_proj: torch.Tensor
    compressor: CompressorWeights


@dataclass
class OProjWeights(_Tensors):
    """Weights of ``o_proj`` (attention spec §6), as the checkpoint stores them.

    ``wo_a [G*OL, HG*HD] float8_e4m3fn`` with ``wo_a_scale [G*OL/128, HG*HD/128] fp32``, and
    ``wo_b [D, G*OL] float8_e4m3fn`` with ``wo_b_scale [ceil(D/128), G*OL/128] fp32``: one
    power-of-two scale per 128x128 block (the checkpoint's UE8M0 byte ``b`` as ``2^(b - 127)``).
    """

    wo_a: torch.Tensor
    wo_a_scale: torch.Tensor
    wo_b: torch.Tensor
    wo_b_scale: torch.Tensor


@dataclass
class LayerWeights(_Tensors):
    """One layer's attention weights: ``attn`` for ``qkv_proj_rope``, ``indexer`` for ``indexer``
    (CSA layers; None on the others), and the rest of the layer: ``compressor`` (the main compressor
    of CSA and HCA layers), ``attn_sink [H] fp32`` and ``o_proj`` (None where only the front end
    is held: ``synthetic_weights`` without a layer, ``DecodeFrontEnd``)."""

    attn: AttnWeights
    indexer: IndexerWeights | None
    compressor: CompressorWeights | None = None
    attn_sink: torch.Tensor | None = None
    o_proj: OProjWeights | None = None

    @property
    def compress_ratio(self) -> int:
        """0 (SWA), 4 (CSA) or the HCA ratio: the rows of the main compressor's ``ape``."""
        return 0 if self.compressor is None else self.compressor.ape.shape[0]

    @property
    def kind(self) -> str:
        """``"swa"``, ``"csa"`` or ``"hca"``."""
        return "swa" if self.compressor is None else "csa" if self.indexer is not None else "hca"

    @property
    def whole(self) -> bool:
        """Whether the rest of the layer (sink, output projection) is held, not only the front end."""
        return self.attn_sink is not None and self.o_proj is not None


MAX_SEED = 2**62  # largest seed the harnesses take: the seeds they derive from it (seed + 1000 + step,
# seed + 7919, ...) stay within torch.Generator's int64; a product (seed * 1009) wraps, `_mixed`


def _mixed(seed: int, salt: int) -> torch.Generator:
    """A generator seeded with ``seed * 1009 + salt`` modulo 2**64, the seeds ``torch.Generator`` takes."""
    return torch.Generator().manual_seed((seed * 1009 + salt) % 2**64)


def _normal(g: torch.Generator, shape: tuple[int, ...], std: float) -> torch.Tensor:
    return torch.randn(shape, generator=g, dtype=torch.float32) * std


def _gain(g: torch.Generator, n: int) -> torch.Tensor:
    """An RMSNorm gain near 1, as trained norms are."""
    return (1.0 + _normal(g, (n,), 0.1)).to(torch.bfloat16)


def synthetic_weights(
    cfg: DeepSeekV4Config, seed: int = 0, device: torch.device | str | None = None, layer: int | None = None
) -> LayerWeights:
    """Seeded random weights of realistic magnitude for ``cfg``.

    Projections are drawn with std ``1/sqrt(in_features)`` so their outputs have unit RMS on
    RMS-normalized inputs; gains are near 1; ``wq_b`` weights are quantized per output channel.
    The values depend on ``seed`` only, not on ``device``.

    ``layer`` None: the front end of a CSA layer (``attn`` and ``indexer``). ``layer`` N: the whole
    attention of layer N, of the kind ``cfg.compress_ratios[N]`` gives (see ``attention_weights``);
    a CSA layer's front end is then the same as without ``layer``.
    """
    if layer is not None:
        return attention_weights(cfg, cfg.layer_ratio(layer), seed, device)
    g = torch.Generator().manual_seed(seed)
    d, ql, hd, hid = cfg.hidden_size, cfg.q_lora_rank, cfg.head_dim, cfg.index_head_dim

    def proj(out: int, inp: int) -> torch.Tensor:
        return _normal(g, (out, inp), inp**-0.5)

    wq_a = proj(ql, d).to(torch.bfloat16)
    gamma_cq = _gain(g, ql)
    wq_b, wq_b_scale = quantize_weight_int8(proj(cfg.num_attention_heads * hd, ql))
    wkv = proj(hd, d).to(torch.bfloat16)
    gamma_ckv = _gain(g, hd)
    attn = AttnWeights(wq_a, gamma_cq, wq_b, wq_b_scale, wkv, gamma_ckv)

    compressor = CompressorWeights(
        wkv=proj(2 * hid, d).to(torch.bfloat16),
        wgate=proj(2 * hid, d).to(torch.bfloat16),
        ape=_normal(g, (cfg.compress_ratio, 2 * hid), 0.5),
        norm_w=_gain(g, hid),
    )
    iq_b, iq_b_scale = quantize_weight_int8(proj(cfg.index_n_heads * hid, ql))
    indexer = IndexerWeights(iq_b, iq_b_scale, proj(cfg.index_n_heads, d).to(torch.bfloat16), compressor)
    weights = LayerWeights(attn, indexer)
    return weights if device is None else weights.to(device)


def attention_weights(
    cfg: DeepSeekV4Config, ratio: int, seed: int = 0, device: torch.device | str | None = None
) -> LayerWeights:
    """Seeded weights of a whole attention layer of compress ``ratio`` (0 SWA, 4 CSA, else HCA): the
    front end (``synthetic_weights(cfg, seed)``'s; without the indexer unless CSA), the main
    compressor (``synthetic_compressor``, CSA/HCA), ``attn_sink [H] fp32`` and the FP8 output
    projection (``synthetic_o_proj``)."""
    front = synthetic_weights(cfg, seed)
    g = torch.Generator().manual_seed(seed + 7)
    layer = LayerWeights(
        attn=front.attn,
        indexer=front.indexer if ratio == 4 else None,
        compressor=synthetic_compressor(cfg, ratio, seed) if ratio else None,
        attn_sink=_normal(g, (cfg.num_attention_heads,), 1.0),
        o_proj=synthetic_o_proj(cfg, seed),
    )
    return layer if device is None else layer.to(device)


def synthetic_compressor(cfg: DeepSeekV4Config, ratio: int, seed: int = 0) -> CompressorWeights:
    """Seeded weights of the main compressor of a layer of compress ``ratio``: ``wkv``, ``wgate``
    ``[COFF*HD, D] bf16`` (COFF 2 at ratio 4, else 1), ``ape [ratio, COFF*HD] fp32``, ``norm_w [HD]``."""
    if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 1:
        raise ValueError(f"ratio: expected a compress ratio >= 1, got {ratio!r}")
    g = _mixed(seed, ratio)
    d, hd = cfg.hidden_size, cfg.head_dim
    width = (2 if ratio == 4 else 1) * hd
    return CompressorWeights(
        wkv=_normal(g, (width, d), d**-0.5).to(torch.bfloat16),
        wgate=_normal(g, (width, d), d**-0.5).to(torch.bfloat16),
        ape=_normal(g, (ratio, width), 0.5),
        norm_w=_gain(g, hd),
    )


def synthetic_o_proj(cfg: DeepSeekV4Config, seed: int = 0) -> OProjWeights:
    """Seeded FP8 output-projection weights with 128x128 block scales (``G``, ``OL`` from ``cfg``),
    drawn with std ``1/sqrt(in_features)`` and quantized as DeepSeek's checkpoints store them."""
    h, hd, gr, ol = cfg.num_attention_heads, cfg.head_dim, cfg.o_groups, cfg.o_lora_rank
    if gr < 1 or ol < 1 or h % gr:
        raise ValueError(f"cfg: {cfg.name} needs o_groups >= 1 dividing H={h} and o_lora_rank >= 1, got {gr}, {ol}")
    g = _mixed(seed, 3)
    inner = h // gr * hd
    wo_a, wo_a_scale = quantize_fp8_weight(_normal(g, (gr * ol, inner), inner**-0.5))
    wo_b, wo_b_scale = quantize_fp8_weight(_normal(g, (cfg.hidden_size, gr * ol), (gr * ol) ** -0.5))
    return OProjWeights(wo_a, wo_a_scale, wo_b, wo_b_scale)


def synthetic_activations(
    shape: tuple[int, ...], seed: int = 0, outliers: int = 0, device: torch.device | str | None = None
) -> torch.Tensor:
    """RMS-normalized random bf16 rows of ``shape`` (last axis = D), like a normed hidden state.

    ``outliers``: how many entries per row to scale by 20x before normalizing (the few large
    activation channels real models have).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float32)
    if outliers:
        idx = torch.randint(0, shape[-1], (*shape[:-1], outliers), generator=g)
        x.scatter_(-1, idx, x.gather(-1, idx) * 20.0)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    return x.to(torch.bfloat16).to(device)

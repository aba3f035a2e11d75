"""Weights of one attention front end (``nn.Linear`` layout ``[out, in]``) and seeded synthetic ones."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .config import DeepSeekV4Config
from .quant import quantize_weight_int8


class _Tensors:
    """Helpers shared by the weight dataclasses."""

    def to(self, device: torch.device | str):
        """A copy with every tensor on ``device``."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})

    def nbytes(self) -> int:
        """Total bytes of every tensor held."""
        total = 0
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
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
    """Weights of the ratio-4 indexer compressor.

    ``wkv [2*HID, D] bf16``, ``wgate [2*HID, D] bf16``, ``ape [4, 2*HID] fp32``, ``norm_w [HID] bf16|fp32``.
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
class LayerWeights(_Tensors):
    """One layer's attention front end: ``attn`` for ``qkv_proj_rope``, ``indexer`` for ``indexer``."""

    attn: AttnWeights
    indexer: IndexerWeights


MAX_SEED = 2**62  # largest seed the harnesses take: the seeds they derive from it (seed + 1000 + step,
# seed + 7919, ...) stay within torch.Generator's int64


def _normal(g: torch.Generator, shape: tuple[int, ...], std: float) -> torch.Tensor:
    return torch.randn(shape, generator=g, dtype=torch.float32) * std


def _gain(g: torch.Generator, n: int) -> torch.Tensor:
    """An RMSNorm gain near 1, as trained norms are."""
    return (1.0 + _normal(g, (n,), 0.1)).to(torch.bfloat16)


def synthetic_weights(cfg: DeepSeekV4Config, seed: int = 0, device: torch.device | str | None = None) -> LayerWeights:
    """Seeded random weights of realistic magnitude for ``cfg``.

    Projections are drawn with std ``1/sqrt(in_features)`` so their outputs have unit RMS on
    RMS-normalized inputs; gains are near 1; ``wq_b`` weights are quantized per output channel.
    The values depend on ``seed`` only, not on ``device``.
    """
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
    layer = LayerWeights(attn, indexer)
    return layer if device is None else layer.to(device)


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

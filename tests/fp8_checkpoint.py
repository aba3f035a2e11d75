"""Write small DeepSeek-V4-format checkpoints for tests: FP8 e4m3 weights with UE8M0 128x128 block
scales (torch's ``float8_e4m3fn`` / ``float8_e8m0fnu`` through ``safetensors``), sharded with an
index file and a ``config.json``. Independent of ``dsv4``'s loader: its own block quantizer and
float64 dequantizer are the expected values the tests compare against."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from dsv4 import DeepSeekV4Config, LayerWeights

BLOCK = 128
E4M3_MAX = 448.0


def quantize_fp8_blocks(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [out, in]`` fp32 -> ``(float8_e4m3fn [out, in], float8_e8m0fnu [ceil(out/b), ceil(in/b)])``:
    each block scaled by the power of two that brings its amax to at most 448."""
    out, inp = w.shape
    grid = (math.ceil(out / block), math.ceil(inp / block))
    padded = torch.zeros(grid[0] * block, grid[1] * block)
    padded[:out, :inp] = w
    amax = padded.view(grid[0], block, grid[1], block).abs().amax(dim=(1, 3)).clamp_min(2.0**-100)
    exponent = torch.ceil(torch.log2(amax / E4M3_MAX))
    scale = torch.exp2(exponent).repeat_interleave(block, 0)[:out].repeat_interleave(block, 1)[:, :inp]
    w8 = (w / scale).to(torch.float8_e4m3fn)
    scale_bytes = (exponent + 127).to(torch.uint8)
    return w8, scale_bytes.view(torch.float8_e8m0fnu)


def dequantize_f64(w8: torch.Tensor, scale: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """The float64 value of an FP8 weight: ``fp8 x 2^(byte - 127)`` per block, from the stored tensors."""
    out, inp = w8.shape
    s = torch.pow(2.0, scale.view(torch.uint8).to(torch.float64) - 127)
    s = s.repeat_interleave(block, 0)[:out].repeat_interleave(block, 1)[:, :inp]
    return w8.to(torch.float64) * s


def _weight(g: torch.Generator, out: int, inp: int) -> torch.Tensor:
    """Random ``[out, in]`` with block magnitudes spread over 2^-6..2^5, so block scales differ."""
    w = torch.randn(out, inp, generator=g) * inp**-0.5
    spread = torch.exp2(torch.randint(-6, 6, (math.ceil(out / BLOCK), math.ceil(inp / BLOCK)), generator=g).float())
    return w * spread.repeat_interleave(BLOCK, 0)[:out].repeat_interleave(BLOCK, 1)[:, :inp]


def layer_tensors(cfg: DeepSeekV4Config, layer: int, ratio: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """One layer's attention tensors as the published checkpoints store them (names under
    ``layers.{layer}.``), for compress ratio 0, 4 (with the lightning indexer) or any other (HCA):
    the front end, the main compressor (ratio > 0), the sink and the FP8 output projection; plus
    one tensor of another part of the layer."""
    g = torch.Generator().manual_seed(seed * 1000 + layer)
    d, ql, hd, hid = cfg.hidden_size, cfg.q_lora_rank, cfg.head_dim, cfg.index_head_dim
    p = f"layers.{layer}."
    t: dict[str, torch.Tensor] = {}

    def fp8(name: str, out: int, inp: int) -> None:
        t[f"{p}{name}.weight"], t[f"{p}{name}.scale"] = quantize_fp8_blocks(_weight(g, out, inp))

    def bf16(name: str, *shape: int) -> None:
        t[p + name] = (torch.randn(shape, generator=g) * shape[-1] ** -0.5).to(torch.bfloat16)

    def gain(name: str, n: int) -> None:
        t[p + name] = (1 + 0.1 * torch.randn(n, generator=g)).to(torch.bfloat16)

    fp8("attn.wq_a", ql, d)
    fp8("attn.wq_b", cfg.num_attention_heads * hd, ql)
    fp8("attn.wkv", hd, d)
    gain("attn.q_norm.weight", ql)
    gain("attn.kv_norm.weight", hd)
    if ratio:  # the attention's own compressor (not part of the front end)
        width = (2 if ratio == 4 else 1) * hd
        bf16("attn.compressor.wkv.weight", width, d)
        t[f"{p}attn.compressor.ape"] = torch.randn(ratio, width, generator=g)
        bf16("attn.compressor.wgate.weight", width, d)
        gain("attn.compressor.norm.weight", hd)
    if ratio == 4:
        fp8("attn.indexer.wq_b", cfg.index_n_heads * hid, ql)
        bf16("attn.indexer.weights_proj.weight", cfg.index_n_heads, d)
        bf16("attn.indexer.compressor.wkv.weight", 2 * hid, d)
        bf16("attn.indexer.compressor.wgate.weight", 2 * hid, d)
        t[f"{p}attn.indexer.compressor.ape"] = 0.5 * torch.randn(4, 2 * hid, generator=g)
        gain("attn.indexer.compressor.norm.weight", hid)
    t[f"{p}attn.attn_sink"] = torch.randn(cfg.num_attention_heads, generator=g)
    gol = cfg.o_groups * cfg.o_lora_rank
    fp8("attn.wo_a", gol, cfg.num_attention_heads // cfg.o_groups * hd)
    fp8("attn.wo_b", d, gol)
    bf16("ffn.gate.weight", 8, d)
    return t


def config_json(cfg: DeepSeekV4Config, compress_ratios: list[int] | None) -> dict:
    """The ``config.json`` fields of a checkpoint with ``cfg``'s dimensions (published field names)."""
    raw = {
        "architectures": ["DeepseekV4ForCausalLM"],
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "head_dim": cfg.head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "q_lora_rank": cfg.q_lora_rank,
        "index_n_heads": cfg.index_n_heads,
        "index_head_dim": cfg.index_head_dim,
        "index_topk": cfg.index_topk,
        "sliding_window": cfg.sliding_window,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": int(cfg.rope_theta),
        "compress_rope_theta": int(cfg.compress_rope_theta),
        "rms_norm_eps": cfg.rms_norm_eps,
        "o_groups": cfg.o_groups,
        "o_lora_rank": cfg.o_lora_rank,
        "quantization_config": {
            "fmt": "e4m3",
            "quant_method": "fp8",
            "scale_fmt": "ue8m0",
            "weight_block_size": [128, 128],
        },
    }
    if cfg.original_max_position_embeddings:
        raw["rope_scaling"] = {
            "beta_fast": int(cfg.beta_fast),
            "beta_slow": int(cfg.beta_slow),
            "factor": int(cfg.rope_factor),
            "original_max_position_embeddings": cfg.original_max_position_embeddings,
            "type": "yarn",
        }
    if compress_ratios is not None:
        raw["compress_ratios"] = compress_ratios
        raw["num_hidden_layers"] = len(compress_ratios)
    return raw


def write_checkpoint(directory: Path, shards: list[dict[str, torch.Tensor]], config: dict | None) -> Path:
    """Write ``shards`` as ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``
    (one shard: a single ``model.safetensors``, no index) and ``config`` as ``config.json``. Each shard's
    header holds ``__metadata__`` ``{"format": "pt"}``, as ``save_pretrained``'s shards do."""
    directory.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, tensors in enumerate(shards):
        name = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    if len(shards) > 1:
        (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def _fields(w: object, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for name, v in vars(w).items():
        if v is not None:
            out.update(_fields(v, f"{prefix}{name}.") if not isinstance(v, torch.Tensor) else {prefix + name: v})
    return out


def assert_same_layer(got: LayerWeights, want: LayerWeights) -> None:
    """Every tensor of two layers' weights equal bit for bit (FP8 codes compared as bytes)."""
    g, w = _fields(got), _fields(want)
    assert g.keys() == w.keys()
    for name in w:
        assert g[name].dtype == w[name].dtype and g[name].shape == w[name].shape, name
        a, b = (t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t for t in (g[name], w[name]))
        assert torch.equal(a, b), f"{name}: {(g[name].double() - w[name].double()).abs().max()}"

"""Load one layer's attention from a DeepSeek-V4 safetensors checkpoint.

The published checkpoints store every linear weight as ``float8_e4m3fn`` with UE8M0 block scales
(``.scale``, one per ``128 x 128`` block). ``wq_a`` and ``wkv`` are dequantized to bf16; ``attn.wq_b``
and ``attn.indexer.wq_b`` are requantized to per-output-channel INT8 (spec §2), the W8A8 form the
kernels take; ``attn.wo_a`` and ``attn.wo_b`` stay FP8 with their block scales as fp32 powers of two
(attention spec §6). Only the requested layer's tensors are read, a bounded number of rows at a time.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..devices import check_device
from ..model.config import COMPRESS_RATIO, PRESETS, DeepSeekV4Config, finite, kind_of_ratio
from ..model.quant import quantize_weight_int8
from ..model.weights import AttnWeights, CompressorWeights, IndexerWeights, LayerWeights, OProjWeights
from ..ops.validate import INDEX_LIMIT, MAX_TOPK
from .fp8 import dequantize_rows_, scale_grid
from .json_files import JSONFileError, read_json, unique_keys
from .safetensors_files import CheckpointError, ShardedCheckpoint, TensorInfo

CONFIG_FILE = "config.json"
DEFAULT_PREFIX = "layers.{layer}."
DEFAULT_BLOCK = (128, 128)  # DeepSeek's weight_block_size when config.json does not say
O_PROJ_BLOCK = 128  # o_proj takes wo_a and wo_b as FP8 codes with one scale per 128 x 128 block
ROW_CHUNK_BYTES = 4 << 20  # fp32 bytes of weight rows dequantized at once: bounds the temporaries to a few
# of these whatever the layer's size (the 32768x1024 wq_b of flash would be 128 MiB in fp32)

FP8, SCALE, GAIN = ("F8_E4M3",), ("F8_E8M0",), ("BF16", "F32")


@dataclass(frozen=True)
class TensorSpec:
    """What the front end needs under a layer's prefix: a tensor name, accepted dtypes and shape."""

    name: str
    dtypes: tuple[str, ...]
    shape: tuple[int, ...]


def _fp8_specs(name: str, out: int, inp: int, block: tuple[int, int]) -> list[TensorSpec]:
    """An FP8 weight ``[out, in]`` and its ``.scale`` block grid."""
    return [
        TensorSpec(f"{name}.weight", FP8, (out, inp)),
        TensorSpec(f"{name}.scale", SCALE, scale_grid((out, inp), block)),
    ]


def front_end_specs(cfg: DeepSeekV4Config, indexer: bool, block: tuple[int, int] = DEFAULT_BLOCK) -> list[TensorSpec]:
    """The tensors of one layer's front end (names relative to the layer prefix), ``[out, in]``
    layout; FP8 weights come with their ``.scale`` block grid. ``indexer``: include the lightning
    indexer's tensors (ratio-4 layers only)."""
    d, ql, hd, hid = cfg.hidden_size, cfg.q_lora_rank, cfg.head_dim, cfg.index_head_dim

    def fp8(name: str, out: int, inp: int) -> list[TensorSpec]:
        return _fp8_specs(name, out, inp, block)

    specs = [
        *fp8("attn.wq_a", ql, d),
        *fp8("attn.wq_b", cfg.num_attention_heads * hd, ql),
        *fp8("attn.wkv", hd, d),
        TensorSpec("attn.q_norm.weight", GAIN, (ql,)),
        TensorSpec("attn.kv_norm.weight", GAIN, (hd,)),
    ]
    if indexer:
        specs += [
            *fp8("attn.indexer.wq_b", cfg.index_n_heads * hid, ql),
            TensorSpec("attn.indexer.weights_proj.weight", ("BF16",), (cfg.index_n_heads, d)),
            TensorSpec("attn.indexer.compressor.wkv.weight", ("BF16",), (2 * hid, d)),
            TensorSpec("attn.indexer.compressor.wgate.weight", ("BF16",), (2 * hid, d)),
            TensorSpec("attn.indexer.compressor.ape", ("F32",), (COMPRESS_RATIO, 2 * hid)),
            TensorSpec("attn.indexer.compressor.norm.weight", GAIN, (hid,)),
        ]
    return specs


def attention_specs(cfg: DeepSeekV4Config, ratio: int, block: tuple[int, int] = DEFAULT_BLOCK) -> list[TensorSpec]:
    """The rest of a layer's attention (attention spec §3, §5, §6): the main compressor of a CSA or
    HCA layer (``ratio > 0``; ``wkv``/``wgate [COFF*HD, D]`` bf16, ``ape [ratio, COFF*HD]`` fp32,
    ``norm``), ``attn_sink [H]`` fp32 and the FP8 output projection ``wo_a [G*OL, HG*HD]``,
    ``wo_b [D, G*OL]`` with their scales."""
    d, hd, h, g = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.o_groups
    specs = []
    if ratio:
        width = (2 if ratio == COMPRESS_RATIO else 1) * hd
        specs += [
            TensorSpec("attn.compressor.wkv.weight", ("BF16",), (width, d)),
            TensorSpec("attn.compressor.wgate.weight", ("BF16",), (width, d)),
            TensorSpec("attn.compressor.ape", ("F32",), (ratio, width)),
            TensorSpec("attn.compressor.norm.weight", GAIN, (hd,)),
        ]
    gol, inner = g * cfg.o_lora_rank, (h // g if g else 0) * hd
    specs += [
        TensorSpec("attn.attn_sink", ("F32",), (h,)),
        *_fp8_specs("attn.wo_a", gol, inner, block),
        *_fp8_specs("attn.wo_b", d, gol, block),
    ]
    return specs


def layer_specs(cfg: DeepSeekV4Config, ratio: int, block: tuple[int, int] = DEFAULT_BLOCK) -> list[TensorSpec]:
    """Every attention tensor of a layer of compress ``ratio``: the front end, then the rest."""
    return front_end_specs(cfg, indexer=ratio == COMPRESS_RATIO, block=block) + attention_specs(cfg, ratio, block)


# config.json fields that must be present; each is the DeepSeekV4Config field of the same name
_REQUIRED_FIELDS = (
    "hidden_size",
    "num_attention_heads",
    "head_dim",
    "qk_rope_head_dim",
    "q_lora_rank",
    "index_n_heads",
    "index_head_dim",
    "index_topk",
    "max_position_embeddings",
    "rope_theta",
    "compress_rope_theta",
)
_INT_FIELDS = _REQUIRED_FIELDS[:9]  # positive ints; the two thetas are positive numbers


def _field(source: str, name: str, value: Any, kind: str) -> int | float:
    """``value`` of config field ``name`` checked: ``kind`` "int" (> 0), "int0" (>= 0), "pos" (finite
    number > 0) or "num" (finite number)."""
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if kind.startswith("int"):
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= (0 if kind == "int0" else 1)
        want = "a non-negative int" if kind == "int0" else "a positive int"
    else:
        ok = is_number and finite(value) and (kind == "num" or value > 0)
        want = "a finite number" + (" > 0" if kind == "pos" else "")
    if not ok:
        raise CheckpointError(f"{source}: {name} must be {want}, got {value!r:.60}")
    return value


def config_from_json(raw: dict[str, Any], source: str = CONFIG_FILE) -> DeepSeekV4Config:
    """A ``DeepSeekV4Config`` from a checkpoint's ``config.json`` fields: the matching preset when
    every dimension and RoPE parameter agrees with one, else a config named ``"checkpoint"``.

    YaRN comes from ``rope_scaling`` (``factor``, ``original_max_position_embeddings``,
    ``beta_fast``, ``beta_slow``; absent or null: no YaRN; a ``type``/``rope_type`` other than
    ``"yarn"``, or a ``factor`` other than 1 without ``original_max_position_embeddings``, is
    refused); the window from ``sliding_window`` (or ``window_size``). Every field used is checked
    (dimensions positive ints, thetas, factor and eps finite and positive); ``CheckpointError`` names
    ``source`` and the field.
    """
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    missing = [k for k in _REQUIRED_FIELDS if k not in raw]
    window = raw.get("sliding_window", raw.get("window_size"))
    if window is None:
        missing.append("sliding_window")
    if missing:
        raise CheckpointError(
            f"{source}: missing field(s) {', '.join(missing)}; pass cfg= to load_layer (dsv4: --preset) instead"
        )
    fields: dict[str, Any] = {k: _field(source, k, raw[k], "int") for k in _INT_FIELDS}
    yarn = raw.get("rope_scaling") or {}
    if not isinstance(yarn, dict):
        raise CheckpointError(f"{source}: rope_scaling must be a JSON object or null, got {yarn!r:.60}")

    def scaling(name: str, default: float, kind: str) -> int | float:
        return _field(source, f"rope_scaling.{name}", yarn.get(name, default), kind)

    types = {key: yarn[key] for key in ("type", "rope_type") if key in yarn}  # older and newer spellings
    for key, value in types.items():
        if value != "yarn":
            raise CheckpointError(
                f"{source}: rope_scaling.{key} must be 'yarn' (the only scaling supported), got {value!r:.60}"
            )
    if yarn and scaling("factor", 1.0, "pos") != 1 and "original_max_position_embeddings" not in yarn:
        raise CheckpointError(
            f"{source}: rope_scaling.original_max_position_embeddings missing: YaRN with rope_scaling.factor "
            f"{yarn['factor']!r:.30} needs the context length it extends (0: no YaRN)"
        )

    fields.update(
        sliding_window=_field(source, "sliding_window", window, "int"),
        rope_theta=float(_field(source, "rope_theta", raw["rope_theta"], "pos")),
        compress_rope_theta=float(_field(source, "compress_rope_theta", raw["compress_rope_theta"], "pos")),
        rope_factor=float(scaling("factor", 1.0, "pos")),
        original_max_position_embeddings=scaling("original_max_position_embeddings", 0, "int0"),
        beta_fast=float(scaling("beta_fast", 32.0, "num")),
        beta_slow=float(scaling("beta_slow", 1.0, "num")),
        rms_norm_eps=float(_field(source, "rms_norm_eps", raw.get("rms_norm_eps", 1e-6), "pos")),
        o_groups=_field(source, "o_groups", raw.get("o_groups", 0), "int0"),
        o_lora_rank=_field(source, "o_lora_rank", raw.get("o_lora_rank", 0), "int0"),
        compress_ratios=_ratios(source, raw.get("compress_ratios")),
    )
    try:
        cfg = DeepSeekV4Config(name="checkpoint", **fields)
    except ValueError as e:  # a value of the right type that no model can have (an odd rope dim, beta <= 0)
        raise CheckpointError(f"{source}: {_json_names(str(e))}") from None
    if cfg.index_topk > MAX_TOPK:
        raise CheckpointError(f"{source}: index_topk must be <= {MAX_TOPK} (the top-k kernels), got {cfg.index_topk}")
    rows = cfg.max_position_embeddings // COMPRESS_RATIO
    if cfg.sliding_window + rows >= INDEX_LIMIT:
        raise CheckpointError(
            f"{source}: sliding_window + max_position_embeddings // {COMPRESS_RATIO} must be < 2^31 (int32 indices), "
            f"got {cfg.sliding_window} + {rows}"
        )
    for preset in PRESETS.values():  # the layer list is the checkpoint's; o_groups / o_lora_rank the preset's if absent
        filled = cfg.replace(
            name=preset.name,
            o_groups=cfg.o_groups or preset.o_groups,
            o_lora_rank=cfg.o_lora_rank or preset.o_lora_rank,
            compress_ratios=cfg.compress_ratios or preset.compress_ratios,
        )
        if _in_effect(filled.replace(compress_ratios=preset.compress_ratios)) == _in_effect(preset):
            return (
                preset
                if filled.compress_ratios == preset.compress_ratios
                else preset.replace(compress_ratios=filled.compress_ratios)
            )
    return cfg


def _ratios(source: str, ratios: object) -> tuple[int, ...]:
    """``compress_ratios`` (absent: ``()``): a list of non-negative ints."""
    if ratios is None:
        return ()
    if not isinstance(ratios, list) or not all(
        isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in ratios
    ):
        raise CheckpointError(f"{source}: compress_ratios must be a list of non-negative ints, got {ratios!r:.80}")
    return tuple(ratios)


_JSON_NAMES = {  # DeepSeekV4Config field -> where config.json holds it
    "rope_factor": "rope_scaling.factor",
    "original_max_position_embeddings": "rope_scaling.original_max_position_embeddings",
    "beta_fast": "rope_scaling.beta_fast",
    "beta_slow": "rope_scaling.beta_slow",
}


def _json_names(message: str) -> str:
    """A ``DeepSeekV4Config`` error with its leading field named as in ``config.json``."""
    field, sep, rest = message.partition(":")
    return _JSON_NAMES.get(field, field) + sep + rest


def _in_effect(cfg: DeepSeekV4Config) -> DeepSeekV4Config:
    """``cfg`` with the YaRN parameters reset when YaRN is off (they change nothing then)."""
    return cfg if cfg.original_max_position_embeddings else cfg.replace(rope_factor=1.0, beta_fast=32.0, beta_slow=1.0)


class Checkpoint(ShardedCheckpoint):
    """A DeepSeek-V4 checkpoint directory: its ``config.json`` (optional) and safetensors files."""

    def __init__(self, directory: str | Path, raw_bytes: bool | None = None):
        super().__init__(directory, raw_bytes)
        path = self.directory / CONFIG_FILE
        try:
            self.config_json: dict[str, Any] | None = read_json(path, unique_keys) if path.is_file() else None
        except JSONFileError as e:
            raise CheckpointError(str(e)) from None
        if self.config_json is not None and not isinstance(self.config_json, dict):
            raise CheckpointError(f"{path}: expected a JSON object, got {type(self.config_json).__name__}")
        quant = (self.config_json or {}).get("quantization_config") or {}
        if not isinstance(quant, dict):
            raise CheckpointError(f"{path}: quantization_config must be a JSON object, got {quant!r:.60}")
        block = quant.get("weight_block_size", DEFAULT_BLOCK)
        well_formed = isinstance(block, list | tuple) and len(block) == 2
        if not (well_formed and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
            raise CheckpointError(f"{path}: weight_block_size must be two positive ints, got {block}")
        self.block: tuple[int, int] = (block[0], block[1])
        ratios = (self.config_json or {}).get("compress_ratios")
        if ratios is not None and not (
            isinstance(ratios, list) and all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in ratios)
        ):
            raise CheckpointError(f"{path}: compress_ratios must be a list of non-negative ints, got {ratios!r:.80}")

    def config(self) -> DeepSeekV4Config:
        """The model dimensions from ``config.json`` (see ``config_from_json``). When the file has no
        ``compress_ratios``, the config's are the ratios the tensors decide (``tensor_ratios``), so that a
        layer's kind is the same to ``load_layer`` and to ``layer_rope_table(cfg, layer)``."""
        cfg = self._file_config()
        if (self.config_json or {}).get("compress_ratios") is None:
            ratios = self.tensor_ratios()
            cfg = cfg if ratios == cfg.compress_ratios else cfg.replace(compress_ratios=ratios)
        return cfg

    def _file_config(self) -> DeepSeekV4Config:
        """``config.json`` as ``config_from_json`` reads it (without it: a ``CheckpointError``)."""
        if self.config_json is None:
            raise CheckpointError(f"{self.directory}: no {CONFIG_FILE}; pass cfg= with the model's dimensions")
        return config_from_json(self.config_json, str(self.directory / CONFIG_FILE))

    def tensor_ratios(self, prefix: str = DEFAULT_PREFIX) -> tuple[int, ...]:
        """The compress ratios the tensors decide (``compress_ratio`` without ``config.json``) of layers 0, 1,
        ... up to the first layer the checkpoint has no tensors of. Reads the headers of the shards holding
        the layers' indexer and compressor tensors."""
        present, ratios = set(self.layers(prefix)), list[int]()
        while len(ratios) in present:
            ratios.append(self._tensor_ratio(len(ratios), prefix)[0])
        return tuple(ratios)

    def layers(self, prefix: str = DEFAULT_PREFIX) -> list[int]:
        """Layer numbers that have tensors under ``prefix`` (a template with ``{layer}``)."""
        check_prefix(prefix)
        pattern = re.compile(re.escape(prefix).replace(re.escape("{layer}"), r"(\d+)"))
        return sorted({int(m.group(1)) for name in self.weight_map if (m := pattern.match(name))})

    def compress_ratio(self, layer: int, prefix: str = DEFAULT_PREFIX) -> tuple[int, str]:
        """``(ratio, where it came from)`` of a layer: ``config.json``'s ``compress_ratios[layer]``
        for the default prefix; otherwise the tensors present decide (an indexer: 4; else the rows
        of ``attn.compressor.ape``, the compressor's window; no compressor: 0)."""
        ratios = (self.config_json or {}).get("compress_ratios")
        if prefix == DEFAULT_PREFIX and ratios is not None and 0 <= layer < len(ratios):
            return ratios[layer], f"{CONFIG_FILE} compress_ratios[{layer}]"
        return self._tensor_ratio(layer, prefix)

    def _tensor_ratio(self, layer: int, prefix: str) -> tuple[int, str]:
        """``compress_ratio`` as the tensors present decide it."""
        p = prefix.format(layer=layer)
        if f"{p}attn.indexer.wq_b.weight" in self.weight_map:
            return COMPRESS_RATIO, "the layer has indexer tensors"
        ape = self.info(f"{p}attn.compressor.ape")
        if ape is not None:
            if len(ape.shape) != 2:
                raise CheckpointError(f"{ape.file}: {ape.name} must be [ratio, width], got shape {list(ape.shape)}")
            return ape.shape[0], f"rows of {ape.name}"
        return 0, "the layer has neither attn.compressor.ape nor attn.indexer.wq_b.weight"

    def unused_kind_tensors(self, layer: int, ratio: int, prefix: str = DEFAULT_PREFIX) -> list[str]:
        """The layer's ``attn.indexer.*`` tensors unless ``ratio`` is 4 (CSA), and its ``attn.compressor.*``
        tensors when ``ratio`` is 0 (SWA): tensors of a kind other than the one ``ratio`` gives, which
        ``load_layer`` refuses rather than drop (empty: none)."""
        p = prefix.format(layer=layer) + "attn."
        unused = (() if ratio == COMPRESS_RATIO else (p + "indexer.",)) + ((p + "compressor.",) if ratio == 0 else ())
        return sorted(name for name in self.weight_map if name.startswith(unused)) if unused else []

    def kind_problem(self, layer: int, prefix: str = DEFAULT_PREFIX) -> str | None:
        """Why the layer's tensors are not of the kind its compress ratio gives (``compress_ratio``):
        they hold a compressor or indexer that kind has not (see ``unused_kind_tensors``); None if not."""
        ratio, source = self.compress_ratio(layer, prefix)
        unused = self.unused_kind_tensors(layer, ratio, prefix)
        if not unused:
            return None
        kind = (
            "an SWA layer, which has no compressor and no indexer"
            if ratio == 0
            else "an HCA layer, which has no indexer"
        )
        return (
            f"compress ratio {ratio} ({source}) makes it {kind}, but the layer holds {len(unused)} such tensor(s): "
            + ", ".join(unused)
        )

    def value_problems(self, prefix: str, specs: list[TensorSpec]) -> list[str]:
        """What ``load_layer`` would refuse in the tensors of ``specs`` present under ``prefix``, found
        without the model's dimensions: a dtype not accepted, a scale grid that does not fit its weight's
        blocks, NaN or infinite values (bf16/fp32), NaN scales, FP8 codes or dequantized values that are NaN
        or infinite. Reads every value of those tensors (empty: none)."""
        problems = []
        for spec in specs:
            info = self.info(prefix + spec.name)
            if info is None:
                continue
            if info.dtype not in spec.dtypes:
                problems.append(f"{info.name}: expected {' or '.join(spec.dtypes)}, found {info.dtype}")
                continue
            if spec.dtypes == SCALE:  # its grid and values: with its weight
                continue
            try:
                if spec.dtypes != FP8:
                    self._finite(info)
                    continue
                scale = self.info(info.name.removesuffix(".weight") + ".scale")
                if scale is None or scale.dtype not in SCALE:
                    continue  # missing (named by the caller's listing) or of another dtype (named above)
                grid = scale_grid(info.shape, self.block) if len(info.shape) == 2 else None
                if scale.shape != grid:
                    problems.append(
                        f"{scale.name}: expected {list(grid or ())} scale blocks of {list(self.block)} over "
                        f"{info.name} {list(info.shape)}, found {list(scale.shape)}"
                    )
                    continue
                self._fp8_codes(info, self._scale(scale))
            except CheckpointError as e:
                problems.append(str(e))
        return problems

    def check(self, prefix: str, specs: list[TensorSpec]) -> list[str]:
        """Every way the tensors under ``prefix`` differ from ``specs`` (empty: all present and right)."""
        problems = []
        for spec in specs:
            name = prefix + spec.name
            info = self.info(name)
            want = f"{' or '.join(spec.dtypes)} {list(spec.shape)}"
            if info is None:
                problems.append(f"{name}: missing (expected {want})")
            elif info.dtype not in spec.dtypes or info.shape != spec.shape:
                problems.append(f"{name}: expected {want}, found {info.dtype} {list(info.shape)}")
        return problems

    def load_layer(
        self,
        layer: int,
        cfg: DeepSeekV4Config | None = None,
        prefix: str = DEFAULT_PREFIX,
        device: torch.device | str | None = None,
        rank: int = 0,
        world: int = 1,
    ) -> LayerWeights:
        """See ``dsv4.load_layer``."""
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise CheckpointError(f"layer: expected a non-negative int, got {layer!r}")
        check_prefix(prefix)
        device = None if device is None else check_device(device)
        given, cfg = cfg is not None, self._file_config() if cfg is None else cfg  # the dims; the ratio: below
        share = cfg.rank(world)  # a world that would split a head or a group: a ValueError naming it
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
            raise CheckpointError(f"rank: expected an int in [0, {world}) (world={world}), got {rank!r}")
        # every rank's rows of wq_b (its heads) and of wo_a / columns of wo_b (its groups) must start a scale
        # block, whichever rank is asked for: the step between ranks must be whole blocks
        q_step, o_step = share.num_attention_heads * cfg.head_dim, share.o_groups * cfg.o_lora_rank
        bm, bn = self.block
        if world > 1 and (q_step % bm or o_step % bm or o_step % bn):
            raise CheckpointError(
                f"world: {world} ranks would split {bm}x{bn} scale blocks: each rank's {q_step} rows of attn.wq_b "
                f"must be whole blocks of {bm} rows, its {o_step} rows of attn.wo_a (columns of attn.wo_b) whole "
                f"blocks of {bm} rows ({bn} columns)"
            )
        p = prefix.format(layer=layer)
        if not any(name.startswith(p) for name in self.weight_map):
            found = self.layers(prefix)
            raise CheckpointError(
                f"{self.directory}: no tensors under {p!r} (layers found: {format_ranges(found) or 'none'})"
            )
        ratio, source = self.compress_ratio(layer, prefix)
        kind_problem = self.kind_problem(layer, prefix)
        if kind_problem:
            raise CheckpointError(f"{self.directory}, layer {layer}: {kind_problem}")
        check_o_proj_config(cfg)
        specs = layer_specs(cfg, ratio, self.block)
        problems = self.check(p, specs)
        if problems:
            raise CheckpointError(f"{self.directory}, layer {layer}: " + "; ".join(problems))
        listed = cfg.compress_ratios[layer] if given and layer < len(cfg.compress_ratios) else ratio
        if prefix == DEFAULT_PREFIX and listed != ratio:  # another prefix's layer N need not be the model's
            raise CheckpointError(
                f"cfg: {cfg.name}'s compress_ratios[{layer}] is {listed} ({kind_of_ratio(listed).upper()}), but the "
                f"checkpoint's layer {layer} has compress ratio {ratio} ({kind_of_ratio(ratio).upper()}; {source}): "
                "its kind and RoPE table would disagree; pass a cfg (dsv4 run: a --preset) whose compress_ratios agree"
            )
        infos = {s.name: info for s in specs if (info := self.info(p + s.name)) is not None}  # all: check()
        scales = {name[: -len(".scale")]: self._scale(info) for name, info in infos.items() if name.endswith(".scale")}

        def weight(name: str) -> tuple[TensorInfo, torch.Tensor]:
            return infos[f"{name}.weight"], scales[name]

        # a rank's rows of wq_b (its heads) and of wo_a (its groups), the same columns of wo_b
        heads, groups = share.num_attention_heads, share.o_groups * cfg.o_lora_rank
        q_rows = (rank * heads * cfg.head_dim, (rank + 1) * heads * cfg.head_dim)
        o_rows = (rank * groups, (rank + 1) * groups)
        wq_b, wq_b_scale = self._requantized_int8(*weight("attn.wq_b"), rows=q_rows)
        plain = {name: self._finite(info) for name, info in infos.items() if info.dtype not in FP8 + SCALE}
        attn = AttnWeights(
            wq_a=self._dequantized_bf16(*weight("attn.wq_a")),
            gamma_cq=plain["attn.q_norm.weight"],
            wq_b=wq_b,
            wq_b_scale=wq_b_scale,
            wkv=self._dequantized_bf16(*weight("attn.wkv")),
            gamma_ckv=plain["attn.kv_norm.weight"],
        )
        indexer = None
        if ratio == COMPRESS_RATIO:
            iq_b, iq_b_scale = self._requantized_int8(*weight("attn.indexer.wq_b"))
            compressor = CompressorWeights(
                wkv=plain["attn.indexer.compressor.wkv.weight"],
                wgate=plain["attn.indexer.compressor.wgate.weight"],
                ape=plain["attn.indexer.compressor.ape"],
                norm_w=plain["attn.indexer.compressor.norm.weight"],
            )
            indexer = IndexerWeights(iq_b, iq_b_scale, plain["attn.indexer.weights_proj.weight"], compressor)
        main = None
        if ratio:
            main = CompressorWeights(
                wkv=plain["attn.compressor.wkv.weight"],
                wgate=plain["attn.compressor.wgate.weight"],
                ape=plain["attn.compressor.ape"],
                norm_w=plain["attn.compressor.norm.weight"],
            )
        o_blocks = slice(o_rows[0] // O_PROJ_BLOCK, -(-o_rows[1] // O_PROJ_BLOCK))  # wo_a's rows, wo_b's columns
        o_proj = OProjWeights(
            self._fp8_codes(infos["attn.wo_a.weight"], scales["attn.wo_a"], o_rows),
            self._scales_128(infos["attn.wo_a.weight"], scales["attn.wo_a"])[o_blocks].contiguous(),
            self._fp8_codes(infos["attn.wo_b.weight"], scales["attn.wo_b"])[:, o_rows[0] : o_rows[1]].contiguous(),
            self._scales_128(infos["attn.wo_b.weight"], scales["attn.wo_b"])[:, o_blocks].contiguous(),
        )  # fmt: skip
        sink = plain["attn.attn_sink"][rank * heads : (rank + 1) * heads].contiguous()
        weights = LayerWeights(attn, indexer, main, sink, o_proj)
        return weights if device is None else weights.to(device)

    def _scales_128(self, info: TensorInfo, scale: torch.Tensor) -> torch.Tensor:
        """``scale`` (one per stored block of ``info``'s weight) as one per ``128 x 128`` block, the layout
        ``o_proj`` takes: each such block lies in one stored block where the stored block is a multiple of
        128 or covers the whole dim; other block sizes are refused."""
        picks = []
        for dim, b in zip(info.shape, self.block, strict=True):
            if b % O_PROJ_BLOCK and b < dim:
                raise CheckpointError(
                    f"quantization_config.weight_block_size: {info.name} keeps its FP8 codes with one scale per "
                    f"{O_PROJ_BLOCK}x{O_PROJ_BLOCK} block (o_proj's layout); blocks of {list(self.block)} split them"
                )
            picks.append(torch.arange(0, dim, O_PROJ_BLOCK) // min(b, dim))
        return scale[picks[0][:, None], picks[1][None, :]]

    def _fp8_codes(self, info: TensorInfo, scale: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """An FP8 weight as stored (``float8_e4m3fn``), its ``rows`` (default all), refused when a code is NaN
        or a value is not finite after dequantization with its block scales ``scale`` (kept apart)."""
        lo, hi = rows or (0, info.shape[0])
        out = torch.empty((hi - lo, *info.shape[1:]), dtype=torch.float8_e4m3fn)
        for r0, r1 in self._row_chunks(info, lo, hi):
            codes = self.rows(info, r0, r1)
            if not torch.isfinite(codes).all():
                raise CheckpointError(f"{info.name}: rows {r0}..{r1 - 1} hold NaN codes")
            out[r0 - lo : r1 - lo] = codes.to(torch.float8_e4m3fn)  # e4m3 values: exact
            self._dequantized_rows(info, scale, r0, r1, codes)  # for its check of the values
        return out

    def _finite(self, info: TensorInfo) -> torch.Tensor:
        """A bf16/fp32 tensor as stored, refused when any value is NaN or infinite (spec §7)."""
        t = self.rows(info)
        bad = (~torch.isfinite(t)).nonzero()
        if len(bad):
            raise CheckpointError(
                f"{info.file}: {info.name}: {len(bad)} value(s) are NaN or infinite, first at {bad[0].tolist()}"
            )
        return t

    def _scale(self, info: TensorInfo) -> torch.Tensor:
        scale = self.rows(info)
        bad = (~torch.isfinite(scale)).nonzero()
        if len(bad):
            raise CheckpointError(
                f"{info.name}: {len(bad)} scale(s) are NaN (UE8M0 byte 255), first at block {bad[0].tolist()}"
            )
        return scale

    def _row_chunks(self, info: TensorInfo, lo: int = 0, hi: int | None = None) -> list[tuple[int, int]]:
        """Row ranges of rows ``[lo, hi)`` (default all; ``lo`` starting a scale block) of at most
        ``ROW_CHUNK_BYTES`` of fp32, each starting a scale block."""
        rows, cols = info.shape
        hi = rows if hi is None else hi
        step = max(1, ROW_CHUNK_BYTES // (4 * cols) // self.block[0]) * self.block[0]
        return [(r0, min(r0 + step, hi)) for r0 in range(lo, hi, step)]

    def _dequantized_rows(
        self, info: TensorInfo, scale: torch.Tensor, r0: int, r1: int, codes: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rows ``[r0, r1)`` dequantized in fp32 (``codes``: those rows already read, fp32, used in place),
        refused when a value is NaN or infinite."""
        bm = self.block[0]
        codes = self.rows(info, r0, r1) if codes is None else codes
        w = dequantize_rows_(codes, scale[r0 // bm : -(-r1 // bm)], self.block)
        if not torch.isfinite(w).all():
            raise CheckpointError(f"{info.name}: rows {r0}..{r1 - 1} hold NaN or infinite values after dequantization")
        return w

    def _dequantized_bf16(self, info: TensorInfo, scale: torch.Tensor) -> torch.Tensor:
        """``[out, in]`` bf16: FP8 x block scale, exact (a 4-bit significand times a power of two)."""
        out = torch.empty(info.shape, dtype=torch.bfloat16)
        for r0, r1 in self._row_chunks(info):
            out[r0:r1] = self._dequantized_rows(info, scale, r0, r1)
        return out

    def _requantized_int8(
        self, info: TensorInfo, scale: torch.Tensor, rows: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-output-channel INT8 (``[out, in]`` int8, ``[out]`` fp32) of the dequantized weight's ``rows``
        (default all: a row's INT8 values and scale depend on that row alone)."""
        lo, hi = rows or (0, info.shape[0])
        q = torch.empty((hi - lo, info.shape[1]), dtype=torch.int8)
        q_scale = torch.empty(hi - lo, dtype=torch.float32)
        for r0, r1 in self._row_chunks(info, lo, hi):
            q[r0 - lo : r1 - lo], q_scale[r0 - lo : r1 - lo] = quantize_weight_int8(
                self._dequantized_rows(info, scale, r0, r1)
            )
        return q, q_scale


def check_o_proj_config(cfg: DeepSeekV4Config) -> None:
    """A ``CheckpointError`` unless ``cfg``'s ``o_groups`` and ``o_lora_rank`` can size a layer's output
    projection (``o_groups`` >= 1 dividing the heads, ``o_lora_rank`` >= 1): ``layer_specs`` needs them."""
    if cfg.o_groups < 1 or cfg.o_lora_rank < 1 or cfg.num_attention_heads % cfg.o_groups:
        raise CheckpointError(
            f"config: o_groups {cfg.o_groups} / o_lora_rank {cfg.o_lora_rank} cannot size the output projection "
            f"of {cfg.num_attention_heads} heads (config.json's o_groups and o_lora_rank; or pass cfg=, "
            "on the command line --preset)"
        )


def check_prefix(prefix: object) -> str:
    """``prefix``, a tensor-name template with exactly one ``{layer}`` field and no other."""
    if not isinstance(prefix, str):
        raise CheckpointError(f"prefix: expected a string with one {{layer}}, got {type(prefix).__name__}")
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(prefix) if f is not None]
    except ValueError as e:  # an unmatched brace
        raise CheckpointError(f"prefix: {prefix!r} is not a valid template ({e})") from None
    if fields != [("layer", "", None)]:
        found = ", ".join("{" + f + "}" for f, _, _ in fields) or "none"
        raise CheckpointError(f"prefix: expected exactly one {{layer}} field in {prefix!r}, found {found}")
    return prefix


def format_ranges(numbers: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2, 5, 7-8"``."""
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def load_layer(
    checkpoint_dir: str | Path,
    layer: int,
    cfg: DeepSeekV4Config | None = None,
    *,
    prefix: str = DEFAULT_PREFIX,
    device: torch.device | str | None = None,
    rank: int = 0,
    world: int = 1,
) -> LayerWeights:
    """One layer's attention weights from a DeepSeek-V4 safetensors checkpoint, any layer type.

    ``checkpoint_dir`` holds ``model.safetensors.index.json`` and its shards (or one
    ``model.safetensors``) and, unless ``cfg`` is given, a ``config.json`` giving the dimensions.
    Reads only the tensors under ``prefix.format(layer=layer)``, memory-mapped, a bounded number
    of rows at a time. The layer's kind comes from its compress ratio (``config.json``'s
    ``compress_ratios[layer]``, else the tensors present): 0 SWA, 4 CSA (with the lightning
    indexer), any other HCA. Returns ``LayerWeights`` on ``device`` (default CPU): ``attn`` (``wq_a``,
    ``wkv`` bf16, FP8 x block scale, exact; ``wq_b`` INT8 per output channel with fp32 scales, spec
    §2), ``indexer`` (CSA only; its ``wq_b`` INT8 likewise), ``compressor`` (CSA/HCA: the main
    compressor's ``wkv``, ``wgate`` bf16, ``ape`` fp32, ``norm``), ``attn_sink`` fp32 and
    ``o_proj`` (``wo_a``, ``wo_b`` float8_e4m3fn as stored, their UE8M0 block scales as fp32);
    norms as stored (bf16 or fp32).

    ``world`` > 1: tensor-parallel rank ``rank``'s share (README, "Tensor parallelism"): its rows of
    ``wq_b`` (and their INT8 scales) and of ``wo_a``, which are all it reads of those two, the same
    columns of ``wo_b``, the scale blocks of each, and its entries of ``attn_sink``; everything else
    whole. Its config is ``cfg.rank(world)``.

    ``device``: None, ``"cpu"`` or ``"cuda[:N]"`` (a string or ``torch.device``); anything else, or a
    CUDA device that does not exist, is a ``ValueError`` naming ``device`` before anything is read.

    Raises ``CheckpointError`` (a ``ValueError``), before anything is built, naming each missing or
    mismatched tensor with the expected and found dtype/shape (expected from the layer's kind), the
    tensors of a kind other than the layer's ratio gives (a compressor on a ratio-0 layer, an indexer
    on a layer of ratio other than 4), a ``cfg`` whose ``compress_ratios[layer]`` is not that ratio
    (default prefix), or ``rank``; a ``ValueError`` naming ``world`` for ranks that would split a head,
    an output-projection group or a scale block.
    """
    with Checkpoint(checkpoint_dir) as ckpt:
        return ckpt.load_layer(layer, cfg, prefix=prefix, device=device, rank=rank, world=world)


def checkpoint_config(checkpoint_dir: str | Path) -> DeepSeekV4Config:
    """The ``DeepSeekV4Config`` of a checkpoint, from its ``config.json`` (a preset when one matches);
    without ``compress_ratios`` there, the ratios the tensors decide (``Checkpoint.tensor_ratios``)."""
    with Checkpoint(checkpoint_dir) as ckpt:
        return ckpt.config()

"""``dsv4 inspect``: what a checkpoint holds for the attention layers, from its file headers: each
layer's kind (SWA, CSA, HCA), and one layer's attention tensors; that layer is then loaded as
``load_layer`` loads it, so "ok" means every check passed."""

from __future__ import annotations

from pathlib import Path

from ..model.config import COMPRESS_RATIO, LAYER_KINDS, PRESETS, DeepSeekV4Config, kind_of_ratio
from .checkpoint import (
    CONFIG_FILE,
    DEFAULT_PREFIX,
    FP8,
    SCALE,
    Checkpoint,
    TensorSpec,
    check_o_proj_config,
    format_ranges,
    layer_specs,
)
from .safetensors_files import CheckpointError, TensorInfo

_KIND_MEANING = {  # by kind_of_ratio: an HCA layer may have any ratio but 0 and 4
    "swa": "sliding window only, no indexer",
    "csa": "compressor + lightning indexer",
    "hca": "compressor, no indexer",
}


_KEPT_FP8 = ("attn.wo_a", "attn.wo_b")  # loaded as stored, their block scales as fp32


def _loaded_bytes(spec: TensorSpec, info: TensorInfo) -> int:
    """Bytes of a tensor once loaded: bf16 ``wq_a``/``wkv``, INT8 + fp32 scale ``wq_b``s, FP8
    ``wo_a``/``wo_b`` with fp32 block scales, others as stored."""
    kept = spec.name.startswith(_KEPT_FP8)
    if spec.dtypes == SCALE:
        return 4 * info.nbytes if kept else 0  # fp32 beside the FP8 codes, else folded into the weights
    if spec.dtypes != FP8 or kept:
        return info.nbytes
    out, inp = info.shape
    return out * inp + 4 * out if spec.name.endswith("wq_b.weight") else 2 * out * inp


def describe_checkpoint(
    checkpoint_dir: str | Path,
    layer: int | None = None,
    cfg: DeepSeekV4Config | None = None,
    prefix: str = DEFAULT_PREFIX,
) -> tuple[list[str], bool]:
    """``dsv4 inspect``: the checkpoint's layers, their compress ratios and kinds, and one layer's
    attention tensors (the first ratio-4 layer unless ``layer`` is given) with dtypes, shapes and bytes,
    checked against ``cfg`` (default: from ``config.json``). The listing comes from the file headers
    (every header is checked as ``load_layer`` checks it); when the layer's tensors are all present
    with the right dtypes and shapes, the layer is then loaded exactly as ``load_layer`` does, so the
    values are checked too (NaN/infinite values, NaN scales): ``check: ok`` is printed only for a layer
    ``load_layer`` loads. Without a config the shapes go unchecked but the dtypes and values are checked
    the same way. Returns the report's lines and whether the layer loads."""
    with Checkpoint(checkpoint_dir) as ckpt:
        ckpt.check_headers()  # the listing below is of every shard: each header is checked first
        files = sorted(set(ckpt.weight_map.values()))
        lines = [f"checkpoint {ckpt.directory}: {len(ckpt.weight_map)} tensors in {len(files)} safetensors file(s)"]
        if cfg is None and ckpt.config_json is not None:
            cfg = ckpt.config()
        if cfg is None:
            lines.append(f"config: no {CONFIG_FILE} (pass --preset to check shapes)")
        else:
            lines.append(
                f"config: {cfg.name} (D={cfg.hidden_size} H={cfg.num_attention_heads} HD={cfg.head_dim} "
                f"R={cfg.qk_rope_head_dim} QL={cfg.q_lora_rank} HI={cfg.index_n_heads} HID={cfg.index_head_dim} "
                f"index_topk={cfg.index_topk} window={cfg.sliding_window})"
            )
        lines.append(f"FP8 block scales: {ckpt.block[0]}x{ckpt.block[1]}")
        layers = ckpt.layers(prefix)
        lines.append(f"layers under {prefix!r}: {format_ranges(layers) or 'none'} ({len(layers)})")
        ratios = {n: ckpt.compress_ratio(n, prefix) for n in layers}
        for ratio in sorted({r for r, _ in ratios.values()}):
            members = [n for n, (r, _) in ratios.items() if r == ratio]
            meaning = _KIND_MEANING[kind_of_ratio(ratio)]
            lines.append(f"  compress ratio {ratio:>3}: layers {format_ranges(members)} ({meaning})")
        kinds = {k: [n for n, (r, _) in ratios.items() if kind_of_ratio(r) == k] for k in LAYER_KINDS}
        lines.append("layer kinds: " + "; ".join(f"{k.upper()} {format_ranges(v)}" for k, v in kinds.items() if v))
        if not layers:
            return lines, False
        if layer is None:
            layer = next((n for n in layers if ratios[n][0] == COMPRESS_RATIO), layers[0])
        if layer not in ratios:
            return [*lines, f"layer {layer}: no tensors under {prefix.format(layer=layer)!r}"], False
        ratio, source = ratios[layer]
        p = prefix.format(layer=layer)
        # Without a config only the names of the specs are used (shapes are not checked).
        specs = layer_specs(cfg or PRESETS["tiny"], ratio, ckpt.block)
        kind = kind_of_ratio(ratio).upper()
        lines.append(f"layer {layer}: compress ratio {ratio} ({source}); {kind}; attention tensors:")
        width = max(len(p + s.name) for s in specs)
        lines.append(f"  {'name':<{width}}  {'dtype':<8} {'shape':<14} {'bytes':>12}")
        stored = loaded = missing = 0
        for spec in specs:
            info = ckpt.info(p + spec.name)
            if info is None:
                lines.append(f"  {p + spec.name:<{width}}  MISSING")
                missing += 1
                continue
            stored += info.nbytes
            loaded += _loaded_bytes(spec, info)
            lines.append(f"  {info.name:<{width}}  {info.dtype:<8} {str(list(info.shape)):<14} {info.nbytes:>12,}")
        lines.append(
            f"  attention of layer {layer}: {stored:,} bytes stored ({stored / 2**20:.1f} MiB); "
            f"{loaded:,} bytes loaded as bf16 + INT8 + FP8 ({loaded / 2**20:.1f} MiB)"
        )
        others = sum(name.startswith(p) for name in ckpt.weight_map) - sum(
            ckpt.info(p + s.name) is not None for s in specs
        )
        lines.append(f"  other tensors under {p!r} (not used by the attention): {others}")
        kind_problem = ckpt.kind_problem(layer, prefix)
        if kind_problem:
            return [*lines, f"check: {kind_problem}"], False
        if cfg is None:  # no dims: every value still checked, as load_layer would
            problems = ckpt.value_problems(p, specs)
            if missing:
                problems.insert(0, f"{missing} tensor(s) missing")
            if problems:
                return [*lines, *(f"check: {q}" for q in problems), "(shapes not checked: no config)"], False
            return [
                *lines,
                f"check: dtypes and values ok; shapes not checked (no {CONFIG_FILE}: --preset checks them)",
            ], True
        try:
            check_o_proj_config(cfg)  # else the output projection's expected shapes are [0, 0]
        except CheckpointError as e:
            return [*lines, f"check: {e}"], False
        problems = ckpt.check(p, specs)
        if problems:
            return lines + [f"check: {q}" for q in problems], False
        try:
            ckpt.load_layer(layer, cfg, prefix=prefix)
        except CheckpointError as e:
            return [*lines, f"check: headers and shapes ok, but load_layer refuses the layer: {e}"], False
        return [*lines, "check: ok, load_layer loads this layer (headers, shapes and every value checked)"], True

"""Loading a layer from a DeepSeek-V4-format checkpoint (FP8 e4m3 + UE8M0 block scales, sharded
safetensors): exact dequantization, spec §2 INT8 requantization, tensor mapping, the front end
running on the loaded layer, and clear errors for every way a checkpoint can be wrong."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import dsv4
from dsv4 import PRESETS, CheckpointError, load_layer
from dsv4.cli import main
from dsv4.harness.golden import compare, step_inputs
from dsv4.io.checkpoint import Checkpoint, config_from_json
from dsv4.model.quant import quantize_weight_int8
from fp8_checkpoint import assert_same_layer, config_json, dequantize_f64, layer_tensors, write_checkpoint
from subprocesses import run_dsv4

TINY = PRESETS["tiny"]
# Dims that are not multiples of the 128x128 scale block (D=320, H*HD=288, QL=192): edge blocks.
ODD = TINY.replace(
    name="checkpoint", hidden_size=320, num_attention_heads=3, head_dim=96, q_lora_rank=192, o_groups=3,
    o_lora_rank=128, compress_ratios=(4,),
)  # fmt: skip
RATIOS = [0, 4, 128, 4]  # layer 0: window only, 1 and 3: indexer, 2: heavily compressed


def _tiny_shards(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Layer 1 split over the first two shards; layer 3 alone in the third."""
    layers = [layer_tensors(TINY, n, r, seed) for n, r in enumerate(RATIOS)]
    first = {**layers[0], **{k: v for k, v in layers[1].items() if ".indexer." not in k}}
    second = {**{k: v for k, v in layers[1].items() if ".indexer." in k}, **layers[2]}
    return [first, second, layers[3]]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("tiny"), _tiny_shards(), config_json(TINY, RATIOS))


@pytest.fixture(scope="module")
def odd_dir(tmp_path_factory) -> Path:
    """A single ``model.safetensors`` (no index) with edge blocks in every FP8 weight."""
    return write_checkpoint(tmp_path_factory.mktemp("odd"), [layer_tensors(ODD, 0, 4, 1)], config_json(ODD, [4]))


def _stored(directory: Path, layer: int) -> dict[str, torch.Tensor]:
    """Every stored tensor of a layer, by name under its prefix, read back with safetensors."""
    from safetensors.torch import load_file

    out = {}
    for f in directory.glob("*.safetensors"):
        prefix = f"layers.{layer}."
        out.update({k.removeprefix(prefix): v for k, v in load_file(f).items() if k.startswith(prefix)})
    return out


def _expected_layer(stored: dict[str, torch.Tensor]) -> dsv4.LayerWeights:
    """The layer built directly from the stored tensors with float64 dequantization (the indexer and
    the main compressor where the layer has them)."""

    def deq(name: str) -> torch.Tensor:
        return dequantize_f64(stored[f"{name}.weight"], stored[f"{name}.scale"])

    attn = dsv4.AttnWeights(
        deq("attn.wq_a").to(torch.bfloat16),
        stored["attn.q_norm.weight"],
        *quantize_weight_int8(deq("attn.wq_b")),
        deq("attn.wkv").to(torch.bfloat16),
        stored["attn.kv_norm.weight"],
    )

    def compressor(c: str) -> dsv4.CompressorWeights | None:  # None where the layer's kind has none
        if c + "ape" not in stored:
            return None
        return dsv4.CompressorWeights(
            stored[c + "wkv.weight"], stored[c + "wgate.weight"], stored[c + "ape"], stored[c + "norm.weight"]
        )

    indexer = None
    if "attn.indexer.wq_b.weight" in stored:
        own = compressor("attn.indexer.compressor.")
        assert own is not None, "an indexer without its compressor"
        indexer = dsv4.IndexerWeights(
            *quantize_weight_int8(deq("attn.indexer.wq_b")), stored["attn.indexer.weights_proj.weight"], own
        )
    main = compressor("attn.compressor.")

    def fp8(name: str) -> tuple[torch.Tensor, torch.Tensor]:  # the codes as stored, the UE8M0 scales as fp32
        scale = stored[f"{name}.scale"].view(torch.uint8).double()
        return stored[f"{name}.weight"], torch.pow(2.0, scale - 127).float()

    o_proj = dsv4.OProjWeights(*fp8("attn.wo_a"), *fp8("attn.wo_b"))
    return dsv4.LayerWeights(attn, indexer, main, stored["attn.attn_sink"], o_proj)


@pytest.mark.parametrize("raw_bytes", [False, True], ids=["safetensors", "raw-bytes"])
@pytest.mark.parametrize("which", ["tiny-sharded", "odd-single-file"])
def test_loaded_layer_equals_float64_dequantization(which, raw_bytes, tiny_dir, odd_dir):
    directory, layer = (tiny_dir, 1) if which == "tiny-sharded" else (odd_dir, 0)
    stored = _stored(directory, layer)
    with Checkpoint(directory, raw_bytes=raw_bytes) as ckpt:
        got = ckpt.load_layer(layer)
    # bf16 projections: FP8 (4 significant bits) x 2^k is exact in bf16, so equal to float64 exactly.
    for name, w in (("attn.wq_a", got.attn.wq_a), ("attn.wkv", got.attn.wkv)):
        want = dequantize_f64(stored[f"{name}.weight"], stored[f"{name}.scale"])
        assert torch.equal(want.to(torch.bfloat16).double(), want), "test premise: the dequantized values fit bf16"
        assert torch.equal(w.double(), want), name
    # Every field, INT8 weights included: the fp32 dequantization is exact, so it quantizes
    # identically to the float64 one.
    assert_same_layer(got, _expected_layer(stored))


def test_a_layer_read_in_row_chunks_equals_one_read(odd_dir, monkeypatch):
    """The rows dequantized at once are bounded (``ROW_CHUNK_BYTES``); each chunk starts a scale block, so
    a layer read in chunks equals the float64 dequantization. At 100 rows of ``attn.wq_b`` (192 columns of
    fp32) a chunk, a chunk not rounded to the 128-row block would start at row 200 and take block 1's
    scale for rows 256..287, which are block 2's."""
    monkeypatch.setattr("dsv4.io.checkpoint.ROW_CHUNK_BYTES", 100 * 4 * ODD.q_lora_rank)
    assert ODD.num_attention_heads * ODD.head_dim > 256, "test premise: wq_b has a third row block"
    assert_same_layer(load_layer(odd_dir, 0), _expected_layer(_stored(odd_dir, 0)))


@pytest.mark.parametrize("name", ["attn.wq_b", "attn.indexer.wq_b"])
def test_int8_requantization_follows_spec(name, odd_dir):
    """Spec §2 per output channel, evaluated in float64: amax = max(max|row|, 1e-4), q = round(row*127/amax).

    FP8 values are coarse, so row*127/amax is often exactly n + 1/2 (e.g. a value of amax/2). There
    the computed s = 127/amax (rounded in fp32 or float64) decides the side, so the loaded int may
    differ by 1 from a float64 evaluation; everywhere else the ints are equal. Scales within fp32 rounding."""
    stored = _stored(odd_dir, 0)
    w = dequantize_f64(stored[f"{name}.weight"], stored[f"{name}.scale"])
    amax = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-4)
    q_want = torch.round(w * (127 / amax))
    layer = load_layer(odd_dir, 0)
    owner = layer.attn if name == "attn.wq_b" else layer.indexer
    assert owner is not None
    q, scale = owner.wq_b, owner.wq_b_scale
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (w.shape[0],)
    diff = (q.double() - q_want).abs()
    twice = 2 * w * (127 / amax)
    tie = ((twice - twice.round()).abs() < 1e-9) & (twice.round().remainder(2) == 1)
    assert diff.max() <= 1 and (diff[~tie] == 0).all() and tie.any()
    assert q.abs().amax(dim=1).eq(127).all(), "every row uses the full INT8 range"
    torch.testing.assert_close(scale.double(), (amax / 127).squeeze(1), rtol=2e-7, atol=0)


def test_loaded_layer_runs_the_front_end(odd_dir):
    """The loaded odd-sized layer through qkv_proj_rope and indexer (reference backend), equal to
    the same ops on the layer built from the float64 dequantization."""
    cfg = dsv4.checkpoint_config(odd_dir)
    assert cfg == ODD
    got, want = load_layer(odd_dir, 0), _expected_layer(_stored(odd_dir, 0))
    b, s, start = 2, 5, 6
    rope = dsv4.rope_table(cfg, "compressed", max_position=64)
    x = dsv4.synthetic_activations((b, s, cfg.hidden_size), seed=3)
    positions = (start + torch.arange(s)).repeat(b)
    outs = []
    for w in (got, want):
        assert w.indexer is not None  # the front end's layer: CSA
        qkv = dsv4.qkv_proj_rope(x.view(-1, cfg.hidden_size), w.attn, positions, rope, backend="reference")
        state = dsv4.IndexerState.empty(cfg, b, 64)
        idx = dsv4.indexer(x, qkv.qr, qkv.qr_scale, w.indexer, state, start, cfg.sliding_window, rope,
                           topk=cfg.index_topk, backend="reference")  # fmt: skip
        outs.append((qkv, idx, state))
    (qkv, idx, state), (qkv_ref, idx_ref, state_ref) = outs
    assert qkv.q.shape == (b * s, 3, 96) and torch.isfinite(qkv.q.float()).all() and qkv.q.abs().max() > 0
    assert compare("qkv_proj_rope", qkv._asdict(), qkv_ref._asdict()).passed
    inputs = step_inputs(x, start, dsv4.IndexerState.empty(cfg, b, 64), cfg.sliding_window)
    got_idx, want_idx = {**idx._asdict(), **state.tensors()}, {**idx_ref._asdict(), **state_ref.tensors()}
    report = compare("indexer", got_idx, want_idx, inputs)
    assert report.passed, report
    assert (idx.topk_idxs >= 0).sum() > 0


def test_device_and_bytes(tiny_dir):
    layer = load_layer(tiny_dir, 3, device="cpu")
    assert layer.attn.wq_a.device.type == "cpu" and layer.attn.wq_b.dtype == torch.int8
    d, ql, hd, h, hi, hid = 256, 128, 128, 4, 4, 128
    expected = (2 * ql * d + 2 * ql + (h * hd * ql + 4 * h * hd) + 2 * hd * d + 2 * hd  # attn
                + (hi * hid * ql + 4 * hi * hid) + 2 * hi * d  # indexer wq_b, weights_proj
                + 2 * (2 * 2 * hid * d) + 4 * 4 * 2 * hid + 2 * hid  # the indexer's compressor
                + 2 * (2 * 2 * hd * d) + 4 * 4 * 2 * hd + 2 * hd  # the main compressor (ratio 4: 2*HD wide)
                + 4 * h  # attn_sink
                + 128 * 256 + 4 * 1 * 2 + 256 * 128 + 4 * 2 * 1)  # wo_a, wo_b FP8 and their scales  # fmt: skip
    assert layer.nbytes() == expected


@pytest.mark.parametrize(
    "device", ["bogus", "meta", f"cuda:{torch.cuda.device_count()}", 3.5, torch.int8, False, 0], ids=repr
)
def test_a_device_that_is_not_one_is_refused_by_name(device, tiny_dir, monkeypatch):
    """``device`` is parsed before anything is read: a dtype, a number or a bool is not a device (``.to`` would
    take a dtype and change the weights' types), nor is a device type other than cpu/cuda, nor a CUDA
    device this machine does not have."""
    reads = []
    monkeypatch.setattr(Checkpoint, "rows", lambda self, *a, **k: reads.append(a))
    with pytest.raises(ValueError, match="^device: "):
        load_layer(tiny_dir, 1, device=device)
    assert not reads
    monkeypatch.undo()
    assert load_layer(tiny_dir, 1, device=torch.device("cpu")).attn.wq_b.dtype == torch.int8


def test_reads_only_the_layers_shards(tmp_path):
    """Layer 1 lives in shards 1 and 2; deleting shard 3 (layer 3) does not matter to it."""
    d = write_checkpoint(tmp_path, _tiny_shards(), config_json(TINY, RATIOS))
    want = load_layer(d, 1)
    (d / "model-00003-of-00003.safetensors").unlink()
    assert_same_layer(load_layer(d, 1), want)
    with pytest.raises(CheckpointError, match=r"maps layers\.3\.attn\..* to model-00003-of-00003\.safetensors, which"):
        load_layer(d, 3)


def test_inspect_checks_every_shards_header(tmp_path, capsys):
    """``dsv4 inspect`` lists every shard's layers, so it checks every header, also of shards that hold
    none of the layer it reports on (``load_layer`` reads only the layer's own shards)."""
    d = write_checkpoint(tmp_path, _tiny_shards(), config_json(TINY, RATIOS))
    third = d / "model-00003-of-00003.safetensors"  # layer 3 alone
    third.write_bytes(b"\xff" * 8 + b"not a safetensors file")
    assert load_layer(d, 1).kind == "csa"
    assert main(["inspect", str(d), "--layer", "1"]) == 2
    captured = capsys.readouterr()
    assert f"{third}: header length" in captured.err and "check: ok" not in captured.out
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["layers.3.attn.attn_sink"] = "model-00001-of-00003.safetensors"  # not there
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    third.unlink()
    write_checkpoint(tmp_path / "again", _tiny_shards(), None)
    (tmp_path / "again" / third.name).rename(third)
    assert main(["inspect", str(d), "--layer", "1"]) == 2
    assert "maps layers.3.attn.attn_sink to model-00001-of-00003.safetensors, which does not hold it" in (
        capsys.readouterr().err
    )


def test_falls_back_to_raw_bytes_when_safetensors_cannot_open(tiny_dir, monkeypatch):
    """An older safetensors that does not know F8_E8M0 refuses the whole file; the bytes still decode."""
    want = load_layer(tiny_dir, 1)

    def refuse(*args, **kwargs):
        raise RuntimeError("unknown dtype F8_E8M0")

    monkeypatch.setattr("dsv4.io.safetensors_files.safe_open", refuse)
    assert_same_layer(load_layer(tiny_dir, 1), want)


def test_fp8_byte_decoders_match_torch():
    from dsv4.io.fp8 import e4m3_bytes_to_float32, e8m0_bytes_to_float32

    every = torch.arange(256, dtype=torch.uint8)
    for decode, dtype in ((e4m3_bytes_to_float32, torch.float8_e4m3fn), (e8m0_bytes_to_float32, torch.float8_e8m0fnu)):
        torch.testing.assert_close(decode(every), every.view(dtype).float(), equal_nan=True, rtol=0, atol=0)
    assert e8m0_bytes_to_float32(torch.tensor([0, 127, 254], dtype=torch.uint8)).tolist() == [2.0**-127, 1.0, 2.0**127]


@pytest.mark.parametrize("block", [(2, 3), (3, 2), (8, 2)], ids=["2x3", "3x2", "taller-than-the-rows"])
def test_block_scales_of_blocks_that_are_not_square(block: tuple[int, int]) -> None:
    """``weight_block_size`` may give blocks of other rows than columns (e.g. ``[256, 128]``): entry
    ``(i, j)`` of a weight is scaled by block ``(i // rows, j // columns)``'s scale, edge blocks partial.
    Every checkpoint of the other tests has square blocks, where the rows and columns of a block are
    interchangeable."""
    from dsv4.io.fp8 import dequantize_rows_, scale_grid

    g = torch.Generator().manual_seed(5)
    w = torch.randn(5, 7, generator=g)
    scale = torch.exp2(torch.randint(-4, 5, scale_grid((5, 7), block), generator=g).float())
    i, j = torch.arange(5)[:, None], torch.arange(7)[None, :]
    want = w.double() * scale.double()[i // block[0], j // block[1]]
    assert torch.equal(dequantize_rows_(w.clone(), scale, block).double(), want)


# --- configuration -------------------------------------------------------------------------------


def test_config_matches_presets_or_is_built_from_the_file():
    for preset in ("flash", "pro", "demo", "tiny"):
        assert config_from_json(config_json(PRESETS[preset], None)) is PRESETS[preset]
    raw = config_json(PRESETS["flash"], None) | {"index_topk": 256}
    cfg = config_from_json(raw)
    assert cfg.name == "checkpoint"
    assert cfg == PRESETS["flash"].replace(name="checkpoint", index_topk=256, compress_ratios=())  # none in the file
    with pytest.raises(CheckpointError, match="missing field.*q_lora_rank.*sliding_window"):
        config_from_json({k: v for k, v in raw.items() if k not in ("q_lora_rank", "sliding_window")})


def test_rope_scaling_is_yarn_in_either_spelling():
    """``rope_scaling.type`` or ``rope_type`` "yarn" (or neither) is YaRN; a factor of 1 needs no context length
    (it changes nothing). Other types and a factor without ``original_max_position_embeddings`` are refused
    (tests/bad_checkpoints.py, config_corruptions)."""
    raw = config_json(PRESETS["flash"], None)
    scaling = {k: v for k, v in raw["rope_scaling"].items() if k != "type"}
    for extra in ({}, {"type": "yarn"}, {"rope_type": "yarn"}, {"type": "yarn", "rope_type": "yarn"}):
        assert config_from_json(raw | {"rope_scaling": scaling | extra}) is PRESETS["flash"]
    plain = {k: v for k, v in scaling.items() if k != "original_max_position_embeddings"} | {"factor": 1}
    assert config_from_json(raw | {"rope_scaling": plain}).original_max_position_embeddings == 0
    with pytest.raises(CheckpointError, match="rope_scaling.rope_type must be 'yarn'.*'linear'"):
        config_from_json(raw | {"rope_scaling": scaling | {"type": "yarn", "rope_type": "linear"}})


def test_the_window_is_read_from_sliding_window_or_window_size():
    """``config.json`` names the window ``sliding_window`` or ``window_size``: either gives the preset; with
    neither the field is named as missing."""
    raw = config_json(PRESETS["flash"], None)
    window = raw.pop("sliding_window")
    assert config_from_json(raw | {"window_size": window}) is PRESETS["flash"]
    assert config_from_json(raw | {"window_size": 64}).sliding_window == 64
    with pytest.raises(CheckpointError, match="missing field.*sliding_window"):
        config_from_json(raw)


NOT_RATIOS = "compress_ratios must be a list of non-negative ints"


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ([1, 2], "expected a JSON object, got list"),
        ("tiny", "expected a JSON object, got str"),
        (config_json(TINY, None) | {"compress_ratios": ["0", "4"]}, NOT_RATIOS),
        (config_json(TINY, None) | {"compress_ratios": [0, -4]}, NOT_RATIOS),
        (config_json(TINY, None) | {"compress_ratios": [0, True]}, NOT_RATIOS),
        (config_json(TINY, None) | {"compress_ratios": {"1": 4}}, NOT_RATIOS),
    ],
    ids=["a-list", "a-string", "ratios-strings", "ratio-negative", "ratio-bool", "ratios-a-dict"],
)
def test_config_from_json_refuses_a_value_that_is_not_a_config_naming_the_source(raw: object, words: str) -> None:
    """``config_from_json`` given fields that are not a JSON object, or ``compress_ratios`` that are not a list of
    non-negative ints, raises a ``CheckpointError`` naming the source it was told and the field."""
    with pytest.raises(CheckpointError, match=f"^ckpt/config.json: {words}"):
        config_from_json(raw, "ckpt/config.json")  # type: ignore[arg-type]


def test_block_size_from_config(tmp_path):
    raw = config_json(TINY, RATIOS)
    raw["quantization_config"]["weight_block_size"] = [128]
    d = write_checkpoint(tmp_path, _tiny_shards(), raw)
    with pytest.raises(CheckpointError, match="weight_block_size must be two positive ints, got .128."):
        load_layer(d, 1)


def _scales_of_one(shards: list[dict[str, torch.Tensor]], whole: bool) -> None:
    """Every FP8 weight's block scales 1.0 (UE8M0 byte 127): one per block, or one for the whole weight."""
    for tensors in shards:
        for name, t in tensors.items():
            if t.dtype == torch.float8_e8m0fnu:
                shape = (1, 1) if whole else t.shape
                tensors[name] = torch.full(shape, 127, dtype=torch.uint8).view(torch.float8_e8m0fnu)


@pytest.mark.parametrize("block", [2**40, 2**63])
def test_a_block_larger_than_every_weight_is_one_block(tmp_path, block):
    """``weight_block_size`` past every weight's dims: each weight is one block with one scale, loaded as a
    checkpoint whose every block holds the same scale loads (no repeat or view of the block's size)."""
    one, per_block = _tiny_shards(), _tiny_shards()
    _scales_of_one(one, whole=True)
    _scales_of_one(per_block, whole=False)
    raw = config_json(TINY, RATIOS)
    raw["quantization_config"]["weight_block_size"] = [block, block]
    got = load_layer(write_checkpoint(tmp_path / "one", one, raw), 1)
    want = load_layer(write_checkpoint(tmp_path / "blocks", per_block, config_json(TINY, RATIOS)), 1)
    assert_same_layer(got, want)  # wo_a and wo_b: their codes, and the one scale as one per 128 x 128 block


def test_a_block_that_splits_o_projs_128_blocks_is_refused(tmp_path):
    """``wo_a`` and ``wo_b`` keep their codes with one scale per 128 x 128 block: a 64 x 64 block (its scales
    shaped to match) cannot be given in that layout, and is refused naming the field and the weight."""
    shards = _tiny_shards()
    for tensors in shards:
        for name, t in list(tensors.items()):
            if t.dtype == torch.float8_e8m0fnu:
                weight = tensors[name.removesuffix(".scale") + ".weight"]
                shape = (-(-weight.shape[0] // 64), -(-weight.shape[1] // 64))
                tensors[name] = torch.full(shape, 127, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    raw = config_json(TINY, RATIOS)
    raw["quantization_config"]["weight_block_size"] = [64, 64]
    with pytest.raises(CheckpointError, match=r"weight_block_size: layers\.1\.attn\.wo_a\.weight keeps its FP8"):
        load_layer(write_checkpoint(tmp_path, shards, raw), 1)


def test_compress_ratio_from_config_or_tensors(tiny_dir, tmp_path):
    with Checkpoint(tiny_dir) as ckpt:
        assert ckpt.layers() == [0, 1, 2, 3]
        assert [ckpt.compress_ratio(n)[0] for n in range(4)] == RATIOS
        assert "config.json compress_ratios[2]" in ckpt.compress_ratio(2)[1]
    d = write_checkpoint(tmp_path, _tiny_shards(), config_json(TINY, None))  # no compress_ratios
    with Checkpoint(d) as ckpt:
        assert [ckpt.compress_ratio(n)[0] for n in range(4)] == RATIOS
        assert "rows of layers.2.attn.compressor.ape" in ckpt.compress_ratio(2)[1]
    layer = load_layer(d, 2)  # the kind from the tensors: a compressor of 128 rows, no indexer
    assert layer.kind == "hca" and layer.compress_ratio == 128


def test_under_another_prefix_the_tensors_decide_the_ratio(tmp_path):
    """``config.json``'s ``compress_ratios[N]`` is the model's layer N, not layer N under another prefix
    (an MTP block, say): there the tensors present decide. ``mtp.0.`` holds a CSA layer (indexer tensors)
    while the model's layer 0 is SWA; it loads as CSA."""
    mtp = {k.replace("layers.0.", "mtp.0.", 1): v for k, v in layer_tensors(TINY, 0, 4, seed=5).items()}
    d = write_checkpoint(tmp_path, [{**layer_tensors(TINY, 0, 0), **mtp}], config_json(TINY, RATIOS))
    with Checkpoint(d) as ckpt:
        assert ckpt.compress_ratio(0) == (0, "config.json compress_ratios[0]")
        assert ckpt.compress_ratio(0, "mtp.{layer}.") == (4, "the layer has indexer tensors")
    w = load_layer(d, 0, prefix="mtp.{layer}.")
    assert w.kind == "csa" and w.compress_ratio == 4 and w.indexer is not None


def test_a_config_without_ratios_takes_the_tensors_kinds(tmp_path, capsys):
    """Without ``compress_ratios`` in ``config.json`` the config's are the tensors' (for layers 0, 1, ... up
    to the first one missing), so ``layer_rope_table(cfg, n)`` and ``load_layer`` agree on each layer's kind."""
    d = write_checkpoint(tmp_path / "a", _tiny_shards(), config_json(TINY, None))
    cfg = dsv4.checkpoint_config(d)
    assert cfg.compress_ratios == tuple(RATIOS) and cfg.name == "tiny"  # TINY's own list is (0, 4, 16, 0)
    assert [load_layer(d, n, cfg).compress_ratio for n in range(4)] == RATIOS
    compressed = dsv4.rope_table(cfg, "compressed", 64)
    assert torch.equal(dsv4.layer_rope_table(cfg, 3, 64).cos, compressed.cos)  # CSA: not TINY's window table
    d = write_checkpoint(tmp_path / "c", _tiny_shards(), config_json(TINY, None) | {"sliding_window": 32})
    assert dsv4.checkpoint_config(d).name == "checkpoint"  # dims of no preset: no preset's list either
    args = ["run", "--checkpoint", str(d), "--layer", "3", "--device", "cpu", "--backend", "reference"]
    assert main([*args, "--steps", "1", "--start-pos", "8", "--batch", "1"]) == 0
    assert "L3 decode 1   csa attention" in capsys.readouterr().out
    shards = _tiny_shards()
    shards[2] = {}  # no layer 3: the list stops before it, no kind made up for it
    shards[0] = {k: v for k, v in shards[0].items() if not k.startswith("layers.0.")}  # nor layer 0: empty
    d = write_checkpoint(tmp_path / "b", [s for s in shards if s], config_json(TINY, None))
    assert dsv4.checkpoint_config(d).compress_ratios == ()


def test_a_cfg_listing_another_kind_is_refused(tiny_dir, capsys):
    """A ``cfg`` whose ``compress_ratios[N]`` is not the checkpoint's ratio of layer N (it would run the layer
    with the other kind's RoPE table) is refused naming both; where they agree the layer loads."""
    with pytest.raises(CheckpointError) as e:
        load_layer(tiny_dir, 3, TINY)  # TINY lists layer 3 as SWA, the checkpoint's layer 3 is CSA
    assert "cfg: tiny's compress_ratios[3] is 0 (SWA)" in str(e.value)
    assert "compress ratio 4 (CSA; config.json compress_ratios[3])" in str(e.value)
    with pytest.raises(CheckpointError, match=r"compress_ratios\[2\] is 16 \(HCA\).* ratio 128 \(HCA"):
        load_layer(tiny_dir, 2, TINY)
    assert load_layer(tiny_dir, 1, TINY).kind == "csa"
    args = ["run", "--checkpoint", str(tiny_dir), "--layer", "3", "--preset", "tiny", "--device", "cpu"]
    assert main([*args, "--backend", "reference", "--steps", "1", "--start-pos", "8", "--batch", "1"]) == 2
    captured = capsys.readouterr()
    assert "compress_ratios[3] is 0 (SWA)" in captured.err and "qkv_proj_rope" not in captured.out


def test_the_harness_runs_a_layer_with_its_weights_rope_table(tiny_dir, monkeypatch):
    """``run_front_end(cfg, weights=..., layer=N)``: the layer's attention gets the RoPE table of the kind
    of the weights it runs, whatever ``cfg.compress_ratios[N]`` says."""
    from dsv4.harness import run as harness

    tables = []
    real = harness.DecodeAttention

    def spy(weights, rope, cfg, **kwargs):
        tables.append(rope)
        return real(weights, rope, cfg, **kwargs)

    monkeypatch.setattr(harness, "DecodeAttention", spy)
    weights = load_layer(tiny_dir, 1)  # CSA; TINY lists layer 0 as SWA
    harness.run_front_end(TINY, "reference", steps=1, start_pos=8, batch=1, weights=weights, layer=0)
    (rope,) = tables
    assert torch.equal(rope.cos, dsv4.rope_table(TINY, "compressed", rope.max_position).cos)


# --- errors --------------------------------------------------------------------------------------


def _broken(tmp_path: Path, edit) -> Path:
    shards = _tiny_shards()
    edit(shards[0], shards[1])
    return write_checkpoint(tmp_path, shards, config_json(TINY, RATIOS))


@pytest.mark.parametrize("layer,kind", [(0, "swa"), (1, "csa"), (2, "hca")])
def test_every_layer_kind_loads_whole(layer, kind, tiny_dir):
    """Each layer with every attention tensor its kind has (the front end alone needs an indexer)."""
    got = load_layer(tiny_dir, layer)
    assert got.kind == kind and got.compress_ratio == RATIOS[layer] and got.whole
    assert (got.indexer is None) == (kind != "csa") and (got.compressor is None) == (kind == "swa")
    assert got.o_proj is not None and got.attn_sink is not None  # whole
    assert got.o_proj.wo_a.dtype == torch.float8_e4m3fn and got.attn_sink.shape == (TINY.num_attention_heads,)
    assert_same_layer(got, _expected_layer(_stored(tiny_dir, layer)))
    if kind != "csa":
        rope = dsv4.rope_table(TINY, "compressed", max_position=64)
        with pytest.raises(ValueError, match="weights: .* no lightning indexer"):
            dsv4.DecodeFrontEnd(got, rope, batch=1, max_position=64, topk=16, offset=16)


def test_a_layer_missing_the_rest_of_its_attention_is_named(tmp_path):
    d = _broken(tmp_path, lambda first, second: second.pop("layers.2.attn.wo_b.scale"))
    with pytest.raises(CheckpointError, match=r"layers\.2\.attn\.wo_b\.scale: missing \(expected F8_E8M0 \[2, 1\]\)"):
        load_layer(d, 2)


def test_a_compressor_ape_of_another_rank_is_named_where_it_decides_the_ratio(tmp_path, capsys):
    """Without ``compress_ratios`` the rows of ``attn.compressor.ape`` give a layer's ratio: an ``ape`` that
    is not ``[ratio, width]`` is a ``CheckpointError`` naming its file and entry (not an ``IndexError``)."""
    shards = _tiny_shards()
    shards[1]["layers.2.attn.compressor.ape"] = torch.tensor(1.0)
    d = write_checkpoint(tmp_path, shards, config_json(TINY, None))
    with pytest.raises(
        CheckpointError, match=r"safetensors: layers\.2\.attn\.compressor\.ape must be \[ratio, width\], got shape \[\]"
    ):
        load_layer(d, 2)
    assert main(["inspect", str(d)]) != 0
    assert "layers.2.attn.compressor.ape must be [ratio, width]" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("listed", "layer", "kind", "held"),
    [
        ([0, 0, 128, 4], 1, "an SWA layer", ("attn.compressor.ape", "attn.indexer.wq_b.weight")),  # a CSA layer
        ([0, 4, 0, 4], 2, "an SWA layer", ("attn.compressor.wkv.weight", "attn.compressor.ape")),  # an HCA layer
        ([0, 4, 128, 128], 3, "an HCA layer", ("attn.indexer.wq_b.weight", "attn.indexer.compressor.ape")),  # CSA
    ],
)
def test_a_layer_holding_tensors_its_listed_kind_has_not_is_refused(listed, layer, kind, held, tmp_path, capsys):
    """``compress_ratios`` lists a layer as a kind without a compressor (SWA) or an indexer (HCA) while the
    layer holds them: refused naming the list entry and the tensors, not loaded as that kind without them."""
    d = write_checkpoint(tmp_path, _tiny_shards(), config_json(TINY, listed))
    source = f"compress ratio {listed[layer]} (config.json compress_ratios[{layer}]) makes it {kind}"
    with pytest.raises(CheckpointError, match=re.escape(source)) as e:
        load_layer(d, layer)
    assert all(f"layers.{layer}.{name}" in str(e.value) for name in held), str(e.value)
    assert main(["inspect", str(d), "--layer", str(layer)]) == 1
    out = capsys.readouterr().out
    assert f"check: {source}" in out and "check: ok" not in out
    assert load_layer(d, 0).kind == "swa"  # the layers listed as their kind still load


def test_a_compressor_without_its_ape_is_not_dropped(tmp_path):
    """Without ``compress_ratios`` a layer with no ``attn.compressor.ape`` (and no indexer) is ratio 0: its
    other compressor tensors are refused by name, not dropped (loaded as a window-only layer)."""
    shards = _tiny_shards()
    del shards[1]["layers.2.attn.compressor.ape"]
    d = write_checkpoint(tmp_path, shards, config_json(TINY, None))
    with pytest.raises(CheckpointError, match=r"makes it an SWA layer.*layers\.2\.attn\.compressor\.wkv\.weight"):
        load_layer(d, 2)


def test_missing_tensor(tmp_path):
    d = _broken(tmp_path, lambda first, second: second.pop("layers.1.attn.indexer.compressor.ape"))
    with pytest.raises(CheckpointError) as e:
        load_layer(d, 1)
    assert "layers.1.attn.indexer.compressor.ape: missing (expected F32 [4, 256])" in str(e.value)


def test_wrong_dtype(tmp_path):
    def edit(first, second):
        first["layers.1.attn.wq_a.weight"] = first["layers.1.attn.wq_a.weight"].to(torch.bfloat16)

    with pytest.raises(CheckpointError) as e:
        load_layer(_broken(tmp_path, edit), 1)
    assert "layers.1.attn.wq_a.weight: expected F8_E4M3 [128, 256], found BF16 [128, 256]" in str(e.value)


def test_wrong_shapes_are_all_named(tmp_path):
    def edit(first, second):
        first["layers.1.attn.kv_norm.weight"] = first["layers.1.attn.kv_norm.weight"][:64].clone()
        first["layers.1.attn.wkv.scale"] = first["layers.1.attn.wkv.scale"].repeat(1, 2)

    with pytest.raises(CheckpointError) as e:
        load_layer(_broken(tmp_path, edit), 1)
    msg = str(e.value)
    assert "layers.1.attn.kv_norm.weight: expected BF16 or F32 [128], found BF16 [64]" in msg
    assert "layers.1.attn.wkv.scale: expected F8_E8M0 [1, 2], found F8_E8M0 [1, 4]" in msg


def test_cfg_that_does_not_match_the_checkpoint(tiny_dir):
    with pytest.raises(CheckpointError) as e:
        load_layer(tiny_dir, 1, PRESETS["flash"])
    assert "layers.1.attn.wq_a.weight: expected F8_E4M3 [1024, 4096], found F8_E4M3 [128, 256]" in str(e.value)


def test_nan_scale(tmp_path):
    def edit(first, second):
        scale = first["layers.1.attn.wq_b.scale"].view(torch.uint8).clone()
        scale[2, 0] = 255
        first["layers.1.attn.wq_b.scale"] = scale.view(torch.float8_e8m0fnu)

    with pytest.raises(CheckpointError, match=r"layers\.1\.attn\.wq_b\.scale: 1 scale\(s\) are NaN .*block \[2, 0\]"):
        load_layer(_broken(tmp_path, edit), 1)


def test_missing_files_and_layers(tiny_dir, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_layer(tmp_path / "nowhere", 1)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(CheckpointError, match=r"a-file is not a directory: a checkpoint is a folder"):
        load_layer(tmp_path / "a-file", 1)
    (tmp_path / "a-file").unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors.index.json nor model.safetensors"):
        load_layer(tmp_path, 1)
    with pytest.raises(CheckpointError, match=r"no tensors under 'layers\.7\.' \(layers found: 0-3\)"):
        load_layer(tiny_dir, 7)
    save_file(layer_tensors(TINY, 1, 4), str(tmp_path / "model.safetensors"))  # no config.json
    with pytest.raises(CheckpointError, match="no config.json; pass cfg="):
        load_layer(tmp_path, 1)
    assert load_layer(tmp_path, 1, TINY).attn.wq_a.shape == (128, 256)


def test_cli_run_of_a_checkpoint_without_a_config_asks_for_a_preset(tmp_path, capsys):
    save_file(layer_tensors(TINY, 1, 4), str(tmp_path / "model.safetensors"))  # no config.json
    assert main(["run", "--checkpoint", str(tmp_path), "--layer", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "has no config.json; give the model's dimensions with --preset NAME" in err and "cfg=" not in err
    argv = ["run", "--checkpoint", str(tmp_path), "--layer", "1", "--preset", "tiny", "--backend", "reference"]
    assert main([*argv, "--steps", "1", "--batch", "1", "--seq", "1", "--start-pos", "0", "--device", "cpu"]) == 0
    assert "loaded layer 1 of" in capsys.readouterr().out  # --preset gives the dims


# --- command line --------------------------------------------------------------------------------


def test_cli_inspect(tiny_dir, capsys):
    assert main(["inspect", str(tiny_dir)]) == 0
    out = capsys.readouterr().out
    assert "config: tiny" in out and "layers under 'layers.{layer}.': 0-3 (4)" in out
    assert "compress ratio   4: layers 1, 3 (compressor + lightning indexer)" in out
    assert "compress ratio 128: layers 2 (compressor, no indexer)" in out
    assert "layer kinds: SWA 0; CSA 1, 3; HCA 2" in out
    assert "layer 1: compress ratio 4 (config.json compress_ratios[1]); CSA" in out
    assert "layers.1.attn.indexer.wq_b.weight" in out and "F8_E4M3  [512, 128]" in out
    assert "layers.1.attn.wo_b.scale" in out and "layers.1.attn.compressor.wgate.weight" in out
    with Checkpoint(tiny_dir) as ckpt:
        infos = [ckpt.info(n) for n in ckpt.names() if n.startswith("layers.1.attn.")]
        stored = sum(i.nbytes for i in infos if i is not None)
        assert len(infos) > 0 and None not in infos
    assert f"attention of layer 1: {stored:,} bytes stored" in out
    loaded = load_layer(tiny_dir, 1).nbytes()
    assert f"{loaded:,} bytes loaded as bf16 + INT8 + FP8 ({loaded / 2**20:.1f} MiB)" in out
    assert f"{stored:,} bytes stored ({stored / 2**20:.1f} MiB)" in out
    assert "check: ok" in out
    assert main(["inspect", str(tiny_dir), "--layer", "2"]) == 0  # every kind loads
    out = capsys.readouterr().out
    assert "layer 2: compress ratio 128" in out and "HCA" in out and "check: ok" in out
    assert main(["inspect", str(tiny_dir), "--layer", "7"]) == 1  # a layer the checkpoint lacks
    assert "layer 7: no tensors under 'layers.7.'" in capsys.readouterr().out
    assert main(["inspect", str(tiny_dir), "--preset", "demo"]) == 1
    out = capsys.readouterr().out
    assert "check: layers.1.attn.wq_a.weight: expected F8_E4M3 [1024, 4096], found F8_E4M3 [128, 256]" in out


def test_cli_inspect_names_an_hca_layer_of_any_ratio(tmp_path, capsys):
    """An HCA layer's ratio need not be 128: its line says what the layer holds, as its kind does."""
    layers = {**layer_tensors(TINY, 0, 16), **layer_tensors(TINY, 1, 4), **layer_tensors(TINY, 2, 2)}
    write_checkpoint(tmp_path, [layers], config_json(TINY, [16, 4, 2]))
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "layer 1: compress ratio 4" in out  # without --layer: the first CSA layer, not the first compressed
    assert "compress ratio   2: layers 2 (compressor, no indexer)" in out
    assert "compress ratio  16: layers 0 (compressor, no indexer)" in out
    assert "compress ratio   4: layers 1 (compressor + lightning indexer)" in out
    assert "layer kinds: CSA 1; HCA 0, 2" in out and "unknown" not in out and "check: ok" in out


def test_cli_run_checkpoint(tiny_dir, capsys):
    """The front end of a CSA layer op by op, then the layer's whole attention; an HCA layer (no
    indexer) runs its projection and its whole attention."""
    args = ["run", "--checkpoint", str(tiny_dir), "--layer", "3", "--backend", "reference", "--device", "cpu"]
    assert main([*args, "--steps", "2", "--start-pos", "8", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "loaded layer 3 of" in out and "preset=tiny" in out
    assert out.count("qkv_proj_rope") == 3 and out.count("indexer ") >= 3
    assert out.count("csa attention") == 3 and "L3 decode 2   csa attention" in out and "hca attention" not in out
    for op in ("kv_compressor", "sparse_attn", "sparse_attn_write", "o_proj"):  # on the layer's own weights
        assert re.search(rf"^L3 call +{op} ", out, re.M), op
    assert re.search(r"^one call +window_kv_write +reference +B=2 S=2 .* is the reference$", out, re.M)
    assert main([*args[:3], "--layer", "2", "--steps", "1", "--start-pos", "8", "--batch", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("hca attention") == 2 and "indexer " not in out.split("one call")[0]
    assert out.count("qkv_proj_rope") == 2  # the prefill's and the step's: no indexer, the chain goes on
    assert re.search(r"^L2 call +kv_compressor ", out, re.M) and re.search(r"^L2 call +o_proj ", out, re.M)
    assert main(args[:3]) == 2
    assert "--checkpoint needs --layer N" in capsys.readouterr().err


def test_run_puts_the_layers_own_weights_into_the_cases_of_its_kind(tiny_dir) -> None:
    """``dsv4 run --checkpoint``'s calls of the rest of the layer run on the layer's own compressor,
    sink and output projection; a case of another kind (a window-only layer has no compressor) or of
    other shapes keeps its synthetic weights, and an op without weights is left alone."""
    from dsv4.harness.cases import make_case
    from dsv4.harness.run import _use_layer_weights

    cfg = dsv4.checkpoint_config(tiny_dir)
    swa, csa = load_layer(tiny_dir, 0), load_layer(tiny_dir, 1)
    case = make_case(cfg, "o_proj", batch=2, seq=2, start_pos=8)
    assert _use_layer_weights(case, csa) is True and case.args["w"] is csa.o_proj
    case = make_case(cfg, "sparse_attn_write", batch=2, seq=2, start_pos=8, kind="swa")
    assert _use_layer_weights(case, swa) is True and case.args["attn_sink"] is swa.attn_sink
    case = make_case(cfg, "kv_compressor", batch=2, seq=2, start_pos=8, kind="csa")
    assert _use_layer_weights(case, csa) is True and case.args["w"] is csa.compressor
    synthetic = case.args["w"]
    assert _use_layer_weights(case, swa) is False and case.args["w"] is synthetic
    other = make_case(TINY.replace(o_lora_rank=256), "o_proj", batch=2, seq=2, start_pos=8)
    synthetic = other.args["w"]
    assert _use_layer_weights(other, csa) is False and other.args["w"] is synthetic
    assert _use_layer_weights(make_case(cfg, "window_kv_write", batch=2, seq=2, start_pos=8), csa) is None


def test_cli_subprocess_inspect(odd_dir):
    r = run_dsv4("inspect", str(odd_dir))
    assert r.returncode == 0, r.stderr
    assert "config: checkpoint (D=320 H=3 HD=96" in r.stdout and "layers.0.attn.wq_b.scale" in r.stdout
    assert "F8_E8M0  [3, 2]" in r.stdout and json.loads((odd_dir / "config.json").read_text())["compress_ratios"] == [4]


def test_cli_inspect_without_a_config_still_fails_a_layer_missing_tensors(tmp_path, capsys):
    """Without ``config.json`` the shapes go unchecked, but a missing tensor still fails the layer."""
    shards = {k: v for k, v in layer_tensors(TINY, 1, 4).items() if not k.startswith("layers.1.attn.wq_b")}
    save_file(shards, str(tmp_path / "model.safetensors"))
    assert main(["inspect", str(tmp_path), "--layer", "1"]) == 1
    out = capsys.readouterr().out
    assert "layers.1.attn.wq_b.weight" in out and "MISSING" in out and "tensor(s) missing" in out
    assert "other tensors under 'layers.1.' (not used by the attention): 1" in out  # the missing ones not counted


def test_cli_inspect_of_a_prefix_no_tensor_has_lists_no_layers_and_fails(tiny_dir, capsys) -> None:
    """A ``--prefix`` under which the checkpoint holds no tensor: the report says no layers were found and
    inspect fails (exit 1) with no layer to describe or check."""
    assert main(["inspect", str(tiny_dir), "--prefix", "mtp.{layer}."]) == 1
    out = capsys.readouterr().out
    assert "layers under 'mtp.{layer}.': none (0)" in out, out
    assert "check:" not in out and "attention tensors" not in out


def test_cli_inspect_names_a_config_that_cannot_size_the_output_projection(tmp_path, capsys):
    """A ``config.json`` without ``o_groups``/``o_lora_rank`` and dims of no preset: inspect names the config,
    as ``load_layer`` does, instead of blaming the output projection's tensors for shapes of 0."""
    raw = config_json(TINY, RATIOS) | {"sliding_window": 32}
    del raw["o_groups"], raw["o_lora_rank"]
    d = write_checkpoint(tmp_path, _tiny_shards(), raw)
    with pytest.raises(CheckpointError, match="config: o_groups 0 / o_lora_rank 0 cannot size"):
        load_layer(d, 1)
    assert main(["inspect", str(d), "--layer", "1"]) == 1
    out = capsys.readouterr().out
    assert "check: config: o_groups 0 / o_lora_rank 0 cannot size the output projection" in out
    assert "wo_a.weight: expected" not in out and "[0, 0]" not in out


def test_a_config_whose_groups_do_not_split_the_heads_is_refused(tmp_path):
    """``o_groups`` 3 over 4 heads: a group would hold 1 head and the fourth none. Tensors stored to that
    config's shapes would load as a layer that ``o_proj`` takes as 4 groups; it is refused naming the
    config instead."""
    cfg = TINY.replace(o_groups=3)
    d = write_checkpoint(tmp_path, [layer_tensors(cfg, 0, 0)], config_json(cfg, [0]))
    with pytest.raises(CheckpointError, match="config: o_groups 3 / o_lora_rank 64 cannot size .* of 4 heads"):
        load_layer(d, 0)


def _nan_at(name: str, index: tuple[int, ...], byte: int | None = None):
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        t = tensors[name]
        if byte is None:
            t[index] = float("nan")
        else:  # an FP8 code or UE8M0 scale byte
            t.view(torch.uint8)[index] = byte

    return edit


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda t: None, "check: dtypes and values ok; shapes not checked"),
        (_nan_at("layers.1.attn.q_norm.weight", (3,)), "layers.1.attn.q_norm.weight: 1 value(s) are NaN"),
        (_nan_at("layers.1.attn.wq_b.scale", (2, 0), 255), "layers.1.attn.wq_b.scale: 1 scale(s) are NaN"),
        (_nan_at("layers.1.attn.wo_a.weight", (5, 7), 0x7F), "layers.1.attn.wo_a.weight: rows 0..127 hold NaN codes"),
        (_nan_at("layers.1.attn.indexer.compressor.ape", (1, 2)), "indexer.compressor.ape: 1 value(s) are NaN"),
        (
            lambda t: t.update({"layers.1.attn.wkv.weight": t["layers.1.attn.wkv.weight"].to(torch.bfloat16)}),
            "layers.1.attn.wkv.weight: expected F8_E4M3, found BF16",
        ),
        (lambda t: t.pop("layers.1.attn.wq_b.scale"), "check: 1 tensor(s) missing"),
        (
            lambda t: t.update({"layers.1.attn.wq_b.scale": t["layers.1.attn.wq_b.scale"].repeat(1, 2)}),
            "layers.1.attn.wq_b.scale: expected [4, 1] scale blocks of [128, 128] over layers.1.attn.wq_b.weight "
            "[512, 128], found [4, 2]",
        ),
        (
            lambda t: t.update({"layers.1.attn.wq_b.scale": t["layers.1.attn.wq_b.scale"].float()}),
            "layers.1.attn.wq_b.scale: expected F8_E8M0, found F32",
        ),
    ],
    ids=["clean", "nan-norm", "nan-scale", "nan-code", "nan-ape", "dtype", "no-scale", "scale-grid", "scale-dtype"],
)
def test_cli_inspect_without_a_config_checks_the_values(edit, words, tmp_path, capsys):
    """Without ``config.json`` the shapes go unchecked, but the values are checked as ``load_layer`` checks
    them: a layer ``load_layer`` would refuse for its values or dtypes fails inspect (exit 1)."""
    tensors = layer_tensors(TINY, 1, 4)
    edit(tensors)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    clean = words.startswith("check: dtypes and values ok")
    assert main(["inspect", str(tmp_path), "--layer", "1"]) == (0 if clean else 1)
    out = capsys.readouterr().out
    assert words in out and ("values ok" in out) == clean, out
    if clean:
        assert load_layer(tmp_path, 1, TINY).kind == "csa"
    else:
        with pytest.raises(CheckpointError):  # the loader, given the dims, refuses the same layer
            load_layer(tmp_path, 1, TINY)

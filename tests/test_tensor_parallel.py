"""A tensor-parallel rank's share of a layer (README, "Tensor parallelism"): the ops, ``DecodeFrontEnd``
and ``DecodeAttention`` take a rank's heads and output-projection groups as they take a whole layer's.

A rank of ``world`` holds ``H / world`` query heads (its rows of ``wq_b`` and ``wq_b_scale``, its
``attn_sink`` entries) and ``G / world`` output-projection groups (its rows of ``wo_a``, its columns
of ``wo_b``, and their scale blocks); everything else (``wq_a``, ``wkv``, the compressors, the
indexer, the KV pools) is the whole layer's on every rank. A rank's ``q`` and attention output are
the whole layer's heads (bit for bit on the CPU); its ``y`` is its groups' share of the output
projection, which the ranks add (an all-reduce) to the whole layer's ``y`` up to the roundings of the
shares to bf16.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

import dsv4
from conftest import DEVICE, FULL, backends_of
from dsv4.bench.runner import bench_cost, shape_grid
from dsv4.cli import main
from dsv4.harness.cases import make_case
from dsv4.harness.golden import ratio_allclose, tolerance
from dsv4.io.checkpoint import Checkpoint
from dsv4.model.config import DeepSeekV4Config
from dsv4.model.weights import AttnWeights, LayerWeights, OProjWeights
from fp8_checkpoint import assert_same_layer, config_json, layer_tensors, write_checkpoint
from subprocesses import ROOT, run_python

BLOCK = 128  # the FP8 weights' scale blocks: a rank's G*OL output-projection rows are whole blocks
# tiny with 128 output-projection rows a group, so that one group (a rank of 2) is a whole scale block
CFG = dataclasses.replace(dsv4.get_config("tiny"), o_lora_rank=BLOCK)
LAYERS = {"swa": 0, "csa": 1, "hca": 2}
BF16_U = 2.0**-8  # bf16's unit roundoff: rounding to bf16 moves a value by at most this times its magnitude
# per op, the tensors of its bytes model that a rank holds its share of (the rest are the whole layer's)
_ATTENTION = {"q", "attn_sink", "o"}
HEAD_TENSORS = {
    "qkv_proj_rope": {"wq_b", "wq_b_scale", "q"},
    "sparse_attn": _ATTENTION,
    "sparse_attn_write": _ATTENTION,
    "o_proj": {"o"} | {f"w.{name}" for name in ("wo_a (FP8)", "wo_a_scale", "wo_b (FP8)", "wo_b_scale")},
}


def rank_o_proj(op: OProjWeights, rows: int, rank: int) -> OProjWeights:
    """Rank ``rank``'s ``rows`` of ``wo_a`` (its groups), the same columns of ``wo_b``, and their scales."""
    r, b = slice(rank * rows, (rank + 1) * rows), slice(rank * rows // BLOCK, (rank + 1) * rows // BLOCK)
    return OProjWeights(
        op.wo_a[r].contiguous(),
        op.wo_a_scale[b].contiguous(),
        op.wo_b[:, r].contiguous(),
        op.wo_b_scale[:, b].contiguous(),
    )


def rank_attn(attn: AttnWeights, cfg: DeepSeekV4Config, rank: int, world: int) -> AttnWeights:
    """Rank ``rank`` of ``world``'s rows of ``wq_b`` and ``wq_b_scale`` (its heads); the rest whole."""
    heads = cfg.num_attention_heads // world
    rows = slice(rank * heads * cfg.head_dim, (rank + 1) * heads * cfg.head_dim)
    return dataclasses.replace(attn, wq_b=attn.wq_b[rows].contiguous(), wq_b_scale=attn.wq_b_scale[rows].contiguous())


def rank_weights(w: LayerWeights, cfg: DeepSeekV4Config, rank: int, world: int) -> LayerWeights:
    """Rank ``rank`` of ``world``'s share of a layer's weights ``w`` (of ``cfg``)."""
    heads = cfg.num_attention_heads // world
    out = dataclasses.replace(w, attn=rank_attn(w.attn, cfg, rank, world))
    if w.attn_sink is not None and w.o_proj is not None:
        out = dataclasses.replace(
            out,
            attn_sink=w.attn_sink[rank * heads : (rank + 1) * heads].contiguous(),
            o_proj=rank_o_proj(w.o_proj, cfg.o_groups // world * cfg.o_lora_rank, rank),
        )
    return out


def assert_same(got: torch.Tensor, whole: torch.Tensor, output: str) -> None:
    """A rank's heads of ``output`` against the same heads of the whole layer's: bit for bit on the CPU
    (the reference, Triton's interpreter); on a GPU within the output's rule, since a launch of fewer
    heads may tile them otherwise (the paired q heads, the attention's head blocks)."""
    if DEVICE.type == "cpu":
        assert torch.equal(got, whole), output
    t = tolerance(output)
    check = ratio_allclose(got, whole, t.atol, t.rtol, t.max_error_ratio, output)
    assert check, check.detail


def assert_shares_add_up(shares: list[torch.Tensor], whole: torch.Tensor) -> None:
    """The ranks' bf16 shares of ``y`` add to the whole layer's ``y`` up to the roundings to bf16: each
    share and the whole are their fp32 sums rounded once (``BF16_U`` of their magnitude), and those
    sums differ only in the order of their fp32 additions."""
    total = sum((s.float() for s in shares), torch.zeros(whole.shape, device=whole.device))
    bound = BF16_U * (1 + 2.0**-7) * (sum(s.float().abs() for s in shares) + whole.float().abs()) + 1e-5
    off = (total - whole.float()).abs() > bound
    assert not off.any(), f"{int(off.sum())} of {off.numel()} values, worst {(total - whole.float()).abs().max():.4g}"


@pytest.mark.parametrize("name", ["flash/tp8", "pro/tp16", "demo/tp2"])
def test_a_ranks_config(name: str) -> None:
    """``get_config("<preset>/tp<N>")`` is ``DeepSeekV4Config.rank(N)`` of the preset: its share of the
    heads and output-projection groups, every other field the preset's, and a name that gives it back."""
    preset, world = name.split("/tp")[0], int(name.split("/tp")[1])
    whole, rank = dsv4.get_config(preset), dsv4.get_config(name)
    assert rank == whole.rank(world) and rank.name == name and rank.preset == preset
    assert (rank.num_attention_heads * world, rank.o_groups * world) == (whole.num_attention_heads, whole.o_groups)
    back = dataclasses.replace(
        rank, name=preset, num_attention_heads=whole.num_attention_heads, o_groups=whole.o_groups
    )
    assert back == whole and whole.rank(1) is whole and whole.preset == preset


@pytest.mark.parametrize(
    ("world", "words"),
    [(3, "H=64"), (16, "G=8"), (0, "positive int"), (True, "positive int"), (2.0, "positive int")],
)
def test_ranks_that_would_split_a_head_or_group_are_refused(world: object, words: str) -> None:
    with pytest.raises(ValueError, match=f"world: .*{words}"):
        dsv4.get_config("flash").rank(world)  # type: ignore[arg-type]


def test_ranks_that_would_split_a_scale_block_are_refused() -> None:
    with pytest.raises(ValueError, match="world: .*128-row scale blocks"):
        dsv4.get_config("tiny").rank(2)  # OL=64: a rank's one group would be half a scale block


def test_a_rank_moves_its_share_of_the_head_bytes() -> None:
    """The bytes model at a rank's shapes (``dsv4 bench --preset flash/tp8``): an op's reads and writes
    of its ``HEAD_TENSORS`` are the whole layer's over ``world``, of every other tensor the whole
    layer's."""
    whole, world = dsv4.get_config("flash"), 8
    rank = whole.rank(world)
    for shape in shape_grid(whole, ["decode", "prefill"]):
        starts = [shape.start_pos or 0] * shape.batch
        mine, layer = bench_cost(rank, shape, starts), bench_cost(whole, shape, starts)
        for part in ("reads", "writes"):
            got, full = getattr(mine, part), getattr(layer, part)
            assert got.keys() == full.keys(), (shape, part)
            shared = HEAD_TENSORS.get(shape.op, set())
            want = {k: v // world if k in shared else v for k, v in full.items()}
            assert got == want and all(full[k] % world == 0 for k in shared & full.keys()), (shape, part)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("backend", backends_of("qkv_proj_rope"))
def test_a_ranks_query_heads_are_the_layers(backend: str, world: int) -> None:
    """``qkv_proj_rope`` on a rank's rows of ``wq_b``: its heads of ``q`` (``assert_same``), and the whole
    layer's ``kv``, ``qr`` and ``qr_scale`` bit for bit (every rank computes them)."""
    case = make_case(CFG, "qkv_proj_rope", seed=2, device=DEVICE, batch=3, seq=2)
    a = case.args
    whole = dsv4.qkv_proj_rope(a["x"], a["w"], a["positions"], a["rope"], backend=backend)
    heads = CFG.num_attention_heads // world
    for rank in range(world):
        got = dsv4.qkv_proj_rope(
            a["x"], rank_attn(a["w"], CFG, rank, world), a["positions"], a["rope"], backend=backend
        )
        assert_same(got.q, whole.q[:, rank * heads : (rank + 1) * heads], "q")
        rest = ("kv", "qr", "qr_scale")  # every rank's whole, from launches that do not depend on the heads
        assert all(torch.equal(getattr(got, n), getattr(whole, n)) for n in rest), rank


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("kind", ["swa", "csa", "hca"])
@pytest.mark.parametrize("backend", backends_of("sparse_attn"))
def test_a_ranks_attention_heads_are_the_layers(backend: str, kind: str, world: int) -> None:
    """``sparse_attn`` on a rank's heads of ``q`` and ``attn_sink`` (the pools and ``kv`` whole: one
    MQA key head for every query head): those heads of the whole layer's output (``assert_same``)."""
    a = make_case(CFG, "sparse_attn", seed=4, device=DEVICE, batch=2, seq=2, kind=kind).args
    whole = dsv4.sparse_attn(**a, backend=backend).o
    heads = CFG.num_attention_heads // world
    for rank in range(world):
        h = slice(rank * heads, (rank + 1) * heads)
        got = dsv4.sparse_attn(
            **{**a, "q": a["q"][:, :, h].contiguous(), "attn_sink": a["attn_sink"][h]}, backend=backend
        )
        assert_same(got.o, whole[:, :, h], "o")


@pytest.mark.parametrize("backend", backends_of("o_proj"))
def test_the_ranks_output_projections_add_up_to_the_layers(backend: str) -> None:
    """``o_proj`` on each rank's heads of ``o`` and groups of the weights: the shares add up to ``y``."""
    case = make_case(CFG, "o_proj", seed=5, device=DEVICE, batch=3, seq=2)
    o, w = case.args["o"], case.args["w"]
    whole = dsv4.o_proj(o, w, backend=backend).y
    world, heads = 2, CFG.num_attention_heads // 2
    shares = [
        dsv4.o_proj(
            o[:, r * heads : (r + 1) * heads].contiguous(), rank_o_proj(w, CFG.o_lora_rank, r), backend=backend
        ).y
        for r in range(world)
    ]
    assert_shares_add_up(shares, whole)
    wrong = [dsv4.o_proj(o[:, :heads].contiguous(), rank_o_proj(w, CFG.o_lora_rank, 1), backend=backend).y, shares[1]]
    with pytest.raises(AssertionError):  # another rank's heads against these groups: the check sees it
        assert_shares_add_up(wrong, whole)


# "auto" is the reference on a CPU: the kernels take a rank's shapes in the op tests above, and the module's
# launches of them in the `full` case
@pytest.mark.parametrize(
    "kind,backend", [("swa", "auto"), ("csa", "auto"), ("hca", "auto"), pytest.param("csa", "triton", marks=FULL)]
)
def test_decode_attention_ranks_add_up_to_the_layer(kind: str, backend: str) -> None:
    """``DecodeAttention`` built from a rank's config and weights runs the rank's share of every step
    (a prompt, decode steps, a draft re-run); the ranks' ``y`` add up to the whole layer's."""
    layer, world = LAYERS[kind], 2
    w = dsv4.synthetic_weights(CFG, seed=0, device=DEVICE, layer=layer)
    rope = dsv4.layer_rope_table(CFG, layer, 128, DEVICE)
    whole = dsv4.DecodeAttention(w, rope, CFG, batch=2, max_position=128, backend=backend)
    ranks = [
        dsv4.DecodeAttention(
            rank_weights(w, CFG, r, world), rope, CFG.rank(world), batch=2, max_position=128, backend=backend
        )
        for r in range(world)
    ]
    for step, (s, start) in enumerate([(5, None), (2, None), (2, [5, 5]), (2, None)]):
        x = dsv4.synthetic_activations((2, s, CFG.hidden_size), seed=10 + step, device=DEVICE)
        assert_shares_add_up([m(x, start) for m in ranks], whole(x, start))


def test_decode_front_end_of_a_rank() -> None:
    """``DecodeFrontEnd`` on a rank's weights: its heads of the whole layer's ``q``, and the whole layer's
    ``kv`` and top-k (the indexer is every rank's), over a prompt and decode steps."""
    w = dsv4.synthetic_weights(CFG, seed=0, device=DEVICE)
    rope = dsv4.rope_table(CFG, "compressed", max_position=128, device=DEVICE)

    def front_end(weights: LayerWeights) -> dsv4.DecodeFrontEnd:
        return dsv4.DecodeFrontEnd(
            weights, rope, batch=2, max_position=128, topk=CFG.index_topk, offset=CFG.sliding_window, block_size=16
        )

    world, heads = 2, CFG.num_attention_heads // 2
    whole, ranks = front_end(w), [front_end(rank_weights(w, CFG, r, world)) for r in range(world)]
    for step, s in enumerate((5, 2, 2)):
        x = dsv4.synthetic_activations((2, s, CFG.hidden_size), seed=20 + step, device=DEVICE)
        q, kv, topk = whole(x)
        for rank, m in enumerate(ranks):
            rq, rkv, rtopk = m(x)
            assert_same(rq, q[:, :, rank * heads : (rank + 1) * heads], "q")
            assert torch.equal(rkv, kv) and torch.equal(rtopk, topk), (step, rank)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An FP8 checkpoint of ``CFG``'s first layers (SWA, CSA, HCA), as the published ones store them."""
    ratios = [CFG.layer_ratio(layer) for layer in LAYERS.values()]
    tensors = {k: v for layer, ratio in enumerate(ratios) for k, v in layer_tensors(CFG, layer, ratio).items()}
    return write_checkpoint(tmp_path_factory.mktemp("tp") / "ckpt", [tensors], config_json(CFG, ratios))


@pytest.mark.parametrize("raw_bytes", [False, True], ids=["safetensors", "raw-bytes"])
def test_a_rank_loads_its_share_of_a_checkpoint(raw_bytes: bool, checkpoint: Path) -> None:
    """``load_layer(..., rank=r, world=w)`` reads rank ``r``'s share of an FP8 checkpoint, in each layer
    kind: bit for bit the whole layer's weights as ``rank_weights`` slices them (``wq_b``'s INT8 rows and
    scales depend on their own rows alone). A rank outside ``[0, world)`` and a world that would split an
    output-projection group are refused, naming the argument."""
    with Checkpoint(checkpoint, raw_bytes=raw_bytes) as ckpt:
        assert ckpt.config().o_lora_rank == BLOCK
        for layer in LAYERS.values():
            whole = ckpt.load_layer(layer)
            for rank in range(2):
                assert_same_layer(ckpt.load_layer(layer, rank=rank, world=2), rank_weights(whole, CFG, rank, 2))
        for rank in (2, -1, True):
            with pytest.raises(ValueError, match=r"^rank: expected an int in \[0, 2\)"):
                ckpt.load_layer(1, rank=rank, world=2)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="^world: .*G=2"):
            ckpt.load_layer(1, rank=0, world=4)


@pytest.mark.parametrize("block", [[128, 256], [256, 128], [256, 256]])
def test_a_world_that_splits_a_scale_block_is_refused_for_every_rank(
    block: list[int], checkpoint: Path, tmp_path: Path
) -> None:
    """Scale blocks of ``block`` and 2 ranks of 128 output-projection rows (``wo_a``) and columns (``wo_b``)
    each: a block would be split between the ranks, so every rank is refused naming ``world`` (rank 0's
    rows start at 0, a block's start, but rank 1's do not), before any tensor is read."""
    shutil.copytree(checkpoint, tmp_path / "ckpt")
    raw = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    raw["quantization_config"]["weight_block_size"] = block
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(raw))
    for rank in range(2):
        with pytest.raises(ValueError, match=rf"^world: 2 ranks would split {block[0]}x{block[1]} scale blocks"):
            dsv4.load_layer(tmp_path / "ckpt", 1, rank=rank, world=2)


def test_dsv4_run_of_a_ranks_checkpoint_share(checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    """``dsv4 run --checkpoint DIR --layer 1 --rank 1 --world 2``: the rank's share of the CSA layer,
    its front end and its whole attention, every call checked against the reference."""
    argv = ["run", "--checkpoint", str(checkpoint), "--layer", "1", "--rank", "1", "--world", "2", "--steps", "1"]
    assert main([*argv, "--start-pos", "16", "--batch", "2", "--device", str(DEVICE)]) == 0
    out = capsys.readouterr().out
    assert "rank 1 of 2" in out and "all checks passed" in out, out[-2000:]
    assert "preset=checkpoint/tp2" in out  # the config.json of no preset, one of 2 ranks


@pytest.mark.parametrize("example", ["decode_loop.py", "attention_loop.py"])
def test_the_examples_run_a_rank(example: str) -> None:
    """The examples take a rank preset as the ``dsv4`` commands do (``demo/tp8``: flash dims, 8 q heads,
    on the reference for speed), and refuse one that would split a head with the reason, naming
    ``--preset``."""
    script = str(ROOT / "examples" / example)
    steps = ["--backend", "reference", "--steps", "1", "--prefill", "16", "--batch", "1", "--device", "cpu"]
    done = run_python([script, "--preset", "demo/tp8", *steps], timeout=300)
    assert done.returncode == 0 and "preset=demo/tp8" in done.stdout, done.stderr[-2000:]
    refused = run_python([script, "--preset", "demo/tp3"], timeout=300)
    assert refused.returncode == 2 and "--preset: world: demo splits" in refused.stderr, refused.stderr[-2000:]

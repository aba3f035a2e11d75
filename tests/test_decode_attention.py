"""``DecodeAttention``: one layer's whole attention step for each kind, equal to the ops composed by
hand on a dense state (spec §7), with paged pools, recycled window blocks, chunked prefill, slot
resets and draft re-runs."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

import dsv4
from conftest import DEVICE
from dsv4.harness.golden import bit_identical, ratio_allclose
from dsv4.model.attention_state import compressor_dims
from dsv4.model.structs import IndexerOut
from dsv4.ops import get_op
from dsv4.ops.step_cost import step_bytes, step_costs
from subprocesses import ROOT, run_python

CFG = dsv4.get_config("tiny")
LAYERS = {"swa": 0, "csa": 1, "hca": 2}
BS = 16
Y = dsv4.ops.get_op("o_proj").output("y").tolerance


def module(kind: str, batch: int = 3, max_position: int = 128, **kw) -> dsv4.DecodeAttention:
    layer = LAYERS[kind]
    w = dsv4.synthetic_weights(CFG, seed=0, device=DEVICE, layer=layer)
    rope = dsv4.layer_rope_table(CFG, layer, max_position, DEVICE)
    kw.setdefault("block_size", BS)
    kw.setdefault("backend", "reference")
    return dsv4.DecodeAttention(w, rope, CFG, batch=batch, max_position=max_position, **kw)


def x_of(b: int, s: int, seed: int) -> torch.Tensor:
    return dsv4.synthetic_activations((b, s, CFG.hidden_size), seed=seed, device=DEVICE)


def counted_checks(m: dsv4.DecodeAttention, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that gets an entry each time ``m`` checks its ops' buffers again."""
    checks: list[int] = []
    check_ops = m._check_ops

    def counted() -> None:
        checks.append(1)
        check_ops()

    monkeypatch.setattr(m, "_check_ops", counted)
    return checks


def composed(
    kind: str, calls: list[tuple[torch.Tensor, int]], max_position: int = 128, cfg: dsv4.DeepSeekV4Config = CFG
) -> list[torch.Tensor]:
    """The §7 steps by hand (the public ops) on a dense ``AttentionState``: the expected ``y`` of each call."""
    layer = LAYERS[kind]
    w = dsv4.synthetic_weights(cfg, seed=0, device=DEVICE, layer=layer)
    rope = dsv4.layer_rope_table(cfg, layer, max_position, DEVICE)
    b = calls[0][0].shape[0]
    state = dsv4.AttentionState.empty(cfg, layer, b, max_position, DEVICE, block_size=BS)
    assert w.attn_sink is not None and w.o_proj is not None  # a layer's weights: the whole attention
    out = []
    for x, start in calls:
        s = x.shape[1]
        positions = (start + torch.arange(s, device=DEVICE)).repeat(b)
        qkv = dsv4.qkv_proj_rope(x.reshape(b * s, -1), w.attn, positions, rope)
        q, kv = qkv.q.view(b, s, *qkv.q.shape[1:]), qkv.kv.view(b, s, -1)
        if state.compressor is not None:
            assert w.compressor is not None
            dsv4.kv_compressor(x, w.compressor, state.compressor, start, rope)
        topk = None
        if kind == "csa":
            assert w.indexer is not None and state.indexer is not None
            idx_out = IndexerOut(
                torch.empty(b, s, (start + s) // 4, device=DEVICE),
                torch.empty(b, s, cfg.index_topk, dtype=torch.int32, device=DEVICE),
            )
            topk = dsv4.indexer(
                x, qkv.qr, qkv.qr_scale, w.indexer, state.indexer, start, cfg.sliding_window, rope,
                topk=cfg.index_topk, out=idx_out,
            ).topk_idxs  # fmt: skip
        o = dsv4.sparse_attn(
            q, kv, start, state.window, w.attn_sink, rope, kind=kind, window=cfg.sliding_window,
            compress_ratio=w.compress_ratio, compressed_pool=state.compressor.pool if state.compressor else None,
            topk_idxs=topk, topk_offset=cfg.sliding_window if topk is not None else 0,
        ).o  # fmt: skip
        dsv4.window_kv_write(kv, state.window, start, window=cfg.sliding_window)
        out.append(dsv4.o_proj(o.view(b * s, *o.shape[2:]), w.o_proj).y.view(b, s, -1))
    return out


@pytest.mark.parametrize("kind", ["swa", "csa", "hca"])
def test_attention_state_holds_the_parts_of_its_kind(kind: str) -> None:
    """``empty``: room for ``max_position`` window rows, ``max_position // RC`` compressed rows and (CSA)
    ``max_position // 4`` indexer keys per slot, rings empty; ``paged``: the given pools, and a pool
    the kind lacks (or one it needs, missing) is refused."""
    layer, ratio = LAYERS[kind], CFG.layer_ratio(LAYERS[kind])
    e = dsv4.AttentionState.empty(CFG, layer, 2, 64, block_size=BS)
    assert e.kind == kind and e.window.rows == 64 and e.window.row_bytes == 64 + 2 * 64 + 8  # NOPE 64, R 64
    assert (e.compressor is None) == (kind == "swa") and (e.indexer is None) == (kind != "csa")
    if e.compressor is not None:
        assert e.compressor.ratio == ratio and e.compressor.pool.rows == BS * -(-(64 // ratio) // BS)
        assert bool((e.compressor.kv_state == 0).all() and (e.compressor.score_state == float("-inf")).all())
    if e.indexer is not None:
        assert e.indexer.block_table.shape[1] * BS >= 64 // 4
    table = torch.tensor([[2, -1], [0, 1]], dtype=torch.int32)
    pools: dict[str, Any] = {"window": (3, table)}
    if ratio:
        pools["compressed"] = (3, table)
    if kind == "csa":
        pools["indexer"] = (3, table)
    p = dsv4.AttentionState.paged(CFG, layer, 2, **pools, block_size=BS)
    assert p.kind == kind and torch.equal(p.window.block_table, table) and p.window.nope.shape[:2] == (3, BS)
    wrong = dict(pools)
    if ratio:
        del wrong["compressed"]
    else:
        wrong["compressed"] = (3, table)
    with pytest.raises(ValueError, match="compressed: a"):
        dsv4.AttentionState.paged(CFG, layer, 2, **wrong, block_size=BS)
    with pytest.raises(ValueError, match="window: expected a block table of 3 rows"):
        dsv4.AttentionState.paged(CFG, layer, 3, **pools, block_size=BS)
    outside = torch.tensor([[3, -1], [0, 1]], dtype=torch.int32)  # block 3 of a 3-block pool
    three = torch.tensor([[2, -1], [0, 1], [-1, -1]], dtype=torch.int32)
    for part in pools:  # each part's table is named, though their inner checks share their words
        with pytest.raises(ValueError, match=rf"^{part}: block_table: expected entries in \[0, 3\) or -1"):
            dsv4.AttentionState.paged(CFG, layer, 2, **{**pools, part: (3, outside)}, block_size=BS)
        with pytest.raises(TypeError, match=f"^{part}: block_table: expected an integer tensor, got float32"):
            dsv4.AttentionState.paged(CFG, layer, 2, **{**pools, part: (3, table.float())}, block_size=BS)
        with pytest.raises(
            ValueError, match=rf"^{part}: (expected a block table of 2 rows|block_table: expected (2 rows|shape \[2,))"
        ):
            dsv4.AttentionState.paged(CFG, layer, 2, **{**pools, part: (3, three)}, block_size=BS)


@pytest.mark.parametrize("kind", ["swa", "csa", "hca"])
def test_steps_equal_the_ops_composed_on_a_dense_state(kind: str) -> None:
    """A prefill of 37 tokens (3 chunks of 16: rows across pool blocks, closes inside a chunk), then
    decode steps of 2: bit for bit the ops composed by hand, though the module's pools are paged and
    its window blocks recycled."""
    m = module(kind, prefill_chunk=16)
    xs = [(x_of(3, 37, 1), 0), (x_of(3, 2, 2), 37), (x_of(3, 2, 3), 39), (x_of(3, 1, 4), 41)]
    got = [m(x) for x, _ in xs]
    chunks = [(xs[0][0][:, c : c + 16].contiguous(), c) for c in (0, 16, 32)] + xs[1:]
    want = composed(kind, chunks)
    assert bit_identical(got[0], torch.cat(want[:3], 1)) and all(
        bit_identical(g, w) for g, w in zip(got[1:], want[3:], strict=True)
    )
    assert m.next_pos == [42] * 3
    held = [sorted(cols) for cols in m.paging.pools[0].slots]
    assert held == [[1, 2]] * 3, held  # rows 0..15 were given back: no later token sees them


@pytest.mark.parametrize("ratio", [1, 2])
def test_an_hca_layer_of_any_ratio_equals_its_ops_composed(ratio: int) -> None:
    """A compressor of ratio 1 closes a row at every position, so the step at position 0 reads its own row 0:
    the module's build-time check of its ops gives that row a block (its table is empty until a step runs);
    the steps are the ops composed by hand, bit for bit, as at the presets' ratios."""
    cfg = CFG.replace(compress_ratios=(0, 4, ratio, 0))
    w = dsv4.synthetic_weights(cfg, seed=0, device=DEVICE, layer=LAYERS["hca"])
    rope = dsv4.layer_rope_table(cfg, LAYERS["hca"], 128, DEVICE)
    m = dsv4.DecodeAttention(w, rope, cfg, batch=2, max_position=128, backend="reference", block_size=BS)
    assert m.kind == "hca" and m.ratio == ratio
    xs = [(x_of(2, 9, 1), 0), (x_of(2, 2, 2), 9), (x_of(2, 1, 3), 11)]
    for got, want in zip([m(x) for x, _ in xs], composed("hca", xs, cfg=cfg), strict=True):
        assert bit_identical(got, want)


@pytest.mark.parametrize("kind", ["csa", "hca"])
def test_chunked_prefill_is_within_the_rule_of_one_long_step(kind: str) -> None:
    one, chunked = module(kind), module(kind, prefill_chunk=7)
    x = x_of(2, 40, 5)
    assert ratio_allclose(chunked(x), one(x), Y.atol, Y.rtol, Y.max_error_ratio)


@pytest.mark.parametrize("failing", [1, 2])
def test_a_chunked_call_whose_later_step_raises_says_how_far_it_got(
    failing: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 40-token call in steps of 16 whose ``failing``-th step raises (out of memory in ``o_proj``): the
    steps before it stay, and the call raises ``PartialCallError`` with how many tokens ran and where the
    slots stand (before, it raised the step's error alone, and the same call run again appended the first
    16 tokens twice); going on with the rest gives what a call that never failed gives. A failure in the
    first step raises the step's own error and changes nothing."""
    m, fresh = module("csa", batch=2, prefill_chunk=16), module("csa", batch=2, prefill_chunk=16)
    launch, calls = m._launch, []

    def flaky(op: str, *args: Any, **kwargs: Any) -> Any:
        if op == "o_proj":
            calls.append(op)
            if len(calls) == failing:
                raise RuntimeError("out of memory")
        return launch(op, *args, **kwargs)

    monkeypatch.setattr(m, "_launch", flaky)
    x = x_of(2, 40, 11)
    ran = 16 * (failing - 1)
    if failing == 1:
        with pytest.raises(RuntimeError, match="out of memory") as info:
            m(x)
        assert not isinstance(info.value, dsv4.PartialCallError)
    else:
        with pytest.raises(dsv4.PartialCallError, match=r"first 16 tokens ran .* now stand at \[16, 16\]") as info:
            m(x)
        assert isinstance(info.value.__cause__, RuntimeError) and "out of memory" in str(info.value.__cause__)
        assert (info.value.ran, info.value.next_pos) == (ran, [ran, ran])
    assert m.next_pos == [ran, ran]
    want = fresh(x)
    assert bit_identical(m(x[:, ran:].contiguous()), want[:, ran:], "y")
    assert m.next_pos == fresh.next_pos == [40, 40] and _paging(m) == _paging(fresh)


def test_window_blocks_are_recycled_so_a_small_pool_serves_long_sequences() -> None:
    """Two slots, 3 window blocks each (``ceil((W + S - 2) / bs) + 1`` for S=2 decode is 2), over 120
    positions: the window pool never runs out; the compressed pool grows with the sequence."""
    m = module("hca", batch=2, num_blocks={"window": 6}, prefill_chunk=16)
    m(x_of(2, 30, 6))
    for i in range(45):
        m(x_of(2, 2, 100 + i))
    assert m.next_pos == [120, 120] and len(m.paging.pools[0].free) == 6 - sum(len(s) for s in m.paging.pools[0].slots)
    assert all(len(s) <= 2 for s in m.paging.pools[0].slots)
    assert sorted(m.paging.pools[1].slots[0]) == [0]  # 7 compressed rows in one block


def test_too_few_blocks_is_refused_before_anything_changes() -> None:
    m = module("csa", batch=2, num_blocks={"compressed": 2})
    m(x_of(2, 8, 7))  # 2 compressed rows per slot: a block each; 64 more tokens need a second each
    before = {k: v.clone() for k, v in m.named_buffers()}
    free = list(m.paging.pools[1].free)
    with pytest.raises(ValueError, match="compressed pool blocks"):
        m(x_of(2, 64, 8))
    assert m.next_pos == [8, 8] and m.paging.pools[1].free == free
    assert all(bit_identical(v, before[k], k) for k, v in m.named_buffers())


@pytest.mark.parametrize("blocks", [2, 3])
def test_a_later_step_one_block_short_is_refused_before_the_first_runs(blocks: int) -> None:
    """A call of 48 tokens in steps of 16 (W = 16, blocks of 16): the third step (32..47) still holds
    columns 0 and 1 (its first token sees rows 17..32) and needs column 2, three blocks at once. Two
    blocks are refused before the first step runs, counting what the earlier steps hold and give back;
    three run."""
    m = module("swa", batch=1, num_blocks={"window": blocks}, prefill_chunk=16)
    x = x_of(1, 48, 3)
    if blocks == 3:
        m(x)
        assert m.next_pos == [48]
        return
    before = {k: v.clone() for k, v in m.named_buffers()}
    with pytest.raises(ValueError, match="the step needs 1 more window pool blocks, 0 are free"):
        m(x)
    assert m.next_pos == [0] and not m.paging.pools[0].slots[0] and len(m.paging.pools[0].free) == blocks
    assert all(bit_identical(v, before[k], k) for k, v in m.named_buffers())


def test_a_later_step_of_a_call_takes_the_window_block_an_earlier_step_gave_back() -> None:
    """A call of 64 tokens in steps of 16 (W = 16, blocks of 16) on 3 window blocks: the third step
    (32..47) holds columns 0..2 and gives column 0 back, and the fourth (48..63) takes that block for
    column 3 (the last step gives column 1 back in turn). The check before the first step counts the
    block given back, so the call runs, equal to one on a pool of every block."""
    m, roomy = module("swa", batch=1, num_blocks={"window": 3}, prefill_chunk=16), module("swa", batch=1)
    x = x_of(1, 64, 4)
    assert bit_identical(m(x), roomy(x), "y")
    window = m.paging.pools[0]
    assert m.next_pos == [64] and window.slots[0] == {2: 2, 3: 0} and window.free == [1]


@pytest.mark.parametrize("kind", ["csa", "hca"])
def test_a_rejected_draft_token_rerun_equals_the_accepted_sequence(kind: str) -> None:
    """Step (x0, draft) at 13 (CSA: the draft's position 14 writes the ring; 15 would close); the draft
    is rejected, the next step starts at 14 with the right token: its y, and every later step,
    equal a module that never saw the draft (within §8's rule: another matmul shape)."""
    m, fresh = module(kind, batch=2), module(kind, batch=2)
    prefix, good, draft, nxt = x_of(2, 13, 9), x_of(2, 2, 10), x_of(2, 1, 11), x_of(2, 2, 12)
    m(prefix), fresh(prefix)
    m(torch.cat((good[:, :1], draft), 1))
    y = m(good[:, 1:].contiguous(), start_pos=14)
    want = fresh(good)
    assert ratio_allclose(y, want[:, 1:], Y.atol, Y.rtol, Y.max_error_ratio)
    assert ratio_allclose(m(nxt), fresh(nxt), Y.atol, Y.rtol, Y.max_error_ratio)


def test_deeper_rollbacks_and_skips_are_refused_and_change_nothing() -> None:
    m = module("csa", batch=2)
    m(x_of(2, 10, 13))
    m(x_of(2, 2, 14))  # positions 10, 11
    before = {k: v.clone() for k, v in m.named_buffers()}
    for start, words in ((9, "go back to 10"), (13, "cannot start at 13")):
        with pytest.raises(ValueError, match=words):
            m(x_of(2, 1, 15), start_pos=start)
    assert m.next_pos == [12, 12] and m.last_start == [10, 10]
    assert all(bit_identical(v, before[k], k) for k, v in m.named_buffers())
    long = module("hca", batch=1)
    long(x_of(1, 14, 16))
    long(x_of(1, 6, 17))  # positions 14..19: 16..19 overwrote ring slots 0..3 of block 0
    with pytest.raises(ValueError, match="ring slots"):
        long(x_of(1, 1, 18), start_pos=15)


@pytest.mark.parametrize("kind", ["csa", "hca"])
def test_a_rerun_is_taken_up_to_the_ring_and_refused_one_past_it(kind: str) -> None:
    """From 1, a slot that stands at COFF*RC (the ring's slots) re-runs: no position since 1 overwrote
    a ring slot (position ``p`` in ``p % (COFF*RC)``). One position further, position COFF*RC overwrote
    position 0's slot, which a re-run from 1 reads: refused."""
    for ran, refused in ((0, False), (1, True)):
        m = module(kind, batch=1)
        ring = compressor_dims(m.ratio, 1)[1]
        m(x_of(1, 1, 1))
        m(x_of(1, ring - 1 + ran, 2))  # positions 1..ring - 1 + ran
        assert m.last_start == [1] and m.next_pos == [ring + ran]
        if refused:
            with pytest.raises(ValueError, match="ring slots"):
                m(x_of(1, 1, 3), start_pos=1)
        else:
            m(x_of(1, 1, 3), start_pos=1)
            assert m.next_pos == [2]


def test_reset_gives_a_slot_to_a_new_sequence() -> None:
    m, fresh = module("csa", batch=2), module("csa", batch=1)
    m(x_of(2, 20, 19))
    m.reset([1])
    assert m.next_pos == [20, 0] and not m.paging.pools[0].slots[1] and not m.paging.pools[1].slots[1]
    x = x_of(2, 6, 20)
    y = m(x, start_pos=[20, 0])
    assert bit_identical(y[1], fresh(x[1:].contiguous())[0])


def test_a_call_past_max_position_is_refused_whatever_the_rope_and_pools_cover() -> None:
    """``max_position`` 65 sizes the compressed tables for 16 rows (one block of 16); a longer rope table
    and spare pool blocks do not let a slot pass position 64: a call to 78 is refused before any block is
    given, and a call up to 65 runs."""
    w = dsv4.synthetic_weights(CFG, seed=0, device=DEVICE, layer=LAYERS["csa"])
    rope = dsv4.layer_rope_table(CFG, LAYERS["csa"], 128, DEVICE)
    m = dsv4.DecodeAttention(
        w, rope, CFG, batch=2, max_position=65, backend="reference", block_size=BS,
        num_blocks={"compressed": 8, "indexer": 8},
    )  # fmt: skip
    before = {k: v.clone() for k, v in m.named_buffers()}
    with pytest.raises(ValueError, match=r"start_pos: a slot would pass position 64 \(max_position\)"):
        m(x_of(2, 78, 30))
    assert all(torch.equal(v, before[k]) for k, v in m.named_buffers())
    assert m.next_pos == [0, 0] and all(not slot for pool in m.paging.pools for slot in pool.slots)
    m(x_of(2, 65, 31))
    assert m.next_pos == [65, 65]


def _broken(w, part: str, field: str, bad):
    """``w`` with ``part.field`` (``part`` "" for the layer itself, "indexer.compressor" for a nested one)
    replaced by ``bad`` of it."""
    if not part:
        return dataclasses.replace(w, **{field: bad(getattr(w, field))})
    head, _, rest = part.partition(".")
    inner = getattr(w, head)
    if rest:
        return dataclasses.replace(w, **{head: _broken(inner, rest, field, bad)})
    return dataclasses.replace(w, **{head: dataclasses.replace(inner, **{field: bad(getattr(inner, field))})})


@pytest.mark.parametrize(
    ("kind", "part", "field", "bad", "exc", "words"),
    [
        ("swa", "", "attn_sink", lambda t: t.double(), TypeError, "attn_sink: expected dtype float32"),
        ("swa", "attn", "gamma_cq", lambda t: t[:-1].contiguous(), ValueError, r"w\.gamma_cq: expected shape"),
        ("hca", "o_proj", "wo_b", lambda t: t[:, :-16].contiguous(), ValueError, r"w\.wo_b: expected shape"),
        ("hca", "compressor", "ape", lambda t: t[:, :-1].contiguous(), ValueError, r"w\.ape: expected shape"),
        ("csa", "indexer.compressor", "wkv", lambda t: t[:-2].contiguous(), ValueError, r"w\.compressor\.wkv"),
        ("csa", "indexer", "weights_proj", lambda t: t.float(), TypeError, r"w\.weights_proj: expected dtype"),
    ],
)
def test_weights_an_op_would_refuse_are_refused_when_the_module_is_built(kind, part, field, bad, exc, words) -> None:
    """Each op's checks run once on the layer's buffers when the module is built (the captured step runs
    none per step): a weight of the wrong dtype or shape is named then, before any step."""
    w = dsv4.synthetic_weights(CFG, seed=0, device=DEVICE, layer=LAYERS[kind])
    rope = dsv4.layer_rope_table(CFG, LAYERS[kind], 128, DEVICE)
    with pytest.raises(exc, match=words):
        dsv4.DecodeAttention(_broken(w, part, field, bad), rope, CFG, batch=2, max_position=128, backend="reference")


@pytest.mark.parametrize(
    ("kind", "indexer_of", "words"),
    [
        ("hca", "csa", "compress ratio 16 takes no indexer, got one"),  # would select ratio-16 rows by ratio-4 numbers
        ("csa", None, "compress ratio 4 needs an indexer, got none"),  # an overlapping ratio-4 ring run as HCA
        ("swa", "csa", "compress ratio 0 takes no indexer, got one"),
    ],
)
def test_a_layer_whose_indexer_does_not_fit_its_ratio_is_refused(kind: str, indexer_of: str | None, words: str) -> None:
    """The layer's kind comes from its weights: CSA is ratio 4 with the indexer (spec A1), HCA another
    ratio without; weights that mix them are refused when the module is built, naming the ratio."""
    w = dsv4.synthetic_weights(CFG, seed=0, device=DEVICE, layer=LAYERS[kind])
    other = None if indexer_of is None else dsv4.synthetic_weights(CFG, seed=0, device=DEVICE, layer=LAYERS[indexer_of])
    mixed = dataclasses.replace(w, indexer=None if other is None else other.indexer)
    rope = dsv4.layer_rope_table(CFG, LAYERS[kind], 128, DEVICE)
    with pytest.raises(ValueError, match="weights: a layer of " + words):
        dsv4.DecodeAttention(mixed, rope, CFG, batch=2, max_position=128, backend="reference")


@pytest.mark.parametrize(
    "dims, kind, words",
    [
        ({"hidden_size": 200}, "csa", r"indexer on the 'triton' backend: w\.compressor\.wkv: .*hidden size D .*16"),
        ({"hidden_size": 200}, "hca", r"kv_compressor on the 'triton' backend: w\.wkv: .*hidden size D .*16"),
        (
            {"num_attention_heads": 16, "o_groups": 16, "o_lora_rank": 8},
            "swa",
            r"o_proj on the 'triton' backend: w\.wo_a: .*OL a multiple of 16, got 8",
        ),
        ({"head_dim": 192}, "swa", r"qkv_proj_rope on the 'triton' backend: w\.wkv: .*got HD=192, R=64"),
    ],
    ids=["d200-csa", "d200-hca", "ol8", "hd192"],
)
def test_dims_the_triton_kernels_cannot_take_are_refused_when_the_module_is_built(
    dims: dict[str, int], kind: str, words: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A layer whose dims a Triton kernel cannot take (a hidden size D not a multiple of 16, an o LoRA
    rank OL not a multiple of 16, a head dim not a power of two) is refused when the module is built on
    Triton, naming the op and the weight, not on its first call; ``auto`` where it picks Triton refuses
    alike. On the reference the same layer builds and runs."""
    cfg = CFG.replace(name="odd-dims", **dims)
    layer = LAYERS[kind]
    w = dsv4.synthetic_weights(cfg, seed=0, device=DEVICE, layer=layer)
    rope = dsv4.layer_rope_table(cfg, layer, 64, DEVICE)
    with pytest.raises(ValueError, match="^" + words):  # the op's words first: not a change since the last check
        dsv4.DecodeAttention(w, rope, cfg, batch=1, max_position=64, backend="triton")
    import dsv4.engine.op_checks as op_checks

    with monkeypatch.context() as patch:  # auto as on a GPU: Triton for every op
        patch.setattr(op_checks, "resolve", lambda backend, device: "triton")
        with pytest.raises(ValueError, match=words):
            dsv4.DecodeAttention(w, rope, cfg, batch=1, max_position=64, backend="auto")
    m = dsv4.DecodeAttention(w, rope, cfg, batch=1, max_position=64, backend="reference")
    y = m(dsv4.synthetic_activations((1, 2, cfg.hidden_size), seed=1, device=DEVICE))
    assert y.shape == (1, 2, cfg.hidden_size) and bool(torch.isfinite(y).all())


def test_a_backend_that_cannot_run_is_refused_when_the_module_is_built(monkeypatch) -> None:
    """The module resolves its backend when it is built: one that cannot run on the device is named then,
    with the reason, not in the middle of a step; ``auto`` takes the reference instead."""
    import dsv4.ops.backends as backends

    monkeypatch.setattr(backends, "unavailable_reason", lambda name, _: "no GPU here" if name == "triton" else None)
    w = dsv4.synthetic_weights(CFG, seed=0, device=DEVICE, layer=LAYERS["csa"])
    rope = dsv4.layer_rope_table(CFG, LAYERS["csa"], 64, DEVICE)
    with pytest.raises(ValueError, match="backend: 'triton' cannot run on .*: no GPU here"):
        dsv4.DecodeAttention(w, rope, CFG, batch=2, max_position=64, backend="triton")
    m = dsv4.DecodeAttention(w, rope, CFG, batch=2, max_position=64, backend="auto")
    assert set(m.op_backends.values()) == {"reference"}


@pytest.mark.parametrize(
    ("kind", "ops"),
    [
        ("swa", ["qkv_proj_rope", "sparse_attn_write", "o_proj"]),
        ("hca", ["qkv_proj_rope", "kv_compressor", "sparse_attn_write", "o_proj"]),
        ("csa", ["qkv_proj_rope", "kv_compressor", "indexer", "sparse_attn_write", "o_proj"]),
    ],
)
def test_op_backends_name_the_ops_the_layer_runs(kind: str, ops: list[str]) -> None:
    """``op_backends`` (which ``examples/attention_loop.py`` prints) names each op a step of the layer runs
    and no other: an SWA layer has no compressor and no indexer (before, their backends were listed too)."""
    m = module(kind, batch=1)
    assert list(m.ops) == ops and list(m.op_backends) == ops
    proc = run_python(
        [str(ROOT / "examples" / "attention_loop.py"), "--kind", kind, "--steps", "1", "--prefill", "4",
         "--batch", "1", "--device", "cpu", "--backend", "reference"], timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"backends={dict.fromkeys(ops, 'reference')}" in proc.stdout.splitlines()[0]
    assert proc.stdout.splitlines()[2].split()[:3] == ["0", "eager", "4"]  # the step's start: after the prefill


def test_attention_loop_example_runs_the_backend_it_is_given() -> None:
    """``--backend triton`` reaches the layer: every op of a CSA step names Triton (the default, ``auto``,
    is the reference on a CPU, as the test above runs it), and the step's ``y`` passed the example's
    finite check."""
    ops = ["qkv_proj_rope", "kv_compressor", "indexer", "sparse_attn_write", "o_proj"]
    proc = run_python(
        [str(ROOT / "examples" / "attention_loop.py"), "--kind", "csa", "--steps", "1", "--prefill", "4",
         "--batch", "1", "--device", "cpu", "--backend", "triton"], timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"backends={dict.fromkeys(ops, 'triton')}" in proc.stdout.splitlines()[0]
    assert proc.stdout.splitlines()[-1].startswith("median ms per step: eager ")


@pytest.mark.parametrize(("layer", "kind"), [(0, "swa"), (1, "csa"), (3, "hca")])
def test_the_step_bytes_model_costs_each_op_a_step_launches(layer: int, kind: str, monkeypatch) -> None:
    """``step_costs`` (the memory floor ``examples/attention_loop.py`` reports) holds one cost per op a step
    of the layer launches, in launch order, each the op's model for the kind and compress ratio the op was
    launched with, at the module's pool blocks (16 rows: the window's rows 0..19 span two, where 64-row
    blocks hold them in one); ``step_bytes`` is their sum. Layer 3 is an HCA layer of ratio 2 in a model
    whose first HCA layer has ratio 16, so a cost taken at the kind's first ratio is seen."""
    cfg = CFG.replace(compress_ratios=(0, 4, 16, 2))
    w = dsv4.synthetic_weights(cfg, seed=0, device=DEVICE, layer=layer)
    rope = dsv4.layer_rope_table(cfg, layer, 128, DEVICE)
    m = dsv4.DecodeAttention(w, rope, cfg, batch=2, max_position=128, backend="reference", block_size=BS)
    m(x_of(2, 20, 1))
    launched: list[tuple[str, dict[str, Any]]] = []
    launch = m._launch

    def recorded(op: str, *args: object, **kw: Any) -> Any:
        launched.append((op, kw))
        return launch(op, *args, **kw)

    monkeypatch.setattr(m, "_launch", recorded)
    starts, s = [20, 20], 3
    m(x_of(2, s, 2))
    want = []
    for op, kw in launched:
        if op == "kv_compressor":
            want.append(get_op(op).cost(cfg, starts, s, kind, kw["w"].ape.shape[0], block_size=BS))
        elif op == "sparse_attn_write":
            want.append(get_op(op).cost(cfg, starts, s, kw["kind"], kw["compress_ratio"] or None, block_size=BS))
        elif op == "indexer":
            want.append(get_op(op).cost(cfg, starts, s, block_size=BS))
        else:
            want.append(get_op(op).cost(cfg, starts, s))
    got = step_costs(cfg, layer, starts, s, block_size=BS)
    assert [c.op for c in got] == [op for op, _ in launched]
    assert got == want and got != step_costs(cfg, layer, starts, s)
    assert step_bytes(cfg, layer, starts, s, BS) == sum(c.read_bytes + c.write_bytes for c in want)


@pytest.mark.parametrize("missing", ["attn_sink", "o_proj", "both"])
def test_weights_without_the_rest_of_the_layer_are_refused(missing: str) -> None:
    """A step needs the sink and the output projection: weights lacking either (a front end only, as
    ``synthetic_weights`` without a layer makes) are a ``ValueError`` naming ``weights`` when the module is
    built, not a failure inside the first step."""
    w = dsv4.synthetic_weights(CFG, seed=0, device=DEVICE, layer=LAYERS["csa"])
    sink = None if missing in ("attn_sink", "both") else w.attn_sink
    o_proj = None if missing in ("o_proj", "both") else w.o_proj
    part = dataclasses.replace(w, attn_sink=sink, o_proj=o_proj)
    rope = dsv4.layer_rope_table(CFG, LAYERS["csa"], 64, DEVICE)
    with pytest.raises(ValueError, match="weights: the layer's attn_sink and o_proj are missing"):
        dsv4.DecodeAttention(part, rope, CFG, batch=2, max_position=64, backend="reference")


def test_backends_are_resolved_again_after_a_move(monkeypatch) -> None:
    """``auto`` is resolved on the buffers' device: a layer built on the CPU and moved (``.to("cuda")``, as
    the README's engine example does) takes its ops' backends on the new device at its next call, not
    the reference it was given on the CPU. (Here the move is ``_apply`` of a copy, which ``.to()`` to
    another device is: every buffer a new tensor; the device's answer is ``resolve``'s, made to say
    "triton".)"""
    import dsv4.engine.op_checks as op_checks

    w = dsv4.synthetic_weights(CFG, seed=0, layer=LAYERS["csa"])  # on the CPU, wherever the tests run
    m = dsv4.DecodeAttention(w, dsv4.layer_rope_table(CFG, LAYERS["csa"], 64), CFG, batch=2, max_position=64)
    assert set(m.op_backends.values()) == {"reference"}
    monkeypatch.setattr(op_checks, "resolve", lambda backend, device: "triton")
    m._apply(torch.clone)
    m.recheck()
    assert set(m.op_backends.values()) == {"triton"}


@pytest.mark.parametrize("where", ["built", "captured"])
def test_a_layer_made_under_inference_mode_runs_outside_it(where: str) -> None:
    """Buffers made under ``torch.inference_mode`` are inference tensors, which torch lets be written in
    place only in that mode. A layer built there, or a step captured there, and called outside writes
    them in that mode, and gives what a layer made outside gives, bit for bit (before, the call raised
    after it had given blocks, and left the layer's allocator changed)."""
    plain = module("csa", batch=2)
    with torch.inference_mode(where == "built"):
        m = module("csa", batch=2)
    got, want = [m(x_of(2, 6, 60))], [plain(x_of(2, 6, 60))]
    with torch.inference_mode(where == "captured"):
        graph, plain_graph = m.capture(2), plain.capture(2)
    got.append(graph(x_of(2, 2, 61)).clone())
    want.append(plain_graph(x_of(2, 2, 61)).clone())
    m.reset([1])
    plain.reset([1])
    got.append(m(x_of(2, 2, 62)))
    want.append(plain(x_of(2, 2, 62)))
    assert all(bit_identical(a, b, f"y of call {i}") for i, (a, b) in enumerate(zip(got, want, strict=True)))
    assert m.next_pos == plain.next_pos == [10, 2]
    assert all(bit_identical(v, dict(plain.named_buffers())[k], k) for k, v in m.named_buffers())


def test_a_layer_whose_buffers_become_inference_tensors_after_a_step_runs_outside_inference_mode() -> None:
    """Buffers replaced by inference tensors after the layer has stepped (cloned under
    ``torch.inference_mode``): the next step outside the mode writes them in it, as a layer built
    there does, and gives what a plain layer gives."""
    m, plain = module("csa", batch=2), module("csa", batch=2)
    assert bit_identical(m(x_of(2, 6, 70)), plain(x_of(2, 6, 70)), "y before")
    with torch.inference_mode():
        m._apply(torch.clone)
    assert all(t.is_inference() for t in m.buffers())
    assert bit_identical(m(x_of(2, 2, 71)), plain(x_of(2, 2, 71)), "y after")


def test_weights_that_require_grad_leave_no_autograd_graph_in_the_state() -> None:
    """An engine's weights may be ``nn.Parameter``s, which require grad: the steps run without autograd,
    so the pools and rings never carry a graph (on the reference they did, one that grew every step)
    and ``y`` is what plain weights give."""
    w = dsv4.synthetic_weights(CFG, seed=0, device=DEVICE, layer=LAYERS["csa"])
    grads = {
        f.name: torch.nn.Parameter(getattr(w.attn, f.name).clone())
        for f in dataclasses.fields(w.attn)
        if getattr(w.attn, f.name).dtype in (torch.float32, torch.bfloat16)
    }
    rope = dsv4.layer_rope_table(CFG, LAYERS["csa"], 128, DEVICE)
    m = dsv4.DecodeAttention(
        dataclasses.replace(w, attn=dataclasses.replace(w.attn, **grads)), rope, CFG, batch=2, max_position=128,
        backend="reference", block_size=BS,
    )  # fmt: skip
    plain = module("csa", batch=2)
    for seed, s in ((90, 6), (91, 2)):
        y = m(x_of(2, s, seed))
        assert not y.requires_grad and bit_identical(y, plain(x_of(2, s, seed)), "y")
    assert not any(t.requires_grad or t.grad_fn is not None for n, t in m.named_buffers() if n not in m.state_dict())


def test_a_callers_autocast_changes_nothing() -> None:
    """An engine may run its model under ``torch.autocast``: the layer's steps run their ops with it off,
    so ``y`` and every buffer are what they are without it."""
    m, plain = module("csa", batch=2), module("csa", batch=2)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        got = [m(x_of(2, 6, 95)), m(x_of(2, 2, 96))]
    want = [plain(x_of(2, 6, 95)), plain(x_of(2, 2, 96))]
    assert all(bit_identical(a, b, "y") for a, b in zip(got, want, strict=True))
    assert all(bit_identical(v, dict(plain.named_buffers())[k], k) for k, v in m.named_buffers())


def test_torch_compile_of_a_model_runs_the_step_as_it_is() -> None:
    """An engine may ``torch.compile`` a model the layer sits in: the step's host bookkeeping changes every
    call, so torch.compile runs it as it is (traced, it was compiled again for every step's positions:
    95 graphs in 12 steps, then the recompile limit), and the results are eager's."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    m, plain = module("csa", batch=2), module("csa", batch=2)
    compiled = torch.compile(torch.nn.Sequential(m), backend="eager")
    for seed in range(6):
        assert bit_identical(compiled(x_of(2, 2, 100 + seed)), plain(x_of(2, 2, 100 + seed)), f"y of step {seed}")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0


@pytest.mark.parametrize("how", ["assigned", "registered"])
@pytest.mark.parametrize("rows", [63, 64])
def test_a_replaced_rope_table_must_cover_max_position_to_its_last_row(rows: int, how: str) -> None:
    """A RoPE table replaced after build (assigned, or given to ``register_buffer``) is held to
    ``max_position`` at its edge: 64 rows (a copy of the table) run the next call, 63 are refused naming
    the buffer before anything changes (the other tests of the check replace the table by one of half
    its rows, where a bound one off goes unseen)."""
    m = module("csa", batch=1, max_position=64)
    m(x_of(1, 2, 30))
    cos, sin = m.rope_cos[:rows].clone(), m.rope_sin[:rows].clone()
    if how == "assigned":
        m.rope_cos, m.rope_sin = cos, sin
    else:
        m.register_buffer("rope_cos", cos, persistent="rope_cos" not in m._non_persistent_buffers_set)
        m.register_buffer("rope_sin", sin, persistent="rope_sin" not in m._non_persistent_buffers_set)
    before, pos = {k: v.clone() for k, v in m.named_buffers()}, list(m.next_pos)
    if rows == 64:
        m(x_of(1, 2, 31))
        assert m.next_pos == [4]
        return
    with pytest.raises(ValueError, match="rope_cos: the RoPE table has 63 positions, max_position is 64"):
        m(x_of(1, 2, 31))
    assert m.next_pos == pos
    assert all(bit_identical(v, before[k], k) for k, v in m.named_buffers())


def test_bad_input_changes_nothing() -> None:
    m = module("swa", batch=2)
    m(x_of(2, 4, 21))
    before = {k: v.clone() for k, v in m.named_buffers()}
    for bad, exc, words in (
        (x_of(2, 4, 22).float(), TypeError, "xn"),
        (x_of(3, 4, 22), ValueError, "xn"),
        (x_of(2, 4, 22)[..., :128].contiguous(), ValueError, "xn"),
        (x_of(2, 4, 22)[0], ValueError, r"xn: expected a \[B, S, D\] tensor, got torch.Size\(\[4, 256\]\)"),
        (x_of(2, 4, 22).to("meta"), ValueError, "xn: expected device .*, got meta"),
        (x_of(2, 125, 22), ValueError, "start_pos"),  # past max_position
    ):
        with pytest.raises(exc, match=words):
            m(bad)
    assert m.next_pos == [4, 4]
    assert all(bit_identical(v, before[k], k) for k, v in m.named_buffers())
    with pytest.raises(ValueError, match="attn_sink and o_proj"):
        dsv4.DecodeAttention(dsv4.synthetic_weights(CFG), dsv4.rope_table(CFG), CFG, batch=1, max_position=64)


def test_slots_and_positions_of_another_form_are_refused_naming_them() -> None:
    """``batch_rows`` and ``start_pos`` are ints, lists of ints or integer tensors of at most one
    dimension, ``start_pos`` one per slot of ``xn``: a 2-D tensor, a bool, or one position more
    than ``xn``'s slots is refused naming the argument, changing nothing."""
    m = module("swa", batch=3)
    m(x_of(3, 3, 1))
    before = {k: v.clone() for k, v in m.named_buffers()}
    for call, exc, words in (
        (lambda: m.reset(torch.tensor([[0], [1]])), TypeError, "batch_rows: expected an integer tensor of at most"),
        (lambda: m.reset([0, True]), TypeError, r"batch_rows: expected ints, got True \(bool\)"),
        (lambda: m(x_of(2, 1, 2), start_pos=torch.tensor([[3], [3]])), TypeError, "start_pos: expected an integer"),
        (lambda: m(x_of(2, 1, 2), start_pos=[3, True]), TypeError, r"start_pos: expected ints, got True \(bool\)"),
        (lambda: m(x_of(2, 1, 2), start_pos=[3, 3, 3]), ValueError, r"start_pos: expected 2 positions .* got 3"),
    ):
        with pytest.raises(exc, match=words):
            call()
    assert m.next_pos == [3, 3, 3]
    assert all(bit_identical(v, before[k], k) for k, v in m.named_buffers())


@pytest.mark.parametrize("kind", ["csa", "hca"])
def test_max_position_below_the_compress_ratio_is_refused_naming_it(kind: str) -> None:
    """A slot must reach a compressed row: ``max_position >= RC`` (one row), refused naming it below."""
    w = dsv4.synthetic_weights(CFG, seed=0, device=DEVICE, layer=LAYERS[kind])
    rope = dsv4.layer_rope_table(CFG, LAYERS[kind], 64, DEVICE)
    ratio = w.compress_ratio
    with pytest.raises(ValueError, match=f"max_position: expected >= {ratio}, got {ratio - 1}"):
        dsv4.DecodeAttention(w, rope, CFG, batch=1, max_position=ratio - 1, backend="reference", block_size=BS)
    dsv4.DecodeAttention(w, rope, CFG, batch=1, max_position=ratio, backend="reference", block_size=BS)


@pytest.mark.parametrize(
    ("change", "exc", "words"),
    [
        (lambda w, rope: {"weights": w.attn}, TypeError, "^weights: expected LayerWeights, got AttnWeights$"),
        (lambda w, rope: {"rope": (rope.cos, rope.sin)}, TypeError, "^rope: expected RopeTable, got tuple$"),
        (lambda w, rope: {"cfg": "tiny"}, TypeError, "^cfg: expected DeepSeekV4Config, got str$"),
        (lambda w, rope: {"block_size": 48}, ValueError, "^block_size: expected a power of two >= 16, got 48$"),
        (
            lambda w, rope: {"rope": dsv4.layer_rope_table(CFG, LAYERS["csa"], 127, DEVICE)},
            ValueError,
            "^rope: the table has 127 positions, max_position is 128$",
        ),
        (lambda w, rope: {"backend": "cuda"}, ValueError, "^backend: expected 'auto' or one of .*, got 'cuda'$"),
    ],
    ids=["weights-part", "rope-tuple", "cfg-name", "block-size-48", "rope-short", "backend-unknown"],
)
def test_arguments_of_another_kind_or_size_are_refused_naming_them(change: Any, exc: type, words: str) -> None:
    """Building the module, an argument of another class (a part of the weights, a ``(cos, sin)`` pair, a
    preset's name), a block size that is not a power of two, a RoPE table one row short of
    ``max_position`` or a backend of no name the library has is refused naming that argument."""
    w = dsv4.synthetic_weights(CFG, seed=0, device=DEVICE, layer=LAYERS["csa"])
    rope = dsv4.layer_rope_table(CFG, LAYERS["csa"], 128, DEVICE)
    args = dict(weights=w, rope=rope, cfg=CFG, batch=2, max_position=128, backend="reference", block_size=BS)
    with pytest.raises(exc, match=words):
        dsv4.DecodeAttention(**{**args, **change(w, rope)})


@pytest.mark.parametrize(
    ("kind", "num_blocks", "exc", "words"),
    [
        ("swa", 100, TypeError, r"num_blocks: expected a dict of blocks per pool .* got int"),
        (
            "swa",
            {"compressed": 1, "indexer": 1},
            ValueError,
            "num_blocks: a swa layer has the pools window, got compressed, indexer",
        ),
        ("hca", {"indexer": 1}, ValueError, "num_blocks: a hca layer has the pools window, compressed, got indexer"),
        (
            "csa",
            {"window": 4, "cache": 4},
            ValueError,
            "num_blocks: a csa layer has the pools window, compressed, indexer, got cache",
        ),
        ("swa", {"window": 0}, ValueError, r"num_blocks\['window'\]: expected >= 1, got 0"),
    ],
    ids=["int", "swa-extra-pools", "hca-indexer-pool", "csa-unknown-pool", "no-blocks"],
)
def test_num_blocks_names_only_the_pools_the_layer_has(kind: str, num_blocks: Any, exc: type, words: str) -> None:
    """``num_blocks`` sizes the layer's own pools: an int (``DecodeFrontEnd``'s form) is refused naming the
    argument (before, a bare "'int' object is not iterable"), and a pool the layer lacks is refused, not
    ignored (before, ``{"indexer": 1}`` on an HCA layer passed as if it sized something)."""
    with pytest.raises(exc, match=words):
        module(kind, batch=2, num_blocks=num_blocks)


def _paging(
    m: dsv4.DecodeAttention,
) -> list[tuple[list[int], list[dict[int, int]], list[range], list[tuple[int, int, int]]]]:
    """Each pool's blocks on the host (free, per slot, runs) and the slots' quiet bounds, copied."""
    return [(sorted(p.free), [dict(d) for d in p.slots], list(p.runs), list(m.paging.quiet)) for p in m.paging.pools]


def _rings(m: dsv4.DecodeAttention) -> dict[str, torch.Tensor]:
    """The layer's compressor rings (the main compressor's, the indexer's), copied."""
    return {n: t.clone() for n, t in m.named_buffers() if n.endswith(("kv_state", "score_state"))}


@pytest.mark.parametrize(
    ("kind", "pre", "s"),
    [("csa", 64, 4), ("csa", 6, 3), ("hca", 12, 6), ("csa", 69, 4)],
    ids=["csa-exact-rerun", "csa-ring-wraps", "hca-ring-wraps", "csa-block-crossed"],
)
@pytest.mark.parametrize("captured", [False, True], ids=["eager", "captured"])
def test_a_step_that_raises_in_an_op_gives_its_blocks_back(
    captured: bool, kind: str, pre: int, s: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An op raising mid-step (out of memory, a compile error) after the step was given its blocks and the
    compressors wrote their rings: the blocks go back to the pools and out of the device tables, the slots
    stay where they stood, and the ring rows a step from the same start reads are as before the step. The
    step run again, and the next one, give what they give on a module that never failed. From 64 with 4
    tokens the step is an exact re-run of itself (spec A3: 64 + 4 <= 4 * 16 + 4); from 6 with 3 (CSA:
    position 8 overwrites ring slot 0, which the step from 6 reads), 12 with 6 (HCA, ratio 16) and 69 with
    4 (crossing a CSA block) it is not, and without the rings put back the run again gave other numbers
    (0.37 off ``y`` from 6)."""
    m, fresh = module(kind, batch=2), module(kind, batch=2)
    m(x_of(2, pre, 7)), fresh(x_of(2, pre, 7))
    paging, tables, rings = _paging(m), [t.clone() for t in m._tables()], _rings(m)

    def out_of_memory(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("out of memory")

    if captured:  # the step's last launch (o_proj's) raises
        run: Any = m.capture(s)
        last = run.launches[-1]
        run.launches[-1] = (out_of_memory, (), {})
    else:
        run, launch = m, m._launch
        monkeypatch.setattr(
            m, "_launch", lambda op, *a, **k: (out_of_memory if op == "o_proj" else launch)(op, *a, **k)
        )
    x = x_of(2, s, 8)  # from 64: a window block, and the compressed and indexer pools' second (row 16)
    with pytest.raises(RuntimeError, match="out of memory"):
        run(x)
    assert m.next_pos == [pre, pre] and _paging(m) == paging
    assert all(torch.equal(t, before) for t, before in zip(m._tables(), tables, strict=True))
    if pre != 64:  # the rings as before the step (from 64 it rewrites what it wrote before reading it)
        assert all(torch.equal(t, rings[n]) for n, t in _rings(m).items())
    if captured:
        run.launches[-1] = last
    else:
        monkeypatch.setattr(m, "_launch", launch)
    assert bit_identical(run(x), fresh(x), "y")
    assert _paging(m) == _paging(fresh)
    assert bit_identical(m(x_of(2, 2, 9)), fresh(x_of(2, 2, 9)), "y")


def test_module_moves_with_to_and_names_its_buffers() -> None:
    m = module("csa", batch=1)
    names = {n for n, _ in m.named_buffers()}
    assert {"attn_wq_a", "o_wo_b", "attn_sink", "win_nope", "cmp_kv_state", "idx_keys", "rope_cos"} <= names
    m.to(torch.device("cpu"))
    assert m.window_pool.nope.data_ptr() == m.win_nope.data_ptr()
    assert m.op_backends["sparse_attn_write"] == "reference"


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_cast_after_build_is_refused_before_anything_changes(backend: str) -> None:
    """The steps launch the ops unchecked, on buffers checked at build. An engine's ``model.to(torch.bfloat16)``
    casts the fp32 scales and rings and the FP8 weights too: the next call runs every op's checks again and
    refuses, naming the buffer, before any block is given or any kernel runs (unchecked, the Triton step
    ran on the cast buffers and returned values 10^5 times the right ones); a step captured before the
    cast refuses to run on the old buffers."""
    w = dsv4.synthetic_weights(CFG, seed=0, device=DEVICE, layer=LAYERS["csa"])
    rope = dsv4.layer_rope_table(CFG, LAYERS["csa"], 64, DEVICE)
    m = dsv4.DecodeAttention(w, rope, CFG, batch=2, max_position=64, backend=backend, block_size=BS)
    graph = m.capture(2)
    torch.nn.ModuleList([m]).to(torch.bfloat16)  # an engine's model, with the layer inside it
    tables = [t.clone() for t in m._tables()]
    refused = r"DecodeAttention: a buffer changed .*: w\.wq_b_scale: expected dtype float32"
    for _ in range(2):  # a retry is refused again: the buffers are still the cast ones
        with pytest.raises(TypeError, match=refused):
            m(x_of(2, 2, 40))
    with pytest.raises(ValueError, match="buffers changed since this step was captured"):
        graph(x_of(2, 2, 40))
    assert m.next_pos == [0, 0] and all(torch.equal(a, b) for a, b in zip(m._tables(), tables, strict=True))
    assert all(not slot for pool in m.paging.pools for slot in pool.slots)


@pytest.mark.parametrize(
    ("kind", "replace", "words"),
    [
        ("swa", {"rope_cos": 32, "rope_sin": 32}, "rope_cos: the RoPE table has 32 positions, max_position is 64"),
        ("csa", {"rope_cos": 32, "rope_sin": 32}, "rope_cos: the RoPE table has 32 positions, max_position is 64"),
        ("swa", {"win_nope": 2, "win_rope": 2, "win_scale": 2}, r"win_nope: expected shape \[8, 16, 64\]"),
        ("hca", {"cmp_nope": 1, "cmp_rope": 1, "cmp_scale": 1}, r"cmp_nope: expected shape \[2, 16, 64\]"),
        ("swa", {"win_block_table": 1}, r"win_block_table: expected shape \[2, 4\]"),
        ("csa", {"idx_kv_state": 1}, r"idx_kv_state: expected shape \[2, 8, 256\]"),
    ],
    ids=["swa-rope", "csa-rope", "window-pool", "compressed-pool", "block-table", "indexer-ring"],
)
def test_a_replaced_buffer_the_host_bookkeeping_no_longer_fits_is_refused(
    kind: str, replace: dict[str, int], words: str
) -> None:
    """The ops' checks judge a one-token step at position 0, not what the host sized at build: a RoPE
    table shorter than ``max_position`` (before, a step past its end was accepted, and on Triton read past
    it), pools of fewer blocks than the allocator hands out (before, the kernels wrote past the pool), a
    block table or a ring of other rows. Each is refused on the next call, naming it, before anything
    changes."""
    m = module(kind, batch=2, max_position=64)
    m(x_of(2, 40, 1))
    for name, rows in replace.items():
        setattr(m, name, getattr(m, name)[:rows].clone())
    paging, tables = _paging(m), [t.clone() for t in m._tables()]
    with pytest.raises(ValueError, match="DecodeAttention: a buffer changed .*: " + words):
        m(x_of(2, 2, 2))
    assert m.next_pos == [40, 40] and _paging(m) == paging
    assert all(torch.equal(t, before) for t, before in zip(m._tables(), tables, strict=True))


def test_a_replaced_buffer_is_checked_again_and_one_that_fits_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """A buffer replaced after build (``setattr``): one that no longer fits its op is refused on the next
    call, naming it; one that fits is checked once and used from then on (the call equals a module built
    with it), and a step captured before must be captured again."""
    m = module("swa", batch=2)
    checks = counted_checks(m, monkeypatch)
    m(x_of(2, 3, 50))
    graph = m.capture(2)
    m.to(DEVICE)  # where the buffers are: the same tensors, so the captured step stays valid
    m.attn_sink = m.attn_sink
    graph(x_of(2, 2, 51), [3, 3])
    m(x_of(2, 2, 51), [3, 3])  # the same step again (a re-run from the previous start)
    assert checks == []  # nothing changed: no checks again
    sink = m.get_buffer("attn_sink")
    m.attn_sink = sink.double()
    with pytest.raises(TypeError, match="DecodeAttention: a buffer changed .*attn_sink: expected dtype float32"):
        m(x_of(2, 2, 52))
    m.attn_sink = sink + 1.0
    y = m(x_of(2, 2, 52))
    m(x_of(2, 2, 53))
    assert len(checks) == 2  # the refused call's and the next one's; none after
    with pytest.raises(ValueError, match="capture it again"):
        graph(x_of(2, 2, 53))
    w = dsv4.synthetic_weights(CFG, seed=0, device=DEVICE, layer=LAYERS["swa"])
    rope = dsv4.layer_rope_table(CFG, LAYERS["swa"], 128, DEVICE)
    assert w.attn_sink is not None
    fresh = dsv4.DecodeAttention(
        dataclasses.replace(w, attn_sink=w.attn_sink + 1.0), rope, CFG, batch=2, max_position=128, backend="reference",
        block_size=BS,
    )  # fmt: skip
    for seed, s in ((50, 3), (51, 2)):  # the history: the sink changes no row a step writes
        fresh(x_of(2, s, seed))
    assert bit_identical(y, fresh(x_of(2, 2, 52)), "y")
    assert m.capture(2)(x_of(2, 2, 54)).shape == (2, 2, CFG.hidden_size)


@pytest.mark.parametrize("kind", ["csa", "hca"])
def test_state_dict_holds_the_weights_and_loading_it_swaps_them_under_running_sequences(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``state_dict`` holds the weights and the RoPE table, not the pools, rings and block tables: those
    belong to the slots' sequences, which the host's paging tracks. Loading another layer's weights
    mid-sequence swaps the weights and leaves the sequences' state as it was, so the next step is what a
    step of the running layer gives with those weights (before, the state came too: the tables stopped
    matching the paging, and the next step read blocks it did not hold)."""
    m, other = module(kind, batch=2), module(kind, batch=2)
    m(x_of(2, 40, 70))
    sd = dsv4.DecodeAttention(
        dsv4.synthetic_weights(CFG, seed=5, device=DEVICE, layer=LAYERS[kind]),
        dsv4.layer_rope_table(CFG, LAYERS[kind], 128, DEVICE), CFG, batch=2, max_position=128,
    ).state_dict()  # fmt: skip
    names = {n for n, _ in m.named_buffers()}
    state = {
        n for n in names if n.startswith(("win_", "cmp_", "idx_")) and not n.startswith(("cmp_w_", "idx_w_", "idx_c_"))
    }
    assert {"win_block_table", "cmp_kv_state", "cmp_nope"} <= state and set(sd) == names - state
    other(x_of(2, 40, 70))
    before = {k: v.clone() for k, v in m.named_buffers() if k not in sd}
    checks = counted_checks(m, monkeypatch)
    m.load_state_dict(sd)
    assert all(torch.equal(v, before[k]) for k, v in m.named_buffers() if k not in sd)
    for name, t in sd.items():  # the running layer given the same weights by hand: the step to compare with
        getattr(other, name).copy_(t)
    assert bit_identical(m(x_of(2, 2, 71)), other(x_of(2, 2, 71)), "y")
    assert checks == []  # copied in place, the same shapes and dtypes: nothing to check again


def _plan_by_every_column(m: dsv4.DecodeAttention, starts: list[int], s: int) -> list[tuple[list, list]]:
    """A step's block changes found by looking up every column each slot needs (window: the step's
    columns, and those whose rows no later token sees; compressed and indexer pools: ``[0, rows)``)."""
    bs, w = m.paging.block_size, m.window
    pools = m.paging.pools
    window = pools[0]
    give = [(b, range(max(0, p - w + 1) // bs, (p + s - 1) // bs + 1)) for b, p in enumerate(starts)]
    free = [(b, sorted(c for c in window.slots[b] if (c + 1) * bs <= p - w + 1)) for b, p in enumerate(starts)]
    out = [([(b, cols) for b, cols in give if window.need(b, cols)], [(b, cols) for b, cols in free if cols])]
    for blocks in pools[1:]:  # a CSA layer: ratio 4 for both
        give = [(b, range(0, -(-((p + s) // 4) // bs))) for b, p in enumerate(starts)]
        out.append(([(b, cols) for b, cols in give if blocks.need(b, cols)], []))
    return out


def test_step_plans_only_the_blocks_that_change() -> None:
    """A step's plan names only the slots whose blocks change (looked up past each slot's run, not
    column by column over the whole context), and the same changes as looking up every column: at
    each of 60 decode steps of 2 tokens (a slot reset half way), most of which change no block."""
    m = module("csa", batch=2, max_position=256, prefill_chunk=16)
    m(x_of(2, 40, 8))
    quiet = 0
    for i in range(60):
        if i == 30:
            m.reset([1])
        starts = list(m.next_pos)
        plan = m.paging.plan(starts, 2)  # the quiet slots skipped, as every step plans
        got = [(give, [(b, sorted(cols)) for b, cols in free]) for _, give, free in plan]
        assert got == _plan_by_every_column(m, starts, 2), (i, starts)
        quiet += all(not give and not free for give, free in got)
        m(x_of(2, 2, 100 + i))
    assert quiet >= 40, quiet


@pytest.mark.parametrize(("kind", "block_size"), [("swa", 16), ("csa", 16), ("csa", 64), ("hca", 32)])
def test_quiet_slots_are_exactly_those_a_step_leaves_alone(kind: str, block_size: int) -> None:
    """A step looks only at the slots outside their quiet bounds, and those are exactly the slots
    whose blocks it changes: through random host steps (decode, prefill-sized, re-runs, resets),
    for every start from 0 to past where a slot stands, the plan with the quiet slots skipped
    equals the plan looking at every slot and a slot is quiet iff that plan leaves it out; the
    step taken runs the plan its check kept, equal to the whole plan."""
    import random

    rng = random.Random(block_size)
    m = module(kind, batch=3, max_position=1024, block_size=block_size)
    seen = {True: 0, False: 0}
    for _ in range(150):
        if rng.random() < 0.04:
            m.reset([rng.randrange(3)])
        s = rng.choice([1, 2, 2, 2, 2, 3, 17])
        starts = list(m.next_pos)
        if rng.random() < 0.2:  # re-runs
            starts = [rng.choice([m.last_start[b], m.next_pos[b]]) for b in range(3)]
        top = max(m.next_pos) + 3 * block_size
        for p in range(0, top):
            for n in (1, 2, 5):
                probe = [p, m.next_pos[1], min(p + 7, top)]
                full = m.paging.plan(probe, n, m.paging.pools)
                assert m.paging.plan(probe, n) == full, (probe, n, m.paging.quiet)
                changed = {b for _, give, free in full for b, _ in give + free}
                for b, (q, (lo, hi, end)) in enumerate(zip(probe, m.paging.quiet, strict=True)):
                    quiet = lo <= q < hi and q + n <= end
                    assert quiet == (b not in changed), (b, q, n, m.paging.quiet[b])
                    seen[quiet] += 1
        try:
            m.step_starts(3, s, starts, s)
        except ValueError:  # a re-run the rings refuse: nothing changed
            continue
        full = m.paging.plan(starts, s, m.paging.pools)
        plan = m.begin_step(starts, s)
        assert plan == full, (starts, s)
        m.end_step(plan, starts, s)
    assert max(m.next_pos) > 4 * block_size and min(seen.values()) > 1000, (m.next_pos, seen)

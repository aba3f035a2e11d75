"""The attention ops over attention spec §8's matrix: per-slot start positions at every boundary mixed
in one batch, S in {1, 2, an odd prefill longer than the window and the ratio}, rows crossing pool
blocks, shared prefix blocks, a rejected draft token re-run. Each backend against the independent
expectations of ``attention_expect`` (float64, dense, from the spec), with §8's rules."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch

import dsv4
from attention_expect import F64, Decoded, attention, compressed_row, paged_pool, put_row, stored, token_keys
from conftest import DEVICE, backends_of
from device_assert import assert_stops_on_device
from dsv4.harness.cases import record_outputs
from dsv4.harness.golden import bit_identical, compare, ratio_allclose
from dsv4.model.weights import synthetic_compressor, synthetic_o_proj
from dsv4.ops import get_op

CFG = dsv4.get_config("tiny")
HD, R, W, BS = CFG.head_dim, CFG.qk_rope_head_dim, CFG.sliding_window, 16
RATIOS = {"csa": 4, "hca": 16, "swa": 0}
SEQS = (1, 2, 19)  # decode, MTP decode, an odd prefill chunk longer than W (16) and either ratio
GARBAGE = 1e30  # ring slots no position has written: a pool that read one would be far off


def starts(ratio: int) -> list[int]:
    """§8's start positions: {0, 1, RC-2, RC-1, RC, 2RC-1, W-2, W-1, W, bs-1, 8192} (distinct)."""
    rc = ratio or 4
    return sorted({0, 1, rc - 2, rc - 1, rc, 2 * rc - 1, W - 2, W - 1, W, BS - 1, 8192})


def rope_for(kind: str, end: int) -> dsv4.RopeTable:
    return dsv4.rope_table(CFG, "window" if kind == "swa" else "compressed", max_position=end)


def rows(b: int, *shape: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(b, *shape, generator=g).to(torch.bfloat16)


def on_device(args: dict, device: torch.device = DEVICE) -> dict:
    """The arguments on ``device`` (default: the device under test): every value with a ``to`` (tensors,
    records, weights, RoPE tables) moved there, ints, strings and None as they are. Read results back
    from the returned records."""
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in args.items()}


# --- kv_compressor ---------------------------------------------------------------------------------


def compressor_setup(kind: str, seq: int, seed: int = 0):
    """A batch of slots at ``starts``, each with the ring its history wrote (projections of its last
    ``COFF*RC`` positions; slots of positions before 0 hold 1e30: never read) and a compressed pool of
    stale rows (the last slot's table all -1: its writes are skipped)."""
    g = torch.Generator().manual_seed(seed)
    ratio = RATIOS[kind]
    w = synthetic_compressor(CFG, ratio, seed)
    coff = 2 if ratio == 4 else 1
    ring = coff * ratio
    start = starts(ratio)
    b = len(start)
    xs = [{p: rows(1, CFG.hidden_size, g=g)[0] for p in range(max(0, p0 - ring), p0 + seq)} for p0 in start]
    kv_state = torch.full((b, ring, coff * HD), GARBAGE)
    score_state = torch.full((b, ring, coff * HD), GARBAGE)
    for i, p0 in enumerate(start):
        for p in range(max(0, p0 - ring), p0):
            x = xs[i][p].float()
            kv_state[i, p % ring] = x @ w.wkv.float().T
            score_state[i, p % ring] = x @ w.wgate.float().T + w.ape[p % ratio]
    width = -(-((max(start) + seq) // ratio) // BS)
    spans = [(p0 // ratio, (p0 + seq) // ratio) for p0 in start]
    pool = paged_pool(g, spans, width, CFG, BS)
    pool.block_table[-1] = -1
    state = dsv4.CompressorState(kv_state, score_state, pool)
    x = torch.stack([torch.stack([xs[i][p0 + s] for s in range(seq)]) for i, p0 in enumerate(start)])
    return w, state, x, torch.tensor(start), xs, rope_for(kind, max(start) + seq)


@pytest.mark.parametrize("backend", backends_of("kv_compressor"))
@pytest.mark.parametrize("seq", SEQS)
@pytest.mark.parametrize("kind", ["csa", "hca"])
def test_kv_compressor_matrix(kind: str, seq: int, backend: str) -> None:
    w, state, x, start, xs, rope = compressor_setup(kind, seq)
    ratio, ring = state.ratio, state.kv_state.shape[1]
    before = state.clone()
    args = on_device({"x": x, "w": w, "state": state, "start_pos": start, "rope": rope})
    dsv4.kv_compressor(**args, backend=backend)
    state = args["state"].to("cpu")
    expected = before.clone()
    written = torch.zeros(state.pool.nope.shape[:2], dtype=torch.bool)
    wkv, wgate, ape = w.wkv.to(F64).T, w.wgate.to(F64).T, w.ape.to(F64)
    for b, p0 in enumerate(start.tolist()):
        for p in range(p0, p0 + seq):
            xp = xs[b][p].to(F64)
            expected.kv_state[b, p % ring] = (xp @ wkv).float()
            expected.score_state[b, p % ring] = (xp @ wgate + ape[p % ratio]).float()
            if (p + 1) % ratio == 0 and put_row(
                expected.pool, b, p // ratio, compressed_row(xs[b], p // ratio, w, rope)
            ):
                j = p // ratio
                written[int(state.pool.block_table[b, j // BS]), j % BS] = True
    inputs = {"before": record_outputs({"state": before}), "written": {"pool": written}}
    report = compare("kv_compressor", record_outputs({"state": state}), record_outputs({"state": expected}), inputs)
    assert report, str(report)
    assert bool(written.any())  # the batch closes blocks
    never = expected.kv_state == GARBAGE
    assert bool((state.kv_state[never] == GARBAGE).all())  # ring slots of positions before 0: not touched


@pytest.mark.parametrize("backend", backends_of("kv_compressor"))
@pytest.mark.parametrize("kind", ["csa", "hca"])
def test_kv_compressor_prefill_in_one_call_equals_token_by_token(kind: str, backend: str) -> None:
    w, state, x, start, _, rope = compressor_setup(kind, 19, seed=1)
    before = record_outputs({"state": state.clone()})
    a = on_device({"x": x, "w": w, "state": state, "start_pos": start, "rope": rope})
    x, w, state, start, rope = a["x"], a["w"], a["state"], a["start_pos"], a["rope"]
    one = state.clone()
    dsv4.kv_compressor(x, w, one, start, rope, backend=backend)
    for s in range(19):
        dsv4.kv_compressor(x[:, s : s + 1].contiguous(), w, state, start + s, rope, backend=backend)
    # the same numbers, up to the order of the projections' sums (a [B*19, D] product against [B, D] ones)
    report = compare(
        "kv_compressor",
        record_outputs({"state": state.to("cpu")}),
        record_outputs({"state": one.to("cpu")}),
        {"before": before},
    )
    assert report, str(report)


@pytest.mark.parametrize("backend", backends_of("kv_compressor"))
@pytest.mark.parametrize("kind", ["csa", "hca"])
def test_rejected_draft_token_rerun_equals_a_fresh_run(kind: str, backend: str) -> None:
    """A step of 2 tokens, then the draft (token 1) rejected and re-run at its position with another
    token: the ring and the pool equal a fresh run of the accepted tokens (the closing block of the
    draft's position is rewritten), up to the order of the projections' sums."""
    ratio = RATIOS[kind]
    w, state, x, start, _, _ = compressor_setup(kind, 2, seed=2)
    start = start - start % ratio + ratio - 2  # token 1 closes a block
    rope = rope_for(kind, int(start.max()) + 2)
    state = dsv4.CompressorState(
        torch.zeros_like(state.kv_state), torch.full_like(state.score_state, float("-inf")),
        paged_pool(torch.Generator().manual_seed(5), [(0, (int(p) + 2) // ratio) for p in start], 200, CFG, BS),
    )  # fmt: skip
    other = torch.randn(x.shape[0], 1, x.shape[2]).to(torch.bfloat16)
    a = on_device({"x": x, "other": other, "w": w, "state": state, "start_pos": start, "rope": rope})
    x, other, w, state, start, rope = a["x"], a["other"], a["w"], a["state"], a["start_pos"], a["rope"]
    fresh = state.clone()
    dsv4.kv_compressor(x, w, state, start, rope, backend=backend)
    dsv4.kv_compressor(other, w, state, start + 1, rope, backend=backend)
    dsv4.kv_compressor(torch.cat((x[:, :1], other), 1), w, fresh, start, rope, backend=backend)
    report = compare(
        "kv_compressor", record_outputs({"state": state.to("cpu")}), record_outputs({"state": fresh.to("cpu")})
    )
    assert report, str(report)


# --- window_kv_write -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backends_of("window_kv_write"))
@pytest.mark.parametrize("seq", SEQS)
def test_window_kv_write_matrix(seq: int, backend: str) -> None:
    g = torch.Generator().manual_seed(seq)
    start = starts(0)
    width = -(-(max(start) + seq) // BS)
    pool = paged_pool(g, [(max(0, p - W + 1), p + seq) for p in start], width, CFG, BS)
    pool.block_table[0, 0] = -1  # slot 0's first block unallocated: its rows there are skipped
    kv = rows(len(start), seq, HD, g=g)
    expected = pool.clone()
    for b, p0 in enumerate(start):
        for s in range(max(0, seq - W), seq):  # the last min(S, W) tokens
            put_row(expected, b, p0 + s, kv[b, s])
    args = on_device({"kv": kv, "pool": pool, "start_pos": torch.tensor(start), "window": W})
    dsv4.window_kv_write(**args, backend=backend)
    report = compare("window_kv_write", record_outputs({"pool": args["pool"]}), record_outputs({"pool": expected}))
    assert report, str(report)


# --- sparse_attn -----------------------------------------------------------------------------------


def topk_lists(g: torch.Generator, start: list[int], seq: int, ratio: int, k: int, offset: int) -> torch.Tensor:
    """Top-k lists as an indexer might give them, with every entry §5 ignores: -1 padding, a repeated
    index (counts twice), a row the next token's close makes visible, one past every table, one below
    the offset; the rest random visible rows."""
    out = torch.full((len(start), seq, k), -1, dtype=torch.int32)
    for b, p0 in enumerate(start):
        for s in range(seq):
            vis = (p0 + s + 1) // ratio
            chosen = torch.randperm(max(vis, 1), generator=g)[: k - 6].tolist() if vis else []
            extra = [chosen[0]] if chosen else []  # a repeat
            entries = [c + offset for c in chosen + extra] + [vis + offset, 10**6, offset - 1]
            out[b, s, : len(entries)] = torch.tensor(entries[:k], dtype=torch.int32)
    return out


def attn_setup(
    kind: str,
    seq: int,
    seed: int = 0,
    shared_prefix: bool = False,
    k: int = CFG.index_topk,
    start: list[int] | None = None,
    offset: int | None = None,
):
    """``sparse_attn``'s arguments for ``kind``; ``offset``: CSA's ``topk_offset`` (the window ``W`` unless
    given)."""
    g = torch.Generator().manual_seed(seed)
    ratio = RATIOS[kind]
    start = start or (starts(ratio) if not shared_prefix else [40, 40, 45])
    b, h = len(start), CFG.num_attention_heads
    end = max(start) + seq
    win = paged_pool(g, [(max(0, p - W + 1), p + seq) for p in start], -(-end // BS), CFG, BS)
    cmp = topk = None
    offset = (W if kind == "csa" else 0) if offset is None else offset
    if kind != "swa":
        cmp = paged_pool(g, [(0, (p + seq) // ratio) for p in start], -(-(end // ratio) // BS) + 1, CFG, BS)
    if kind == "csa":
        topk = topk_lists(g, start, seq, ratio, k, offset)
    if shared_prefix:  # slot 1 has slot 0's history: it reads slot 0's blocks of the rows below its start
        win.block_table[1, (start[1] - W + 1) // BS : (start[1] - 1) // BS + 1] = win.block_table[
            0, (start[1] - W + 1) // BS : (start[1] - 1) // BS + 1
        ]
        if cmp is not None:
            cmp.block_table[1] = cmp.block_table[0]
    args: dict[str, Any] = dict(
        q=rows(b, seq, h, HD, g=g), kv=rows(b, seq, HD, g=g), start_pos=torch.tensor(start), window_pool=win,
        attn_sink=torch.randn(h, generator=g), rope=rope_for(kind, end), kind=kind, window=W, compress_ratio=ratio,
        compressed_pool=cmp, topk_idxs=topk, topk_offset=offset,
    )  # fmt: skip
    args["attn_sink"][0] = float("-inf")  # head 0 without a sink
    return args


def one_token_step(args: dict, s: int) -> dict:
    """The arguments of a step of token ``s`` alone: its query, row and (CSA) list, at ``start + s``."""
    one = {**args, "q": args["q"][:, s : s + 1].contiguous(), "kv": args["kv"][:, s : s + 1].contiguous()}
    if args["topk_idxs"] is not None:
        one["topk_idxs"] = args["topk_idxs"][:, s : s + 1].contiguous()
    one["start_pos"] = args["start_pos"] + s
    return one


def expected_o(args: dict) -> torch.Tensor:
    q, start = args["q"], args["start_pos"].tolist()
    own = stored(args["kv"], R)  # this call's rows as a pool stores them
    win = Decoded(args["window_pool"])
    cmp = Decoded(args["compressed_pool"]) if args["compressed_pool"] is not None else None
    out = torch.empty(q.shape, dtype=torch.bfloat16)
    for b, p0 in enumerate(start):
        for s in range(q.shape[1]):
            topk = None if args["topk_idxs"] is None else args["topk_idxs"][b, s]
            keys = token_keys(
                b, p0 + s, p0, own[b], win, W, args["kind"], args["compress_ratio"], cmp, topk, args["topk_offset"]
            )
            out[b, s] = attention(q[b, s], keys, args["attn_sink"], p0 + s, args["rope"])
    return out


@pytest.mark.parametrize("backend", backends_of("sparse_attn"))
@pytest.mark.parametrize("seq", SEQS)
@pytest.mark.parametrize("kind", ["swa", "csa", "hca"])
def test_sparse_attn_matrix(kind: str, seq: int, backend: str) -> None:
    args = attn_setup(kind, seq)
    o = dsv4.sparse_attn(**on_device(args), backend=backend).o
    report = compare("sparse_attn", {"o": o}, {"o": expected_o(args)})
    assert report, str(report)


@pytest.mark.parametrize("backend", backends_of("sparse_attn"))
def test_probabilities_enter_the_value_product_as_bf16(backend: str) -> None:
    """Spec A5 step 3: ``acc = sum bf16(e_i) * k_i``, with ``l`` summed unrounded. Two keys ``+c`` and
    ``-c`` (one column, exact in FP8) whose logits differ by ``d``: ``acc = c * (1 - bf16(exp(-d)))``,
    where ``exp(-d)`` lies 1.4 bf16 steps below 1, so the rounded and the unrounded probability give
    outputs 30% apart, far outside §8's ``o`` rule; random keys never show it."""
    c = 256.0  # a power of two: the FP8 row holds it exactly
    args = attn_setup("swa", 2, start=[0])
    h = args["q"].shape[2]
    d = -math.log(1 - 1.4 * 2.0**-8)  # the logit gap: exp(-d) 1.4 steps of bf16 (2^-8 below 1) under 1
    q0 = torch.tensor(d / 2 * HD**0.5 / c, dtype=torch.bfloat16)
    args["q"] = torch.zeros_like(args["q"])
    args["q"][..., 0] = q0
    args["kv"] = torch.zeros_like(args["kv"])
    args["kv"][0, 0, 0], args["kv"][0, 1, 0] = c, -c  # token 1 sees both (positions 0 and 1), token 0 the first
    args["attn_sink"] = torch.full_like(args["attn_sink"], float("-inf"))
    o = dsv4.sparse_attn(**on_device(args), backend=backend).o.cpu().double()

    z = float(torch.tensor(float(q0) * c, dtype=torch.float32) * torch.tensor(HD**-0.5, dtype=torch.float32))
    e2 = math.exp(-2 * z)  # the second key's e_i, the first's being exp(0) = 1
    rounded = float(torch.tensor(e2).to(torch.bfloat16))
    want = float(torch.tensor(c * (1 - rounded) / (1 + e2)).to(torch.bfloat16))
    unrounded = c * (1 - e2) / (1 + e2)
    assert abs(unrounded - want) > 10 * (1e-3 + abs(want) / 128)  # the test tells the two apart
    assert torch.allclose(o[0, 1, :, 0], torch.full((h,), want, dtype=torch.float64), atol=1e-3, rtol=1 / 128)
    assert torch.equal(o[0, 0, :, 0], torch.full((h,), c, dtype=torch.float64))  # one key: weight 1
    assert not o[..., 1:].any()


def shared_prefix_args() -> dict:
    """Slots 0 and 1 with a common history (their shared blocks) and the same query and row."""
    args = attn_setup("hca", 2, seed=3, shared_prefix=True)
    args["q"][1], args["kv"][1] = args["q"][0], args["kv"][0]
    return args


def shared_prefix_write_call(backend: str) -> None:
    """The refused write of the test below on the device (for a child process: see ``device_assert``)."""
    args = on_device(shared_prefix_args())
    dsv4.window_kv_write(args["kv"], args["window_pool"], args["start_pos"] - 1, window=W, backend=backend)


@pytest.mark.parametrize("backend", backends_of("sparse_attn"))
def test_shared_prefix_blocks_are_read_by_both_slots(backend: str) -> None:
    """Slots 0 and 1 share the window and compressed blocks of their common history: each reads them
    as its own (and slot 1 gets what slot 0 gets from the same query), and writes stay apart (on a GPU
    refused by a device-side assert, which leaves the process's CUDA context unusable: in a child)."""
    args = shared_prefix_args()
    o = dsv4.sparse_attn(**on_device(args), backend=backend).o
    assert bit_identical(o[1], o[0])
    assert compare("sparse_attn", {"o": o}, {"o": expected_o(args)})
    if DEVICE.type == "cuda":
        script = f"import test_attention_ops as t\nt.shared_prefix_write_call({backend!r})"
        assert_stops_on_device(script, ("pool.block_table: two slots write the same pool row",))
        return
    pool = args["window_pool"]
    before = pool.clone()
    with pytest.raises(ValueError, match="two slots write the same pool row"):  # the shared block holds row 41
        dsv4.window_kv_write(args["kv"], pool, args["start_pos"] - 1, window=W, backend=backend)
    assert all(bit_identical(a, b) for a, b in zip(pool.tensors().values(), before.tensors().values(), strict=True))


@pytest.mark.parametrize("backend", backends_of("sparse_attn"))
@pytest.mark.parametrize("kind", ["swa", "hca"])
def test_this_calls_rows_come_from_kv_not_the_pool(kind: str, backend: str) -> None:
    """The pool rows at positions >= start hold stale rows; a step of S tokens equals S steps of one
    token that each find the earlier tokens' rows in the pool (written by ``window_kv_write``), also
    where the Triton launch splits HCA's compressed rows over programs (the pool's 34 tiles in two by
    default) and packs the step's tokens 4 a program: the slot at 256 has tokens 12-14 (one
    compressed tile visible) in a program with token 15 (two)."""
    args = on_device(attn_setup(kind, 19, seed=4, start=sorted({*starts(16), 256}) if kind == "hca" else None))
    writer = backend if backend in get_op("window_kv_write").implementations else "reference"
    whole = dsv4.sparse_attn(**args, backend=backend).o
    for s in range(19):
        one = one_token_step(args, s)
        o = dsv4.sparse_attn(**one, backend=backend).o
        assert bit_identical(o[:, 0], whole[:, s], f"token {s}")
        dsv4.window_kv_write(one["kv"], args["window_pool"], one["start_pos"], window=W, backend=writer)


# --- o_proj ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backends_of("o_proj"))
@pytest.mark.parametrize("t", [1, 5])
def test_o_proj_against_float64(t: int, backend: str) -> None:
    g = torch.Generator().manual_seed(t)
    w = synthetic_o_proj(CFG, seed=t)
    o = rows(t, CFG.num_attention_heads, HD, g=g)
    y = dsv4.o_proj(o.to(DEVICE), w.to(DEVICE), backend=backend).y.cpu()
    wa = (w.wo_a.to(F64) * w.wo_a_scale.repeat_interleave(128, 0).repeat_interleave(128, 1).to(F64)).view(
        CFG.o_groups, CFG.o_lora_rank, -1
    )
    r = torch.einsum("tgk,gok->tgo", o.to(F64).view(t, CFG.o_groups, -1), wa).to(torch.bfloat16).reshape(t, -1)
    a8, sa = dsv4.fp8_act_quant(r)
    ws = w.wo_b_scale.repeat_interleave(128, 0)[: w.wo_b.shape[0]].to(F64)
    blocks = (
        (a8[:, i : i + 128].to(F64) @ w.wo_b[:, i : i + 128].to(F64).T)
        * sa[:, i // 128, None].to(F64)
        * ws[None, :, i // 128]
        for i in range(0, r.shape[1], 128)
    )
    acc = sum(blocks, torch.zeros((), dtype=F64))
    assert ratio_allclose(y, acc.to(torch.bfloat16), 1e-4, 1 / 128)


@pytest.mark.parametrize("backend", backends_of("o_proj"))
def test_o_proj_of_an_output_width_not_a_multiple_of_128(backend: str) -> None:
    """``D = 192``: ``wo_b_scale`` holds ``ceil(D / 128) = 2`` rows of blocks, the last one partly
    used. The first 192 rows of a layer's ``wo_b`` (and its scale as it is) give the first 192
    columns of that layer's ``y``: each output column reads only its own row and block."""
    g = torch.Generator().manual_seed(3)
    w = synthetic_o_proj(CFG, seed=3).to(DEVICE)
    assert w.wo_b.shape[0] == 256 and w.wo_b_scale.shape[0] == 2
    o = rows(4, CFG.num_attention_heads, HD, g=g).to(DEVICE)
    full = dsv4.o_proj(o, w, backend=backend).y
    y = dsv4.o_proj(o, dataclasses.replace(w, wo_b=w.wo_b[:192].contiguous()), backend=backend).y
    assert y.shape == (4, 192) and bit_identical(y, full[:, :192])


# --- bytes models ----------------------------------------------------------------------------------


def test_bytes_models_by_hand() -> None:
    """The attention ops' minimal bytes at flash decode, counted by hand (PERFORMANCE's layer tables)."""
    from dsv4.ops.costs import ring_traffic

    flash = dsv4.get_config("flash")
    row = 448 + 2 * 64 + 8  # an FP8 KV row: codes, bf16 rope part, scale bytes
    starts = [8190] * 64  # every slot at the same place: token 1 closes a CSA block and an HCA block
    o = get_op("o_proj").cost(flash, starts, 2)
    assert o.reads["w.wo_a (FP8)"] == o.reads["w.wo_b (FP8)"] == 8192 * 4096 and o.writes["y"] == 128 * 4096 * 2
    attn = get_op("sparse_attn").cost(flash, starts, 2, kind="csa")
    assert attn.reads["compressed rows (FP8)"] == 64 * 512 * row  # the pair's shared top-k
    assert attn.reads["window rows (FP8, below start)"] == 64 * 127 * row  # rows start-127 .. start-1
    hca = get_op("sparse_attn").cost(flash, starts, 2, kind="hca")
    assert hca.reads["compressed rows (FP8)"] == 64 * (8192 // 128) * row
    assert get_op("window_kv_write").cost(flash, starts, 2).writes["window rows (FP8)"] == 128 * row
    comp = get_op("kv_compressor").cost(flash, starts, 2, ratio=128)
    assert comp.writes["compressed rows (FP8)"] == 64 * row
    # the ring: HCA closes block 0 at 127, reading the 126 slots this step did not write
    assert ring_traffic(126, 2, ratio=128, coff=1) == (126, 2, 1)
    assert ring_traffic(6, 2, ratio=4, coff=2) == ring_traffic(6, 2)  # the indexer's ring


def test_bytes_models_where_a_count_turns() -> None:
    """The bytes models at flash where a count changes by one: slots at different places of a compressor
    block, a step that closes no row, a window that starts a pool block, a compressed row one past a pool
    block, written rows that straddle a block, a prompt longer than the window, a start that is the last
    position of an indexer block; the block size a caller gives, in every term that counts entries; and
    what differs by kind and slot (HCA's single-half ring, no top-k list outside CSA, a short context's
    few compressed rows, slots of different lengths, each slot's own ring) and the GEMMs' flops."""
    flash = dsv4.get_config("flash")
    w, hd, hid, bs = flash.sliding_window, flash.head_dim, flash.index_head_dim, 64
    assert (w, hd, hid) == (128, 512, 128)
    # the indexer's compressor: an ape row (2 x HID fp32) per place in the block some token takes
    assert get_op("indexer_compressor").cost(flash, [0, 1], 1).reads["compressor.ape"] == 2 * 2 * hid * 4
    # the attention's compressor reads its norm weights only when a row closes (position 8191, not 8188)
    kvc = get_op("kv_compressor").cost
    assert kvc(flash, [8188], 1, ratio=4).reads["w.norm_w"] == 0
    assert kvc(flash, [8191], 1, ratio=4).reads["w.norm_w"] == hd * 2
    # HCA at 128, position 8319: window rows 8192..8318 (blocks 128, 129), compressed rows 0..64 (blocks 0, 1)
    hca = get_op("sparse_attn").cost(flash, [8319], 1, kind="hca", ratio=128, block_size=bs)
    assert hca.reads["block_table (rows read)"] == 4 * 4
    # rows 8191 and 8192 written (blocks 127, 128); block 127 is the last one read, its entry read once
    write = get_op("sparse_attn_write").cost(flash, [8191], 2, kind="swa", block_size=bs)
    assert write.reads["block_table (rows written, blocks not read)"] == 1 * 4
    # a prompt of 300 from 0 keeps its last 128 rows, 172..299: blocks 2, 3, 4
    prompt = get_op("window_kv_write").cost(flash, [0], 300)
    assert prompt.reads["kv (rows written)"] == w * hd * 2 and prompt.reads["block_table (written rows)"] == 3 * 4
    # from 8191 (a block's last position) the step closes key 2047; the 2047 keys before it are old
    key = dsv4.IndexerState.key_format.row_bytes(hid)
    assert get_op("indexer").cost(flash, [8191], 2).reads["keys + key_scale (old rows)"] == 2047 * key
    # the indexer's compressor writes no row from 1024 (positions 1024, 1025) and row 255 (block 3) from 1022
    icc = get_op("indexer_compressor").cost
    assert icc(flash, [1024], 2).reads["block_table (written rows)"] == 0
    assert icc(flash, [1022], 2).reads["block_table (written rows)"] == 1 * 4
    # each slot's ring is its own: two slots read what each reads alone
    ring = "kv_state + score_state"
    assert (
        icc(flash, [1024, 1026], 2).reads[ring] == icc(flash, [1024], 2).reads[ring] + icc(flash, [1026], 2).reads[ring]
    )
    # CSA's ape rows by place in the block (positions 0 and 4: one row of 2 x 512 fp32), not by ring slot
    assert kvc(flash, [0, 4], 1, ratio=4).reads["w.ape (rows used)"] == 1 * 2 * hd * 4
    # HCA at 128 from 8190: its ring of 128 single-half slots; position 8191 closes block 63, which reads the
    # 126 slots the step did not write, of kv_state and score_state (512 fp32 each), and writes 2
    hca_c = kvc(flash, [8190] * 64, 2, kind="hca", ratio=128)
    assert hca_c.reads[ring] == 64 * 2 * 126 * hd * 4 and hca_c.writes[ring] == 64 * 2 * 2 * hd * 4
    # the indexer's scores: B x S rows of the longest cache (8192 // 4 = 2048 keys), not the sum of them
    assert get_op("indexer").cost(flash, [1024, 8190], 2).writes["score"] == 2 * 2 * 2048 * 4
    # HCA reads no top-k list; CSA at position 100 sees 25 compressed rows, not its list's 512
    attn = get_op("sparse_attn").cost
    assert attn(flash, [8190] * 64, 2, kind="hca").reads["topk_idxs"] == 0
    row = 448 + 2 * 64 + 8
    assert attn(flash, [100] * 4, 2, kind="csa").reads["compressed rows (FP8)"] == 4 * 25 * row
    # SWA past the window: each token attends to W keys, q.k and p.v per key and head
    h = flash.num_attention_heads
    assert attn(flash, [8190] * 64, 2, kind="swa").flops["bf16"] == 2 * 2 * h * hd * (64 * 2 * w)
    # o_proj: each group's [T, H*HD/G] x [H*HD/G, OL]; wo_b [T, G*OL] x [G*OL, D]
    g, ol, d = flash.o_groups, flash.o_lora_rank, flash.hidden_size
    o_cost = get_op("o_proj").cost(flash, [0], 2)
    assert o_cost.flops == {"bf16": 2 * 2 * h * hd * ol, "fp8": 2 * 2 * (g * ol) * d}
    # wo_b's scale blocks along D round up: D 192 is two blocks of 128 rows (tiny: G*OL 128, one column)
    tiny_d192 = dsv4.get_config("tiny").replace(name="d192", hidden_size=192)
    assert get_op("o_proj").cost(tiny_d192, [0], 1).reads["w.wo_b_scale"] == 2 * 1 * 4
    # 16-row blocks: the window read 8064..8190 (blocks 504..511); a prompt's 64 rows written, blocks 0..3
    small = get_op("sparse_attn_write").cost
    assert small(flash, [8191], 2, kind="swa", block_size=16).reads["block_table (rows read)"] == 8 * 4
    prompt_rows = small(flash, [0], 64, kind="swa", block_size=16).reads
    assert prompt_rows["block_table (rows written, blocks not read)"] == 4 * 4

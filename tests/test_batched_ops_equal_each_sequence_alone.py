"""Continuous batching through the ops (README, "Continuous batching"): what an engine does that
``DecodeFrontEnd`` and ``DecodeAttention`` do not, since they step slots ``0..B-1`` by one ``S``.

A step of one slot or of a contiguous range ``a..z-1`` runs on a state of views: each per-slot tensor
(the rings ``kv_state`` and ``score_state``, every ``block_table``) sliced ``[a:z]``, the pools (the
indexer's ``keys`` and ``key_scale``, a ``KVPool``'s ``nope``, ``rope`` and ``scale``) whole. A set of
slots that is not a range runs on its rows gathered (copies), its rings scattered back after. A slot
that takes another's prompt prefix shares the blocks the prefix fills, gets a copy of the block it
fills partly, and a copy of the rings. Each sequence then gets what it gets run alone (batch 1, a
fresh state, the same steps), and its slot ends holding what the alone run's does: on the CPU bit for
bit (Triton's interpreter; the reference too, but for its scores and its rings, within their rules: its
fp32 GEMMs may round by the number of rows they are given, as MKL's do on an AVX-512 CPU); on a GPU
within the outputs' rules, since a launch of another batch may tile its sums otherwise.

The stateless per-token projection (``qkv_proj_rope``) runs once per sequence on the reference: the
batched and the alone steps get the same ``q``, ``kv``, ``qr`` and ``qr_scale`` rows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest
import torch

import dsv4
from conftest import DEVICE, FULL, backends_of
from dsv4.harness.golden import bit_identical, ratio_allclose, tolerance, topk_allclose
from dsv4.model.structs import QKV

CFG = dsv4.get_config("tiny")
LAYER = 1  # tiny's CSA layer: the window pool, the compressor (ratio 4) with its pool, the indexer
RATIO = CFG.layer_ratio(LAYER)
W, BS, MAX_POSITION = CFG.sliding_window, 16, 96
WEIGHTS = dsv4.synthetic_weights(CFG, seed=0, device=DEVICE, layer=LAYER)
ROPE = dsv4.layer_rope_table(CFG, LAYER, MAX_POSITION, DEVICE)
MASKED = -1e38  # a score at or below this is masked (a key past the token's cache)

State = dsv4.IndexerState | dsv4.AttentionState
Slots = slice | list[int]  # a contiguous range (views) or any set (gathered rows)


@dataclass
class Sequence:
    """One sequence's tokens, their projections (the reference's, shared by every run of them), where it
    stands, the step sizes it ran in and what each step gave it."""

    x: torch.Tensor  # [n, D] bf16
    qkv: QKV  # of positions 0..n-1
    done: int = 0
    steps: list[int] = field(default_factory=list)
    outs: list[dict[str, torch.Tensor]] = field(default_factory=list)

    def again(self) -> Sequence:
        """The same tokens, not yet run."""
        return Sequence(self.x, self.qkv)


def sequence(n: int, seed: int, prefix: torch.Tensor | None = None) -> Sequence:
    """``n`` tokens (after ``prefix [p, D]``, if given)."""
    x = dsv4.synthetic_activations((n, CFG.hidden_size), seed=seed, device=DEVICE)
    x = x if prefix is None else torch.cat([prefix, x])
    positions = torch.arange(x.shape[0], device=DEVICE)
    return Sequence(x, dsv4.qkv_proj_rope(x, WEIGHTS.attn, positions, ROPE, backend="reference"))


def empty(kind: type[State], batch: int) -> State:
    if kind is dsv4.IndexerState:
        return dsv4.IndexerState.empty(CFG, batch, MAX_POSITION, DEVICE, block_size=BS)
    return dsv4.AttentionState.empty(CFG, LAYER, batch, MAX_POSITION, DEVICE, block_size=BS)


def rows_of(state: State, slots: Slots) -> State:
    """The state of ``slots``: each per-slot tensor's rows (views of a range, copies of a set), the pools whole."""

    def pool(p: dsv4.KVPool) -> dsv4.KVPool:
        return dataclasses.replace(p, block_table=p.block_table[slots])

    if isinstance(state, dsv4.IndexerState):
        return dataclasses.replace(
            state, kv_state=state.kv_state[slots], score_state=state.score_state[slots],
            block_table=state.block_table[slots],
        )  # fmt: skip
    comp, idx = state.compressor, state.indexer
    assert comp is not None and idx is not None
    comp = dataclasses.replace(
        comp, kv_state=comp.kv_state[slots], score_state=comp.score_state[slots], pool=pool(comp.pool)
    )
    idx = dataclasses.replace(
        idx, kv_state=idx.kv_state[slots], score_state=idx.score_state[slots], block_table=idx.block_table[slots]
    )
    return dsv4.AttentionState(pool(state.window), comp, idx)


def rings(state: State) -> list[torch.Tensor]:
    """The per-slot tensors the ops write: the rings (they never change a block table)."""
    if isinstance(state, dsv4.IndexerState):
        return [state.kv_state, state.score_state]
    assert state.compressor is not None and state.indexer is not None
    return [state.compressor.kv_state, state.compressor.score_state, state.indexer.kv_state, state.indexer.score_state]


def step(state: State, seqs: list[Sequence], s: int, backend: str) -> None:
    """One op-level step of ``s`` tokens of each of ``seqs`` (slot ``b`` of ``state`` holding ``seqs[b]``,
    each from where it stands): the indexer on an ``IndexerState``, CSA's stateful ops on an
    ``AttentionState``; each sequence keeps its part of the outputs."""
    b = len(seqs)
    start = torch.tensor([seq.done for seq in seqs], device=DEVICE)
    x = torch.stack([seq.x[seq.done : seq.done + s] for seq in seqs])

    def rows(name: str) -> torch.Tensor:  # [B*S, ...]: the tokens' projections
        return torch.cat([getattr(seq.qkv, name)[seq.done : seq.done + s] for seq in seqs])

    w = WEIGHTS
    assert w.indexer is not None and w.compressor is not None and w.attn_sink is not None
    layer = state if isinstance(state, dsv4.AttentionState) else None
    idx = state if isinstance(state, dsv4.IndexerState) else state.indexer
    assert idx is not None and (layer is None or layer.compressor is not None)
    if layer is not None and layer.compressor is not None:
        dsv4.kv_compressor(x, w.compressor, layer.compressor, start, ROPE, backend=backend)
    index = dsv4.indexer(
        x, rows("qr"), rows("qr_scale"), w.indexer, idx, start, W, ROPE, topk=CFG.index_topk, backend=backend
    )
    out = {"score": index.score, "topk_idxs": index.topk_idxs}
    if layer is not None and layer.compressor is not None:
        q, kv = rows("q"), rows("kv")
        out["o"] = dsv4.sparse_attn_write(
            q.view(b, s, *q.shape[1:]), kv.view(b, s, -1), start, layer.window, w.attn_sink, ROPE, kind="csa",
            window=W, compress_ratio=RATIO, compressed_pool=layer.compressor.pool, topk_idxs=index.topk_idxs,
            topk_offset=W, backend=backend,
        ).o  # fmt: skip
    for i, seq in enumerate(seqs):
        seq.outs.append({k: v[i] for k, v in out.items()})
        seq.steps.append(s)
        seq.done += s


def step_slots(state: State, slots: Slots, seqs: list[Sequence], s: int, backend: str) -> None:
    """``step`` of the slots ``slots`` alone (holding ``seqs``): on views of a range; on the rows of a
    set gathered, its rings scattered back after."""
    part = rows_of(state, slots)
    step(part, seqs, s, backend)
    if isinstance(slots, list):
        for whole, rows in zip(rings(state), rings(part), strict=True):
            whole[slots] = rows


def held(state: State, b: int, n: int) -> dict[str, torch.Tensor]:
    """What slot ``b`` of ``state`` holds of a sequence that ran positions ``0..n-1``: its rings and its
    rows of every pool (the window's ``n``, the compressor's and the indexer's ``n // 4``), as bytes."""
    idx = state if isinstance(state, dsv4.IndexerState) else state.indexer
    assert idx is not None
    k8, ks = idx.dense_keys(b, n // 4)
    out = {"indexer.keys": k8, "indexer.key_scale": ks.view(torch.uint8)}
    out |= {f"ring{i}": ring[b].view(torch.uint8) for i, ring in enumerate(rings(state))}
    if isinstance(state, dsv4.AttentionState) and state.compressor is not None:
        for name, pool, rows in (("window", state.window, n), ("compressed", state.compressor.pool, n // RATIO)):
            block, offset = pool.locate(torch.full((rows,), b, device=DEVICE), torch.arange(rows, device=DEVICE))
            for part in ("nope", "rope", "scale"):
                out[f"{name}.{part}"] = getattr(pool, part)[block, offset].view(torch.uint8)
    return out


def alone(seq: Sequence, kind: type[State], backend: str) -> tuple[Sequence, State]:
    """``seq`` run alone in the steps it ran in, on a fresh state of one slot; and that state."""
    run, state = seq.again(), empty(kind, 1)
    for s in seq.steps:
        step(state, [run], s, backend)
    return run, state


def assert_as_alone(got: Sequence, want: Sequence, backend: str, what: str) -> None:
    """Each step's outputs of ``got`` against those of ``want`` (its last ``len(want.outs)`` steps): bit for
    bit on the CPU but for the reference's scores, within the outputs' rules on a GPU. A score row holds
    a column per key of the widest cache of its batch: the sequence's own columns are the alone run's,
    the rest masked."""
    assert got.steps[len(got.steps) - len(want.steps) :] == want.steps, what
    for i, (g, a) in enumerate(zip(got.outs[len(got.outs) - len(want.outs) :], want.outs, strict=True)):
        n = a["score"].shape[-1]
        assert bool((g["score"][..., n:] <= MASKED).all()), f"{what} step {i}: a column past its cache"
        for name, value in {**g, "score": g["score"][..., :n]}.items():
            if DEVICE.type == "cpu" and not (backend == "reference" and name == "score"):
                check = bit_identical(value, a[name], name)
            elif name == "topk_idxs":
                check = topk_allclose(value[None], a[name][None], a["score"][None], offset=W)
            else:
                t = tolerance(name, "indexer" if name == "score" else "sparse_attn")
                check = ratio_allclose(value, a[name], t.atol, t.rtol, t.max_error_ratio, name)
            assert check, f"{what} step {i}: {check.detail}"


def assert_holds_as_alone(state: State, b: int, seq: Sequence, kind: type[State], backend: str, what: str) -> None:
    """``seq``, run in slot ``b`` of ``state``, against its run alone: every step's outputs, and (on the
    CPU) the slot's rings and pool rows."""
    run, single = alone(seq, kind, backend)
    assert_as_alone(seq, run, backend, what)
    if DEVICE.type == "cpu":
        got, want = held(state, b, seq.done), held(single, 0, seq.done)
        assert got.keys() == want.keys()
        for name, value in got.items():
            if backend == "reference" and name.startswith("ring"):  # fp32 GEMM rows: the state's rule
                t = tolerance("score_state" if int(name.removeprefix("ring")) % 2 else "kv_state", "indexer")
                check = ratio_allclose(value.view(torch.float32), want[name].view(torch.float32), t.atol, t.rtol,
                                       t.max_error_ratio, name)  # fmt: skip
            else:
                check = bit_identical(value, want[name], name)
            assert check, f"{what}: slot {b}'s {name}: {check.detail}"


@pytest.mark.parametrize("kind", [dsv4.IndexerState, dsv4.AttentionState], ids=["indexer", "csa"])
@pytest.mark.parametrize("backend", backends_of("indexer"))
def test_steps_of_some_slots_equal_each_sequence_alone(backend: str, kind: type[State]) -> None:
    """Three slots of an ``IndexerState`` (the indexer) or a CSA ``AttentionState`` (its compressor,
    indexer and attention): a prompt in the middle slot alone (views of slot 1), the first and last
    slots (not a range: gathered rows), then the middle slot's decode beside the last one's (views of
    slots 1..2), each at its own position."""
    state = empty(kind, 3)
    a, b, c = sequence(2, seed=1), sequence(6, seed=2), sequence(4, seed=3)
    step_slots(state, slice(1, 2), [b], 4, backend)  # b's prompt: 0..3, a block closes at 3
    step_slots(state, [0, 2], [a, c], 2, backend)  # a and c: 0..1
    step_slots(state, slice(1, 3), [b, c], 2, backend)  # b: 4..5; c: 2..3, a block closes at 3
    for i, (name, seq) in enumerate((("a", a), ("b", b), ("c", c))):
        assert_holds_as_alone(state, i, seq, kind, backend, name)


Holder = dsv4.KVPool | dsv4.IndexerState  # a pool's rows and the block table addressing them


def row_tensors(holder: Holder) -> list[torch.Tensor]:
    """The pool's rows (``[num_blocks, block_size, ...]``)."""
    if isinstance(holder, dsv4.IndexerState):
        return [holder.keys, holder.key_scale]
    return [holder.nope, holder.rope, holder.scale]


def holders(state: dsv4.AttentionState, p: int) -> dict[str, tuple[Holder, int]]:
    """Each pool of a CSA layer's ``state``, with the rows a sequence that ran ``p`` positions holds in it."""
    assert state.compressor is not None and state.indexer is not None
    return {
        "window": (state.window, p),
        "compressed": (state.compressor.pool, p // RATIO),
        "indexer": (state.indexer, p // 4),
    }


def take_prefix(state: dsv4.AttentionState, src: int, dst: int, p: int) -> dict[str, list[int]]:
    """Slot ``dst`` (given blocks of its own) takes the first ``p`` positions slot ``src`` ran: in each
    pool, ``dst``'s table maps the blocks they fill to ``src``'s (shared, read-only from now on) and the
    block they fill partly is copied into ``dst``'s own; the rings are copied. Returns the shared blocks."""
    shared = {}
    for name, (holder, rows) in holders(state, p).items():
        table, full = holder.block_table, rows // BS
        table[dst, :full] = table[src, :full]
        if rows % BS:  # both slots write the rest of this block: each its own copy
            for t in row_tensors(holder):
                t[table[dst, full]] = t[table[src, full]]
        shared[name] = table[src, :full].tolist()
    for ring in rings(state):
        ring[dst] = ring[src]
    return shared


def blocks(state: dsv4.AttentionState, shared: dict[str, list[int]]) -> list[torch.Tensor]:
    """Copies of the rows of the blocks ``shared`` names in each pool."""
    pools = holders(state, 0)
    return [t[ids].clone() for name, ids in shared.items() for t in row_tensors(pools[name][0])]


# A prefix of 17 shares the first window block (positions 0..15) and copies the second; its 4
# compressed rows and 4 indexer keys fill part of the first block of each: copied. A prefix of 68
# also shares the first compressed and indexer blocks (rows 0..15) and copies their second. The
# suffix's step ends on a position that closes a compressed row from ring rows the prefix wrote.
@pytest.mark.parametrize("p,s", [(17, 3), pytest.param(68, 4, marks=FULL)])
@pytest.mark.parametrize("backend", backends_of("indexer"))
def test_two_slots_sharing_a_prefix_equal_each_sequence_alone(backend: str, p: int, s: int) -> None:
    """A CSA layer's prompt prefix runs once, in slot 0 (views); slot 1 takes it (``take_prefix``); then
    a step of both slots, each with a suffix of its own. Each sequence equals its run alone (the
    prefix, then its suffix), and the shared blocks stay as the prefix left them."""
    prefix = dsv4.synthetic_activations((p, CFG.hidden_size), seed=4, device=DEVICE)
    x, y = sequence(s, seed=5, prefix=prefix), sequence(s, seed=6, prefix=prefix)
    state = empty(dsv4.AttentionState, 2)
    assert isinstance(state, dsv4.AttentionState)
    step_slots(state, slice(0, 1), [x], p, backend)
    shared = take_prefix(state, 0, 1, p)
    assert shared["window"] and bool(shared["compressed"]) == bool(shared["indexer"]) == (p >= 64)
    before = blocks(state, shared)
    y.done = p
    step(state, [x, y], s, backend)
    for rows, was in zip(blocks(state, shared), before, strict=True):
        check = bit_identical(rows, was)
        assert check, f"a shared block changed: {check.detail}"
    _, single = alone(Sequence(x.x, x.qkv, steps=[p]), dsv4.AttentionState, backend)  # the prefix, once
    for name, seq in (("x", x), ("y", y)):
        rest = Sequence(seq.x, seq.qkv, done=p)
        step(single.clone(), [rest], s, backend)
        assert_as_alone(seq, rest, backend, name)

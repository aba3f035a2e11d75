"""The ratio-4 compressor's state ring (spec §4), checked against the model's whole-sequence form.

Feeding a sequence a step at a time must give the same cache rows as computing every block at once
with overlapping windows (block j pools the first half of block j-1 with the second half of block j).
"""

from __future__ import annotations

import pytest
import torch

import dsv4
from conftest import BACKENDS, DEVICE, FULL

CFG = dsv4.get_config("tiny")
N_TOKENS = 40  # ten blocks
MAX_POS = 64


def whole_sequence_cache(x: torch.Tensor, w: dsv4.CompressorWeights, rope: dsv4.RopeTable) -> torch.Tensor:
    """Every closed block of one sequence ``x [N, D]`` (positions 0..N-1) -> ``[N//4, HID]`` bf16."""
    hid = w.norm_w.shape[0]
    nb = x.shape[0] // 4
    kv = (x[: 4 * nb].float() @ w.wkv.float().T).view(nb, 4, 2 * hid)
    sc = (x[: 4 * nb].float() @ w.wgate.float().T).view(nb, 4, 2 * hid) + w.ape
    prev_kv = torch.cat((torch.zeros(1, 4, hid, device=x.device), kv[:-1, :, :hid]))
    prev_sc = torch.cat((torch.full((1, 4, hid), float("-inf"), device=x.device), sc[:-1, :, :hid]))
    cand_kv = torch.cat((prev_kv, kv[:, :, hid:]), dim=1)  # [nb, 8, HID] overlapping windows
    cand_sc = torch.cat((prev_sc, sc[:, :, hid:]), dim=1)
    pooled = (cand_kv * torch.softmax(cand_sc, dim=1)).sum(dim=1)

    k = pooled.to(torch.bfloat16).double()  # the norm in float64: the spec's value for any finite key
    k = (k * torch.rsqrt(k.square().mean(-1, keepdim=True) + 1e-6) * w.norm_w.double()).to(torch.bfloat16)
    first = torch.arange(nb, device=x.device) * 4
    rot = torch.complex(rope.cos[first], rope.sin[first])  # [nb, R/2]
    r = rope.rope_dim
    roped = torch.view_as_real(torch.view_as_complex(k[:, -r:].float().reshape(nb, r // 2, 2)) * rot)
    k[:, -r:] = roped.flatten(1).to(torch.bfloat16)
    return (k.float() @ dsv4.hadamard_matrix(hid, device=x.device)).to(torch.bfloat16)


def _inputs(batch: int, seed: int):
    indexer = dsv4.synthetic_weights(CFG, seed=seed, device=DEVICE).indexer
    assert indexer is not None  # the front end's weights hold the indexer's
    w = indexer.compressor
    rope = dsv4.rope_table(CFG, "compressed", max_position=MAX_POS, device=DEVICE)
    x = dsv4.synthetic_activations((batch, N_TOKENS, CFG.hidden_size), seed=seed + 1, device=DEVICE)
    return w, rope, x


# Both sides round to bf16 three times before the Hadamard rotation; where their fp32 sums differ in
# the last bit, one rounding may flip by an ulp (<= 2^-6 for |k| < 4) and the rotation spreads it over
# the row (2^-6 / sqrt(128) = 1.4e-3 per entry). Allow two such flips per row; a wrong window,
# slot or position is off by 0.1 or more.
FLIP_ATOL = 4e-3


def _check_rows(state: dsv4.IndexerState, b: int, expected: torch.Tensor, n_tokens: int) -> None:
    """Slot ``b``'s pool rows are the expected bf16 keys quantized per row (spec §2; an ulp flip of
    FLIP_ATOL moves k8 by well under one step, a wrong window or position by several); the rows of
    blocks not yet closed are still empty."""
    nb = n_tokens // 4
    k8, ks = state.dense_keys(b, nb)
    e8, es = dsv4.quantize_int8_per_row(expected[:nb])
    assert (k8.int() - e8.int()).abs().max() <= 1, f"row {b}: k8 more than 1 off"
    torch.testing.assert_close(ks, es[:, 0], atol=0, rtol=1 / 128, msg=lambda m: f"row {b} key scale: {m}")
    dequant = k8.float() * ks[:, None]
    torch.testing.assert_close(dequant, expected[:nb].float(), atol=FLIP_ATOL + ks.max().item(), rtol=1 / 128)
    rest_k8, rest_ks = state.dense_keys(b, state.cache_rows)
    assert not rest_k8[nb:].any() and not rest_ks[nb:].any(), "rows of blocks not yet closed must stay empty"


def stack_states(states: list[dsv4.IndexerState]) -> dsv4.IndexerState:
    """One state whose slots are those of ``states`` in order (each keeps its pool blocks)."""
    offsets = torch.tensor([0, *[s.keys.shape[0] for s in states[:-1]]]).cumsum(0)
    tables = [
        torch.where(s.block_table >= 0, s.block_table + o, -1) for s, o in zip(states, offsets.tolist(), strict=True)
    ]
    fields = {
        name: torch.cat([getattr(s, name) for s in states]) for name in ("kv_state", "score_state", "keys", "key_scale")
    }
    return dsv4.IndexerState(**fields, block_table=torch.cat(tables).to(torch.int32))


def _check_ring(state: dsv4.IndexerState, b: int, x: torch.Tensor, w: dsv4.CompressorWeights, n: int) -> None:
    """After n tokens: slot ``q % 8`` holds position ``q`` for the last closed block and the open one
    (``q >= 4*(n//4) - 4``: what the next steps read); slots no position has reached are still empty."""
    kv = x[:n].float() @ w.wkv.float().T
    for q in range(max(0, 4 * (n // 4) - 4), n):
        torch.testing.assert_close(state.kv_state[b, q % 8], kv[q], rtol=1e-5, atol=1e-5)
    if n < 8:
        assert torch.isinf(state.score_state[b, n:]).all() and not state.kv_state[b, n:].any()


# Triton takes each prefill once, S=1, S=3 and S=2 from an odd and an even start (a block closes on a
# step's first / last token); the rest of its grid repeats those steps (`-m full`).
TRITON_STEPWISE = {(0, 1), (1, 2), (2, 2), (3, 3), (5, 3), (8, 2)}
STEPWISE = [
    pytest.param(backend, seq, prefill, id=f"{prefill}-{seq}-{backend}",
                 marks=FULL if backend == "triton" and (prefill, seq) not in TRITON_STEPWISE else ())
    for backend in BACKENDS for seq in (1, 2, 3) for prefill in (0, 1, 2, 3, 5, 8)
]  # fmt: skip


@pytest.mark.parametrize(("backend", "seq", "prefill"), STEPWISE)
def test_stepwise_equals_whole_sequence(backend: str, seq: int, prefill: int) -> None:
    """Prefill ``prefill`` tokens in one call, then steps of ``seq`` tokens: with seq=2 from an odd
    start a block closes on a step's first token, from an even start on its last; seq=3 mixes."""
    w, rope, x = _inputs(batch=1, seed=seq * 10 + prefill)
    expected = whole_sequence_cache(x[0], w, rope)
    state = dsv4.IndexerState.empty(CFG, 1, MAX_POS, device=DEVICE)
    p = 0
    if prefill:
        dsv4.indexer_compressor(x[:, :prefill].contiguous(), w, state, 0, rope, backend=backend)
        p = prefill
    while p + seq <= N_TOKENS:
        dsv4.indexer_compressor(x[:, p : p + seq].contiguous(), w, state, p, rope, backend=backend)
        p += seq
    _check_rows(state, 0, expected, p)
    _check_ring(state, 0, x[0], w, p)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_step_closing_many_blocks(backend: str) -> None:
    w, rope, x = _inputs(batch=1, seed=3)
    expected = whole_sequence_cache(x[0], w, rope)
    state = dsv4.IndexerState.empty(CFG, 1, MAX_POS, device=DEVICE)
    dsv4.indexer_compressor(x[:, :3].contiguous(), w, state, 0, rope, backend=backend)
    dsv4.indexer_compressor(
        x[:, 3:29].contiguous(), w, state, 3, rope, backend=backend
    )  # closes blocks 0..6 in one step
    _check_rows(state, 0, expected, 29)
    _check_ring(state, 0, x[0], w, 29)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_row_start_positions(backend: str) -> None:
    """Three sequences at different positions advance together with a ``start_pos`` tensor."""
    w, rope, x = _inputs(batch=3, seed=4)
    offsets = [0, 3, 6]
    rows = []
    for b, o in enumerate(offsets):  # bring each sequence to its own position first
        s = dsv4.IndexerState.empty(CFG, 1, MAX_POS, device=DEVICE)
        if o:
            dsv4.indexer_compressor(x[b : b + 1, :o].contiguous(), w, s, 0, rope, backend=backend)
        rows.append(s)
    state = stack_states(rows)
    seq = 2
    steps = 12 if backend == "reference" else 4  # Triton: each row still closes two blocks on the way
    for k in range(steps):
        start = torch.tensor([o + k * seq for o in offsets], device=DEVICE)
        xs = torch.stack([x[b, o + k * seq : o + (k + 1) * seq] for b, o in enumerate(offsets)])
        dsv4.indexer_compressor(xs, w, state, start, rope, backend=backend)
    for b, o in enumerate(offsets):
        n = o + steps * seq
        _check_rows(state, b, whole_sequence_cache(x[b], w, rope), n)
        _check_ring(state, b, x[b], w, n)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_rows_of_the_batch_change(backend: str) -> None:
    """A step over B rows leaves state rows >= B untouched, their pool blocks included."""
    w, rope, x = _inputs(batch=2, seed=5)
    state = dsv4.IndexerState.empty(CFG, 4, MAX_POS, device=DEVICE)
    others = state.block_table[2:].flatten().long()
    state.keys[others], state.key_scale[others] = 1, 1.0
    before = state.clone()
    dsv4.indexer_compressor(x[:, :8].contiguous(), w, state, 0, rope, backend=backend)
    for name in ("kv_state", "score_state", "block_table"):
        assert torch.equal(getattr(state, name)[2:], getattr(before, name)[2:]), name
    assert torch.equal(state.keys[others], before.keys[others])
    assert torch.equal(state.key_scale[others], before.key_scale[others])
    assert state.dense_keys(0, 2)[0].any() and state.dense_keys(1, 2)[0].any()


def _same_reads(a: dsv4.IndexerState, b: dsv4.IndexerState, n: int) -> tuple[bool, bool]:
    """Whether what later steps of a sequence at position ``n`` (slot 0) read agrees in ``a`` and ``b``:
    (its pool rows ``[0, n//4)`` within an ulp flip of the key, the ring slots of positions
    ``[max(0, 4*(n//4) - 4), n)`` within the spec's state tolerance). The projections of a token differ
    in the last bits between steps of other lengths (another GEMM shape); a wrong token is off by 0.1."""
    slots = [q % 8 for q in range(max(0, 4 * (n // 4) - 4), n)]
    (ka, sa), (kb, sb) = a.dense_keys(0, n // 4), b.dense_keys(0, n // 4)
    keys = torch.allclose(ka.float() * sa[:, None], kb.float() * sb[:, None], rtol=1 / 128, atol=FLIP_ATOL)
    ring = all(
        torch.allclose(x[0, slots], y[0, slots], rtol=1e-4, atol=1e-4)
        for x, y in ((a.kv_state, b.kv_state), (a.score_state, b.score_state))
    )
    return keys, ring


# (r, n1, m): run positions 0..n1-1, then re-run m new tokens from r. Spec §4: the re-run equals a
# fresh run iff r + k <= max(8, 4*(r//4) + 4) with k = n1 - r positions run since r.
RERUNS = {
    "one-draft-token": (3, 4, 1),  # the speculative-decoding case
    "from-2-after-8": (2, 8, 2),  # the deepest rollback into block 0
    "from-9-after-12-wrapped": (9, 12, 3),  # the first step (S=12) wraps the ring; block 1 intact
    "from-2-after-9-too-deep": (2, 9, 2),  # position 8 overwrote slot 0 (position 0, block 0 needs it)
    "from-9-after-13-too-deep": (9, 13, 3),  # position 12 overwrote slot 4 (block 1, block 2's close needs it)
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", RERUNS)
def test_rerun_from_an_earlier_position(backend: str, name: str) -> None:
    """A step re-run from an earlier position ``r`` (a rejected draft token) with other tokens equals a
    fresh run of the same tokens exactly when the spec's rule allows it, and differs when it does not
    (why engines refuse a deeper rollback)."""
    r, n1, m = RERUNS[name]
    w, rope, x = _inputs(batch=1, seed=6)
    xb = dsv4.synthetic_activations((1, m, CFG.hidden_size), seed=99, device=DEVICE)
    rerun = dsv4.IndexerState.empty(CFG, 1, MAX_POS, device=DEVICE)
    dsv4.indexer_compressor(x[:, :n1].contiguous(), w, rerun, 0, rope, backend=backend)
    dsv4.indexer_compressor(xb, w, rerun, r, rope, backend=backend)
    fresh = dsv4.IndexerState.empty(CFG, 1, MAX_POS, device=DEVICE)
    dsv4.indexer_compressor(torch.cat((x[:, :r], xb), dim=1), w, fresh, 0, rope, backend=backend)
    keys, ring = _same_reads(rerun, fresh, r + m)
    if r + (n1 - r) <= max(8, 4 * (r // 4) + 4):
        assert keys and ring
    else:
        assert not keys  # the re-run's close read a slot a later position had overwritten


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_0_never_reads_the_ring(backend: str) -> None:
    """A slot handed to a new sequence without a reset: whatever its ring holds (NaN kv, huge gates),
    the first blocks' keys are those of a fresh state; the ring reaches 8 positions and wraps within
    the step (S=9)."""
    w, rope, x = _inputs(batch=1, seed=7)
    fresh = dsv4.IndexerState.empty(CFG, 1, MAX_POS, device=DEVICE)
    garbage = fresh.clone()
    garbage.kv_state.fill_(float("nan"))
    garbage.score_state.fill_(1e30)
    for state in (fresh, garbage):
        dsv4.indexer_compressor(x[:, :9].contiguous(), w, state, 0, rope, backend=backend)
    k8, ks = garbage.dense_keys(0, 2)
    assert torch.equal(k8, fresh.dense_keys(0, 2)[0]) and torch.equal(ks, fresh.dense_keys(0, 2)[1])
    assert torch.equal(garbage.kv_state, fresh.kv_state) and torch.equal(garbage.score_state, fresh.score_state)
    _check_rows(fresh, 0, whole_sequence_cache(x[0], w, rope), 9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_very_large_activations_give_the_spec_keys(backend: str) -> None:
    """x = 1e30: the pooled keys' squares overflow fp32; the keys are still the spec's (float64 norm),
    not zeros."""
    w, rope, x = _inputs(batch=1, seed=8)
    x = (x[:, :12].float() * 1e30).to(torch.bfloat16)
    state = dsv4.IndexerState.empty(CFG, 1, MAX_POS, device=DEVICE)
    dsv4.indexer_compressor(x, w, state, 0, rope, backend=backend)
    assert state.dense_keys(0, 3)[0].any(dim=-1).all()
    _check_rows(state, 0, whole_sequence_cache(x[0], w, rope), 12)

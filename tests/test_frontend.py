"""``DecodeFrontEnd``: many steps with per-slot positions and mid-run resets equal a fresh recompute."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import dsv4
from conftest import BACKENDS, DEVICE
from dsv4.harness.golden import ratio_allclose, tolerance, topk_allclose
from frontends import last_score, tiny_frontend
from subprocesses import ROOT, run_python

CFG = dsv4.get_config("tiny")
SEQ = 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_steps_with_resets_equal_fresh_sequences(backend: str) -> None:
    """Three slots; slots 1 and 2 get new sequences mid-run, so positions differ per slot. Each slot's
    outputs equal a fresh one-slot module fed that slot's tokens since its (re)start.

    q and kv are checked over the whole run: a +-1 flip of one qr element (legal, spec §6) moves every
    q entry of its token, so the spec's 0.5% violation ratio is meant over many tokens, not two.
    """
    steps = 200 if backend == "reference" else 9  # Triton: each slot still closes a block after its reset
    resets = {1: steps // 3, 2: 2 * steps // 3}  # slot -> step at which a new sequence takes it
    max_position = 4 * (SEQ * steps // 4 + 1)
    batched = tiny_frontend(backend, 3, max_position)
    fresh = {b: tiny_frontend("reference", 1, max_position) for b in range(3)}
    g = torch.Generator().manual_seed(0)
    got_qkv: list[tuple[torch.Tensor, torch.Tensor]] = []
    want_qkv: list[tuple[torch.Tensor, torch.Tensor]] = []
    for step in range(steps):
        for slot, at in resets.items():
            if step == at:
                batched.reset([slot])
                fresh[slot] = tiny_frontend("reference", 1, max_position)
        x = torch.randn(3, SEQ, CFG.hidden_size, generator=g).to(torch.bfloat16).to(DEVICE)
        q, kv, topk = batched(x)
        since = [at if step >= at else 0 for at in (0, resets[1], resets[2])]
        assert batched.next_pos == [SEQ * (step - s + 1) for s in since]
        for b in range(3):
            fq, fkv, ftopk = fresh[b](x[b : b + 1].contiguous())
            got_qkv.append((q[b], kv[b]))
            want_qkv.append((fq[0], fkv[0]))
            check = topk_allclose(topk[b : b + 1], ftopk, last_score(fresh[b]), CFG.sliding_window)
            assert check, f"step {step} slot {b}: {check.detail}"
    for i, name in enumerate(("q", "kv")):
        t = tolerance(name)
        got = torch.stack([pair[i] for pair in got_qkv])
        want = torch.stack([pair[i] for pair in want_qkv])
        check = ratio_allclose(got, want, t.atol, t.rtol, t.max_error_ratio, name)
        assert check, f"{name}: {check.detail}"


def test_explicit_start_positions_and_reset_validation() -> None:
    m = tiny_frontend("reference", 2, 64)
    x = dsv4.synthetic_activations((2, SEQ, CFG.hidden_size), seed=1, device=DEVICE)
    m(x)  # both slots at 0
    m(x, start_pos=torch.tensor([2, 2]))
    assert m.next_pos == [4, 4]
    with pytest.raises(ValueError, match="batch_rows"):
        m.reset([2])
    before = m.state.clone()
    with pytest.raises(ValueError, match="start_pos"):
        m(x, start_pos=[64, 0])  # past the cache: refused before anything changes
    with pytest.raises(ValueError, match=r"^start_pos: expected 1 positions"):
        m(x[:1], start_pos=[4, 4])  # a position for a row the step does not have
    assert m.next_pos == [4, 4]
    assert all(torch.equal(a, b) for a, b in zip(m.state.tensors().values(), before.tensors().values(), strict=True))


@pytest.mark.parametrize("max_position", [64, 66, 67, 72])
def test_a_step_ending_one_past_max_position_is_refused_whatever_the_rope_covers(max_position: int) -> None:
    """A step's last token sits at ``start + S - 1``, so ``start + S <= max_position``, whatever more the
    RoPE table (128 rows) and the block table cover (at 72, two blocks of 16 rows: 128 positions): 4 tokens
    from ``max_position - 4`` run and 5 are refused naming ``start_pos``, changing nothing. At 66 and 67
    the one block's 16 rows hold every row of positions below 68, so the last positions run too."""
    weights = dsv4.synthetic_weights(CFG, seed=0, device=DEVICE)
    rope = dsv4.rope_table(CFG, "compressed", max_position=128, device=DEVICE)
    m = dsv4.DecodeFrontEnd(
        weights, rope, batch=1, max_position=max_position, topk=CFG.index_topk, offset=CFG.sliding_window,
        backend="reference", block_size=16,
    )  # fmt: skip
    start = max_position - 4
    m(dsv4.synthetic_activations((1, start, CFG.hidden_size), seed=1, device=DEVICE))
    state, blocks = m.state.clone(), [b[:] for b in m.slot_blocks]
    words = rf"start_pos: expected 1 positions in \[0, {max_position - 5}\] \(S=5, max_position={max_position}\)"
    with pytest.raises(ValueError, match=words):
        m(dsv4.synthetic_activations((1, 5, CFG.hidden_size), seed=2, device=DEVICE))
    assert m.next_pos == [start] and m.slot_blocks == blocks
    assert all(torch.equal(a, b) for a, b in zip(m.state.tensors().values(), state.tensors().values(), strict=True))
    m(dsv4.synthetic_activations((1, 4, CFG.hidden_size), seed=2, device=DEVICE))
    assert m.next_pos == [max_position]


@pytest.mark.parametrize("rows", [63, 64])
def test_a_rope_table_must_cover_max_position_to_its_last_row(rows: int) -> None:
    """Positions run to ``max_position - 1``, so the table needs ``max_position`` rows: one short is a
    ``ValueError`` naming ``rope`` when the module is built; exactly enough builds."""
    weights = dsv4.synthetic_weights(CFG, seed=0, device=DEVICE)
    rope = dsv4.rope_table(CFG, "compressed", max_position=rows, device=DEVICE)
    kw: dict[str, Any] = dict(batch=1, max_position=64, topk=CFG.index_topk, offset=CFG.sliding_window)
    if rows < 64:
        with pytest.raises(ValueError, match="rope: the table has 63 positions, max_position is 64"):
            dsv4.DecodeFrontEnd(weights, rope, backend="reference", **kw)
    else:
        assert dsv4.DecodeFrontEnd(weights, rope, backend="reference", **kw).max_position == 64


def test_a_start_later_than_the_slot_stands_is_refused() -> None:
    """A slot that stands at 2 after a reset and one step cannot start at 60: positions 2..59 never ran,
    and the pool blocks it would be given (freed by the reset, not cleared) hold the previous sequence's
    keys. Refused naming the slot and both positions, changing nothing; starting where it stands runs."""
    m = tiny_frontend("reference", 2, 128)
    m(dsv4.synthetic_activations((2, 64, CFG.hidden_size), seed=1, device=DEVICE))  # 16 keys in each slot's block
    m.reset([0])
    x = dsv4.synthetic_activations((2, SEQ, CFG.hidden_size), seed=5, device=DEVICE)
    m(x, start_pos=[0, 64])
    state, blocks, free = m.state.clone(), [b[:] for b in m.slot_blocks], m.free_blocks[:]
    with pytest.raises(
        ValueError, match=r"start_pos: slot 0 stands at position 2; a step cannot start at 60 \(later\)"
    ):
        m(x, start_pos=[60, 66])
    assert m.next_pos == [2, 66] and m.free_blocks == free and m.slot_blocks == blocks
    assert all(torch.equal(a, b) for a, b in zip(m.state.tensors().values(), state.tensors().values(), strict=True))
    m(x, start_pos=[2, 66])
    assert m.next_pos == [4, 68]


@pytest.mark.parametrize("backend", BACKENDS)
def test_rerun_from_an_earlier_position_equals_a_fresh_run(backend: str) -> None:
    """Speculative decoding: after 8 tokens, slot 0 goes back to position 2 with other tokens (the
    deepest rollback spec §4 allows there: r + k = 2 + 6 <= 8). Its scores and selection equal a fresh
    module's on the same tokens; the rolled-back positions are simply overwritten."""
    m = tiny_frontend(backend, 1, 64)
    x8 = dsv4.synthetic_activations((1, 8, CFG.hidden_size), seed=2, device=DEVICE)
    xb = dsv4.synthetic_activations((1, SEQ, CFG.hidden_size), seed=3, device=DEVICE)
    m(x8)
    _, _, topk = m(xb, start_pos=2)
    assert m.next_pos == [4]
    fresh = tiny_frontend(backend, 1, 64)
    _, _, ftopk = fresh(torch.cat((x8[:, :2], xb), dim=1))
    t = tolerance("score")
    check = ratio_allclose(last_score(m), last_score(fresh)[:, 2:], t.atol, t.rtol, 0.0, "score")
    assert check, check.detail
    assert torch.equal(topk, ftopk[:, 2:])


def test_module_moves_with_to_and_uses_its_buffers() -> None:
    m = tiny_frontend("reference", 2, 64)
    names = {n for n, _ in m.named_buffers()}
    assert {"attn_wq_a", "indexer_weights_proj", "compressor_norm_w", "keys", "block_table", "rope_cos"} <= names
    state = set(m.state.tensors())  # the sequences' state, which the host's allocator tracks: not in state_dict
    assert "block_table" in state and set(m.state_dict()) == names - state
    m.to(torch.device("cpu"))
    assert m.state.keys.data_ptr() == m.keys.data_ptr()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_cast_after_build_is_refused_before_anything_changes(backend: str) -> None:
    """The steps launch both ops unchecked, on buffers checked at build: after ``m.to(torch.bfloat16)`` (the
    fp32 scales and the indexer's rings cast too) the next call checks them again and refuses, naming
    the buffer, before any block is reserved; so does a step captured before the cast (the check comes
    before the graph is touched)."""
    from dsv4.engine.frontend import CapturedDecodeStep

    m = tiny_frontend(backend, 2, 64)
    m(dsv4.synthetic_activations((2, 6, CFG.hidden_size), seed=1, device=DEVICE))
    captured = CapturedDecodeStep(m, no_replay(m.static_step(batch=2, seq=2, max_cache_len=16)))
    m.to(torch.bfloat16)
    before = _allocator(m)
    x = dsv4.synthetic_activations((2, 2, CFG.hidden_size), seed=2, device=DEVICE)
    refused = r"DecodeFrontEnd: a buffer changed .*: w\.wq_b_scale: expected dtype float32"
    for _ in range(2):  # a retry is refused again: the buffers are still the cast ones
        with pytest.raises(TypeError, match=refused):
            m(x)
    with pytest.raises(ValueError, match="buffers changed since this step was captured"):
        captured(x)
    after = _allocator(m)
    assert after[:3] == before[:3] and torch.equal(after[3], before[3])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("replace", "words"),
    [
        ({"rope_cos": 32, "rope_sin": 32}, "rope_cos: the RoPE table has 32 positions, max_position is 64"),
        ({"keys": 1, "key_scale": 1}, r"key_scale: expected shape \[2, 16\]"),
        ({"block_table": 1}, r"block_table: expected shape \[2, 1\]"),
    ],
    ids=["rope", "pool", "block-table"],
)
def test_a_replaced_buffer_the_host_bookkeeping_no_longer_fits_is_refused(
    backend: str, replace: dict[str, int], words: str
) -> None:
    """A RoPE table replaced by one shorter than ``max_position`` (before, the step from 40 was accepted:
    on Triton it read past the table and gave other ``q``; on the reference an IndexError), a key pool
    of fewer blocks than the allocator hands out, a block table of other rows: refused on the next call,
    naming the buffer, before any block is reserved."""
    m = tiny_frontend(backend, 2, 64)
    m(dsv4.synthetic_activations((2, 40, CFG.hidden_size), seed=1, device=DEVICE))
    for name, rows in replace.items():
        setattr(m, name, getattr(m, name)[:rows].clone())
    before = _allocator(m)
    x = dsv4.synthetic_activations((2, 2, CFG.hidden_size), seed=2, device=DEVICE)
    with pytest.raises(ValueError, match="DecodeFrontEnd: a buffer changed .*: " + words):
        m(x)
    after = _allocator(m)
    assert after[:3] == before[:3] and torch.equal(after[3], before[3])


def test_a_backend_that_cannot_run_is_refused_when_the_module_is_built(monkeypatch) -> None:
    """The module resolves its ops' backends when it is built (and after its buffers change): one that
    cannot run on the device is named then, with the reason, not inside a step; ``auto`` takes the
    reference instead."""
    import dsv4.ops.backends as backends

    monkeypatch.setattr(backends, "unavailable_reason", lambda name, _: "no GPU here" if name == "triton" else None)
    with pytest.raises(ValueError, match="backend: 'triton' cannot run on .*: no GPU here"):
        tiny_frontend("triton", 2, 64)
    assert set(tiny_frontend("auto", 2, 64).op_backends.values()) == {"reference"}


@pytest.mark.parametrize(
    ("dims", "words"),
    [
        (
            {"hidden_size": 200},
            r"indexer on the 'triton' backend: w\.compressor\.wkv: .*hidden size D that is a multiple of 16",
        ),
        ({"head_dim": 192}, r"qkv_proj_rope on the 'triton' backend: w\.wkv: .*got HD=192, R=64"),
    ],
    ids=["d200", "hd192"],
)
def test_dims_the_triton_kernels_cannot_take_are_refused_when_the_module_is_built(
    dims: dict[str, int], words: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hidden size D that is not a multiple of 16 (the indexer's front launch steps over D in 16-wide
    K-slices), a head dim that is not a power of two (a qkv tile holds half a head) is refused when the
    module is built on Triton, naming the op and the weight, not on its first call; ``auto`` where it
    picks Triton refuses alike. On the reference it builds and runs."""
    cfg = CFG.replace(name="odd-dims", **dims)
    weights = dsv4.synthetic_weights(cfg, seed=0, device=DEVICE)
    rope = dsv4.rope_table(cfg, "compressed", max_position=64, device=DEVICE)

    def build(backend: str) -> dsv4.DecodeFrontEnd:
        return dsv4.DecodeFrontEnd(
            weights, rope, batch=1, max_position=64, topk=cfg.index_topk, offset=cfg.sliding_window,
            backend=backend, block_size=16,
        )  # fmt: skip

    with pytest.raises(ValueError, match="^" + words):  # the op's words first: not a change since the last check
        build("triton")
    import dsv4.engine.op_checks as op_checks

    with monkeypatch.context() as patch:  # auto as on a GPU: Triton for both ops
        patch.setattr(op_checks, "resolve", lambda backend, device: "triton")
        with pytest.raises(ValueError, match=words):
            build("auto")
    q, kv, topk = build("reference")(dsv4.synthetic_activations((1, SEQ, cfg.hidden_size), seed=1, device=DEVICE))
    assert q.shape[:2] == kv.shape[:2] == topk.shape[:2] == (1, SEQ) and bool(torch.isfinite(q).all())


def test_a_module_built_under_inference_mode_runs_outside_it() -> None:
    """Its pool and rings, made under ``torch.inference_mode``, are inference tensors, which torch lets be
    written in place only in that mode: called outside it, the module writes them in that mode and
    gives what a module built outside gives (before, the step raised after it had reserved blocks, and
    the release of those blocks raised too, so the allocator kept them)."""
    plain = tiny_frontend("reference", 2, 64)
    with torch.inference_mode():
        m = tiny_frontend("reference", 2, 64)
    for seed, s in ((1, 6), (2, 2)):
        x = dsv4.synthetic_activations((2, s, CFG.hidden_size), seed=seed, device=DEVICE)
        assert all(torch.equal(a, b) for a, b in zip(m(x), plain(x), strict=True))
        m.reset([0])
        plain.reset([0])
    assert _allocator(m)[:3] == _allocator(plain)[:3]
    assert all(torch.equal(v, dict(plain.named_buffers())[k]) for k, v in m.named_buffers())


def test_calls_inside_a_foreign_cuda_graph_capture_are_refused(monkeypatch) -> None:
    """``forward``, ``reset`` and the captured step refuse while the current CUDA stream is being captured
    by someone else (an engine capturing its whole model would replay their host side stale), before
    anything changes. (The capture is stood in for.)"""
    import dsv4.engine.op_checks as op_checks
    from dsv4.engine.frontend import CapturedDecodeStep

    m = tiny_frontend("reference", 2, 64)
    m(dsv4.synthetic_activations((2, 6, CFG.hidden_size), seed=1, device=DEVICE))
    captured = CapturedDecodeStep(m, no_replay(m.static_step(batch=2, seq=2, max_cache_len=16)))
    x = dsv4.synthetic_activations((2, 2, CFG.hidden_size), seed=2, device=DEVICE)
    before = _allocator(m)
    monkeypatch.setattr(op_checks, "capturing", lambda device: True)
    for call in (lambda: m(x), lambda: m.reset([0]), lambda: captured(x)):
        with pytest.raises(RuntimeError, match="being captured into a graph"):
            call()
    after = _allocator(m)
    assert after[:3] == before[:3] and torch.equal(after[3], before[3])


def test_torch_compile_of_a_model_runs_the_step_as_it_is() -> None:
    """Under a caller's ``torch.compile`` the step (host bookkeeping that changes every call) runs as it
    is: no graph is compiled for it, and the results are eager's."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    m, plain = tiny_frontend("reference", 2, 64), tiny_frontend("reference", 2, 64)
    compiled = torch.compile(m, backend="eager")
    for seed in range(4):
        x = dsv4.synthetic_activations((2, 2, CFG.hidden_size), seed=seed, device=DEVICE)
        assert all(torch.equal(a, b) for a, b in zip(compiled(x), plain(x), strict=True)), seed
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0


def test_decode_loop_example_runs() -> None:
    proc = run_python([str(ROOT / "examples" / "decode_loop.py"), "--steps", "3", "--prefill", "16"], timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    rows = [line.split() for line in lines[2:-1]]
    assert [r[:3] for r in rows] == [["0", "eager", "17"], ["1", "eager", "19"], ["2", "eager", "21"]]  # last tokens
    assert all(int(r[4]) == min(CFG.index_topk, (int(r[2]) + 1) // 4) for r in rows)  # k = min(topk, vis)
    assert lines[-1].startswith("median ms per step: eager")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_decode_loop_example_runs_the_backend_it_is_given(backend: str) -> None:
    """``--backend`` reaches the front end: the header names the backend each op ran on (``auto``, the
    default, is the reference on a CPU, so a ``--backend`` left behind ran the reference unseen)."""
    argv = ["--backend", backend, "--steps", "1", "--prefill", "4", "--batch", "1", "--device", "cpu"]
    proc = run_python([str(ROOT / "examples" / "decode_loop.py"), *argv], timeout=300)
    assert proc.returncode == 0, proc.stderr
    ops = ["qkv_proj_rope", "indexer"]
    assert f" backends={dict.fromkeys(ops, backend)} device=cpu " in proc.stdout.splitlines()[0]
    assert proc.stdout.splitlines()[2].split()[:3] == ["0", "eager", "5"]


def test_decode_loop_capture_without_a_gpu_is_a_usage_error() -> None:
    """``--capture`` needs a CUDA device: on the CPU the example says so as a usage error (exit 2) before
    it builds anything, not with a traceback from ``capture``."""
    proc = run_python([str(ROOT / "examples" / "decode_loop.py"), "--device", "cpu", "--capture"], timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "error: --capture: CUDA graphs need a CUDA device, --device is cpu" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("example", ["decode_loop.py", "attention_loop.py"])
@pytest.mark.parametrize(
    ("flag", "value"),
    [("--steps", "0"), ("--prefill", "-4"), ("--batch", "0"), ("--seq", "-1"), ("--device", "bogus")],
)
def test_loop_examples_refuse_bad_arguments_as_usage_errors(example: str, flag: str, value: str) -> None:
    """The examples' sizes and device are checked by argparse: exit 2 naming the option, before anything
    is built (``--steps 0`` was a ``statistics.StatisticsError`` traceback after the prefill, ``--prefill
    -4`` a torch ``RuntimeError``)."""
    proc = run_python([str(ROOT / "examples" / example), "--preset", "tiny", flag, value], timeout=300)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert f"error: argument {flag}: " in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize("example", ["decode_loop.py", "attention_loop.py"])
def test_loop_examples_refuse_positions_past_the_presets_limit(example: str) -> None:
    """A prompt and steps that would run past the preset's ``max_position_embeddings`` are a usage error
    (exit 2) before anything is built, as ``dsv4 run`` refuses them."""
    limit = dsv4.get_config("tiny").max_position_embeddings
    proc = run_python([str(ROOT / "examples" / example), "--preset", "tiny", "--prefill", str(limit - 1),
                       "--steps", "1", "--seq", "2"], timeout=300)  # fmt: skip
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert f"{limit + 1} positions, past tiny's max_position_embeddings {limit}" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_attention_loop_counts_every_back_to_back_run_in_its_room() -> None:
    """``--back-to-back`` runs the steps three times in each mode (the timed run, its warm-up and the
    per-step run): a prompt that leaves room for two is refused, before anything is built."""
    limit = dsv4.get_config("tiny").max_position_embeddings
    argv = ["--preset", "tiny", "--kind", "swa", "--prefill", str(limit - 5), "--steps", "1", "--seq", "2"]
    proc = run_python([str(ROOT / "examples" / "attention_loop.py"), *argv, "--back-to-back"], timeout=300)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert f"{limit + 1} positions, past tiny's max_position_embeddings {limit}" in proc.stderr


# --- rollback (spec §4 "Re-running positions") ----------------------------------------------------


def _spec_allows(r: int, current: int) -> bool:
    """The spec's words: a re-run from ``r`` of ``k = current - r`` positions equals a fresh run when
    ``r + k <= max(8, 4*(r//4) + 4)``."""
    k = current - r
    return r + k <= max(8, 4 * (r // 4) + 4)


def _allocator(m: dsv4.DecodeFrontEnd) -> tuple:
    return list(m.next_pos), list(m.free_blocks), [list(b) for b in m.slot_blocks], m.block_table.clone()


# (current position, r): allowed and refused on either side of the rule's edges
ROLLBACKS = [(8, 2), (8, 0), (8, 7), (12, 8), (12, 11), (16, 12), (9, 4), (9, 7), (13, 9), (16, 2), (70, 64), (70, 60)]


@pytest.mark.parametrize(("current", "r"), ROLLBACKS, ids=[f"{c}->{r}" for c, r in ROLLBACKS])
def test_rollback_is_refused_beyond_the_spec_rule(current: int, r: int) -> None:
    """Slot 0 runs to ``current``, then a step starts it again at ``r``: accepted exactly when the spec's
    rule holds; a refusal names start_pos, the slot, r, the current position and the rule, and changes
    nothing. An accepted rollback keeps the slot's blocks (its table is unchanged) and moves it to r + S."""
    m = tiny_frontend("reference", 2, 128)
    m(dsv4.synthetic_activations((1, current, CFG.hidden_size), seed=1, device=DEVICE))
    x = dsv4.synthetic_activations((1, 1, CFG.hidden_size), seed=2, device=DEVICE)
    before, state = _allocator(m), m.state.clone()
    if _spec_allows(r, current):
        m(x, start_pos=r)
        assert m.next_pos[0] == r + 1
        assert m.slot_blocks == before[2] and torch.equal(m.block_table, before[3])  # blocks kept
    else:
        with pytest.raises(ValueError) as info:
            m(x, start_pos=r)
        message = str(info.value)
        words = ("start_pos", "slot 0", f"position {current}", f"r={r}", f"k={current - r}", "max(8, 4*(r//4) + 4)")
        assert all(w in message for w in words), message
        after = _allocator(m)
        assert after[:3] == before[:3] and torch.equal(after[3], before[3])
        assert all(torch.equal(a, b) for a, b in zip(m.state.tensors().values(), state.tensors().values(), strict=True))


def test_rollback_keeps_the_allocator_consistent() -> None:
    """Rolled-back slots keep their blocks; going forward again reuses them, and reset frees them all."""
    m = tiny_frontend("reference", 2, 128)
    m(dsv4.synthetic_activations((2, 66, CFG.hidden_size), seed=1, device=DEVICE))  # 16 rows: one block each
    m(dsv4.synthetic_activations((2, 2, CFG.hidden_size), seed=2, device=DEVICE))  # row 16: the second block
    assert m.next_pos == [68, 68] and [len(b) for b in m.slot_blocks] == [2, 2]
    m(dsv4.synthetic_activations((2, 1, CFG.hidden_size), seed=3, device=DEVICE), start_pos=[65, 67])
    assert m.next_pos == [66, 68] and [len(b) for b in m.slot_blocks] == [2, 2]  # slot 0 keeps its 2nd block
    m(dsv4.synthetic_activations((2, 6, CFG.hidden_size), seed=4, device=DEVICE))
    assert m.next_pos == [72, 74] and [len(b) for b in m.slot_blocks] == [2, 2]
    held = sorted(b for blocks in m.slot_blocks for b in blocks)
    assert sorted(m.free_blocks + held) == list(range(m.keys.shape[0]))
    m.reset([0, 1])
    assert m.free_blocks == list(range(m.keys.shape[0])) and (m.block_table == -1).all()


@pytest.mark.parametrize(("pre", "s"), [(6, 3), (67, 2)])
def test_a_step_that_raises_after_the_indexer_ran_changes_what_a_retry_reads_not(
    pre: int, s: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An op raising after the indexer's compressor wrote its ring (out of memory in the scoring stage):
    the blocks go back, the slot stays where it stood and the ring is as before, so the step run again,
    and the next one, equal a module's that never failed. From 6 with 3 tokens position 8 overwrites ring
    slot 0, which the step from 6 reads; from 67 with 2, 67 and 68 cross a block (before, the run again
    gave other keys and scores)."""
    m, fresh = tiny_frontend("reference", 1, 128), tiny_frontend("reference", 1, 128)
    prompt = dsv4.synthetic_activations((1, pre, CFG.hidden_size), seed=1, device=DEVICE)
    m(prompt), fresh(prompt)
    before = (list(m.next_pos), [list(b) for b in m.slot_blocks], list(m.free_blocks), m.block_table.clone())
    rings = (m.kv_state.clone(), m.score_state.clone())
    launch = m._launch

    def fails_after_indexer(op: str, *args: Any, **kwargs: Any) -> Any:
        out = launch(op, *args, **kwargs)
        if op == "indexer":
            raise RuntimeError("out of memory")
        return out

    monkeypatch.setattr(m, "_launch", fails_after_indexer)
    x = dsv4.synthetic_activations((1, s, CFG.hidden_size), seed=2, device=DEVICE)
    with pytest.raises(RuntimeError, match="out of memory"):
        m(x)
    assert (list(m.next_pos), m.slot_blocks, m.free_blocks) == before[:3] and torch.equal(m.block_table, before[3])
    assert torch.equal(m.kv_state, rings[0]) and torch.equal(m.score_state, rings[1])
    monkeypatch.setattr(m, "_launch", launch)
    for step in (x, dsv4.synthetic_activations((1, 2, CFG.hidden_size), seed=3, device=DEVICE)):
        got, want = m(step), fresh(step)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        assert torch.equal(last_score(m), last_score(fresh))
        states = zip(m.state.tensors().values(), fresh.state.tensors().values(), strict=True)
        assert all(torch.equal(a, b) for a, b in states)


def test_a_step_past_the_free_blocks_is_refused_and_a_reset_makes_room() -> None:
    """Three pool blocks for two slots: a step that would need two more than the one free is refused
    with the count, changing nothing; after one slot is reset, the other's step gets its block."""
    weights = dsv4.synthetic_weights(CFG, seed=0, device=DEVICE)
    rope = dsv4.rope_table(CFG, "compressed", max_position=128, device=DEVICE)
    m = dsv4.DecodeFrontEnd(
        weights, rope, batch=2, max_position=128, topk=CFG.index_topk, offset=CFG.sliding_window,
        backend="reference", block_size=16, num_blocks=3,
    )  # fmt: skip
    m(dsv4.synthetic_activations((2, 64, CFG.hidden_size), seed=1, device=DEVICE))  # 16 rows: one block each
    m(dsv4.synthetic_activations((2, 2, CFG.hidden_size), seed=2, device=DEVICE))  # 66 // 4 rows: still one block
    assert m.slot_blocks == [[0], [1]] and m.free_blocks == [2]
    before = (list(m.next_pos), [list(b) for b in m.slot_blocks], list(m.free_blocks), m.block_table.clone())
    with pytest.raises(ValueError, match="needs 2 more pool blocks, 1 are free"):
        m(dsv4.synthetic_activations((2, 2, CFG.hidden_size), seed=3, device=DEVICE))  # row 16: a second block each
    assert (list(m.next_pos), m.slot_blocks, m.free_blocks) == before[:3] and torch.equal(m.block_table, before[3])
    m.reset([1])
    m(dsv4.synthetic_activations((1, 2, CFG.hidden_size), seed=3, device=DEVICE))
    assert m.next_pos == [68, 0] and m.slot_blocks == [[0, 1], []] and m.free_blocks == [2]
    assert m.block_table.cpu().tolist()[0][:2] == [0, 1]


@pytest.mark.parametrize("start_pos", [None, [0, 0, 0]], ids=["where-they-stand", "given"])
def test_a_host_step_of_more_slots_than_the_module_has_is_refused(start_pos: list[int] | None) -> None:
    """The host side a caller's loop drives itself (``check_starts``, ``step_starts``, as a static step's
    loop and ``benchmarks/host_step.py`` do): three slots on a module of two are refused naming the batch,
    before any block is reserved, whether the starts are given or taken from where the slots stand."""
    m = tiny_frontend("reference", 2, 128)
    m(dsv4.synthetic_activations((2, 6, CFG.hidden_size), seed=1, device=DEVICE))
    before = _allocator(m)
    for host_step in (m.check_starts, m.step_starts):
        with pytest.raises(ValueError, match=r"^b: batch 3 exceeds the module's 2 slots$"):
            host_step(3, 2, start_pos)
    after = _allocator(m)
    assert after[:3] == before[:3] and torch.equal(after[3], before[3])
    assert m.step_starts(2, 2, None) == [6, 6]


class _NoReplay:
    """A stand-in for ``DecodeGraph`` on the CPU: the checks of ``CapturedDecodeStep`` run before any replay."""

    def __init__(self, step: object) -> None:
        self.step = step

    def replay(self, x: torch.Tensor, start: object) -> None:
        raise AssertionError("a refused call must not replay the graph")


def no_replay(step: object) -> Any:
    """A ``_NoReplay`` of ``step``, in the place of the ``DecodeGraph`` that ``CapturedDecodeStep`` takes."""
    return _NoReplay(step)


@pytest.mark.parametrize("what", ["fp32", "wrong-shape", "deep-rollback", "past-max-cache-len"])
def test_captured_step_refuses_before_reserving(what: str) -> None:
    """``CapturedDecodeStep`` checks ``x`` and the positions (rollback rule included) before it reserves
    pool blocks: a refused call leaves positions, block table, free list and slots' blocks alone."""
    from dsv4.engine.frontend import CapturedDecodeStep

    m = tiny_frontend("reference", 2, 128)
    m(dsv4.synthetic_activations((2, 14, CFG.hidden_size), seed=1, device=DEVICE))
    step = CapturedDecodeStep(m, no_replay(m.static_step(batch=2, seq=2, max_cache_len=16)))
    x = dsv4.synthetic_activations((2, 2, CFG.hidden_size), seed=2, device=DEVICE)
    start = None
    if what == "fp32":
        x = x.float()
    elif what == "wrong-shape":
        x = x[:1].contiguous()
    elif what == "deep-rollback":
        start = [2, 14]
    else:
        start = [66, 66]  # would reserve each slot's second block: past the captured 16 rows
    before = _allocator(m)
    with pytest.raises(ValueError, match="start_pos" if start else "x"):
        step(x, start)
    after = _allocator(m)
    assert after[:3] == before[:3] and torch.equal(after[3], before[3])

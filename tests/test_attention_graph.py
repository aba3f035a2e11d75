"""``DecodeAttention.capture``: the whole attention step of a layer from static buffers (one CUDA graph
on a GPU) equals ``forward`` bit for bit, step after step, with the layer's state; bad calls change nothing."""

from __future__ import annotations

import copy

import pytest
import torch

import dsv4
from conftest import DEVICE
from dsv4.harness.golden import bit_identical
from dsv4.ops.backends import available_backends

CFG = dsv4.get_config("tiny")
LAYERS = {"swa": 0, "csa": 1, "hca": 2}
BS = 16
BACKEND = available_backends(DEVICE)[0]  # Triton where it runs (the interpreter on a CPU)


def layer(kind: str, backend: str = BACKEND, batch: int = 3, **kwargs) -> dsv4.DecodeAttention:
    n = LAYERS[kind]
    w = dsv4.synthetic_weights(CFG, seed=0, device=DEVICE, layer=n)
    rope = dsv4.layer_rope_table(CFG, n, 64, DEVICE)
    return dsv4.DecodeAttention(w, rope, CFG, batch=batch, max_position=64, backend=backend, block_size=BS, **kwargs)


def state(m: dsv4.DecodeAttention) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.named_buffers()}


def x_of(b: int, s: int, seed: int) -> torch.Tensor:
    return dsv4.synthetic_activations((b, s, CFG.hidden_size), seed=seed, device=DEVICE)


@pytest.mark.parametrize("kind", ["swa", "csa", "hca"])
def test_captured_steps_equal_forward_bit_for_bit(kind: str) -> None:
    """Slots prefilled to different lengths (one at a window-block edge), then MTP decode steps (S=2)
    across ratio and block boundaries, one of them re-running a rejected draft token: ``y`` and every
    buffer of the layer (pools, rings, block tables) equal ``forward``'s after each step."""
    eager = layer(kind)
    for i, (b, n) in enumerate([(3, 13), (2, 2)]):  # slots 0-1 reach 15 (a block edge - 1), slot 2 stays at 13
        eager(x_of(b, n, seed=i))
    static = copy.deepcopy(eager)  # the same state, block lists and positions
    graph = static.capture(seq=2)
    for i, start in enumerate([None, None, [18, 18, 17], None]):  # the third re-runs the last token of two slots
        x = x_of(3, 2, seed=10 + i)
        want = eager(x, start)
        got = graph(x, start)
        assert bit_identical(got, want), f"step {i}: y"
        assert eager.next_pos == static.next_pos
        for name, t in state(eager).items():
            assert bit_identical(state(static)[name], t), f"step {i}: {name}"


def test_activations_written_into_the_graph_input_need_no_copy() -> None:
    """A caller may write a step's ``xn`` into ``graph.xn`` and pass that buffer: the same ``y`` and
    state as passing its own tensor."""
    a = layer("csa", backend="reference", batch=2)
    b = copy.deepcopy(a)
    ga, gb = a.capture(seq=2), b.capture(seq=2)
    for i in range(3):
        x = x_of(2, 2, seed=40 + i)
        want = ga(x).clone()
        gb.xn.copy_(x)
        assert bit_identical(gb(gb.xn), want), f"step {i}"
    assert a.next_pos == b.next_pos
    for name, t in state(a).items():
        assert bit_identical(state(b)[name], t), name


def test_a_refused_call_changes_nothing() -> None:
    """A wrong shape or dtype, a start past the slot's position or a ``seq`` longer than the layer's
    ``prefill_chunk`` raises naming the argument, state untouched."""
    # a CUDA graph needs every op on Triton; the refusals come before any op runs, so a CPU takes the
    # reference (seconds faster than the interpreter)
    m = layer("csa", backend=BACKEND if DEVICE.type == "cuda" else "reference", prefill_chunk=8)
    m(x_of(3, 4, seed=0))
    graph = m.capture(seq=2)
    before, pos = state(m), list(m.next_pos)
    with pytest.raises(ValueError, match="xn"):
        graph(x_of(3, 1, seed=1))
    with pytest.raises(ValueError, match="xn"):  # bf16 only: fp32 activations are not rounded silently
        graph(x_of(3, 2, seed=1).float())
    with pytest.raises(ValueError, match="start_pos"):
        graph(x_of(3, 2, seed=1), start_pos=[9, 4, 4])
    with pytest.raises(ValueError, match="seq"):
        m.capture(seq=0)
    with pytest.raises(ValueError, match=r"^seq: at most the layer's prefill_chunk \(8\), got 9$"):
        m.capture(seq=9)
    assert m.capture(seq=8).seq == 8  # a step as long as the layer's longest
    assert m.next_pos == pos
    for name, t in state(m).items():
        assert bit_identical(t, before[name]), name


def test_the_last_step_the_layer_allows_runs_captured() -> None:
    """The captured step reaches the last positions ``max_position`` allows (62 and 63 of 64: the CSA
    indexer pool's 16 rows, all of them then), equal to ``forward``; one step more is refused naming
    ``start_pos`` with nothing changed. Its own bound on the indexer's rows must not be one short."""
    backend = BACKEND if DEVICE.type == "cuda" else "reference"  # the bounds are the host's: no kernel needed
    eager = layer("csa", backend=backend, batch=1)
    eager(x_of(1, 62, seed=50))
    static = copy.deepcopy(eager)
    graph = static.capture(seq=2)
    x = x_of(1, 2, seed=51)
    assert bit_identical(graph(x), eager(x)), "y"
    assert static.next_pos == eager.next_pos == [64]
    before = state(static)
    with pytest.raises(ValueError, match="start_pos"):
        graph(x)
    assert static.next_pos == [64]
    for name, t in state(static).items():
        assert bit_identical(t, before[name]), name


def test_calls_inside_a_foreign_cuda_graph_capture_are_refused(monkeypatch) -> None:
    """An engine that captures its whole model would freeze a call's host side (positions, blocks, table
    entries copied from pinned host memory) into its graph, and replay it stale: ``forward``, ``reset``
    and the captured step refuse while the current CUDA stream is capturing, before anything changes.
    (The capture is stood in for here; on a GPU the next test captures for real.)"""
    import dsv4.engine.op_checks as op_checks

    m = layer("csa")
    m(x_of(3, 3, seed=0))
    graph = m.capture(seq=2)
    before, pos = state(m), list(m.next_pos)
    monkeypatch.setattr(op_checks, "capturing", lambda device: True)
    for call in (lambda: m(x_of(3, 2, seed=1)), lambda: m.reset([0]), lambda: graph(x_of(3, 2, seed=1))):
        with pytest.raises(RuntimeError, match="being captured into a graph.*capture\\(seq\\)"):
            call()
    assert m.next_pos == pos
    for name, t in state(m).items():
        assert bit_identical(t, before[name]), name


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graph capture needs a GPU: not run on this machine")
def test_forward_inside_a_real_foreign_capture_is_refused() -> None:
    m = layer("csa")
    m(x_of(3, 3, seed=0))
    x, g, stream = x_of(3, 2, seed=1), torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with (
        torch.cuda.stream(stream),
        pytest.raises(RuntimeError, match="being captured into a graph"),
        torch.cuda.graph(g),
    ):
        m(x)
    torch.cuda.current_stream().wait_stream(stream)
    assert m.next_pos == [3, 3, 3]


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graph capture needs a GPU: not run on this machine")
def test_cuda_graph_replay_allocates_nothing_and_never_syncs() -> None:
    m = layer("csa")
    m(x_of(3, 4, seed=0))
    graph = m.capture(seq=2)
    graph(x_of(3, 2, seed=1))
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_stats()["allocation.all.allocated"]
    torch.cuda.set_sync_debug_mode("error")
    assert graph.graph is not None
    try:
        for _ in range(3):
            graph.graph.replay()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == allocated

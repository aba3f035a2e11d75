"""The capturable decode step: static buffers, no allocation, no host sync, same results as eager.

On the CPU the step's launches run through Triton's interpreter and are watched at the ATen level;
on a GPU the same step is also captured as a CUDA graph and replayed.
"""

from __future__ import annotations

import dataclasses
import gc
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import dsv4
from conftest import DEVICE
from dsv4.engine.decode_graph import StaticDecodeStep
from frontends import last_score, tiny_frontend

CFG = dsv4.get_config("tiny")
HOST_SYNCS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default}


def _live_storages() -> set[int]:
    """Storage addresses of every tensor alive now (tensors without data, such as the fake tensors
    torch.compile leaves behind, and dead weak proxies are skipped)."""
    live = set()
    # walking every object touches deprecated module proxies and fake tensors, which warn
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor):
                    live.add(obj.untyped_storage().data_ptr())
            except (RuntimeError, ReferenceError):
                continue
    return live


class AllocationAndSyncWatch(TorchDispatchMode):
    """Records every ATen op that creates a tensor with new storage, or reads a device value on the host."""

    def __init__(self) -> None:
        super().__init__()
        self.live = _live_storages()
        self.allocations: list[str] = []
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_SYNCS:
            self.syncs.append(str(func))
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() and t.untyped_storage().data_ptr() not in self.live:
                self.allocations.append(str(func))
        return out


def test_watch_catches_allocations_and_syncs() -> None:
    x = torch.ones(4)
    with AllocationAndSyncWatch() as watch:
        x.add_(1)  # in place: fine
        y = x * 2  # a new tensor
        int(y.sum())  # reads a value on the host
    assert watch.allocations and watch.syncs == [str(torch.ops.aten._local_scalar_dense.default)]


def test_static_step_allocates_nothing_and_matches_eager() -> None:
    """Steps after a prefill, slots at different positions: slots 0 and 2 (at 5) close a block on a
    step's first token (position 7), slot 1 (reset to 0) on a step's last token (position 3)."""
    static_fe, eager_fe = tiny_frontend("triton"), tiny_frontend("triton")
    prompt = dsv4.synthetic_activations((3, 5, CFG.hidden_size), seed=1, device=DEVICE)
    static_fe(prompt)
    eager_fe(prompt)
    static_fe.reset([1])
    eager_fe.reset([1])  # slot 1 restarts at 0: slots at different positions
    step = static_fe.static_step(batch=3, seq=2, max_cache_len=32)
    step.warm_up()
    for i in range(2):
        x = dsv4.synthetic_activations((3, 2, CFG.hidden_size), seed=10 + i, device=DEVICE)
        start = static_fe.step_starts(3, 2, None)
        step.set_inputs(x, start)
        with AllocationAndSyncWatch() as watch:
            step.launch()
        assert not watch.allocations, f"step {i} allocated: {watch.allocations}"
        assert not watch.syncs, f"step {i} synced: {watch.syncs}"
        static_fe.advance(start, 2)
        q, kv, topk = step.results()
        eq, ekv, etopk = eager_fe(x)
        assert torch.equal(q, eq) and torch.equal(kv, ekv) and torch.equal(topk, etopk), f"step {i}"
        n = last_score(eager_fe).shape[-1]
        assert torch.equal(step.out.score[..., :n], last_score(eager_fe))
        assert (step.out.score[..., n:] == torch.finfo(torch.float32).min).all()
    for name, t in static_fe.state.tensors().items():
        assert torch.equal(t, getattr(eager_fe.state, name)), name


def test_a_static_step_whose_last_row_fills_max_cache_len_matches_eager() -> None:
    """At ``max_cache_len=4`` a slot at 17 takes positions 17, 18: 4 visible rows, every score column
    filled, none past them; the step equals the eager module's."""
    static_fe, eager_fe = tiny_frontend("triton", batch=1), tiny_frontend("triton", batch=1)
    prompt = dsv4.synthetic_activations((1, 17, CFG.hidden_size), seed=1, device=DEVICE)
    static_fe(prompt)
    eager_fe(prompt)
    step = static_fe.static_step(batch=1, seq=2, max_cache_len=4)
    x = dsv4.synthetic_activations((1, 2, CFG.hidden_size), seed=2, device=DEVICE)
    step.set_inputs(x, [17])
    step.launch()
    q, kv, topk = step.results()
    eq, ekv, etopk = eager_fe(x)
    assert torch.equal(q, eq) and torch.equal(kv, ekv) and torch.equal(topk, etopk)
    assert torch.equal(step.out.score, last_score(eager_fe))


def test_static_step_checks_its_inputs() -> None:
    fe = tiny_frontend("triton", batch=2, max_position=64)
    step = fe.static_step(batch=2, seq=2, max_cache_len=4)
    with pytest.raises(ValueError, match="x: expected"):
        step.set_inputs(torch.zeros(1, 2, CFG.hidden_size, dtype=torch.bfloat16, device=DEVICE), [0, 0])
    step.set_inputs(torch.zeros(2, 2, CFG.hidden_size, dtype=torch.bfloat16, device=DEVICE), [17, 0])  # the last
    for start in ([18, 0], [0, 18]):  # one more: positions 18, 19 close row 4, past the 4 columns, in either slot
        with pytest.raises(ValueError, match="start_pos: .* leaves 5 cache rows, past max_cache_len=4"):
            step.set_inputs(torch.zeros(2, 2, CFG.hidden_size, dtype=torch.bfloat16, device=DEVICE), start)
    assert tuple(step.out.score.shape) == (2, 2, 4)  # [batch, seq, max_cache_len], not the cache's 16 rows
    with pytest.raises(ValueError, match="max_cache_len"):
        fe.static_step(batch=2, seq=2, max_cache_len=17)


@pytest.mark.parametrize(
    ("what", "words"),
    [("gamma_cq", r"w\.gamma_cq: expected shape"), ("topk", "topk"), ("norm_w", r"w\.compressor\.norm_w")],
)
def test_static_step_checks_its_operands_once(what: str, words: str) -> None:
    """The static launches skip the ops' checks, so the step runs them when it is built (a one-token
    step at position 0): a weight of the wrong shape, a bad ``topk``, is named then."""
    fe = tiny_frontend("triton", batch=2, max_position=64)
    attn, indexer, topk = fe.attn, fe.indexer_weights, fe.topk
    if what == "gamma_cq":
        attn = dataclasses.replace(attn, gamma_cq=attn.gamma_cq[:-1].contiguous())
    elif what == "topk":
        topk = 0
    else:
        comp = dataclasses.replace(indexer.compressor, norm_w=indexer.compressor.norm_w[:-1].contiguous())
        indexer = dataclasses.replace(indexer, compressor=comp)
    with pytest.raises(ValueError, match=words):
        StaticDecodeStep(attn, indexer, fe.rope, fe.state, batch=2, seq=2, topk=topk, offset=fe.offset, eps=fe.eps)


def test_capture_needs_cuda_or_says_why() -> None:
    fe = tiny_frontend("reference")
    if DEVICE.type == "cuda":
        with pytest.raises(ValueError, match="Triton backend"):
            fe.capture()
    else:
        with pytest.raises(ValueError, match="CUDA device"):
            fe.capture()


# CUDA graphs exist only on a CUDA device; without one the capture/replay test cannot run, and the
# skip says so in the test report (the static step above is what gets captured, and runs everywhere).
@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graph capture needs a GPU: not run on this machine")
def test_cuda_graph_replay_matches_eager_without_allocating() -> None:
    graph_fe, eager_fe = tiny_frontend("triton"), tiny_frontend("triton")
    prompt = dsv4.synthetic_activations((3, 7, CFG.hidden_size), seed=1, device=DEVICE)
    graph_fe(prompt)
    eager_fe(prompt)
    graph = graph_fe.capture(seq=2, max_cache_len=32)
    xs = [dsv4.synthetic_activations((3, 2, CFG.hidden_size), seed=10 + i, device=DEVICE) for i in range(6)]
    for i, x in enumerate(xs):
        torch.cuda.synchronize()
        allocated = torch.cuda.memory_stats()["allocation.all.allocated"]
        torch.cuda.set_sync_debug_mode("error")  # any host sync inside the step raises
        try:
            q, kv, topk = graph(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        assert torch.cuda.memory_stats()["allocation.all.allocated"] == allocated, f"step {i} allocated"
        eq, ekv, etopk = eager_fe(x)
        assert torch.equal(q, eq) and torch.equal(kv, ekv) and torch.equal(topk, etopk), f"step {i}"
        if i == 2:  # refused calls between replays change nothing (x checked, rollback rule) before reserving
            allocator = (list(graph_fe.next_pos), list(graph_fe.free_blocks), [list(b) for b in graph_fe.slot_blocks])
            with pytest.raises(ValueError, match="x: expected"):
                graph(x.float())
            with pytest.raises(ValueError, match="start_pos: slot 0"):
                graph(x, start_pos=[0, 0, 0])
            assert (list(graph_fe.next_pos), list(graph_fe.free_blocks), graph_fe.slot_blocks) == allocator
    for name, t in graph_fe.state.tensors().items():
        assert torch.equal(t, getattr(eager_fe.state, name)), name


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graph capture needs a GPU: not run on this machine")
def test_a_step_captured_under_inference_mode_replays_outside_it() -> None:
    """The captured step's static buffers, made under ``torch.inference_mode``, are inference tensors:
    called outside that mode the step writes them in it, and equals the eager module."""
    graph_fe, eager_fe = tiny_frontend("triton"), tiny_frontend("triton")
    prompt = dsv4.synthetic_activations((3, 7, CFG.hidden_size), seed=1, device=DEVICE)
    graph_fe(prompt)
    eager_fe(prompt)
    with torch.inference_mode():
        graph = graph_fe.capture(seq=2, max_cache_len=32)
    for i in range(3):
        x = dsv4.synthetic_activations((3, 2, CFG.hidden_size), seed=20 + i, device=DEVICE)
        assert all(torch.equal(a, b) for a, b in zip(graph(x), eager_fe(x), strict=True)), f"step {i}"

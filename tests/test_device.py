"""Kernels launch on their tensors' device: Triton launches on the current CUDA device, so every entry
that launches kernels (the public ops, the static decode step, the captured attention step) runs them
with the tensors' device made current (``dsv4.ops.device.on_device``)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import dsv4
from conftest import DEVICE
from dsv4.engine import attention_graph, decode_graph
from dsv4.harness.cases import make_case, run_case
from dsv4.harness.golden import bit_identical
from dsv4.ops import api
from dsv4.ops.device import on_device
from dsv4.ops.registry import op_names
from dsv4.ops.validate import same_device
from frontends import tiny_frontend

CFG = dsv4.get_config("tiny")


class Guard:
    """A stand-in for ``on_device``: records each device it is entered for and whether it is active."""

    def __init__(self) -> None:
        self.devices: list[torch.device] = []
        self.active = 0

    @contextlib.contextmanager
    def __call__(self, device: torch.device | str) -> Iterator[None]:
        self.devices.append(torch.device(device))
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1

    def inside(self, fn: Callable[..., Any], calls: list[bool]) -> Callable[..., Any]:
        """``fn``, noting in ``calls`` whether each call came while the guard was active."""

        def run(*args: Any, **kwargs: Any) -> Any:
            calls.append(self.active > 0)
            return fn(*args, **kwargs)

        return run


def test_on_device_makes_an_indexed_gpu_current() -> None:
    assert isinstance(on_device("cpu"), contextlib.nullcontext)
    assert isinstance(on_device("cuda"), contextlib.nullcontext)  # no index: the current device already
    guard = on_device(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    with on_device("cpu"):  # enters and leaves without touching CUDA
        pass


def test_every_op_runs_inside_its_tensors_device(monkeypatch: pytest.MonkeyPatch) -> None:
    guard = Guard()
    calls: list[bool] = []
    resolve = api.implementation
    monkeypatch.setattr(api, "on_device", guard)
    monkeypatch.setattr(api, "implementation", lambda *a: guard.inside(resolve(*a), calls))
    names = op_names()
    for op in names:
        run_case(make_case(CFG, op, device=DEVICE), "reference")
    assert len(guard.devices) == len(names) and all(same_device(d, DEVICE) for d in guard.devices)
    assert calls == [True] * len(names)


def test_the_static_decode_step_launches_inside_its_device(monkeypatch: pytest.MonkeyPatch) -> None:
    guard = Guard()
    calls: list[bool] = []
    monkeypatch.setattr(decode_graph, "on_device", guard)
    step = tiny_frontend("triton").static_step(batch=3, seq=2, max_cache_len=32)
    stubs = SimpleNamespace(
        qkv_proj_rope=guard.inside(lambda *a, **k: None, calls), indexer=guard.inside(lambda *a, **k: None, calls)
    )
    monkeypatch.setattr(step, "kernels", stubs)
    step.launch()
    assert guard.devices == [step.x.device] and calls == [True, True]


def test_the_attention_step_launches_inside_its_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the reference (a CPU has no graph to capture): every bound launch runs inside the guard, and the
    step still equals ``forward``."""
    guard = Guard()
    calls: list[bool] = []
    monkeypatch.setattr(attention_graph, "on_device", guard)
    w = dsv4.synthetic_weights(CFG, seed=0, device="cpu", layer=1)
    rope = dsv4.layer_rope_table(CFG, 1, 64, "cpu")
    eager = dsv4.DecodeAttention(w, rope, CFG, batch=2, max_position=64, backend="reference", block_size=16)
    static = copy.deepcopy(eager)
    graph = static.capture(seq=2)
    graph.launches = [(guard.inside(fn, calls), args, kwargs) for fn, args, kwargs in graph.launches]
    x = dsv4.synthetic_activations((2, 2, CFG.hidden_size), seed=3, device="cpu")
    assert bit_identical(graph(x), eager(x))
    assert guard.devices == [torch.device("cpu")] and calls == [True] * len(graph.launches)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_an_op_on_the_second_gpu_while_the_first_is_current() -> None:
    """Tensors on cuda:1, cuda:0 current: the same bits as on cuda:0, and cuda:0 stays current."""
    case = make_case(CFG, "qkv_proj_rope", device="cuda:0")
    far = make_case(CFG, "qkv_proj_rope", device="cuda:1")
    torch.cuda.set_device(0)
    want = run_case(case, "triton")
    got = run_case(far, "triton")
    assert torch.cuda.current_device() == 0
    for name, t in want.items():
        assert got[name].device == torch.device("cuda", 1) and torch.equal(got[name].cpu(), t.cpu()), name


def test_two_gpus_of_one_type_are_two_devices() -> None:
    """``same_device`` compares the index too: ``cuda:1`` is not ``cuda:0`` (no GPU needed: both named)."""
    assert not same_device("cuda:0", "cuda:1")
    assert same_device("cuda:1", torch.device("cuda", 1))
    assert same_device("cpu", torch.device("cpu"))

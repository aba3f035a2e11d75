"""Bad input (spec §7): a clear error naming the argument, raised before anything changes."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch

import dsv4
from conftest import BACKENDS, DEVICE
from device_assert import assert_stops_on_device
from dsv4.harness.cases import Case, make_case
from dsv4.ops import backends

CFG = dsv4.get_config("tiny")


def _case(op: str) -> Case:
    return make_case(CFG, op, "decode", seed=0, device=DEVICE, max_position=64, batch=2, seq=2)


def _set(args: dict, path: str, value) -> None:
    """Replace ``args[path]``; ``w.wq_a`` style paths reach into the weights (copied, not mutated)."""
    head, _, rest = path.partition(".")
    if not rest:
        args[head] = value
        return
    obj = args[head]
    parts = rest.split(".")
    if len(parts) == 2:  # w.compressor.wkv
        inner = dataclasses.replace(getattr(obj, parts[0]), **{parts[1]: value})
        args[head] = dataclasses.replace(obj, **{parts[0]: inner})
    else:
        args[head] = dataclasses.replace(obj, **{parts[0]: value})


def _get(args: dict, path: str):
    obj = args
    for i, part in enumerate(path.split(".")):
        obj = obj[part] if i == 0 else getattr(obj, part)
    return obj


def _meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, device="meta")


def _noncontig(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(0, 1).contiguous().transpose(0, 1) if t.dim() >= 2 and t.shape[0] > 1 else t[..., ::1]


def _values(breaker: Any) -> Callable:
    """Marks a breaker that keeps dtypes and shapes and changes only values: on a GPU that is caught
    on the device (``device_assert``), elsewhere by a ``ValueError`` before anything runs."""
    breaker.checked_on_device = True
    return breaker


# (op, argument path, how to break it, error type, words the message must contain)
BAD: list[tuple[str, str, Callable, type, tuple[str, ...]]] = [
    ("qkv_proj_rope", "x", lambda t: t.float(), TypeError, ("x:", "bfloat16", "float32")),
    ("qkv_proj_rope", "x", lambda t: t[:, :-8].contiguous(), ValueError, ("w.wkv", "shape")),
    ("qkv_proj_rope", "x", _noncontig, ValueError, ("x:", "contiguous")),
    ("qkv_proj_rope", "w.wq_a", lambda t: t.float(), TypeError, ("w.wq_a",)),
    ("qkv_proj_rope", "w.wq_b", lambda t: t[:-3].contiguous(), ValueError, ("w.wq_b",)),
    ("qkv_proj_rope", "w.wq_b_scale", lambda t: t[:-1].contiguous(), ValueError, ("w.wq_b_scale", "shape")),
    ("qkv_proj_rope", "w.gamma_ckv", _meta, ValueError, ("w.gamma_ckv", "device", "meta")),
    ("qkv_proj_rope", "positions", lambda t: t.float(), TypeError, ("positions",)),
    ("qkv_proj_rope", "positions", lambda t: t[:-1].contiguous(), ValueError, ("positions", "shape")),
    ("qkv_proj_rope", "positions", _values(lambda t: t + 64), ValueError, ("positions", "rope table")),
    ("qkv_proj_rope", "positions", _values(lambda t: t - 1000), ValueError, ("positions",)),
    ("qkv_proj_rope", "rope", lambda r: dsv4.RopeTable(r.cos[:, :8], r.sin[:, :8]), ValueError, ("rope",)),
    ("qkv_proj_rope", "rope", lambda r: dsv4.RopeTable(r.cos.double(), r.sin.double()), TypeError, ("rope.cos",)),
    ("qkv_proj_rope", "w", lambda w: "weights", TypeError, ("w:", "AttnWeights")),
    ("indexer_compressor", "x", lambda t: t[:, :, :-1].contiguous(), ValueError, ("w.wkv", "shape")),
    ("indexer_compressor", "x", lambda t: torch.cat([t, t, t]), ValueError, ("batch", "state")),
    ("indexer_compressor", "start_pos", _values(lambda t: t + 256), ValueError, ("start_pos", "cache rows")),
    ("indexer_compressor", "start_pos", lambda t: t[:1].contiguous(), ValueError, ("start_pos", "shape")),
    ("indexer_compressor", "start_pos", lambda t: t.float(), TypeError, ("start_pos",)),
    ("indexer_compressor", "start_pos", lambda t: -1, ValueError, ("start_pos", ">= 0")),
    ("indexer_compressor", "start_pos", lambda t: 1.5, TypeError, ("start_pos", "int")),
    ("indexer_compressor", "w.ape", lambda t: t[:3].contiguous(), ValueError, ("w.ape", "shape")),
    ("indexer_compressor", "w.norm_w", lambda t: t[:96].contiguous(), ValueError, ("w.norm_w", "power of two")),
    ("indexer_compressor", "state.kv_state", lambda t: t.double(), TypeError, ("state.kv_state",)),
    ("indexer_compressor", "state.keys", _meta, ValueError, ("state.keys", "device")),
    ("indexer_compressor", "state.keys", lambda t: t.float(), TypeError, ("state.keys", "int8")),
    ("indexer_compressor", "state.keys", lambda t: t[:, :12].contiguous(), ValueError, ("state.keys", "power of two")),
    ("indexer_compressor", "state.key_scale", lambda t: t[:, :-1].contiguous(), ValueError, ("state.key_scale",)),
    ("indexer_compressor", "state.block_table", lambda t: t.long(), TypeError, ("state.block_table", "int32")),
    ("indexer_compressor", "state.block_table", _values(lambda t: t[:, :0] + 0), ValueError, ("start_pos", "block")),
    ("indexer_compressor", "state.block_table", _values(lambda t: t + 1000), ValueError, ("state.block_table", "pool")),
    ("indexer", "state.block_table", _values(lambda t: t * 0 - 1), ValueError, ("state.block_table", "needs")),
    ("indexer_compressor", "state.score_state", lambda t: t[:1].contiguous(), ValueError, ("state.score_state",)),
    ("indexer", "qr", lambda t: t.float(), TypeError, ("qr:", "int8")),
    ("indexer", "qr", lambda t: t[:-1].contiguous(), ValueError, ("qr:", "shape")),
    ("indexer", "qr_scale", lambda t: t.view(-1).contiguous(), ValueError, ("qr_scale", "shape")),
    ("indexer", "w.wq_b", lambda t: t[:, :-2].contiguous(), ValueError, ("w.wq_b", "shape")),
    ("indexer", "w.weights_proj", lambda t: t.float(), TypeError, ("w.weights_proj",)),
    ("indexer", "w.compressor.wgate", lambda t: t[:-1].contiguous(), ValueError, ("w.compressor.wgate",)),
    ("indexer", "topk", lambda k: 0, ValueError, ("topk",)),
    ("indexer", "offset", lambda k: "128", TypeError, ("offset",)),
    # read on the host even from a GPU: without out=, the score width depends on start_pos
    ("indexer", "start_pos", lambda t: t + 62, ValueError, ("start_pos", "rope table")),
    ("qkv_proj_rope", "x", lambda t: t[:0], ValueError, ("x:", "T >= 1")),
    ("indexer_compressor", "x", lambda t: t[:, :0], ValueError, ("x:", "S >= 1")),
    # a start_pos on a device that is neither x's nor the host (meta stands in for another GPU)
    ("indexer_compressor", "start_pos", _meta, ValueError, ("start_pos", "meta")),
    # w.wq_b and its scale agree, but their rows are no whole number of heads of w.wkv's head dim
    ("qkv_proj_rope", "w", lambda w: _rows_cut(w, 3), ValueError, ("w.wq_b:", "H*", "head dim from w.wkv")),
    # a RoPE table of rope dim R wider than the head dim: 3 times this one's
    (
        "qkv_proj_rope",
        "rope",
        lambda r: dsv4.RopeTable(r.cos.repeat(1, 3), r.sin.repeat(1, 3)),
        ValueError,
        ("rope:", "exceeds head dim"),
    ),
    # one batch row more than the state holds (the state's batch is 2)
    ("indexer_compressor", "x", lambda t: torch.cat([t, t[:1]]), ValueError, ("x:", "batch 3", "state")),
    # a power of two, but below the 16 rows a pool block needs
    (
        "indexer_compressor",
        "state.keys",
        lambda t: t[:, :8].contiguous(),
        ValueError,
        ("state.keys", "power of two >= 16", "got 8"),
    ),
    # a RoPE table of no positions, and one of no rotated pairs
    (
        "qkv_proj_rope",
        "rope",
        lambda r: dsv4.RopeTable(r.cos[:0], r.sin[:0]),
        ValueError,
        ("rope:", "non-empty", "[0, 32]"),
    ),
    (
        "indexer_compressor",
        "rope",
        lambda r: dsv4.RopeTable(r.cos[:, :0], r.sin[:, :0]),
        ValueError,
        ("rope:", "non-empty", "[64, 0]"),
    ),
    (
        "indexer",
        "w.weights_proj",
        lambda t: t[:0],
        ValueError,
        ("w.weights_proj:", "at least one indexer head", "0 rows"),
    ),
]


def _rows_cut(w: dsv4.AttnWeights, n: int) -> dsv4.AttnWeights:
    """``w`` with its last ``n`` rows of ``wq_b`` and of ``wq_b_scale`` cut off (still agreeing)."""
    return dataclasses.replace(w, wq_b=w.wq_b[:-n].contiguous(), wq_b_scale=w.wq_b_scale[:-n].contiguous())


def _broken_args(op: str, path: str, breaker: Callable) -> dict:
    args = dict(_case(op).args)
    if path == "start_pos" and op == "indexer":  # reach past the table, not past the cache
        args["state"] = dsv4.IndexerState.empty(CFG, 2, 4096, device=DEVICE)
    _set(args, path, breaker(_get(args, path)))
    return args


def broken_call(index: int, backend: str) -> None:
    """The op of ``BAD[index]`` on its broken arguments (for a child process: see ``device_assert``)."""
    op, path, breaker = BAD[index][:3]
    getattr(dsv4, op)(**_broken_args(op, path, breaker), backend=backend)


def _state_snapshot(args: dict) -> dict[str, torch.Tensor]:
    state = args.get("state")
    if state is None:
        return {}
    return {k: v.clone() for k, v in state.tensors().items() if v.device.type != "meta"}


@pytest.mark.parametrize(
    ("op", "path", "breaker", "exc", "words"), BAD, ids=[f"{b[0]}-{b[1]}-{i}" for i, b in enumerate(BAD)]
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_is_named_and_state_untouched(op, path, breaker, exc, words, backend) -> None:
    if DEVICE.type == "cuda" and getattr(breaker, "checked_on_device", False):
        index = next(i for i, b in enumerate(BAD) if b[2] is breaker)
        script = f"import test_validation as tv\ntv.broken_call({index}, {backend!r})"
        assert_stops_on_device(script, words[:1])
        return
    args = _broken_args(op, path, breaker)
    before = _state_snapshot(args)
    with pytest.raises(exc) as info:
        getattr(dsv4, op)(**args, backend=backend)
    message = str(info.value)
    assert all(w in message for w in words), f"{message!r} lacks {words}"
    for name, t in before.items():
        assert torch.equal(getattr(args["state"], name), t), f"state.{name} changed"


def test_unknown_backend_is_named() -> None:
    case = _case("qkv_proj_rope")
    with pytest.raises(ValueError, match="backend"):
        dsv4.qkv_proj_rope(**case.args, backend="cuda-graphs")


@pytest.mark.parametrize("version", ["3.5.1", "3.0.0", "2.3.1+gitdeadbeef"])
def test_a_triton_too_old_is_named(monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    """An installed Triton older than the kernels run on leaves the backend unavailable, naming both
    versions: ``backend="triton"`` is refused before anything runs, and the reference is what is left."""
    monkeypatch.setattr(backends.metadata, "version", lambda dist: version)
    case = _case("qkv_proj_rope")
    with pytest.raises(ValueError, match=rf"backend: 'triton' .*Triton {re.escape(version)} is older than 3\.6"):
        dsv4.qkv_proj_rope(**case.args, backend="triton")
    assert dsv4.available_backends(DEVICE) == ["reference"]


@pytest.mark.parametrize("version", ["3.6.0", "3.9.0", "3.10.0+git1234", "4.0"])
def test_a_recent_triton_is_taken(monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    monkeypatch.setattr(backends.metadata, "version", lambda dist: version)
    assert backends.unavailable_reason("triton", DEVICE) is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["qkv_proj_rope", "indexer_compressor", "indexer"])
def test_unbroken_cases_run(op: str, backend: str) -> None:
    """The cases above differ from a valid call in one argument only: unbroken, each op runs."""
    args = dict(_case(op).args)
    out = getattr(dsv4, op)(**args, backend=backend)
    assert (out is None) == (op == "indexer_compressor")
    if "state" in args:  # decode rows start at random positions: the ring slots always change
        assert not torch.equal(args["state"].kv_state, _case(op).args["state"].kv_state)

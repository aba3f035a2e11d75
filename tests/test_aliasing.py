"""Outputs and state that share memory with each other or with the inputs are refused, as torch's
``out=`` ops refuse them (spec §7): before anything runs, naming both tensors, with every byte of the
caller's buffers unchanged. Views that do not overlap are fine."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import dsv4
from conftest import BACKENDS
from dsv4.model.structs import QKV, IndexerOut
from op_cases import case_at

CFG = dsv4.get_config("tiny")
B, S, ROWS = 2, 2, 16


def _case(op: str) -> dict:
    return dict(case_at(CFG, op, batch=B, seq=S, start=[5, 9], max_position=4 * ROWS).args)


def _in(buffer: torch.Tensor, like: torch.Tensor, byte_offset: int = 0) -> torch.Tensor:
    """A contiguous tensor shaped and typed like ``like``, holding ``like``'s values, that lives in
    ``buffer`` (uint8) from ``byte_offset`` on."""
    view = buffer[byte_offset : byte_offset + like.numel() * like.element_size()].view(like.dtype).view(like.shape)
    view.copy_(like)
    return view


def _buffer(*tensors: torch.Tensor) -> torch.Tensor:
    return torch.zeros(sum(t.numel() * t.element_size() for t in tensors) + 64, dtype=torch.uint8)


def _qkv_out(args: dict) -> QKV:
    t, hd, ql = args["x"].shape[0], CFG.head_dim, CFG.q_lora_rank
    return QKV(
        torch.empty(t, CFG.num_attention_heads, hd, dtype=torch.bfloat16),
        torch.empty(t, hd, dtype=torch.bfloat16),
        torch.empty(t, ql, dtype=torch.int8),
        torch.empty(t, 1, dtype=torch.float32),
    )


def _indexer_out(args: dict, width: int = ROWS) -> IndexerOut:
    return IndexerOut(torch.empty(B, S, width), torch.empty(B, S, args["topk"], dtype=torch.int32))


def _state(args: dict, **fields: torch.Tensor) -> dsv4.IndexerState:
    return dsv4.IndexerState(**{**args["state"].tensors(), **fields})


# Each builder returns the op's arguments with an overlap, and the two names the error must give.
Builder = Callable[[], tuple[str, dict, tuple[str, str]]]


def _qkv_out_kv_in_q() -> tuple[str, dict, tuple[str, str]]:
    args = _case("qkv_proj_rope")
    out = _qkv_out(args)
    kv = out.q.view(-1)[: out.kv.numel()].view(out.kv.shape)  # the reproducer: out.kv a view of out.q
    return "qkv_proj_rope", {**args, "out": out._replace(kv=kv)}, ("out.q", "out.kv")


def _qkv_out_is_x() -> tuple[str, dict, tuple[str, str]]:
    args = _case("qkv_proj_rope")
    out = _qkv_out(args)
    q = torch.empty(out.q.numel() + args["x"].numel(), dtype=torch.bfloat16)
    args["x"] = _in(q.view(torch.uint8), args["x"])
    return "qkv_proj_rope", {**args, "out": out._replace(q=q[: out.q.numel()].view(out.q.shape))}, ("out.q", "x")


def _qkv_scale_in_weights() -> tuple[str, dict, tuple[str, str]]:
    args = _case("qkv_proj_rope")
    out = _qkv_out(args)
    w = args["w"]
    buf = _buffer(w.wq_b_scale)
    w = type(w)(**{**vars(w), "wq_b_scale": _in(buf, w.wq_b_scale)})
    scale = buf[: out.qr_scale.numel() * 4].view(torch.float32).view(out.qr_scale.shape)
    return "qkv_proj_rope", {**args, "w": w, "out": out._replace(qr_scale=scale)}, ("out.qr_scale", "w.wq_b_scale")


def _qkv_qr_over_positions() -> tuple[str, dict, tuple[str, str]]:
    args = _case("qkv_proj_rope")
    out = _qkv_out(args)
    buf = _buffer(out.qr)
    args["positions"] = _in(buf, args["positions"], 8)
    return (
        "qkv_proj_rope",
        {**args, "out": out._replace(qr=buf[: out.qr.numel()].view(torch.int8).view(out.qr.shape))},
        (
            "out.qr",
            "positions",
        ),
    )


def _qkv_out_in_rope() -> tuple[str, dict, tuple[str, str]]:
    args = _case("qkv_proj_rope")
    out = _qkv_out(args)
    cos = args["rope"].cos
    buf = _buffer(cos)
    args["rope"] = dsv4.RopeTable(_in(buf, cos), args["rope"].sin)
    kv = buf[: out.kv.numel() * 2].view(torch.bfloat16).view(out.kv.shape)
    return "qkv_proj_rope", {**args, "out": out._replace(kv=kv)}, ("out.kv", "rope.cos")


def _state_kv_is_score(op: str) -> Builder:
    def build() -> tuple[str, dict, tuple[str, str]]:
        args = _case(op)
        k = args["state"].kv_state
        return op, {**args, "state": _state(args, score_state=k)}, ("state.kv_state", "state.score_state")

    return build


def _state_half_overlap(op: str) -> Builder:
    """kv_state and score_state in one buffer, the second starting halfway through the first."""

    def build() -> tuple[str, dict, tuple[str, str]]:
        args = _case(op)
        kv, sc = args["state"].kv_state, args["state"].score_state
        buf = _buffer(kv, sc)
        kv_in = _in(buf, kv)
        sc_in = buf[kv.numel() * 2 : kv.numel() * 2 + sc.numel() * 4].view(torch.float32).view(sc.shape)
        return (
            op,
            {**args, "state": _state(args, kv_state=kv_in, score_state=sc_in)},
            ("state.kv_state", "state.score_state"),
        )

    return build


def _cache_over_kv_state(op: str) -> Builder:
    def build() -> tuple[str, dict, tuple[str, str]]:
        args = _case(op)
        kv, cache = args["state"].kv_state, args["state"].keys
        buf = _buffer(cache, kv)
        cache_in = _in(buf, cache)
        kv_in = _in(buf, kv, 256)  # starts inside the cache's bytes
        return (
            op,
            {**args, "state": _state(args, kv_state=kv_in, keys=cache_in)},
            (
                "state.kv_state",
                "state.keys",
            ),
        )

    return build


def _state_in_ape(op: str) -> Builder:
    def build() -> tuple[str, dict, tuple[str, str]]:
        args = _case(op)
        w = args["w"]
        comp = w.compressor if op == "indexer" else w
        buf = _buffer(args["state"].score_state)
        score = _in(buf, args["state"].score_state)
        ape = buf[64 : 64 + comp.ape.numel() * 4].view(torch.float32).view(comp.ape.shape)  # inside score_state
        comp = type(comp)(**{**vars(comp), "ape": ape})
        w = type(w)(**{**vars(w), "compressor": comp}) if op == "indexer" else comp
        path = "w.compressor.ape" if op == "indexer" else "w.ape"
        return op, {**args, "w": w, "state": _state(args, score_state=score)}, ("state.score_state", path)

    return build


def _start_pos_in_cache(op: str) -> Builder:
    def build() -> tuple[str, dict, tuple[str, str]]:
        args = _case(op)
        cache = args["state"].keys
        buf = _buffer(cache)
        cache_in = _in(buf, cache)
        start = _in(buf, args["start_pos"], 128)
        return (
            op,
            {**args, "start_pos": start, "state": _state(args, keys=cache_in)},
            (
                "state.keys",
                "start_pos",
            ),
        )

    return build


def _out_score_in_kv_state() -> tuple[str, dict, tuple[str, str]]:
    """The issue's reproducer: ``out=IndexerOut(state.kv_state, ...)``, as a view of the right shape."""
    args = _case("indexer")
    out = _indexer_out(args)
    score = args["state"].kv_state.view(-1)[: out.score.numel()].view(out.score.shape)
    return "indexer", {**args, "out": out._replace(score=score)}, ("state.kv_state", "out.score")


def _out_topk_in_score() -> tuple[str, dict, tuple[str, str]]:
    args = _case("indexer")
    out = _indexer_out(args)
    topk = out.score.view(-1).view(torch.int32)[: out.topk_idxs.numel()].view(out.topk_idxs.shape)
    return "indexer", {**args, "out": out._replace(topk_idxs=topk)}, ("out.score", "out.topk_idxs")


def _out_score_in_qr_scale() -> tuple[str, dict, tuple[str, str]]:
    args = _case("indexer")
    out = _indexer_out(args)
    buf = _buffer(out.score)
    args["qr_scale"] = _in(buf, args["qr_scale"], 16)
    score = buf[: out.score.numel() * 4].view(torch.float32).view(out.score.shape)
    return "indexer", {**args, "out": out._replace(score=score)}, ("out.score", "qr_scale")


def _out_topk_in_x() -> tuple[str, dict, tuple[str, str]]:
    args = _case("indexer")
    out = _indexer_out(args)
    buf = _buffer(args["x"])
    args["x"] = _in(buf, args["x"])
    topk = buf[: out.topk_idxs.numel() * 4].view(torch.int32).view(out.topk_idxs.shape)
    return "indexer", {**args, "out": out._replace(topk_idxs=topk)}, ("out.topk_idxs", "x")


def _cache_in_weights_proj() -> tuple[str, dict, tuple[str, str]]:
    args = _case("indexer")
    w = args["w"]
    cache = args["state"].keys
    buf = _buffer(cache)
    proj = _in(buf, w.weights_proj, 512)
    cache_in = _in(buf, cache)
    w = type(w)(**{**vars(w), "weights_proj": proj})
    return (
        "indexer",
        {**args, "w": w, "state": _state(args, keys=cache_in)},
        (
            "state.keys",
            "w.weights_proj",
        ),
    )


OVERLAPS: dict[str, Builder] = {
    "qkv-out.kv-view-of-out.q": _qkv_out_kv_in_q,
    "qkv-out.q-over-x": _qkv_out_is_x,
    "qkv-out.qr_scale-over-w.wq_b_scale": _qkv_scale_in_weights,
    "qkv-out.qr-over-positions": _qkv_qr_over_positions,
    "qkv-out.kv-over-rope.cos": _qkv_out_in_rope,
    **{f"{op}-kv_state-is-score_state": _state_kv_is_score(op) for op in ("indexer_compressor", "indexer")},
    **{f"{op}-states-half-overlap": _state_half_overlap(op) for op in ("indexer_compressor", "indexer")},
    **{f"{op}-cache-over-kv_state": _cache_over_kv_state(op) for op in ("indexer_compressor", "indexer")},
    **{f"{op}-score_state-over-ape": _state_in_ape(op) for op in ("indexer_compressor", "indexer")},
    **{f"{op}-start_pos-in-cache": _start_pos_in_cache(op) for op in ("indexer_compressor", "indexer")},
    "indexer-out.score-in-kv_state": _out_score_in_kv_state,
    "indexer-out.topk-in-out.score": _out_topk_in_score,
    "indexer-out.score-over-qr_scale": _out_score_in_qr_scale,
    "indexer-out.topk-over-x": _out_topk_in_x,
    "indexer-cache-over-weights_proj": _cache_in_weights_proj,
}


def _bytes_of(args: dict) -> list[torch.Tensor]:
    """A copy of every tensor the call may write (state and outputs), byte for byte."""
    written = list(args["state"].tensors().values()) if "state" in args else []
    written += list(args["out"]) if args.get("out") is not None else []
    return [t.view(-1).view(torch.uint8).clone() if t.numel() else t.clone() for t in written]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("build", list(OVERLAPS.values()), ids=list(OVERLAPS))
def test_overlapping_outputs_and_state_are_refused(build, backend) -> None:
    op, args, names = build()
    before = _bytes_of(args)
    with pytest.raises(ValueError) as info:
        getattr(dsv4, op)(**args, backend=backend)
    message = str(info.value)
    assert all(n in message for n in names) and "memory" in message, message
    after = _bytes_of(args)
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True)), "a refused call wrote"


@pytest.mark.parametrize("order", ["forward", "reversed"])
def test_disjoint_views_of_one_buffer_are_fine(order: str) -> None:
    """State and outputs carved side by side out of one allocation (as an engine's arena would) run,
    with the same results as separate tensors: each tensor ends where the next begins, in either order
    (a tensor that begins where another ends shares no byte with it)."""
    args = _case("indexer")
    state, out = args["state"], _indexer_out(args)
    tensors = [*state.tensors().values(), *out]
    buf = _buffer(*tensors)
    offset, placed = 0, list(tensors)
    for i in range(len(tensors)) if order == "forward" else reversed(range(len(tensors))):
        placed[i] = _in(buf, tensors[i], offset)
        offset += tensors[i].numel() * tensors[i].element_size()
    n_state = len(state.tensors())
    arena_state = dsv4.IndexerState(*placed[:n_state])
    got = dsv4.indexer(**{**args, "state": arena_state}, out=IndexerOut(*placed[n_state:]), backend="reference")
    want = dsv4.indexer(**{**args, "state": state.clone()}, out=_indexer_out(args), backend="reference")
    assert torch.equal(got.score, want.score) and torch.equal(got.topk_idxs, want.topk_idxs)

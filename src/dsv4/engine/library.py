"""The ops as ``torch.library`` custom ops, so ``torch.compile`` and CUDA graphs take them whole.

``torch.ops.dsv4.qkv_proj_rope``, ``torch.ops.dsv4.indexer_compressor`` and ``torch.ops.dsv4.indexer``
take the weights as separate tensors and ``start_pos`` as an int tensor ``[B]`` (never a Python int,
which would specialize a compiled graph on every step). The ``*_out`` variants write into
preallocated outputs. Each op has a fake implementation (shapes only) and declares what it mutates:
the state tensors, and the outputs of the ``*_out`` variants.

``qkv_proj_rope``/``indexer_compressor``/``indexer`` below are the same calls with the dataclass
arguments of ``dsv4``; they are what a model calls inside ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from ..model.rope import RopeTable
from ..model.state import IndexerState
from ..model.structs import QKV, IndexerOut
from ..model.weights import AttnWeights, CompressorWeights, IndexerWeights


def _attn(wq_a, gamma_cq, wq_b, wq_b_scale, wkv, gamma_ckv) -> AttnWeights:
    return AttnWeights(wq_a, gamma_cq, wq_b, wq_b_scale, wkv, gamma_ckv)


def _indexer_weights(wq_b, wq_b_scale, weights_proj, wkv, wgate, ape, norm_w) -> IndexerWeights:
    return IndexerWeights(wq_b, wq_b_scale, weights_proj, CompressorWeights(wkv, wgate, ape, norm_w))


@torch.library.custom_op("dsv4::qkv_proj_rope", mutates_args=())
def _qkv_proj_rope(
    x: Tensor, wq_a: Tensor, gamma_cq: Tensor, wq_b: Tensor, wq_b_scale: Tensor, wkv: Tensor, gamma_ckv: Tensor,
    positions: Tensor, cos: Tensor, sin: Tensor, eps: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    w = _attn(wq_a, gamma_cq, wq_b, wq_b_scale, wkv, gamma_ckv)
    return tuple(ops.qkv_proj_rope(x, w, positions, RopeTable(cos, sin), eps=eps, backend=backend))


@_qkv_proj_rope.register_fake
def _(x, wq_a, gamma_cq, wq_b, wq_b_scale, wkv, gamma_ckv, positions, cos, sin, eps, backend):
    t, hd = x.shape[0], wkv.shape[0]
    return (
        x.new_empty((t, wq_b.shape[0] // hd, hd)),
        x.new_empty((t, hd)),
        x.new_empty((t, wq_a.shape[0]), dtype=torch.int8),
        x.new_empty((t, 1), dtype=torch.float32),
    )


@torch.library.custom_op("dsv4::qkv_proj_rope_out", mutates_args=("q", "kv", "qr", "qr_scale"))
def _qkv_proj_rope_out(
    x: Tensor, wq_a: Tensor, gamma_cq: Tensor, wq_b: Tensor, wq_b_scale: Tensor, wkv: Tensor, gamma_ckv: Tensor,
    positions: Tensor, cos: Tensor, sin: Tensor, eps: float, backend: str,
    q: Tensor, kv: Tensor, qr: Tensor, qr_scale: Tensor,
) -> None:  # fmt: skip
    w = _attn(wq_a, gamma_cq, wq_b, wq_b_scale, wkv, gamma_ckv)
    ops.qkv_proj_rope(x, w, positions, RopeTable(cos, sin), eps=eps, backend=backend, out=QKV(q, kv, qr, qr_scale))


@_qkv_proj_rope_out.register_fake
def _(*args) -> None:
    return None


@torch.library.custom_op("dsv4::indexer_compressor", mutates_args=("kv_state", "score_state", "idx_kv_cache"))
def _indexer_compressor(
    x: Tensor, wkv: Tensor, wgate: Tensor, ape: Tensor, norm_w: Tensor,
    kv_state: Tensor, score_state: Tensor, idx_kv_cache: Tensor,
    start_pos: Tensor, cos: Tensor, sin: Tensor, eps: float, backend: str,
) -> None:  # fmt: skip
    w = CompressorWeights(wkv, wgate, ape, norm_w)
    state = IndexerState(kv_state, score_state, idx_kv_cache)
    ops.indexer_compressor(x, w, state, start_pos, RopeTable(cos, sin), eps=eps, backend=backend)


@_indexer_compressor.register_fake
def _(*args) -> None:
    return None


@torch.library.custom_op("dsv4::indexer", mutates_args=("kv_state", "score_state", "idx_kv_cache"))
def _indexer(
    x: Tensor, qr: Tensor, qr_scale: Tensor, wq_b: Tensor, wq_b_scale: Tensor, weights_proj: Tensor,
    wkv: Tensor, wgate: Tensor, ape: Tensor, norm_w: Tensor,
    kv_state: Tensor, score_state: Tensor, idx_kv_cache: Tensor,
    start_pos: Tensor, offset: int, cos: Tensor, sin: Tensor, topk: int, eps: float, backend: str,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    w = _indexer_weights(wq_b, wq_b_scale, weights_proj, wkv, wgate, ape, norm_w)
    state = IndexerState(kv_state, score_state, idx_kv_cache)
    out = ops.indexer(x, qr, qr_scale, w, state, start_pos, offset, RopeTable(cos, sin), topk=topk, eps=eps,
                      backend=backend)  # fmt: skip
    return out.score, out.topk_idxs


@_indexer.register_fake
def _(x, qr, qr_scale, wq_b, wq_b_scale, weights_proj, wkv, wgate, ape, norm_w, kv_state, score_state,
      idx_kv_cache, start_pos, offset, cos, sin, topk, eps, backend):  # fmt: skip
    b, s = x.shape[:2]
    cache_len = torch.library.get_ctx().new_dynamic_size()  # (start_pos + S) // 4: known at run time only
    return (
        x.new_empty((b, s, cache_len), dtype=torch.float32),
        x.new_empty((b, s, topk), dtype=torch.int32),
    )


@torch.library.custom_op(
    "dsv4::indexer_out", mutates_args=("kv_state", "score_state", "idx_kv_cache", "score", "topk_idxs")
)
def _indexer_out(
    x: Tensor, qr: Tensor, qr_scale: Tensor, wq_b: Tensor, wq_b_scale: Tensor, weights_proj: Tensor,
    wkv: Tensor, wgate: Tensor, ape: Tensor, norm_w: Tensor,
    kv_state: Tensor, score_state: Tensor, idx_kv_cache: Tensor,
    start_pos: Tensor, offset: int, cos: Tensor, sin: Tensor, topk: int, eps: float, backend: str,
    score: Tensor, topk_idxs: Tensor,
) -> None:  # fmt: skip
    w = _indexer_weights(wq_b, wq_b_scale, weights_proj, wkv, wgate, ape, norm_w)
    state = IndexerState(kv_state, score_state, idx_kv_cache)
    ops.indexer(x, qr, qr_scale, w, state, start_pos, offset, RopeTable(cos, sin), topk=topk, eps=eps,
                backend=backend, out=IndexerOut(score, topk_idxs))  # fmt: skip


@_indexer_out.register_fake
def _(*args) -> None:
    return None


def _weights_of(w: AttnWeights | CompressorWeights | IndexerWeights) -> tuple[Tensor, ...]:
    if isinstance(w, IndexerWeights):
        c = w.compressor
        return (w.wq_b, w.wq_b_scale, w.weights_proj, c.wkv, c.wgate, c.ape, c.norm_w)
    if isinstance(w, CompressorWeights):
        return (w.wkv, w.wgate, w.ape, w.norm_w)
    return (w.wq_a, w.gamma_cq, w.wq_b, w.wq_b_scale, w.wkv, w.gamma_ckv)


def qkv_proj_rope(
    x: Tensor, w: AttnWeights, positions: Tensor, rope: RopeTable, *, eps: float = 1e-6, backend: str = "auto",
    out: QKV | None = None,
) -> QKV:  # fmt: skip
    """``dsv4.qkv_proj_rope`` through ``torch.ops.dsv4``; same arguments and result."""
    args = (x, *_weights_of(w), positions, rope.cos, rope.sin, eps, backend)
    if out is None:
        return QKV(*torch.ops.dsv4.qkv_proj_rope(*args))
    torch.ops.dsv4.qkv_proj_rope_out(*args, *out)
    return out


def indexer_compressor(
    x: Tensor, w: CompressorWeights, state: IndexerState, start_pos: Tensor, rope: RopeTable, *,
    eps: float = 1e-6, backend: str = "auto",
) -> None:  # fmt: skip
    """``dsv4.indexer_compressor`` through ``torch.ops.dsv4``; ``start_pos`` is an int tensor ``[B]``."""
    torch.ops.dsv4.indexer_compressor(
        x, *_weights_of(w), state.kv_state, state.score_state, state.idx_kv_cache, start_pos, rope.cos, rope.sin,
        eps, backend,
    )  # fmt: skip


def indexer(
    x: Tensor, qr: Tensor, qr_scale: Tensor, w: IndexerWeights, state: IndexerState, start_pos: Tensor, offset: int,
    rope: RopeTable, *, topk: int, eps: float = 1e-6, backend: str = "auto", out: IndexerOut | None = None,
) -> IndexerOut:  # fmt: skip
    """``dsv4.indexer`` through ``torch.ops.dsv4``; ``start_pos`` is an int tensor ``[B]``."""
    args = (
        x, qr, qr_scale, *_weights_of(w), state.kv_state, state.score_state, state.idx_kv_cache, start_pos, offset,
        rope.cos, rope.sin, topk, eps, backend,
    )  # fmt: skip
    if out is None:
        return IndexerOut(*torch.ops.dsv4.indexer(*args))
    torch.ops.dsv4.indexer_out(*args, *out)
    return out

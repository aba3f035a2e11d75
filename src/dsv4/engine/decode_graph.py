"""A decode step of fixed shape with every buffer preallocated, and its CUDA-graph replay.

``StaticDecodeStep.launch()`` runs ``qkv_proj_rope`` then ``indexer`` on the Triton backend from
static buffers: inputs (``x``, start positions), outputs, and kernel scratch (a ``Workspace``
filled by a warm-up step). After the warm-up it allocates nothing and never reads a device value
on the host, so ``DecodeGraph`` can capture it once and replay it every step.
"""

from __future__ import annotations

from types import ModuleType

import torch

from ..model.config import COMPRESS_RATIO
from ..model.rope import RopeTable
from ..model.state import IndexerState
from ..model.structs import QKV, IndexerOut, StepPositions
from ..model.weights import AttnWeights, IndexerWeights
from ..ops.defs import INDEXER, QKV_PROJ_ROPE
from ..ops.device import on_device, spec_numerics
from .op_checks import check_front_end_ops
from .staging import staged

_OPS = ("qkv_proj_rope", "indexer")  # the step's ops, both launched on Triton


def _triton_backend() -> ModuleType:
    """``dsv4.kernels``, imported when a step is built: Triton is an optional dependency of ``dsv4``."""
    from .. import kernels

    return kernels


class StaticDecodeStep:
    """Static buffers and launches of one decode step of ``batch`` x ``seq`` tokens.

    Operands: the layer's weights, RoPE table and ``IndexerState`` (updated in place by every
    launch), ``topk``, ``offset`` and ``eps``. ``max_cache_len`` bounds the cache rows any replayed
    step may reach (default: all rows of the cache); it sizes the score buffer
    ``[batch, seq, max_cache_len]``, which every step fills whole.
    """

    def __init__(
        self,
        attn: AttnWeights,
        indexer: IndexerWeights,
        rope: RopeTable,
        state: IndexerState,
        *,
        batch: int,
        seq: int,
        topk: int,
        offset: int,
        eps: float,
        max_cache_len: int | None = None,
    ) -> None:
        rows = state.cache_rows
        length = rows if max_cache_len is None else int(max_cache_len)
        if not 1 <= batch <= state.batch or seq < 1 or not 1 <= length <= rows:
            raise ValueError(
                f"batch, seq, max_cache_len: expected 1 <= batch <= {state.batch}, seq >= 1, "
                f"1 <= max_cache_len <= {rows}; got {batch}, {seq}, {max_cache_len}"
            )
        dev = attn.wq_a.device
        t, d = batch * seq, attn.wq_a.shape[1]
        hd, ql = attn.wkv.shape[0], attn.wq_a.shape[0]
        # a step's positions are checked by check_inputs, its block table is the caller's
        check_front_end_ops(attn, indexer, rope, state, topk, offset, eps, dict.fromkeys(_OPS, "triton"))
        self.attn, self.indexer, self.rope, self.state = attn, indexer, rope, state
        self.topk, self.offset, self.eps = topk, offset, eps
        self.batch, self.seq, self.max_cache_len = batch, seq, length
        self.x = torch.zeros(batch, seq, d, dtype=torch.bfloat16, device=dev)
        self.start = torch.zeros(batch, dtype=torch.int64, device=dev)
        self.offsets = torch.arange(seq, dtype=torch.int64, device=dev)
        self.positions = torch.empty(t, dtype=torch.int64, device=dev)
        self.qkv = QKV(
            torch.empty(t, attn.wq_b.shape[0] // hd, hd, dtype=torch.bfloat16, device=dev),
            torch.empty(t, hd, dtype=torch.bfloat16, device=dev),
            torch.empty(t, ql, dtype=torch.int8, device=dev),
            torch.empty(t, 1, dtype=torch.float32, device=dev),
        )
        self.out = IndexerOut(
            torch.empty(batch, seq, length, dtype=torch.float32, device=dev),
            torch.empty(batch, seq, topk, dtype=torch.int32, device=dev),
        )
        self.pos = StepPositions(self.start, seq, length)
        # The kernels' arguments in each op's order (its descriptor's), bound once: views of the buffers.
        self.qkv_args = tuple(
            QKV_PROJ_ROPE.bind(
                {"x": self.x.view(t, d), "w": attn, "positions": self.positions, "rope": rope, "eps": eps}
            ).values()
        )
        self.indexer_args = tuple(
            INDEXER.bind(
                {"x": self.x, "qr": self.qkv.qr, "qr_scale": self.qkv.qr_scale, "w": indexer, "state": state,
                 "start_pos": self.pos, "offset": offset, "rope": rope, "topk": topk, "eps": eps}
            ).values()
        )  # fmt: skip
        self.kernels = _triton_backend()
        self.workspace = self.kernels.Workspace()

    def check_inputs(self, x: object, start: list[int]) -> None:
        """A step's inputs fit the static buffers: ``x`` of the captured shape (bf16), and ``start``
        (host ints) within ``max_cache_len``. Changes nothing."""
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != tuple(self.x.shape) or x.dtype != self.x.dtype:
            got = f"{list(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected {list(self.x.shape)} bf16 (the captured shape), got {got}")
        rows = (max(start) + self.seq) // COMPRESS_RATIO  # the cache rows after the step
        if rows > self.max_cache_len:
            raise ValueError(
                f"start_pos: {start} with S={self.seq} leaves {rows} cache rows, "
                f"past max_cache_len={self.max_cache_len}"
            )

    def set_inputs(self, x: torch.Tensor, start: list[int]) -> None:
        """Copy a step's inputs into the static buffers (no device sync; ``start`` checked on the host)."""
        self.check_inputs(x, start)
        self.start.copy_(staged(start, self.start.device), non_blocking=True)
        self.x.copy_(x)

    def launch(self) -> None:
        """The step: every launch reads and writes only the static buffers (on their device)."""
        with on_device(self.x.device), spec_numerics(self.x.device):
            torch.add(self.start[:, None], self.offsets[None, :], out=self.positions.view(self.batch, self.seq))
            self.kernels.qkv_proj_rope(*self.qkv_args, out=self.qkv, ws=self.workspace)
            self.kernels.indexer(*self.indexer_args, out=self.out, ws=self.workspace)

    def results(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``q [B, S, H, HD]``, ``kv [B, S, HD]``, ``topk_idxs [B, S, topk]``: views of the static outputs."""
        b, s = self.batch, self.seq
        return self.qkv.q.view(b, s, *self.qkv.q.shape[1:]), self.qkv.kv.view(b, s, -1), self.out.topk_idxs

    def warm_up(self) -> None:
        """Run the step once (compiles the kernels, fills the workspace), leaving the state as it was."""
        saved = self.state.clone()
        self.launch()
        for name, t in self.state.tensors().items():
            t.copy_(getattr(saved, name))


class DecodeGraph:
    """A ``StaticDecodeStep`` captured as a CUDA graph; ``replay`` runs one decode step.

    The returned tensors are the graph's static outputs: they hold this step's results until the
    next replay.
    """

    def __init__(self, step: StaticDecodeStep) -> None:
        self.step = step
        with on_device(step.x.device):  # the streams, the capture and its kernels on the step's device
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                step.warm_up()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                step.launch()

    def replay(self, x: torch.Tensor, start: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One step of ``x [batch, seq, D] bf16`` (the captured shape) with rows starting at ``start``
        (checked on the host) -> ``q``, ``kv``, ``topk_idxs`` (see ``StaticDecodeStep.results``)."""
        self.step.set_inputs(x, start)
        with on_device(self.step.x.device):  # replayed on the current stream of the graph's device
            self.graph.replay()
        return self.step.results()

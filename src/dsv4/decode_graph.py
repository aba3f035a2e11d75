"""A decode step of fixed shape with every buffer preallocated, and its CUDA-graph replay.

``StaticDecodeStep.launch()`` runs ``qkv_proj_rope`` then ``indexer`` on the Triton backend from
static buffers: inputs (``x``, start positions), outputs, and kernel scratch (a ``Workspace``
filled by a warm-up step). After the warm-up it allocates nothing and never reads a device value
on the host, so ``DecodeGraph`` can capture it once and replay it every step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .config import COMPRESS_RATIO
from .structs import QKV, IndexerOut, StepPositions

if TYPE_CHECKING:
    from .frontend import DecodeFrontEnd


class StaticDecodeStep:
    """Static buffers and launches of one decode step of ``batch`` x ``seq`` tokens.

    ``max_cache_len`` bounds the cache rows any replayed step may reach (default: all rows of the
    cache); it sizes the score buffer ``[batch, seq, max_cache_len]``, which every step fills whole.
    """

    def __init__(self, frontend: DecodeFrontEnd, batch: int, seq: int, max_cache_len: int | None = None) -> None:
        from .kernels import Workspace  # the Triton backend: imported only when a step is built

        rows = frontend.idx_kv_cache.shape[1]
        length = rows if max_cache_len is None else int(max_cache_len)
        if not 1 <= batch <= frontend.batch or seq < 1 or not 1 <= length <= rows:
            raise ValueError(
                f"batch, seq, max_cache_len: expected 1 <= batch <= {frontend.batch}, seq >= 1, "
                f"1 <= max_cache_len <= {rows}; got {batch}, {seq}, {max_cache_len}"
            )
        dev = frontend.attn_wq_a.device
        attn = frontend.attn
        t, d = batch * seq, attn.wq_a.shape[1]
        hd, ql = attn.wkv.shape[0], attn.wq_a.shape[0]
        self.frontend, self.batch, self.seq, self.max_cache_len = frontend, batch, seq, length
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
            torch.empty(batch, seq, frontend.topk, dtype=torch.int32, device=dev),
        )
        self.pos = StepPositions(self.start, seq, length)
        self.workspace = Workspace()

    def set_inputs(self, x: torch.Tensor, start: list[int]) -> None:
        """Copy a step's inputs into the static buffers (no device sync; ``start`` checked on the host)."""
        if tuple(x.shape) != tuple(self.x.shape) or x.dtype != self.x.dtype:
            raise ValueError(
                f"x: expected {list(self.x.shape)} bf16 (the captured shape), got {list(x.shape)} {x.dtype}"
            )
        limit = self.max_cache_len * COMPRESS_RATIO
        if any((p + self.seq) > limit for p in start):
            raise ValueError(f"start_pos: {start} with S={self.seq} passes max_cache_len={self.max_cache_len} rows")
        staging = torch.tensor(start, dtype=torch.int64)
        if self.start.is_cuda:  # pinned blocks are not reused before their copy is done: no race, no sync
            staging = staging.pin_memory()
        self.start.copy_(staging, non_blocking=True)
        self.x.copy_(x)

    def launch(self) -> None:
        """The step: every launch reads and writes only the static buffers."""
        from . import kernels

        fe = self.frontend
        torch.add(self.start[:, None], self.offsets[None, :], out=self.positions.view(self.batch, self.seq))
        x2d = self.x.view(self.batch * self.seq, -1)
        kernels.qkv_proj_rope(x2d, fe.attn, self.positions, fe.rope, fe.eps, out=self.qkv, ws=self.workspace)
        kernels.indexer(
            self.x, self.qkv.qr, self.qkv.qr_scale, fe.indexer_weights, fe.state, self.pos, fe.offset, fe.rope,
            fe.topk, fe.eps, out=self.out, ws=self.workspace,
        )  # fmt: skip

    def results(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``q [B, S, H, HD]``, ``kv [B, S, HD]``, ``topk_idxs [B, S, topk]``: views of the static outputs."""
        b, s = self.batch, self.seq
        return self.qkv.q.view(b, s, *self.qkv.q.shape[1:]), self.qkv.kv.view(b, s, -1), self.out.topk_idxs

    def warm_up(self) -> None:
        """Run the step once (compiles the kernels, fills the workspace), leaving the state as it was."""
        saved = self.frontend.state.clone()
        self.launch()
        for name, t in self.frontend.state.tensors().items():
            t.copy_(getattr(saved, name))


class DecodeGraph:
    """A ``StaticDecodeStep`` captured as a CUDA graph; calling it replays one decode step.

    Made by ``DecodeFrontEnd.capture``. The returned tensors are the graph's static outputs: they
    hold this step's results until the next call.
    """

    def __init__(self, step: StaticDecodeStep) -> None:
        self.step = step
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step.warm_up()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            step.launch()

    def __call__(
        self, x: torch.Tensor, start_pos: int | list[int] | torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One step for slots ``0..batch-1``; ``x [batch, seq, D] bf16`` (the captured shape)."""
        fe = self.step.frontend
        start = fe.step_starts(self.step.batch, self.step.seq, start_pos)
        self.step.set_inputs(x, start)
        self.graph.replay()
        fe.advance(start, self.step.seq)
        fe.last_score = self.step.out.score
        return self.step.results()

"""A ``DecodeAttention`` layer's whole attention step from static buffers, captured as one CUDA graph.

``DecodeAttention.capture(seq)`` builds an ``AttentionGraph``: every op of the step (``qkv_proj_rope``,
``kv_compressor``, ``indexer``, ``sparse_attn_write``, ``o_proj``, as the layer's kind
has them) bound once to static inputs (``xn``, the slots' start positions), outputs and kernel
scratch, launched with no validation, no allocation and no host read of a device value. The
layer's weights, pools and rings are the module's own buffers; its block tables are written by
the host between steps (device fills, before the replay), as in eager mode.

On a GPU the launches are warmed up once (compiling the kernels and sizing the workspace, the
layer's state restored afterwards) and captured; each call replays the graph. On a CPU the same
launches run eagerly every call, which is how the test suite proves them equal to ``forward``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..model.config import COMPRESS_RATIO
from ..model.structs import QKV, AttnOut, IndexerOut, OProjOut, StepPositions
from ..ops.device import on_device, spec_numerics
from ..ops.registry import get_op
from ..ops.validate import check_int
from .op_checks import not_compiled, refuse_capture
from .staging import staged

if TYPE_CHECKING:
    from .attention import DecodeAttention

Launch = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class AttentionGraph:
    """The attention step of ``layer`` for all its ``batch`` slots, ``seq`` tokens each.

    ``graph(xn)`` with ``xn [batch, seq, D] bf16`` (after ``attn_norm``) runs one step from where each
    slot stands (or from ``start_pos``, with ``forward``'s rules for re-runs) and returns ``y [batch,
    seq, D] bf16``: the graph's static output, valid until the next call. Equal bit for bit to
    ``layer(xn)`` on the same backend. Every op must have a Triton implementation to be captured on a
    GPU (``ValueError`` otherwise); on a CPU ops without one run on the reference.
    """

    def __init__(self, layer: DecodeAttention, seq: int = 2) -> None:
        check_int("seq", seq, 1)
        if seq > layer.prefill_chunk:
            raise ValueError(f"seq: at most the layer's prefill_chunk ({layer.prefill_chunk}), got {seq}")
        layer.recheck()  # the launches bind the layer's buffers as they are now
        self.layer, self.batch, self.seq, self.generation = layer, layer.batch, seq, layer.generation
        dev = layer.attn_wq_a.device
        used = self._ops()
        if dev.type == "cuda":
            slow = [op for op in used if layer.op_backends[op] != "triton"]
            if slow:
                raise ValueError(
                    f"layer: a CUDA graph needs every op on Triton; {', '.join(slow)} run on the reference"
                )
        t, d = self.batch * seq, layer.attn_wq_a.shape[1]
        hd, ql = layer.attn_wkv.shape[0], layer.attn_wq_a.shape[0]
        heads = layer.attn_wq_b.shape[0] // hd
        bf16 = dict(dtype=torch.bfloat16, device=dev)
        self.xn = torch.zeros(self.batch, seq, d, **bf16)
        self.start = torch.zeros(self.batch, dtype=torch.int64, device=dev)
        self.offsets = torch.arange(seq, dtype=torch.int64, device=dev)
        self.positions = torch.empty(t, dtype=torch.int64, device=dev)
        self.qkv = QKV(
            torch.empty(t, heads, hd, **bf16),
            torch.empty(t, hd, **bf16),
            torch.empty(t, ql, dtype=torch.int8, device=dev),
            torch.empty(t, 1, dtype=torch.float32, device=dev),
        )
        self.o = AttnOut(torch.empty(self.batch, seq, heads, hd, **bf16))
        self.y = OProjOut(torch.empty(t, d, **bf16))
        cache_rows = 0 if layer.indexer_state is None else layer.indexer_state.cache_rows
        pos = StepPositions(self.start, seq, cache_rows)
        self.indexer_out = None
        if layer.kind == "csa":
            self.indexer_out = IndexerOut(
                torch.empty(self.batch, seq, cache_rows, dtype=torch.float32, device=dev),
                torch.empty(self.batch, seq, layer.topk, dtype=torch.int32, device=dev),
            )
        self.workspace = self._workspace(used)
        q, kv = self.qkv.q.view(self.batch, seq, heads, hd), self.qkv.kv.view(self.batch, seq, hd)
        rope, eps, window = layer.rope, layer.eps, layer.window
        args: dict[str, dict[str, Any]] = {
            "qkv_proj_rope": dict(x=self.xn.view(t, d), w=layer.attn, positions=self.positions, rope=rope, eps=eps),
            "kv_compressor": dict(
                x=self.xn, w=layer.compressor_weights, state=layer.compressor_state, start_pos=pos, rope=rope, eps=eps
            ),
            "indexer": dict(
                x=self.xn,
                qr=self.qkv.qr,
                qr_scale=self.qkv.qr_scale,
                w=layer.indexer_weights,
                state=layer.indexer_state,
                start_pos=pos,
                offset=window,
                rope=rope,
                topk=layer.topk,
                eps=eps,
            ),  # fmt: skip
            "sparse_attn_write": dict(
                q=q,
                kv=kv,
                start_pos=pos,
                window_pool=layer.window_pool,
                attn_sink=layer.attn_sink,
                rope=rope,
                kind=layer.kind,
                window=window,
                compress_ratio=layer.ratio,
                compressed_pool=layer.compressed_pool,
                topk_idxs=self.indexer_out.topk_idxs if self.indexer_out is not None else None,
                topk_offset=window if layer.kind == "csa" else 0,
            ),  # fmt: skip
            "o_proj": dict(o=self.o.o.view(t, heads, hd), w=layer.o_weights),
        }
        outs = {"qkv_proj_rope": self.qkv, "indexer": self.indexer_out, "sparse_attn_write": self.o, "o_proj": self.y}
        self.launches: list[Launch] = [self._bind(op, args[op], outs.get(op)) for op in used]
        self.graph: torch.cuda.CUDAGraph | None = None
        if dev.type == "cuda":
            self._capture()

    def _ops(self) -> list[str]:
        return list(self.layer.ops)

    def _workspace(self, used: list[str]) -> Any:
        if all(self.layer.op_backends[op] == "reference" for op in used):
            return None
        from .. import kernels  # Triton is an optional dependency of dsv4

        return kernels.Workspace()

    def _bind(self, op: str, args: dict[str, Any], out: Any) -> Launch:
        """``op``'s implementation on the layer's backend for it, with its arguments in the backends'
        order (bound once: no validation per step) and its ``out=``/``ws=``."""
        desc = get_op(op)
        backend = self.layer.op_backends[op]
        kwargs: dict[str, Any] = {}
        if desc.result is not None:
            kwargs["out"] = out
        if backend == "triton":
            kwargs["ws"] = self.workspace
        return desc.implementation(backend), tuple(desc.bind(args).values()), kwargs

    def launch(self) -> None:
        """The step: every launch reads and writes only the static buffers and the layer's own (on their
        device)."""
        with on_device(self.xn.device), spec_numerics(self.xn.device):
            torch.add(self.start[:, None], self.offsets[None, :], out=self.positions.view(self.batch, self.seq))
            for fn, args, kwargs in self.launches:
                fn(*args, **kwargs)

    def _state(self) -> dict[str, torch.Tensor]:
        """The layer's tensors the step writes (pools and rings), by name."""
        layer = self.layer
        records = {"win": layer.window_pool, "cmp": layer.compressor_state, "idx": layer.indexer_state}
        return {f"{p}.{k}": v for p, r in records.items() if r is not None for k, v in r.tensors().items()}

    def _capture(self) -> None:
        saved = {k: v.clone() for k, v in self._state().items()}
        with on_device(self.xn.device):  # the streams, the capture and its kernels on the layer's device
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.launch()  # compiles every kernel and sizes the workspace
            torch.cuda.current_stream().wait_stream(stream)
            for k, v in self._state().items():
                v.copy_(saved[k])
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.launch()

    @not_compiled
    def __call__(self, xn: torch.Tensor, start_pos: int | list[int] | torch.Tensor | None = None) -> torch.Tensor:
        """One step: ``xn [batch, seq, D] bf16`` -> ``y [batch, seq, D] bf16`` (the static output).
        ``xn`` is copied into the graph's input ``self.xn``, unless it is that buffer: a caller that
        writes each step's activations there saves the copy."""
        refuse_capture(self.xn.device, "AttentionGraph", "DecodeAttention.capture(seq)")
        want = list(self.xn.shape)
        if not isinstance(xn, torch.Tensor) or list(xn.shape) != want or xn.dtype != torch.bfloat16:
            got = f"{list(xn.shape)} {xn.dtype}" if isinstance(xn, torch.Tensor) else type(xn).__name__
            raise ValueError(f"xn: expected {want} bf16 (the captured shape), got {got}")
        if xn.device != self.xn.device:
            raise ValueError(f"xn: expected device {self.xn.device}, got {xn.device}")
        layer = self.layer
        layer.check_captured(self.generation, "layer")
        starts = layer.step_starts(self.batch, self.seq, start_pos, self.seq)
        rows = self.indexer_out.score.shape[-1] if self.indexer_out is not None else None
        if rows is not None and (max(starts) + self.seq) // COMPRESS_RATIO > rows:
            raise ValueError(f"start_pos: {starts} with S={self.seq} passes the indexer pool's rows")
        with layer.captured_writing(self.xn):
            self.start.copy_(staged(starts, self.start.device), non_blocking=True)
            if xn is not self.xn:  # a caller may write its activations into the graph's input itself
                self.xn.copy_(xn)
            # a replay is one launch, which runs whole or not at all: only the eager launches may stop partway
            saved = layer.save_rings(starts, self.seq) if self.graph is None else []
            plan = layer.begin_step(starts, self.seq)
            try:
                if self.graph is not None:
                    with on_device(self.xn.device):  # replayed on the current stream of the graph's device
                        self.graph.replay()
                else:
                    self.launch()
            except BaseException:
                layer.abort_step(saved)
                raise
            layer.end_step(plan, starts, self.seq)
        return self.y.y.view(self.batch, self.seq, -1)

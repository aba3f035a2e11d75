"""The ops' checks (spec §7) once, for launches that skip them per step: a module's steps and the
captured steps, whose per-step values (positions, block tables) are the host's own; and again
whenever the module's buffers change."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from ..model.rope import RopeTable
from ..model.state import IndexerState
from ..model.weights import AttnWeights, IndexerWeights
from ..ops.backends import resolve
from ..ops.registry import get_op


def check_op(op: str, backend: str, args: dict[str, Any]) -> None:
    """``op``'s checks on ``args`` (its arguments as the op takes them) and, when it runs on Triton
    (``backend``), the dims its launches need whatever the step (each kernel module's own
    ``check_dims``, which its launcher also runs): a ``ValueError`` naming the op, the backend and the
    weight or dim the kernels cannot take, before anything is launched. A hidden size ``D`` is named
    as ``w.wkv``'s columns (a module holds no ``x``)."""
    get_op(op).backend_args(args)
    if backend != "triton":
        return
    from ..kernels.compressor import check_kv_dims
    from ..kernels.lightning_indexer import check_dims as indexer_dims
    from ..kernels.o_proj import check_dims as o_proj_dims
    from ..kernels.qkv_proj_rope import check_dims as qkv_dims
    from ..kernels.sparse_attn import check_dims as attn_dims

    try:
        if op == "qkv_proj_rope":
            qkv_dims(args["w"], args["rope"].rope_dim)
        elif op == "kv_compressor":
            check_kv_dims(args["x"].shape[-1], args["w"], x="w.wkv")
        elif op == "indexer":
            indexer_dims(args["x"].shape[-1], args["w"], args["rope"].rope_dim, x="w.compressor.wkv")
        elif op == "sparse_attn_write":
            attn_dims(args["q"].shape[-1], args["rope"].rope_dim)
        elif op == "o_proj":
            o_proj_dims(args["o"].shape[-2], args["o"].shape[-1], args["w"])
    except ValueError as e:
        raise ValueError(f"{op} on the 'triton' backend: {e} (backend='reference' runs the op on the reference)") from e


def check_front_end_ops(
    attn: AttnWeights,
    indexer: IndexerWeights | None,
    rope: RopeTable,
    state: IndexerState | None,
    topk: int,
    offset: int,
    eps: float,
    backends: dict[str, str] | None = None,
) -> None:
    """``qkv_proj_rope``'s checks and, with ``indexer`` and ``state``, ``indexer``'s, on a one-token step
    of row 0 at position 0: it reads no pool row and needs no block, so only the operands' shapes,
    dtypes and devices (and ``topk``, ``offset``, ``eps``) are judged; with ``backends`` (op ->
    backend), also the dims of the ops that run on Triton (``check_op``)."""
    backends = backends or {}
    dev = attn.wq_a.device
    x = torch.zeros(1, 1, attn.wq_a.shape[1], dtype=torch.bfloat16, device=dev)
    one = torch.zeros(1, dtype=torch.int64, device=dev)
    args: dict[str, Any] = {"x": x[0], "w": attn, "positions": one, "rope": rope, "eps": eps}
    check_op("qkv_proj_rope", backends.get("qkv_proj_rope", "reference"), args)
    if indexer is None:
        return
    qr = torch.zeros(1, attn.wq_a.shape[0], dtype=torch.int8, device=dev)
    qr_scale = torch.ones(1, 1, dtype=torch.float32, device=dev)
    args = {"x": x, "qr": qr, "qr_scale": qr_scale, "w": indexer, "state": state, "start_pos": 0,
            "offset": offset, "rope": rope, "topk": topk, "eps": eps}  # fmt: skip
    check_op("indexer", backends.get("indexer", "reference"), args)


F = TypeVar("F", bound=Callable[..., Any])


def not_compiled(fn: F) -> F:
    """``fn`` (a step's entry, whose host bookkeeping changes every call) run as it is when a caller's
    ``torch.compile`` reaches it: traced, it was compiled again for every step's positions (95 graphs in
    12 steps of a tiny layer, then the recompile limit). Dynamo is imported only when something is being
    compiled, so ``import dsv4`` stays light."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return torch.compiler.disable(fn)(*args, **kwargs)
        return fn(*args, **kwargs)

    return run  # type: ignore[return-value]


def capturing(device: torch.device) -> bool:
    """Whether the current stream of CUDA ``device`` is being captured into a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def refuse_capture(device: torch.device, what: str, capture: str) -> None:
    """Refuse ``what`` inside a CUDA graph capture that is not its own (an engine capturing its whole
    model): its host side (positions, blocks, table entries, copied from pinned host memory) differs
    every call, and a replay would repeat the captured call's, stale. ``capture`` names the call that
    makes the step a graph of its own."""
    if capturing(device):
        raise RuntimeError(
            f"{what}: called while the current CUDA stream is being captured into a graph, which would replay "
            f"this call's host bookkeeping (positions, blocks, table entries) stale; call it outside the capture "
            f"(between a piecewise graph's pieces), where {capture} gives the step as a graph of its own"
        )


class CheckedBuffers(torch.nn.Module):
    """A module whose steps launch its ops unchecked, on buffers checked by its ``_check_ops`` (which
    each subclass defines).

    ``generation`` counts the changes of its buffers: a move or cast that gives a buffer another tensor
    (``.to()``, ``.cuda()``, ``.bfloat16()``: ``_apply``, also when a parent module is moved; a move to
    the device the buffers are on changes none) and a buffer registered or replaced. ``recheck()``,
    which a step calls first, runs ``_check_ops`` again after such a change, so a buffer that no longer
    fits its op (``model.to(torch.bfloat16)`` casting an fp32 scale or an FP8 weight) or what the host
    sized at build (``_check_sizes``: a pool of fewer blocks, a shorter RoPE table) is refused, naming
    it, before anything runs. Whatever was built on the old buffers (a captured step) compares
    ``generation`` with the one it was built at.

    Buffers made under ``torch.inference_mode`` (the module built, or moved, there) are inference
    tensors, which torch lets be written in place only in that mode: ``writing()`` is the mode a step
    or a reset writes them in (that one, or ``no_grad``), so the module works called from inside or
    outside it.
    """

    generation = 0  # changes of the buffers so far
    _checked = -1  # the generation _check_ops last passed
    backend = "auto"  # the backend the module was built with: "auto", "reference" or "triton"
    _inference = False  # whether a buffer is an inference tensor, as of generation _inference_at
    _inference_at = -1
    op_backends: dict[str, str]  # the backend each op runs on (_resolve_backends)
    _sizes: dict[str, torch.Size]  # the state buffers' shapes at build (_keep_sizes)
    _max_position = 0  # the positions a slot reaches (_keep_sizes)

    if TYPE_CHECKING:  # the buffers are registered by name, so a type checker cannot list them

        def __getattr__(self, name: str) -> Any: ...

    def _resolve_backends(self, ops: Iterable[str], device: torch.device) -> None:
        """``op_backends`` of ``ops`` on ``device``, a part of ``_check_ops``: ``auto`` resolved there, a
        backend that cannot run there refused, naming why, and an op without the backend's
        implementation on the reference."""
        name = resolve(self.backend, device)
        self.op_backends = {op: name if name in get_op(op).implementations else "reference" for op in ops}

    def _keep_sizes(self, max_position: int) -> None:
        """Record what the host's bookkeeping was sized for at build: the state buffers' shapes (the
        non-persistent ones: pools, rings, block tables; the blocks the allocator hands out, the tables'
        widths, the slots) and the positions a slot reaches, ``max_position`` (the RoPE rows it reads).
        ``_check_sizes`` holds a changed buffer to them."""
        self._sizes = {name: getattr(self, name).shape for name in sorted(self._non_persistent_buffers_set)}
        self._max_position = max_position

    def _check_sizes(self) -> None:
        """Raise ``ValueError`` naming the buffer where one no longer fits what the host's bookkeeping
        was sized for (``_keep_sizes``): a state buffer of another shape (a pool of fewer blocks than the
        allocator hands out, a block table of another width), a RoPE table of fewer rows than the
        positions a slot reaches. The ops' checks (a one-token step at position 0) judge neither. Run
        first by ``_check_ops``."""
        for name, shape in self._sizes.items():
            got = self._buffers[name]
            if got is None or got.shape != shape:
                raise ValueError(
                    f"{name}: expected shape {list(shape)} (the blocks, table widths and slots the module hands out "
                    f"were sized for it), got {None if got is None else list(got.shape)}"
                )
        for name in ("rope_cos", "rope_sin"):
            rows = self._buffers[name]
            if rows is not None and rows.dim() >= 1 and rows.shape[0] < self._max_position:
                raise ValueError(
                    f"{name}: the RoPE table has {rows.shape[0]} positions, max_position is {self._max_position}"
                )

    def _launch(self, op: str, out: object = None, **args: object) -> Any:
        """``op`` on its backend (``op_backends``), with ``args`` in the form the backends take (``start_pos``
        a ``StepPositions``) and without the op's checks, as a captured step launches it: they ran on the
        module's buffers (``recheck``), the step's input and positions are the caller's to check, and the
        block tables are the module's own."""
        desc = get_op(op)
        call = tuple(desc.bind(args).values())
        fn = desc.implementation(self.op_backends[op])
        return fn(*call) if desc.result is None else fn(*call, out=out)

    def recheck(self) -> None:
        """``_check_ops`` again if the buffers changed since it last passed (an int compare otherwise).
        A buffer refused after a change is named with the module's class in front of the op's words."""
        if self._checked == self.generation:
            return
        try:
            self._check_ops()
        except (TypeError, ValueError) as e:
            if self._checked < 0:  # at build: the message names the weights as the constructor took them
                raise
            raise type(e)(f"{type(self).__name__}: a buffer changed since the last check no longer fits: {e}") from e
        self._checked = self.generation

    def writing(self) -> AbstractContextManager:
        """The mode in which a step writes the buffers: ``torch.inference_mode()`` when one of them is an
        inference tensor (torch lets those be written in place only there), else ``torch.no_grad()``
        (weights that require grad would give the state an autograd graph that grows every step)."""
        if self._inference_at != self.generation:
            self._inference = any(t.is_inference() for t in self.buffers())
            self._inference_at = self.generation
        return torch.inference_mode() if self._inference else torch.no_grad()

    def check_captured(self, generation: int, name: str) -> None:
        """A captured step built at ``generation`` (its launches bound to the buffers as they were then)
        may replay only if the buffers have not changed since; ``name`` is the module's name in the error."""
        if self.generation != generation:
            raise ValueError(
                f"{name}: its buffers changed since this step was captured (.to(), a cast or a buffer replaced), "
                "and the step would read the old ones: capture it again"
            )

    def captured_writing(self, static: torch.Tensor) -> AbstractContextManager:
        """The mode a captured step with the static buffer ``static`` writes in: its static buffers were
        made in the capture's mode, the module's in its own; inference mode if either needs it."""
        return torch.inference_mode() if static.is_inference() else self.writing()

    def register_buffer(self, name: str, tensor: torch.Tensor | None, persistent: bool = True) -> None:
        """Also an assignment ``module.name = tensor`` to a buffer: ``nn.Module.__setattr__`` registers it."""
        changed = name not in self._buffers or self._buffers[name] is not tensor
        super().register_buffer(name, tensor, persistent)
        self.generation += changed

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> CheckedBuffers:
        before = dict(self._buffers)
        module = super()._apply(fn, recurse)
        # a move or cast that changes nothing (.to() of the device the buffers are on) returns each tensor itself
        self.generation += any(self._buffers[name] is not t for name, t in before.items())
        return module

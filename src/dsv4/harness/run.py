"""``dsv4 run``: the front end of one layer over a prefill and a few decode steps, each op checked
against the reference."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .. import ops
from ..devices import check_device
from ..engine.attention import DecodeAttention
from ..model.config import COMPRESS_RATIO, LAYER_KINDS, DeepSeekV4Config
from ..model.rope import rope_table
from ..model.state import DEFAULT_BLOCK_SIZE, STATE_SLOTS, IndexerState
from ..model.weights import MAX_SEED, LayerWeights, synthetic_activations, synthetic_weights
from ..ops.backends import resolve
from ..ops.registry import get_op, op_names
from ..ops.validate import check_int, step_positions
from ..reference.indexer import indexer_scores as reference_indexer_scores
from .cases import Case, make_case, run_case
from .golden import Report, compare, step_inputs

FRONT_END = (
    "qkv_proj_rope",
    "indexer_compressor",
    "indexer",
)  # the chain below runs them (the indexer, its compressor)


@dataclass
class Row:
    """One line of the run table."""

    step: str
    op: str
    backend: str
    shapes: str
    ms: float
    check: str
    passed: bool = True


def _timed(device: torch.device, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, (time.perf_counter() - t0) * 1e3


def _verdict(report: Report) -> tuple[str, bool]:
    if report.passed:
        return f"{report.verdict()} (vs reference, worst violation ratio {report.worst_violation_ratio:.2%})", True
    return report.verdict(), False


def positions_room(cfg: DeepSeekV4Config) -> int:
    """The positions a run at ``cfg`` can use: ``max_position_embeddings`` in whole compressed blocks
    (what ``make_case`` keeps for the other ops' cases)."""
    return cfg.max_position_embeddings - cfg.max_position_embeddings % COMPRESS_RATIO


def max_seq(cfg: DeepSeekV4Config) -> int:
    """The most new tokens per sequence per step a run at ``cfg`` takes: a case of the other ops
    (``make_case``) needs ``COMPRESS_RATIO`` positions of room beyond its step."""
    return max(positions_room(cfg) - COMPRESS_RATIO, 0)


def run_front_end(
    cfg: DeepSeekV4Config,
    backend: str = "auto",
    steps: int = 4,
    start_pos: int = 64,
    batch: int = 4,
    seq: int = 2,
    seed: int = 0,
    device: torch.device | str = "cpu",
    log: Callable[[Row], None] | None = None,
    weights: LayerWeights | None = None,
    layer: int | None = None,
) -> list[Row]:
    """Prefill ``start_pos`` tokens, then ``steps`` decode steps of ``seq`` tokens for ``batch``
    sequences: ``qkv_proj_rope`` then ``indexer`` each time. Every other registered op runs once
    on a seeded case at the first decode step's shape. Then the whole attention of a layer of each
    kind (SWA, CSA, HCA; ``DecodeAttention``) over the same prefill and steps. When ``backend`` is
    not the reference, every call is checked against the reference run on the same inputs.

    ``weights``: the layer's weights for ``cfg`` (e.g. from ``dsv4.load_layer``; default: seeded
    synthetic ones), and ``layer`` its number: then the other ops' cases of the layer's kind run on
    its own compressor, sink and output projection (rows ``L<layer> call``; the others' on synthetic
    ones, which their rows say), and the attention rows are that layer's (and without an indexer, a
    non-CSA layer, the front-end chain runs ``qkv_proj_rope`` alone). Activations are always synthetic
    RMS-normalized rows.

    Raises ``TypeError``/``ValueError`` naming the argument before anything is allocated: sizes are
    Python ints (``steps``, ``batch``, ``seq`` >= 1; ``start_pos`` >= 0; ``0 <= seed <= MAX_SEED``), the
    positions fit ``cfg.max_position_embeddings`` (in whole compressed blocks; ``seq`` at most
    ``max_seq(cfg)``), and the run's tensors fit the device's memory."""
    if not isinstance(cfg, DeepSeekV4Config):
        raise TypeError(f"cfg: expected a DeepSeekV4Config, got {type(cfg).__name__}")
    for arg, value, minimum in (("steps", steps, 1), ("start_pos", start_pos, 0), ("batch", batch, 1), ("seq", seq, 1)):
        check_int(arg, value, minimum)
    check_int("seed", seed, 0, MAX_SEED)
    if log is not None and not callable(log):
        raise TypeError(f"log: expected a callable or None, got {type(log).__name__}")
    if weights is not None and not isinstance(weights, LayerWeights):
        raise TypeError(f"weights: expected LayerWeights or None, got {type(weights).__name__}")
    device = check_device(device)
    name = resolve(backend, device)
    if seq > max_seq(cfg):
        raise ValueError(
            f"seq: at most {max_seq(cfg)} new tokens per step at max_position_embeddings "
            f"{cfg.max_position_embeddings} (a case of the other ops needs {COMPRESS_RATIO} positions beyond "
            f"its step), got {seq}"
        )
    end, room = start_pos + steps * seq, positions_room(cfg)
    if end > room:
        limit = f"max_position_embeddings {cfg.max_position_embeddings}"
        if room != cfg.max_position_embeddings:
            limit = f"{room} ({limit} in whole blocks of {COMPRESS_RATIO})"
        raise ValueError(f"start_pos + steps*seq = {end} exceeds {limit}")
    max_position = -(-end // COMPRESS_RATIO) * COMPRESS_RATIO
    check_fits(run_bytes(cfg, batch, seq, start_pos, max_position), device, f"batch={batch}, seq={seq}, "
               f"start_pos={start_pos}, steps={steps}")  # fmt: skip
    weights = synthetic_weights(cfg, seed=seed, device=device) if weights is None else weights.to(device)
    rope = rope_table(cfg, "compressed", max_position=max_position, device=device)
    state = IndexerState.empty(cfg, batch, max_position, device=device)
    plan = ([("prefill", 0, start_pos)] if start_pos else []) + [
        (f"decode {i + 1}", start_pos + i * seq, seq) for i in range(steps)
    ]
    rows: list[Row] = []

    def emit(row: Row) -> None:
        rows.append(row)
        if log:
            log(row)

    for i, (label, pos, s) in enumerate(plan):
        x = synthetic_activations((batch, s, cfg.hidden_size), seed=seed + 1000 + i, device=device)
        positions = (pos + torch.arange(s, device=device)).repeat(batch)
        qkv_args = (x.view(-1, cfg.hidden_size), weights.attn, positions, rope)
        qkv, ms = _timed(device, ops.qkv_proj_rope, *qkv_args, backend=name)
        check, ok = "is the reference", True
        if name != "reference":
            ref = ops.qkv_proj_rope(*qkv_args, backend="reference")
            check, ok = _verdict(compare("qkv_proj_rope", qkv._asdict(), ref._asdict()))
        emit(Row(label, "qkv_proj_rope", name, f"T={batch * s} q{list(qkv.q.shape)}", ms, check, ok))
        if weights.indexer is None:  # an SWA or HCA layer: no lightning indexer
            continue

        before = state.clone() if name != "reference" else None
        idx_args = (x, qkv.qr, qkv.qr_scale, weights.indexer)
        idx_kwargs: dict[str, Any] = dict(start_pos=pos, offset=cfg.sliding_window, rope=rope, topk=cfg.index_topk)
        idx, ms = _timed(device, ops.indexer, *idx_args, state=state, **idx_kwargs, backend=name)
        check, ok = "is the reference", True
        if before is not None:
            expected_state = before.clone()
            ops.indexer(*idx_args, state=expected_state, **idx_kwargs, backend="reference")  # the keys it writes
            inputs = step_inputs(x, pos, before, cfg.sliding_window)
            got = {**idx._asdict(), **state.tensors()}
            # spec §6 compares outputs "from the same inputs": the scores' inputs are the keys this step
            # wrote, which may differ from the reference's by the key cache rule (codes within ±1) and
            # are checked by that rule; so the expected scores and top-k are the reference's from the
            # pool this backend left (at flash dims a ±1 code can move a score whose 64 head terms
            # nearly cancel by more than 1/128: 44 of 4096 prefill scores on an H200 against the
            # reference's own keys)
            scored = reference_indexer_scores(
                x, qkv.qr, qkv.qr_scale, weights.indexer, state, step_positions(pos, batch, s, x.device),
                cfg.sliding_window, rope, cfg.index_topk,
            )  # fmt: skip
            want = {**scored._asdict(), **expected_state.tensors()}
            check, ok = _verdict(compare("indexer", got, want, inputs))
        shapes = f"B={batch} S={s} cache={idx.score.shape[-1]} topk={cfg.index_topk}"
        emit(Row(label, "indexer", name, shapes, ms, check, ok))

    checkpoint = layer is not None and weights.whole
    for op in op_names():  # every other registered op: one checked call at the first decode step's shape
        if op in FRONT_END:
            continue
        op_backend = name if name in get_op(op).implementations else "reference"
        room = max(max_position, -(-(seq + COMPRESS_RATIO) // COMPRESS_RATIO) * COMPRESS_RATIO)  # make_case's minimum
        kind = weights.kind if checkpoint and weights.kind in get_op(op).kinds else None
        case = make_case(cfg, op, "decode", seed, device, room, batch, seq, start_pos, kind)
        own = _use_layer_weights(case, weights) if checkpoint else None
        got, ms = _timed(device, run_case, case, op_backend)
        check, ok = "is the reference", True
        if op_backend != name:
            check = f"is the reference (no {name} implementation yet)"
        elif name != "reference":
            check, ok = _verdict(compare(op, got, run_case(case, "reference"), case.compare_inputs()))
        if own is False:
            check += "; synthetic weights (the layer has none for it)"
        emit(Row(f"L{layer} call" if own else "one call", op, op_backend, f"B={batch} S={seq}", ms, check, ok))

    if layer is not None and weights.whole:  # the checkpoint's layer
        run_attention_layer(cfg, layer, plan, name, batch, seed, device, emit, weights)
    else:  # the first layer of each kind the config has
        for kind in (k for k in LAYER_KINDS if k in _kinds(cfg)):
            run_attention_layer(cfg, cfg.first_layer(kind), plan, name, batch, seed, device, emit, None)
    return rows


def _use_layer_weights(case: Case, weights: LayerWeights) -> bool | None:
    """Put the checkpoint layer's own weights for ``case.op`` into ``case`` (its main compressor, its
    sink, its output projection) where the layer has them, of the case's kind and shapes: whether it
    did; None for an op that takes no weights (``window_kv_write``)."""
    if not {p.name for p in get_op(case.op).params} & {"w", "attn_sink"}:
        return None
    kind = case.meta.get("kind")
    own: dict[str, Any] = {}
    if case.op == "kv_compressor" and kind == weights.kind:
        own["w"] = weights.compressor
    elif case.op in ("sparse_attn", "sparse_attn_write") and kind == weights.kind:
        own["attn_sink"] = weights.attn_sink
    elif case.op == "o_proj":
        own["w"] = weights.o_proj
    own = {k: v for k, v in own.items() if v is not None}
    if not own or any(not _alike(v, case.args[k]) for k, v in own.items()):
        return False
    case.args.update(own)
    return True


def _alike(a: Any, b: Any) -> bool:
    """Two tensors, or two records of tensors, of the same shapes and dtypes."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype
    if type(a) is not type(b) or not dataclasses.is_dataclass(a):
        return False
    return all(_alike(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))


def _kinds(cfg: DeepSeekV4Config) -> set[str]:
    return {cfg.layer_kind(n) for n in range(len(cfg.compress_ratios))}


def run_attention_layer(
    cfg: DeepSeekV4Config,
    layer: int,
    plan: list[tuple[str, int, int]],
    backend: str,
    batch: int,
    seed: int,
    device: torch.device,
    emit: Callable[[Row], None],
    weights: LayerWeights | None = None,
) -> None:
    """Layer ``layer``'s whole attention (``DecodeAttention``) over the steps of ``plan``, a row each
    (``emit``), on ``backend`` (on a CPU, Triton's interpreter), with the RoPE table of the kind of ``weights``
    (default: synthetic weights of ``cfg``'s kind of ``layer``). Each step's ``y`` must be finite; the
    ops' numbers are checked op by op (the rows above: §8 compares each op from the same inputs, since
    a layer's FP8 row and activation quants turn last-bit differences of ``q``/``kv`` into whole e4m3
    steps of ``y``)."""
    weights = synthetic_weights(cfg, seed=seed, device=device, layer=layer) if weights is None else weights.to(device)
    end = max(p + s for _, p, s in plan)
    ratio = weights.compress_ratio
    max_position = -(-max(end, ratio, 1) // max(ratio, 1)) * max(ratio, 1)
    rope = rope_table(cfg, "window" if ratio == 0 else "compressed", max_position, device)  # the weights' kind
    module = DecodeAttention(weights, rope, cfg, batch=batch, max_position=max_position, backend=backend)
    ran = "+".join(sorted(set(module.op_backends.values())))
    for i, (label, _, s) in enumerate(plan):
        x = synthetic_activations((batch, s, cfg.hidden_size), seed=seed + 2000 + i, device=device)
        y, ms = _timed(device, module, x)
        finite = bool(torch.isfinite(y).all())
        check = ("y finite; " if finite else "MISMATCH y holds NaN or inf; ") + (
            "is the reference" if ran == "reference" else "its ops checked op by op above"
        )
        emit(
            Row(
                f"L{layer} {label}",
                f"{module.kind} attention",
                ran,
                f"B={batch} S={s} y{list(y.shape)}",
                ms,
                check,
                finite,
            )
        )


def run_bytes(cfg: DeepSeekV4Config, batch: int, seq: int, start_pos: int, max_position: int) -> int:
    """A lower bound on the bytes ``run_front_end`` holds at once: the indexer state three times (the
    state, its copy before a step and the reference's), and the largest step's activations, ``q``, ``kv``,
    ``qr``, scores (two backends) and indices."""
    hid, rows = cfg.index_head_dim, max_position // COMPRESS_RATIO
    blocks = -(-rows // DEFAULT_BLOCK_SIZE) * DEFAULT_BLOCK_SIZE
    state = batch * (2 * STATE_SLOTS * 2 * hid * 4 + blocks * (hid + 4))
    tokens = batch * max(seq, start_pos)
    per_token = 2 * cfg.hidden_size + 2 * (cfg.num_attention_heads + 1) * cfg.head_dim + cfg.q_lora_rank + 4
    per_token += 2 * 4 * rows + 4 * cfg.index_topk
    return 3 * state + tokens * per_token


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory on ``device`` (a GPU's total, or the host's physical memory); None if unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_fits(nbytes: int, device: torch.device, what: str) -> None:
    """Raise ``ValueError`` naming ``what`` when ``nbytes`` exceed ``device``'s memory: a clear error
    instead of an allocator failure (or the host swapping) part-way through."""
    total = device_memory(device)
    if total is not None and nbytes > total:
        raise ValueError(
            f"{what}: needs at least {nbytes / 2**30:.1f} GiB, more than the {total / 2**30:.1f} GiB of {device}; "
            "use a smaller batch, seq or start_pos"
        )


def format_row(row: Row) -> str:
    return f"{row.step:<13} {row.op:<17} {row.backend:<9} {row.shapes:<34} {row.ms:>9.2f}  {row.check}"


HEADER = f"{'step':<13} {'op':<17} {'backend':<9} {'shapes':<34} {'time ms':>9}  check"  # steps as "L42 decode 12"

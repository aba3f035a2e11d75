"""Seeded inputs for one call of an op, and how to run a backend on them.

A ``Case`` is what the golden files, ``dsv4 run``, the tests and the benchmark share: the op's
arguments (weights, state, positions included) for a preset, a mode and a seed. The pieces every
op draws from are made here once; the op's descriptor picks its arguments from them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..model.config import COMPRESS_RATIO, DeepSeekV4Config, mode_shape
from ..model.rope import rope_table
from ..model.state import IndexerState
from ..model.weights import MAX_SEED, synthetic_activations, synthetic_weights
from ..ops.api import call_op
from ..ops.case_inputs import CaseInputs
from ..ops.registry import get_op
from ..ops.validate import check_int
from ..reference.indexer import indexer_scores
from .golden import step_inputs

DEFAULT_MAX_POSITION = 8192  # positions a case spans unless told otherwise (keeps flash tables small)


@dataclass
class Case:
    """One op call: ``op``, its keyword ``args`` and where they came from (``meta``)."""

    op: str
    args: dict[str, Any]
    meta: dict[str, Any]
    recorded_inputs: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    def state(self) -> Any:
        return self.args.get("state")

    def compare_inputs(self) -> dict[str, Any]:
        """What ``golden.compare`` needs of the inputs of a stateful step: for the indexer's state its
        offset, start_pos, seq and pre-step cache; for any other record the op updates, its tensors
        before the step (``before``, by output name); nothing for an op without state.

        Copies on the CPU, never ``args``' own tensors. After ``record_inputs`` (``golden_io.load``
        calls it) they are the inputs as recorded, so a kernel run on ``args`` in place, which updates
        the state, is still held to the state before it ran; otherwise the inputs as ``args`` hold them
        now: take them before running a kernel on ``args`` in place, or run it on ``clone_args``."""
        if self.recorded_inputs is not None:
            return dict(self.recorded_inputs)
        a = self.args
        if isinstance(a.get("state"), IndexerState) and "start_pos" in a:
            return step_inputs(a["x"], a["start_pos"], a["state"], a.get("offset", 0))
        before = record_outputs({name: a[name] for name in mutated_args(self.op)})
        copies = {k: t.detach().to("cpu", copy=True) for k, t in before.items()}
        return {"before": copies} if copies else {}

    def record_inputs(self) -> None:
        """Keep ``compare_inputs()`` as ``args`` hold them now (copies): what later calls return."""
        self.recorded_inputs = None
        self.recorded_inputs = self.compare_inputs()


def make_case(
    cfg: DeepSeekV4Config,
    op: str,
    mode: str = "decode",
    seed: int = 0,
    device: torch.device | str | None = None,
    max_position: int | None = None,
    batch: int | None = None,
    seq: int | None = None,
    start_pos: int | list[int] | None = None,
    kind: str | None = None,
) -> Case:
    """Seeded arguments of ``op`` for preset ``cfg`` in ``mode`` (``decode`` or ``prefill``).

    Decode rows start at different random positions (a per-row ``start_pos`` tensor) with a
    prefilled state; prefill starts every row at 0 with an empty state. ``batch``/``seq``
    override the mode's shape; ``start_pos`` puts every row at that position, or row ``b`` at
    ``start_pos[b]`` (state prefilled either way). ``meta["start_pos"]`` lists each row's start.
    ``kind``: the attention layer kind (``"csa"``, ``"hca"``, ``"swa"``) of an op that runs
    differently in each (``OpDescriptor.kinds``; default its first); ``meta["kind"]`` says which.

    Raises ``TypeError``/``ValueError`` naming the argument before anything is drawn: ``batch``,
    ``seq`` and ``max_position`` are ints >= 1 or None (the default), ``0 <= seed <= MAX_SEED``,
    ``start_pos`` an int or a list of ints.
    """
    for name, value in (("batch", batch), ("seq", seq), ("max_position", max_position)):
        if value is not None:  # None: the mode's shape, or DEFAULT_MAX_POSITION
            check_int(name, value, 1)
    check_int("seed", seed, 0, MAX_SEED)
    if start_pos is not None:  # its range is checked below, against the case's positions
        for row_start in start_pos if isinstance(start_pos, list) else [start_pos]:
            check_int("start_pos", row_start)
    desc = get_op(op)
    kind_args = desc.kind_args(kind)  # checked before anything is drawn
    shape = mode_shape(cfg, mode)
    b = shape.batch if batch is None else batch
    s = shape.seq if seq is None else seq
    n = min(cfg.max_position_embeddings, DEFAULT_MAX_POSITION if max_position is None else max_position)
    n -= n % COMPRESS_RATIO
    if n < s + COMPRESS_RATIO:
        raise ValueError(f"max_position {n} too small for S={s}")
    g = torch.Generator().manual_seed(seed)
    if mode == "prefill":
        start = torch.zeros(b, dtype=torch.int64)
    else:
        start = torch.randint(0, n - s + 1, (b,), generator=g)  # drawn either way: same qr for any start_pos
    if start_pos is not None:
        rows = start_pos if isinstance(start_pos, list) else [start_pos] * b
        if len(rows) != b or not all(0 <= p <= n - s for p in rows):
            raise ValueError(
                f"start_pos: expected {b} values in [0, {n - s}] (max_position {n}, S={s}), got {start_pos}"
            )
        start = torch.tensor(rows, dtype=torch.int64)
    inputs = CaseInputs(
        cfg=cfg,
        mode=mode,
        seed=seed,
        device=device,
        max_position=n,
        start=start,
        weights=synthetic_weights(cfg, seed=seed, device=device),
        rope=rope_table(cfg, "compressed", max_position=n, device=device),
        x=synthetic_activations((b, s, cfg.hidden_size), seed=seed + 1, device=device),
        generator=g,
    )
    meta = {
        "op": op, "preset": cfg.name, "mode": mode, "seed": seed, "batch": b, "seq": s, "max_position": n,
        "start_pos": start.tolist(),
    }  # fmt: skip
    if desc.kinds:
        meta["kind"] = kind or desc.kinds[0]
    return Case(op, desc.case_args(inputs, **kind_args), meta)


def mutated_args(op: str) -> tuple[str, ...]:
    """The arguments ``op`` updates in place (the records its descriptor's ``mutates`` paths start with)."""
    return tuple(dict.fromkeys(m.split(".", 1)[0] for m in get_op(op).mutates))


def record_outputs(records: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of the records an op updates, by output name: ``state``'s by field path
    (``kv_state``, ``pool.nope``), any other record's under its argument name (``pool.nope``)."""
    out: dict[str, torch.Tensor] = {}
    for name, record in records.items():
        tensors = record.tensors() if hasattr(record, "tensors") else {"": record}
        prefix = "" if name == "state" else f"{name}."
        out.update({(prefix + k).rstrip("."): t for k, t in tensors.items()})
    return out


def clone_args(args: dict[str, Any], op: str | None = None) -> dict[str, Any]:
    """The arguments with the caller-owned records ``op`` updates (default: ``state``) copied, so a run
    leaves ``args`` as they were."""
    out = dict(args)
    for name in mutated_args(op) if op is not None else ("state",):
        if name in out:
            out[name] = out[name].clone()
    return out


def run_case(case: Case, backend: str) -> dict[str, torch.Tensor]:
    """Run ``case`` on ``backend`` (on a copy of its state) -> every output by name, the state after included."""
    args = clone_args(case.args, case.op)
    result = call_op(case.op, backend, **args)
    out: dict[str, torch.Tensor] = {}
    if result is not None:
        out.update(result._asdict())
    out.update(record_outputs({name: args[name] for name in mutated_args(case.op) if name in args}))
    return out


def expected_outputs(case: Case, got: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a backend's outputs of ``case`` (``got``, from ``run_case``) are judged against (spec §6,
    outputs "from the same inputs"): the reference's outputs of the case, except the indexer's scores and
    top-k, which are the reference's on the key pool ``got`` holds. The keys the step wrote are judged
    against the reference's own by the key cache rule, which lets a code differ by one; through a key
    scored in the same step such a code can move a score by more than the score's tolerance, and at a
    near-tie swap two top-k indices. ``dsv4 run``, ``dsv4 bench`` and ``dsv4 golden check`` (``expected_for``)
    judge the indexer alike."""
    return expected_for(case, got, run_case(case, "reference"))


def expected_for(
    case: Case, got: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``expected`` (the reference's outputs of ``case``, run or saved) as spec §6 judges ``got`` by them,
    "from the same inputs": for the indexer whose key pool in ``got`` is not the expected one (the key
    cache rule lets a code differ by one), its scores and top-k are the reference's on ``got``'s pool;
    anything else as it is. ``case.args`` other than its state must hold the step's inputs."""
    pool = ("keys", "key_scale")
    if case.op != "indexer" or any(k not in got or k not in expected for k in pool):  # compare names a part missing
        return dict(expected)
    if all(torch.equal(got[k], expected[k]) for k in pool):
        return dict(expected)
    state = IndexerState(**{k: got[k] for k in case.args["state"].tensors()})
    call = get_op("indexer").backend_args({**case.args, "state": state})
    return {**expected, **indexer_scores(*call[:9])._asdict()}

"""The host side of a decode step, timed with nothing launched.

In a decode loop the host prepares a step while the GPU runs the one before (``examples/attention_loop.py
--back-to-back``), so a step costs the larger of the two. This times the host's share on the machine it
runs on, the modules on the CPU and no op called:

- ``DecodeAttention`` (each kind asked for): ``step_starts`` (positions and re-runs checked, the block
  plan counted against the free blocks), ``begin_step`` (blocks given, table entries written) and
  ``end_step`` (window blocks given back, positions moved), as ``AttentionGraph`` runs them a step;
- ``DecodeFrontEnd`` (``--kind csa``): ``check_starts``, the block reservation and ``advance``, as
  ``CapturedDecodeStep`` runs them;
- with ``--eager``, ``DecodeAttention.forward`` of each kind with every op a stub that returns
  preallocated outputs: an eager step's host work (its checks, the bookkeeping, each launch's Python).

Each slot first stands at ``--context`` (its blocks given as a prefill would leave them), then
``--steps`` decode steps of ``--seq`` tokens run; the first ``--warmup`` are not counted.

    python benchmarks/host_step.py --preset flash --batch 64 --seq 2 --context 2048 65536 --eager
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import dsv4
from dsv4.arg_types import int_at_least
from dsv4.model.structs import QKV, AttnOut, OProjOut
from dsv4.model.weights import AttnWeights
from dsv4.ops.registry import OpDescriptor

Part = tuple[str, Callable[[], object]]


def attention_module(
    cfg: dsv4.DeepSeekV4Config, kind: str, batch: int, seq: int, context: int, steps: int
) -> dsv4.DecodeAttention:
    """The flash layer of ``kind`` on the CPU, every slot standing at ``context``."""
    layer = cfg.first_layer(kind)
    ratio = max(cfg.layer_ratio(layer), 4)
    max_position = ratio * -(-(context + seq * steps + 1) // ratio)
    cpu = torch.device("cpu")
    m = dsv4.DecodeAttention(
        dsv4.synthetic_weights(cfg, seed=0, device=cpu, layer=layer),
        dsv4.layer_rope_table(cfg, layer, max_position, cpu),
        cfg, batch=batch, max_position=max_position, backend="reference",
    )  # fmt: skip
    if context:
        m.end_step(m.begin_step([0] * batch, context), [0] * batch, context)
    return m


def attention_parts(
    cfg: dsv4.DeepSeekV4Config, kind: str, batch: int, seq: int, context: int, steps: int
) -> list[Part]:
    m = attention_module(cfg, kind, batch, seq, context, steps)
    held: dict[str, Any] = {}

    def starts() -> None:
        held["starts"] = m.step_starts(batch, seq, None, seq)

    def begin() -> None:
        held["plan"] = m.begin_step(held["starts"], seq)

    def end() -> None:
        m.end_step(held["plan"], held["starts"], seq)

    return [("step_starts", starts), ("begin_step", begin), ("end_step", end)]


def stub_ops(results: dict[str, object]) -> None:
    """From now on in this process every op's implementation, whatever its backend, is a stub that returns
    ``results[op]`` (preallocated outputs) or, for an op given ``out=``, that: a step's host work (its
    checks, the bookkeeping, the Python of each launch) is all that runs."""

    def implementation(desc: OpDescriptor, backend: str) -> Callable[..., object]:
        result = results.get(desc.name)
        return lambda *args, out=None: out if result is None else result

    OpDescriptor.implementation = implementation  # type: ignore[method-assign, assignment]


def qkv_of(attn: AttnWeights, t: int) -> QKV:
    """Outputs of ``qkv_proj_rope`` for ``t`` tokens (uninitialized: a stub's result)."""
    hd, ql = attn.wkv.shape[0], attn.wq_a.shape[0]
    bf16 = torch.bfloat16
    q = torch.empty(t, attn.wq_b.shape[0] // hd, hd, dtype=bf16)
    return QKV(q, torch.empty(t, hd, dtype=bf16), torch.empty(t, ql, dtype=torch.int8), torch.empty(t, 1))


def eager_parts(cfg: dsv4.DeepSeekV4Config, kind: str, batch: int, seq: int, context: int, steps: int) -> list[Part]:
    """``DecodeAttention.forward`` of a decode step, every op a stub (``stub_ops``)."""
    m = attention_module(cfg, kind, batch, seq, context, steps)
    t, d = batch * seq, m.attn_wq_a.shape[1]
    qkv = qkv_of(m.attn, t)
    o = AttnOut(torch.empty(batch, seq, *qkv.q.shape[1:], dtype=torch.bfloat16))
    x = torch.zeros(batch, seq, d, dtype=torch.bfloat16)
    stub_ops({"qkv_proj_rope": qkv, "sparse_attn_write": o, "o_proj": OProjOut(torch.empty(t, d, dtype=x.dtype))})
    return [("forward", lambda: m(x))]


def frontend_eager_parts(cfg: dsv4.DeepSeekV4Config, batch: int, seq: int, context: int, steps: int) -> list[Part]:
    """``DecodeFrontEnd.forward`` of a decode step, both ops stubs (``stub_ops``)."""
    fe = frontend_module(cfg, batch, seq, context, steps)
    stub_ops({"qkv_proj_rope": qkv_of(fe.attn, batch * seq)})
    x = torch.zeros(batch, seq, fe.attn_wq_a.shape[1], dtype=torch.bfloat16)
    return [("forward", lambda: fe(x))]


def frontend_module(cfg: dsv4.DeepSeekV4Config, batch: int, seq: int, context: int, steps: int) -> dsv4.DecodeFrontEnd:
    """The flash front end on the CPU, every slot standing at ``context``."""
    max_position = 4 * -(-(context + seq * steps + 1) // 4)
    cpu = torch.device("cpu")
    fe = dsv4.DecodeFrontEnd(
        dsv4.synthetic_weights(cfg, seed=0, device=cpu),
        dsv4.rope_table(cfg, "compressed", max_position=max_position, device=cpu),
        batch=batch, max_position=max_position, topk=cfg.index_topk, offset=cfg.sliding_window, backend="reference",
    )  # fmt: skip
    if context:
        fe.reserve([0] * batch, context)
        fe.advance([0] * batch, context)
    return fe


def frontend_parts(cfg: dsv4.DeepSeekV4Config, batch: int, seq: int, context: int, steps: int) -> list[Part]:
    fe = frontend_module(cfg, batch, seq, context, steps)
    held: dict[str, list[int]] = {}

    def starts() -> None:
        held["starts"] = fe.check_starts(batch, seq, None)

    def reserve() -> None:
        fe.reserve(held["starts"], seq)

    def advance() -> None:
        fe.advance(held["starts"], seq)

    return [("check_starts", starts), ("reserve", reserve), ("advance", advance)]


def time_parts(parts: list[Part], steps: int, warmup: int) -> dict[str, float]:
    """Median milliseconds of each part and of the whole step over ``steps - warmup`` steps."""
    times: dict[str, list[float]] = {name: [] for name, _ in [*parts, ("step", None)]}
    for i in range(steps):
        t0 = t = time.perf_counter()
        laps = []
        for _, fn in parts:
            fn()
            laps.append(time.perf_counter() - t)
            t = time.perf_counter()
        if i >= warmup:
            for (name, _), lap in zip(parts, laps, strict=True):
                times[name].append(lap * 1e3)
            times["step"].append((t - t0) * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--preset", default="flash", help="a preset, or one of N tensor-parallel ranks of one (e.g. flash/tp8)"
    )
    parser.add_argument("--kind", nargs="+", default=["csa", "hca", "swa"], choices=["swa", "csa", "hca"])
    parser.add_argument("--batch", type=int_at_least(1), default=64)
    parser.add_argument("--seq", type=int_at_least(1), default=2, help="tokens per sequence per step (MTP)")
    parser.add_argument("--context", type=int_at_least(0), nargs="+", default=[2048], help="where each slot stands")
    parser.add_argument("--steps", type=int_at_least(1), default=400)
    parser.add_argument("--warmup", type=int_at_least(0), default=50)
    parser.add_argument(
        "--eager", action="store_true",
        help="also time DecodeAttention.forward of a decode step with every op a stub (its host work alone)",
    )  # fmt: skip
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    if not 0 <= args.warmup < args.steps:
        parser.error("--warmup: expected 0 <= warmup < steps")

    try:
        cfg = dsv4.get_config(args.preset)
    except ValueError as e:
        parser.error(f"--preset: {e}")
    rows = []
    for context in args.context:
        cases: list[tuple[str, str | None, Callable[..., list[Part]]]]
        cases = [(f"DecodeAttention {kind}", kind, attention_parts) for kind in args.kind]
        cases += [(f"DecodeAttention {kind} eager forward", kind, eager_parts) for kind in args.kind if args.eager]
        if "csa" in args.kind:
            cases.append(("DecodeFrontEnd", None, frontend_parts))
            cases += [("DecodeFrontEnd eager forward", None, frontend_eager_parts)] if args.eager else []
        for module, kind, build in cases:
            if kind is None:
                parts = build(cfg, args.batch, args.seq, context, args.steps)
            else:
                parts = build(cfg, kind, args.batch, args.seq, context, args.steps)
            ms = time_parts(parts, args.steps, args.warmup)
            rows.append({"module": module, "batch": args.batch, "seq": args.seq, "context": context, "median_ms": ms})
            laps = ", ".join(f"{name} {v:.4f}" for name, v in ms.items() if name != "step")
            print(f"{module} B={args.batch} S={args.seq} context={context}: host step {ms['step']:.4f} ms ({laps})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": cfg.name, "steps": args.steps, "warmup": args.warmup, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

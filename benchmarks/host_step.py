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

import torch

import dsv4
from dsv4.model.structs import QKV, AttnOut, OProjOut
from dsv4.ops.registry import get_op

Part = tuple[str, Callable[[], object]]
STUB = "host-only"  # the benchmark's backend for --eager: every op returns preallocated outputs


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
    held: dict[str, object] = {}

    def starts() -> None:
        held["starts"] = m.step_starts(batch, seq, None, seq)

    def begin() -> None:
        held["plan"] = m.begin_step(held["starts"], seq)

    def end() -> None:
        m.end_step(held["plan"], held["starts"], seq)

    return [("step_starts", starts), ("begin_step", begin), ("end_step", end)]


def eager_parts(cfg: dsv4.DeepSeekV4Config, kind: str, batch: int, seq: int, context: int, steps: int) -> list[Part]:
    """``DecodeAttention.forward`` of a decode step with every op run by a stub that returns preallocated
    outputs (a backend of the benchmark's own, registered on the ops' descriptors): the call's host work
    (its checks, the bookkeeping, the Python of each launch) without the ops'."""
    m = attention_module(cfg, kind, batch, seq, context, steps)
    t, d, hd = batch * seq, m.attn_wq_a.shape[1], m.attn_wkv.shape[0]
    heads, ql = m.attn_wq_b.shape[0] // hd, m.attn_wq_a.shape[0]
    bf16 = dict(dtype=torch.bfloat16)
    results = {
        "qkv_proj_rope": QKV(
            torch.empty(t, heads, hd, **bf16),
            torch.empty(t, hd, **bf16),
            torch.empty(t, ql, dtype=torch.int8),
            torch.empty(t, 1),
        ),  # fmt: skip
        "sparse_attn_write": AttnOut(torch.empty(batch, seq, heads, hd, **bf16)),
        "o_proj": OProjOut(torch.empty(t, d, **bf16)),
    }
    for op in m.op_backends:
        result = results.get(op)
        get_op(op)._impls[STUB] = lambda *args, out=None, r=result: out if r is None else r
    m.op_backends = {op: STUB for op in m.op_backends}
    x = torch.zeros(batch, seq, d, **bf16)
    return [("forward", lambda: m(x))]


def frontend_parts(cfg: dsv4.DeepSeekV4Config, batch: int, seq: int, context: int, steps: int) -> list[Part]:
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
    times: dict[str, list[float]] = {name: [] for name, _ in parts} | {"step": []}
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
    parser.add_argument("--preset", default="flash", choices=sorted(dsv4.PRESETS))
    parser.add_argument("--kind", nargs="+", default=["csa", "hca", "swa"], choices=["swa", "csa", "hca"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=2, help="tokens per sequence per step (MTP)")
    parser.add_argument("--context", type=int, nargs="+", default=[2048], help="where each slot stands")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument(
        "--eager", action="store_true",
        help="also time DecodeAttention.forward of a decode step with every op a stub (its host work alone)",
    )  # fmt: skip
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    if not 0 <= args.warmup < args.steps:
        parser.error("--warmup: expected 0 <= warmup < steps")

    cfg = dsv4.get_config(args.preset)
    rows = []
    for context in args.context:
        cases = [(f"DecodeAttention {kind}", kind, attention_parts) for kind in args.kind]
        cases += [(f"DecodeAttention {kind} eager forward", kind, eager_parts) for kind in args.kind if args.eager]
        cases += [("DecodeFrontEnd", "csa", None)] if "csa" in args.kind else []
        for module, kind, build in cases:
            if build is None:
                parts = frontend_parts(cfg, args.batch, args.seq, context, args.steps)
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

"""N decode steps of one layer's whole attention (``DecodeAttention``) on synthetic weights.

Prints each step's time and, with ``--capture``, the same steps replayed from one CUDA graph
(``DecodeAttention.capture``; on a CPU its static launches run eagerly). Each step is timed on its
own, from a synchronized device to a synchronized device, so its time holds the host's bookkeeping
(block allocation, block-table writes) and the graph's launch as well as the GPU's work. With
``--back-to-back`` the same number of steps is then launched one after another and synchronized
once (timed on the second of two such runs): the host prepares a step while the GPU still runs
earlier ones, as in an engine's decode loop, so the time a step is the larger of the two; the
median time a call of that run spends on the host (until it returns, the device not waited for) says
which of the two it is. The last lines give the medians (and the back-to-back and host times) and,
on a GPU in the bench's device table, the
step's memory floor (its ops' minimal bytes over the datasheet bandwidth) and each figure's
multiple of it.

    python examples/attention_loop.py --preset tiny --kind csa --steps 8
    python examples/attention_loop.py --preset flash --kind csa --batch 64 --prefill 4096 --steps 50 --capture \
        --back-to-back  # GPU
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import dsv4
from dsv4.arg_types import device as device_arg
from dsv4.arg_types import int_at_least
from dsv4.bench.timing import DeviceSpec, device_spec
from dsv4.ops.step_cost import step_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--preset", default="tiny", help="a preset, or one of N tensor-parallel ranks of one (e.g. flash/tp8)"
    )
    parser.add_argument("--kind", default="csa", choices=["swa", "csa", "hca"])
    parser.add_argument("--backend", default="auto", choices=["auto", *dsv4.BACKENDS])
    parser.add_argument("--batch", type=int_at_least(1), default=4)
    parser.add_argument("--seq", type=int_at_least(1), default=2, help="tokens per sequence per step (MTP)")
    parser.add_argument("--prefill", type=int_at_least(0), default=64, help="prompt tokens before decoding")
    parser.add_argument("--steps", type=int_at_least(1), default=8)
    parser.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--capture", action="store_true", help="then replay the steps from one CUDA graph")
    parser.add_argument(
        "--back-to-back", action="store_true",
        help="then time as many steps again in each mode, launched one after another with one sync at the end",
    )  # fmt: skip
    args = parser.parse_args()

    try:
        cfg = dsv4.get_config(args.preset)
    except ValueError as e:
        parser.error(f"--preset: {e}")
    device = torch.device(args.device)
    layer = cfg.first_layer(args.kind)
    runs = (2 if args.capture else 1) * (3 if args.back_to_back else 1)
    positions = args.prefill + runs * args.seq * args.steps  # the prompt, then the steps of every mode run
    if positions > cfg.max_position_embeddings:
        parser.error(f"--prefill/--steps/--seq: {positions} positions, past {args.preset}'s max_position_embeddings "
                     f"{cfg.max_position_embeddings}")  # fmt: skip
    ratio = max(cfg.layer_ratio(layer), 4)
    max_position = ratio * -(-positions // ratio)
    attn = dsv4.DecodeAttention(
        dsv4.synthetic_weights(cfg, seed=0, device=device, layer=layer),
        dsv4.layer_rope_table(cfg, layer, max_position, device),
        cfg, batch=args.batch, max_position=max_position, backend=args.backend,
    )  # fmt: skip
    if args.prefill:
        attn(dsv4.synthetic_activations((args.batch, args.prefill, cfg.hidden_size), seed=1, device=device))
    print(f"preset={cfg.name} layer={layer} ({args.kind}) backends={attn.op_backends} device={device} "
          f"batch={args.batch} seq={args.seq} prefill={args.prefill}")  # fmt: skip
    print(f"{'step':>5} {'mode':>6} {'position':>9} {'ms':>9}")
    modes: list[tuple[str, Callable[..., Any]]] = [("eager", attn)]
    if args.capture:
        modes.append(("graph", attn.capture(seq=args.seq)))
    medians, back_to_back, host, starts = {}, {}, {}, []
    for mode, step_fn in modes:
        times = []
        for step in range(args.steps):
            x = dsv4.synthetic_activations((args.batch, args.seq, cfg.hidden_size), seed=100 + step, device=device)
            starts = list(attn.next_pos)
            sync(device)
            t0 = time.perf_counter()
            y = step_fn(x)
            sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
            check(y, f"step {step} ({mode})")
            print(f"{step:>5} {mode:>6} {starts[0]:>9} {times[-1]:>9.3f}")
        medians[mode] = statistics.median(times)
        if args.back_to_back:
            xs = [
                dsv4.synthetic_activations((args.batch, args.seq, cfg.hidden_size), seed=200 + step, device=device)
                for step in range(args.steps)
            ]  # fmt: skip
            # twice, timing the second: the first grows the pinned host blocks that the steps' block-table and
            # position copies stage through while the host runs ahead of the device
            for _ in range(2):
                calls = []
                sync(device)
                t0 = time.perf_counter()
                for x in xs:
                    t1 = time.perf_counter()
                    y = step_fn(x)
                    calls.append((time.perf_counter() - t1) * 1e3)
                sync(device)
                check(y, f"the last back-to-back step ({mode})")
            back_to_back[mode] = (time.perf_counter() - t0) * 1e3 / args.steps
            host[mode] = statistics.median(calls)
    spec = device_spec(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    floor_ms = step_bytes(cfg, layer, starts, args.seq) / spec.bandwidth * 1e3 if spec is not None else None
    print(figures_line("median ms per step", medians, floor_ms, spec))
    if back_to_back:
        print(figures_line("back to back, ms per step", back_to_back, floor_ms, spec))
        print(figures_line("host side of a back-to-back call, median ms", host, None, None))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check(y: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(y).all()):
        raise SystemExit(f"{what}: y holds NaN or inf")


def figures_line(label: str, figures: dict[str, float], floor_ms: float | None, spec: DeviceSpec | None) -> str:
    """``label: eager 1.234, graph 0.567[; memory floor F ms (device): eager Nx, graph Mx]``."""
    line = f"{label}: " + ", ".join(f"{m} {t:.3f}" for m, t in figures.items())
    if floor_ms is not None and spec is not None:
        line += f"; memory floor {floor_ms:.4f} ms ({spec.name}): " + ", ".join(
            f"{m} {t / floor_ms:.1f}x" for m, t in figures.items()
        )
    return line


if __name__ == "__main__":
    main()

"""N decode steps of one layer's whole attention (``DecodeAttention``) on synthetic weights.

Prints each step's time and, with ``--capture``, the same steps replayed from one CUDA graph
(``DecodeAttention.capture``; on a CPU its static launches run eagerly). The last line gives the
medians and, on a GPU in the bench's device table, the step's memory floor (its ops' minimal bytes
over the datasheet bandwidth) and each median's multiple of it.

    python examples/attention_loop.py --preset tiny --kind csa --steps 8
    python examples/attention_loop.py --preset flash --kind csa --batch 64 --prefill 4096 --steps 50 --capture  # GPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import dsv4
from dsv4.bench.timing import device_spec
from dsv4.ops.step_cost import step_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(dsv4.PRESETS))
    parser.add_argument("--kind", default="csa", choices=["swa", "csa", "hca"])
    parser.add_argument("--backend", default="auto", choices=["auto", *dsv4.BACKENDS])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2, help="tokens per sequence per step (MTP)")
    parser.add_argument("--prefill", type=int, default=64, help="prompt tokens before decoding")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--capture", action="store_true", help="then replay the steps from one CUDA graph")
    args = parser.parse_args()

    cfg = dsv4.get_config(args.preset)
    device = torch.device(args.device)
    layer = cfg.first_layer(args.kind)
    runs = 2 if args.capture else 1
    ratio = max(cfg.layer_ratio(layer), 4)
    max_position = ratio * -(-(args.prefill + runs * args.seq * args.steps) // ratio)
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
    modes = [("eager", attn)]
    if args.capture:
        modes.append(("graph", attn.capture(seq=args.seq)))
    medians, starts = {}, []
    for mode, step_fn in modes:
        times = []
        for step in range(args.steps):
            x = dsv4.synthetic_activations((args.batch, args.seq, cfg.hidden_size), seed=100 + step, device=device)
            starts = list(attn.next_pos)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            y = step_fn(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append((time.perf_counter() - t0) * 1e3)
            if not bool(torch.isfinite(y).all()):
                raise SystemExit(f"step {step} ({mode}): y holds NaN or inf")
            print(f"{step:>5} {mode:>6} {starts[0]:>9} {times[-1]:>9.3f}")
        medians[mode] = statistics.median(times)
    line = "median ms per step: " + ", ".join(f"{m} {t:.3f}" for m, t in medians.items())
    spec = device_spec(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    if spec is not None:
        floor_ms = step_bytes(cfg, layer, starts, args.seq) / spec.bandwidth * 1e3
        line += f"; memory floor {floor_ms:.4f} ms ({spec.name}): " + ", ".join(
            f"{m} {t / floor_ms:.1f}x" for m, t in medians.items()
        )
    print(line)


if __name__ == "__main__":
    main()

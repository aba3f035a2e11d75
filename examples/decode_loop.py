"""N decode steps of one layer's front end on synthetic weights.

Prints each step's time and how the indexer's top-k set moves: how many of the selected cache
positions are new compared with the previous step (slot 0, last token). With ``--capture`` (CUDA
and the Triton backend only: elsewhere a usage error, exit 2) the steps run as eager launches first,
then as replays of one captured CUDA graph, and the medians of both are printed.

    python examples/decode_loop.py --preset tiny --steps 32
    python examples/decode_loop.py --preset flash --batch 64 --steps 100 --prefill 4096 --capture   # GPU
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--preset", default="tiny", help="a preset, or one of N tensor-parallel ranks of one (e.g. flash/tp8)"
    )
    parser.add_argument("--backend", default="auto", choices=["auto", *dsv4.BACKENDS])
    parser.add_argument("--batch", type=int_at_least(1), default=4)
    parser.add_argument("--seq", type=int_at_least(1), default=2, help="tokens per sequence per step (MTP)")
    parser.add_argument("--prefill", type=int_at_least(0), default=256, help="prompt tokens before decoding")
    parser.add_argument("--steps", type=int_at_least(1), default=32)
    parser.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--capture", action="store_true", help="then replay the steps from one CUDA graph")
    args = parser.parse_args()

    try:
        cfg = dsv4.get_config(args.preset)
    except ValueError as e:
        parser.error(f"--preset: {e}")
    device = torch.device(args.device)
    if args.capture and device.type != "cuda":
        parser.error(f"--capture: CUDA graphs need a CUDA device, --device is {device}")
    runs = 2 if args.capture else 1
    positions = args.prefill + runs * args.seq * args.steps  # the prompt, then the steps of every mode run
    if positions > cfg.max_position_embeddings:
        parser.error(f"--prefill/--steps/--seq: {positions} positions, past {args.preset}'s max_position_embeddings "
                     f"{cfg.max_position_embeddings}")  # fmt: skip
    max_position = 4 * -(-positions // 4)
    frontend = dsv4.DecodeFrontEnd(
        dsv4.synthetic_weights(cfg, seed=0, device=device),
        dsv4.rope_table(cfg, "compressed", max_position=max_position, device=device),
        batch=args.batch, max_position=max_position, topk=cfg.index_topk, offset=cfg.sliding_window,
        backend=args.backend,
    )  # fmt: skip
    if args.prefill:
        frontend(dsv4.synthetic_activations((args.batch, args.prefill, cfg.hidden_size), seed=1, device=device))
    print(f"preset={cfg.name} backends={frontend.op_backends} device={device} batch={args.batch} seq={args.seq} "
          f"prefill={args.prefill}")  # fmt: skip
    print(f"{'step':>5} {'mode':>6} {'position':>9} {'ms':>9} {'selected':>9} {'new':>5}")
    modes: list[tuple[str, Callable[..., Any]]] = [("eager", frontend)]
    if args.capture:
        try:
            modes.append(("graph", frontend.capture(seq=args.seq)))
        except ValueError as e:  # the backend is not Triton
            parser.error(f"--capture: {e}")
    previous: set[int] = set()
    medians = {}
    for mode, step_fn in modes:
        times = []
        for step in range(args.steps):
            x = dsv4.synthetic_activations((args.batch, args.seq, cfg.hidden_size), seed=100 + step, device=device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            _, _, topk = step_fn(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append((time.perf_counter() - t0) * 1e3)
            chosen = {int(i) for i in topk[0, -1].tolist() if i >= 0}
            position = frontend.next_pos[0] - 1
            print(f"{step:>5} {mode:>6} {position:>9} {times[-1]:>9.3f} {len(chosen):>9} {len(chosen - previous):>5}")
            previous = chosen
        medians[mode] = statistics.median(times)
    print("median ms per step: " + ", ".join(f"{m} {t:.3f}" for m, t in medians.items()))


if __name__ == "__main__":
    main()

"""Random cases of every op against the reference, beyond the test suite's fixed seeds.

    python benchmarks/fuzz_ops.py [--device cpu|cuda] [--preset tiny] [--seconds 600] [--seed 0]
                                  [--ops qkv_proj_rope,...] [--batches 1,2,3,5] [--seqs 1,2,2,3,5] [--json out.json]
                                  [--candidates] [--max-start 2000]

Each case draws an op (and one of its layer kinds where it has several), B in {1, 2, 3, 5}, S in
{1, 2, 3, 5} (2 twice as often; ``--batches`` and ``--seqs`` choose others, e.g. prompt chunks) and
every row's own start position up to ``--max-start`` (2000), half of them at or next to a multiple of 4,
16, 64, 128 or 256 (compressor blocks, pool blocks, key tiles); ``make_case`` draws the inputs from the
case's seed. Starts past 16,384 at a preset whose positions reach that far (``flash``, ``pro`` and their
ranks) give the indexer rows of more than 4,096 keys, which the top-k selects in chunks (long context).
The Triton backend (Triton's interpreter with ``--device cpu``, the default; compiled with ``cuda``)
is compared with the reference by the spec's rules (``dsv4.harness.golden.compare``, as ``dsv4 run``
and the tests compare), from the same inputs (the indexer's scores and top-k from the reference on the
keys the step wrote: ``dsv4.harness.cases.expected_outputs``); under the interpreter with the tests' checks of every
access (inside the launch's tensors) and every fp32 dot (exact in tf32). Each failing case is
printed with the ``make_case`` call that rebuilds it (on the CPU; add the device for a GPU); at the
end, per op and kind, the cases run and the cases failed.

``--candidates``: each case launches every kernel with one of its declared tuning candidates at the
bucket the case looks up (``dsv4.kernels.tuning.drawn``), instead of the config file's choice: a tuned
file sets a bucket's launch from the one shape ``dsv4 tune`` timed, and every other shape of that
bucket (odd token counts, other starts, masked tiles) runs it too. A failing case prints its draws as
a config file's ``kernels`` and its verdict at the built-in defaults (a failure there too is not the
candidates'); written with ``"schema": 1, "device": "cpu"`` and named by
``DSV4_KERNEL_CONFIG``, they launch the same candidates again. At the end, per kernel, the lookups,
how many of them drew another candidate than the default, and how many of those change a parameter
that the interpreter runs (warps, stages and PDL alone are the same program there: a CPU compiles
them for sm_90, ``benchmarks/compile_candidates.py``, and only ``--device cuda`` runs them).

Exit status 1 when a case raised (an error is never a rounding) or, with ``--candidates``, failed at
its candidates and passes at the built-in defaults (the candidates' own failure, to trace before a tuned
file holds them: a bug, or a rounding of a kind TESTING.md lists where a candidate sums in another
order), and when no case was judged; else 0, also when some case failed the spec's rules at the
defaults, which every run prints and counts; 130 when interrupted (Ctrl-C, SIGINT) with no such case,
after the summary of the cases judged so far; 2 on a bad argument (``--seconds`` not > 0, a ``--json``
that cannot be written, an unknown ``--preset``, a ``--max-start`` past its positions), before any case.
``docs/TESTING.md`` ("Random cases") says what the failures found so far were.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

_pre = argparse.ArgumentParser(add_help=False)
_pre.add_argument("--device", default="cpu")
DEVICE = _pre.parse_known_args()[0].device
if DEVICE == "cpu":  # chosen before Triton is imported: on the CPU its interpreter runs the kernels
    os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from dsv4.arg_types import device as device_arg  # noqa: E402
from dsv4.arg_types import int_at_least, ints_at_least, names_in, positive_float  # noqa: E402
from dsv4.bench.interp_traffic import bounds_checked, dots_checked  # noqa: E402
from dsv4.harness.cases import expected_outputs, make_case, run_case  # noqa: E402
from dsv4.harness.golden import compare  # noqa: E402
from dsv4.kernels import tuning  # noqa: E402
from dsv4.kernels.interpreter_speed import patch_language_once_per_launch  # noqa: E402
from dsv4.model.config import DeepSeekV4Config, get_config  # noqa: E402
from dsv4.ops.registry import get_op, op_names  # noqa: E402

BATCHES = (1, 2, 3, 5)
SEQS = (1, 2, 2, 3, 5)  # 2, the decode step of the deployment, twice as often
BOUNDARIES = (4, 16, 64, 128, 256)  # compress ratio, pool block, key tiles
MAX_START = 2000
ROOM = 256  # positions past the last start: a pool block, or the longest step drawn where that is longer


def max_position(max_start: int, seqs: list[int]) -> int:
    """The ``max_position`` of every case: room for the latest start (``max_start + 1``, a boundary draw's
    position past it) and the longest step, in whole pool blocks (2304 at the defaults)."""
    return -(-(max_start + 1 + max(ROOM, *seqs)) // ROOM) * ROOM


def draw_start(rng: random.Random, max_start: int = MAX_START) -> int:
    """A row's start: half the time at or next to a boundary, else anywhere up to ``max_start``."""
    if rng.random() < 0.5:
        m = rng.choice(BOUNDARIES)
        return max(0, m * rng.randint(0, max_start // m) + rng.choice((-2, -1, 0, 1)))
    return rng.randint(0, max_start)


def judge(
    cfg: DeepSeekV4Config,
    op: str,
    seed: int,
    device: str,
    b: int,
    s: int,
    starts: list[int],
    kind: str | None,
    positions: int = max_position(MAX_START, list(SEQS)),
) -> str:
    """The verdict of one case: the Triton backend against the reference, or the error it raised. Under
    the interpreter with the tests' checks: an access outside the launch's tensors (``OutOfBounds``, where
    it would read a neighbour's bytes or end the process) and an fp32 ``tl.dot`` that a GPU's tf32 would
    round (``InexactDot``) are errors naming the kernel."""
    with contextlib.ExitStack() as checks:
        if device == "cpu":
            checks.enter_context(bounds_checked())
            checks.enter_context(dots_checked())
        try:
            case = make_case(cfg, op, "decode", seed, device, positions, b, s, starts, kind)
            got = run_case(case, "triton")
            return compare(op, got, expected_outputs(case, got), case.compare_inputs()).verdict()
        except Exception as e:  # noqa: BLE001  (a case that raises is a finding too)
            return f"ERROR {type(e).__name__}: {e}"


def is_finding(record: dict[str, Any]) -> bool:
    """A case that sets the exit status: it raised, or it failed at candidates and passes at the defaults."""
    if record["verdict"].startswith("ERROR") or record.get("defaults", "").startswith("ERROR"):
        return True
    return record["verdict"] != "ok" and record.get("defaults") == "ok"


def report(record: dict[str, Any]) -> str:
    """A failing case as printed: the verdict's first line, the ``make_case`` call, with ``--candidates``
    the draws and the first line of the verdict at the defaults; then any further lines of either verdict
    (an error's message), indented."""
    verdict, *more = record["verdict"].splitlines()
    lines = [verdict, f"  {record['case']}"]
    if "kernels" in record:
        at_defaults, *more_defaults = record["defaults"].splitlines()
        lines += [f"  candidates: {json.dumps(record['kernels'])}", f"  at the defaults: {at_defaults}"]
        more += more_defaults
    return "\n".join(lines + [f"    {line}" for line in more])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", type=device_arg, default="cpu", help="cpu (Triton's interpreter) or cuda[:N] (compiled kernels)"
    )
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seconds", type=positive_float, default=600.0, help="stop drawing cases after this long")
    parser.add_argument("--seed", type=int, default=0, help="seeds the draw of the cases")
    fused = op_names("triton")
    help_ops = "comma-separated (default: every op with a Triton backend)"
    parser.add_argument("--ops", type=names_in(fused), default=list(fused), help=help_ops)
    parser.add_argument("--batches", type=ints_at_least(1), default=list(BATCHES), help="the B to draw from")
    parser.add_argument(
        "--seqs", type=ints_at_least(1), default=list(SEQS), help="the S to draw from (e.g. 17,64,130: chunks)"
    )
    parser.add_argument("--json", help="write every case and its verdict here")
    parser.add_argument(
        "--candidates", action="store_true", help="launch each kernel with a declared tuning candidate drawn per case"
    )
    parser.add_argument(
        "--max-start", type=int_at_least(0), default=MAX_START, help="the latest start position drawn (default 2000)"
    )
    args = parser.parse_args()
    if args.json and Path(args.json).is_dir():  # before the run, not after it
        parser.error(f"--json {args.json}: is a directory; name a file to write")
    if args.json and not Path(args.json).parent.is_dir():
        parser.error(f"--json {args.json}: its directory does not exist")
    try:
        cfg = get_config(args.preset)
    except ValueError as e:
        parser.error(f"--preset: {e}")
    ops, batches, seqs = args.ops, args.batches, args.seqs
    positions = max_position(args.max_start, seqs)
    if positions > cfg.max_position_embeddings:
        parser.error(
            f"--max-start {args.max_start}: its cases hold {positions} positions (the start, the longest step, "
            f"whole pool blocks), more than {args.preset}'s {cfg.max_position_embeddings}"
        )
    patch_language_once_per_launch()  # under the interpreter: the same bits, less of its own work
    rng = random.Random(args.seed)
    runs: Counter = Counter()
    fails: Counter = Counter()
    lookups: Counter = Counter()
    others: Counter = Counter()
    ran: Counter = Counter()  # draws that change what the interpreter runs (not warps, stages or PDL alone)
    records = []
    deadline = time.monotonic() + args.seconds
    interrupted = False
    try:
        while time.monotonic() < deadline:
            op = rng.choice(ops)
            kind = rng.choice(get_op(op).kinds or (None,))
            b, s = rng.choice(batches), rng.choice(seqs)
            starts = [draw_start(rng, args.max_start) for _ in range(b)]
            seed = rng.randint(0, 10**6)
            call = (
                f"make_case(get_config({args.preset!r}), {op!r}, 'decode', {seed}, batch={b}, seq={s}, "
                f"start_pos={starts}, kind={kind!r}, max_position={positions})"
            )
            draws = tuning.drawn(random.Random(seed)) if args.candidates else contextlib.nullcontext()
            with draws as drawn:
                verdict = judge(cfg, op, seed, args.device, b, s, starts, kind, positions)
            record: dict[str, Any] = {"case": call, "verdict": verdict}
            if drawn is not None:
                record["kernels"] = drawn.changes()
            if verdict != "ok" and drawn is not None:  # is it the candidates'? the same case at the defaults
                with tuning.defaults_only():
                    record["defaults"] = judge(cfg, op, seed, args.device, b, s, starts, kind, positions)
            # counted once judged: an interrupted case is left out
            runs[(op, kind)] += 1
            if drawn is not None:
                for name, buckets in drawn.entries.items():
                    lookups[name] += len(buckets)
                    for diff in record["kernels"].get(name, {}).values():
                        others[name] += 1
                        ran[name] += not all(tuning.TUNABLES[name].param(k).compiled_only for k in diff)
            if verdict != "ok":
                fails[(op, kind)] += 1
                print(report(record), flush=True)
            records.append(record)
    except KeyboardInterrupt:  # Ctrl-C, or a runner's time limit: the cases judged so far are still reported
        interrupted = True
        print("interrupted: the case in progress is left out", flush=True)
    findings = sum(map(is_finding, records))
    print(
        f"{sum(runs.values())} cases, {sum(fails.values())} failed (preset {args.preset}, seed {args.seed}); "
        f"{findings} raised or failed at candidates alone"
    )
    for op, kind in sorted(runs, key=str):
        print(f"  {op}{'' if kind is None else f' {kind}'}: {runs[(op, kind)]} cases, {fails[(op, kind)]} failed")
    for name in sorted(lookups):
        print(
            f"  {name}: {lookups[name]} buckets looked up, {others[name]} of them at another candidate, "
            f"{ran[name]} in parameters the interpreter runs"
        )
    if args.json:
        meta = {"preset": args.preset, "seed": args.seed, "candidates": args.candidates, "max_start": args.max_start}
        Path(args.json).write_text(json.dumps({**meta, "cases": records}, indent=1))
    if not records and not interrupted:
        print(f"no case judged in --seconds {args.seconds:g}: nothing was compared")
        return 1
    return 1 if findings else 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())

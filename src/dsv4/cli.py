"""The ``dsv4`` command: ``run`` (the main job), ``inspect``, ``info``, ``golden save|check``, ``bench``, ``tune``."""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import torch

from .arg_types import device as device_arg
from .arg_types import int_at_least, names_in, positive_float
from .model.config import COMPRESS_RATIO, LAYER_KINDS, PRESETS, get_config
from .model.weights import MAX_SEED
from .ops.backends import BACKENDS, available_backends, resolve, triton_missing, unavailable_reason
from .ops.registry import op_names


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit code 2), like every other user error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _preset(text: str) -> str:
    """A preset name, or one of its tensor-parallel ranks (``flash/tp8``), checked by ``get_config``."""
    try:
        get_config(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _presets(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of presets, got {text!r}")
    return [_preset(n) for n in names]


PRESET_HELP = f"{', '.join(sorted(PRESETS))}, or one of N tensor-parallel ranks of one (e.g. flash/tp8)"


NON_NEGATIVE, POSITIVE, SEED = int_at_least(0), int_at_least(1), int_at_least(0, MAX_SEED)


def _cmd_run(args: argparse.Namespace) -> int:
    from .harness.run import HEADER, format_row, max_seq, run_front_end

    cfg = get_config(args.preset) if args.preset else None
    weights = None
    if args.checkpoint:
        from .io.checkpoint import Checkpoint

        if args.layer is None:
            raise ValueError("--checkpoint needs --layer N (`dsv4 inspect DIR` lists the layers and their ratios)")
        if cfg is not None and cfg.name != cfg.preset:
            raise ValueError(
                f"--preset: a checkpoint holds whole layers ({cfg.preset}); a rank's share of one is "
                f"--rank R --world W, not {cfg.name}"
            )
        t0 = time.perf_counter()
        with Checkpoint(args.checkpoint) as ckpt:
            if cfg is None and ckpt.config_json is None:
                raise ValueError(
                    f"--checkpoint: {args.checkpoint} has no config.json; "
                    "give the model's dimensions with --preset NAME"
                )
            cfg = cfg or ckpt.config()
            weights = ckpt.load_layer(args.layer, cfg, device=args.device, rank=args.rank, world=args.world)
        cfg = cfg.rank(args.world)
        share = f", rank {args.rank} of {args.world}" if args.world > 1 else ""
        mib = weights.nbytes() / 2**20
        print(f"loaded layer {args.layer} of {args.checkpoint}{share} ({mib:.1f} MiB as bf16 + INT8 + FP8) "
              f"in {time.perf_counter() - t0:.1f} s")  # fmt: skip
    elif args.layer is not None:
        raise ValueError(
            "--layer: picks a layer of --checkpoint DIR; without a checkpoint `dsv4 run` runs a synthetic layer of "
            "each kind (SWA, CSA, HCA)"
        )
    elif args.world > 1 or args.rank:
        raise ValueError(
            "--rank/--world: a rank's share of a checkpoint layer needs --checkpoint; synthetic weights of a rank "
            f"come from --preset NAME/{f'tp{args.world}' if args.world > 1 else 'tpW (W ranks)'}"
        )
    cfg = cfg or get_config("tiny")
    if args.seq > max_seq(cfg):  # before the run, not at the other ops' cases after the front end
        raise ValueError(
            f"--seq: at most {max_seq(cfg)} new tokens per step at {cfg.name}'s max_position_embeddings "
            f"{cfg.max_position_embeddings} (a case of the other ops needs {COMPRESS_RATIO} positions beyond its "
            f"step), got {args.seq}"
        )
    backend = args.backend or available_backends(args.device)[0]
    name = resolve(backend, args.device)  # the backend that runs: auto is Triton on CUDA, else the reference
    where = " (auto)" if backend == "auto" else ""
    interpreted = name == "triton" and torch.device(args.device).type == "cpu"
    where += " (Triton's interpreter on the CPU)" if interpreted else ""
    print(f"dsv4 run: preset={cfg.name} device={args.device} backend={name}{where} batch={args.batch} "
          f"seq={args.seq} start_pos={args.start_pos} steps={args.steps}")  # fmt: skip
    print(HEADER)
    t0 = time.perf_counter()
    rows = run_front_end(
        cfg, backend=backend, steps=args.steps, start_pos=args.start_pos, batch=args.batch, seq=args.seq,
        seed=args.seed, device=args.device, log=lambda r: print(format_row(r), flush=True), weights=weights,
        layer=args.layer,
    )  # fmt: skip
    failed = [r for r in rows if not r.passed]
    if failed:
        verdict = f"{len(failed)} MISMATCH(ES)"
    elif name == "reference":  # the reference is what the other backends are checked against: no check ran
        verdict = "on the reference alone: nothing compared (--backend triton runs the kernels, each call checked)"
    else:
        verdict = "all checks passed"
    print(f"{len(rows)} op calls in {time.perf_counter() - t0:.1f} s; {verdict}")  # the acceptance run parses it
    return 1 if failed else 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .io.checkpoint_report import describe_checkpoint

    cfg = get_config(args.preset) if args.preset else None
    if cfg is not None and cfg.name != cfg.preset:
        raise ValueError(
            f"--preset: a checkpoint holds whole layers, so it is checked against {cfg.preset}, not one rank of it "
            f"({cfg.name}); `dsv4 run --checkpoint DIR --layer N --rank R --world W` runs a rank's share"
        )
    lines, ok = describe_checkpoint(args.dir, args.layer, cfg, prefix=args.prefix)
    print("\n".join(lines))
    return 0 if ok else 1


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cmd_info(args: argparse.Namespace) -> int:
    from .version import __version__

    print(f"dsv4 {__version__}")
    print(f"python {platform.python_version()} ({platform.machine()})")
    for dist in ("torch", "triton", "numpy", "safetensors"):
        print(f"{dist} {_version(dist)}")
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    for dev in devices:
        label = torch.cuda.get_device_name(dev) if dev.startswith("cuda") else platform.processor() or "cpu"
        print(f"device {dev}: {label}")
        for name in BACKENDS:
            reason = unavailable_reason(name, dev)
            print(f"  backend {name:<9} {'available' if reason is None else 'unavailable: ' + reason}")
        if unavailable_reason("triton", dev) is None:
            from .kernels import tuning

            print(f"  {tuning.describe_active(dev)}")
    return 0


def _cmd_golden_save(args: argparse.Namespace) -> int:
    from .harness.cases import make_case, run_case
    from .io.golden_io import save

    case = make_case(get_config(args.preset), args.op, args.mode, args.seed, device=args.device, kind=args.kind)
    path = save(case, run_case(case, "reference"), args.dir)
    what = f"{case.op}, preset {args.preset}, mode {args.mode}" + (f", kind {case.meta['kind']}" if args.kind else "")
    print(f"saved {path.stem} ({what}, seed {args.seed}) to {args.dir}")
    return 0


def _cmd_golden_check(args: argparse.Namespace) -> int:
    from .io.golden_io import check

    backend = args.backend or available_backends(args.device)[0]
    results = check(args.dir, backend, args.device)
    for name, report in results:
        print(f"[{name}] {report}")
    failed = sum(not r for _, r in results)
    print(f"{len(results) - failed}/{len(results)} golden cases passed on backend {resolve(backend, args.device)}")
    return 1 if failed else 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import report
    from .bench.runner import MODES, failed_rows, run_bench
    from .bench.trace import trace_decode_step

    cfg = get_config(args.preset)
    for flag, path in (("--json", args.json), ("--plot", args.plot), ("--trace", args.trace)):
        _check_output_file(flag, path)  # before the measurements, not after them
    if args.plot:
        _check_plot_format(args.plot)
    device = "cpu" if args.cpu else _default_device()
    result = {"meta": report.provenance(_bench_command(args), device)}
    measure = {"backends": [], "traffic": False} if args.model_only else {"backends": args.backends}

    def keep(figures: dict) -> None:  # after each shape: a run stopped early keeps what it measured
        report.write_json({**result, **figures}, args.json)

    result.update(run_bench(
        cfg, modes=MODES if args.mode == "all" else (args.mode,), device=device, ops=args.ops, reps=args.reps,
        budget_s=args.budget_s, flush_l2=not args.warm_l2, use_graph=not args.no_graph,
        kernel_split=not args.no_kernel_split, seed=args.seed, on_shape=keep if args.json else None,
        shapes=args.shapes, **measure,
    ))  # fmt: skip
    print(report.render(result))
    if args.json:
        report.write_json(result, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        report.plot(result, args.plot)
        print(f"wrote {args.plot}")
    if args.trace:
        backend = trace_decode_step(cfg, args.trace, device, seed=args.seed)
        print(f"wrote {args.trace} (one decode step on backend {backend})")
    failed = failed_rows(result)
    if failed:
        print(f"dsv4 bench: {len(failed)} row(s) not ok against the reference: {'; '.join(failed)}")
        return 1
    return 0


def _check_output_file(flag: str, path: str | None) -> None:
    """``path`` can be written as a file: not a directory, in a directory that exists."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{flag}: {path} is a directory; name a file to write")
    if not target.parent.is_dir():
        raise ValueError(f"{flag}: the directory of {path} does not exist")


def _check_plot_format(path: str) -> None:
    """matplotlib is installed and writes the format ``path``'s suffix names (it would otherwise add
    ``.png`` to a name without one, or refuse an unknown one after the whole measurement)."""
    try:
        import matplotlib  # noqa: F401  (report.plot draws with it; first: its submodules may be loaded already)
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise ValueError(
            '--plot: needs matplotlib, which is not installed: pip install "dsv4-kernels[bench]" '
            '(in a checkout: pip install -e ".[bench]"), or leave out --plot'
        ) from None
    formats = FigureCanvasBase.get_supported_filetypes()
    if Path(path).suffix.lower().removeprefix(".") not in formats:
        raise ValueError(
            f"--plot: {path}: expected a file name ending in an image format matplotlib writes "
            f"({', '.join('.' + f for f in sorted(formats))})"
        )


def _bench_command(args: argparse.Namespace) -> str:
    """The ``dsv4 bench`` arguments of this run, every setting spelled out."""
    words = ["bench", "--preset", args.preset, "--mode", args.mode, "--ops", ",".join(args.ops)]
    words += ["--shapes", ",".join(args.shapes)] if args.shapes else []
    words += ["--backends", ",".join(args.backends)] if args.backends else []
    words += ["--reps", str(args.reps), "--budget-s", f"{args.budget_s:g}", "--seed", str(args.seed)]
    flags = {"--cpu": args.cpu, "--model-only": args.model_only, "--warm-l2": args.warm_l2, "--no-graph": args.no_graph}
    flags["--no-kernel-split"] = args.no_kernel_split
    return " ".join(words + [flag for flag, on in flags.items() if on])


INSTALL_TRITON = 'pip install "dsv4-kernels[triton]"'  # the extra that brings a Triton the kernels run on


def _cmd_tune(args: argparse.Namespace) -> int:
    missing = triton_missing()  # every form (--list, --dry-run, --probe) imports the Triton kernels
    if missing is not None:
        raise ValueError(f"needs Triton: {missing}; {INSTALL_TRITON} installs one that runs the kernels")
    if args.probe:
        return _cmd_probe(args)
    from .bench import tune
    from .kernels import tuning

    if args.list:
        print(tune.describe_tunables())
        return 0
    unknown = sorted(set(args.kernels or ()) - set(tuning.TUNABLES))
    if unknown:
        known = ", ".join(sorted(tuning.TUNABLES))
        raise ValueError(f"--kernels: unknown {', '.join(unknown)}; the kernels are {known}")
    device = _tune_device(args)
    json_path = args.json or (None if args.dry_run else f"tune-{tuning.device_key(device)}.json")
    _check_output_file("--json", json_path)  # before the tuning, not after its first bucket
    words = ["tune", "--preset", ",".join(args.preset), "--mode", args.mode, "--budget-s", f"{args.budget_s:g}"]
    words += ["--dry-run"] if args.dry_run else []
    words += ["--resume"] if args.resume else []
    for flag, values in (("--ops", args.ops), ("--kernels", args.kernels), ("--shapes", args.shapes)):
        words += [flag, ",".join(values)] if values else []
    t0 = time.perf_counter()
    result = tune.run_tune(
        device=device, presets=args.preset, modes=MODES_OF[args.mode], ops=args.ops, kernels=args.kernels,
        shapes=args.shapes, budget_s=args.budget_s, reps=args.reps, timing_s=args.timing_s, json_path=json_path,
        config_path=args.config, dry_run=args.dry_run, resume=args.resume, seed=args.seed, command=" ".join(words),
    )  # fmt: skip
    print(tune.render(result))
    if json_path:
        print(f"wrote {json_path}")
    print(f"dsv4 tune: {time.perf_counter() - t0:.1f} s wall")
    failed = tune.failed_workloads(result)
    if failed:
        print(
            f"dsv4 tune: {len(failed)} workload(s) failed at the defaults, their buckets not tuned: {'; '.join(failed)}"
        )
        return 1
    if not result["buckets"] and not result["stopped"] and not args.resume:
        print("dsv4 tune: no bucket tuned: the workloads chosen (--ops, --shapes) launch none of --kernels")
        return 1
    if result["stopped"] == "budget spent" and not any(b["variants"] for b in result["buckets"]):
        what = "checked" if args.dry_run else "timed"
        print(f"dsv4 tune: --budget-s {args.budget_s:g} ran out before the first candidate: nothing tuned or {what}")
        return 1
    return 1 if result["stopped"] and result["stopped"] != "budget spent" else 0


MODES_OF = {"decode": ("decode",), "prefill": ("prefill",), "all": ("decode", "prefill")}


def _tune_device(args: argparse.Namespace) -> torch.device:
    if args.dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(
            "dsv4 tune times kernels on a GPU and none is visible; on a CPU, --dry-run checks every candidate "
            "under the interpreter and --list prints them"
        )
    return torch.device("cuda")


def _cmd_probe(args: argparse.Namespace) -> int:
    from .bench import probe, report

    if args.list:
        print(probe.describe_experiments())
        return 0
    device = _tune_device(args)
    _check_output_file("--json", args.json)  # before the measurements, not after them
    t0 = time.perf_counter()
    result = probe.dry_run_probe() if args.dry_run else probe.run_probe()
    result = {"meta": report.provenance("tune --probe" + (" --dry-run" if args.dry_run else ""), device), **result}
    print(probe.render(result))
    if args.json:
        report.write_json(result, args.json)
        print(f"wrote {args.json}")
    print(f"dsv4 tune --probe: {time.perf_counter() - t0:.1f} s wall")
    bad = [r for r in result["rows"] if "error" in r or str(r.get("check", "ok")) != "ok"]
    return 1 if bad else 0


def _names_any(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dsv4", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    backends = ["auto", *BACKENDS]

    run = sub.add_parser(
        "run", help="run the front end and a layer of each kind's whole attention, checked against the reference"
    )
    run.add_argument("--preset", type=_preset, help=f"{PRESET_HELP}; default: tiny, or the checkpoint's config.json")
    run.add_argument("--checkpoint", metavar="DIR", help="run on one layer's weights from a safetensors checkpoint")
    run.add_argument("--layer", type=NON_NEGATIVE, help="the checkpoint layer (any kind: SWA, CSA, HCA)")
    run.add_argument(
        "--world", type=POSITIVE, default=1, help="tensor-parallel ranks: run one rank's share of the checkpoint layer"
    )
    run.add_argument("--rank", type=NON_NEGATIVE, default=0, help="which rank of --world (default 0)")
    run.add_argument(
        "--backend",
        choices=backends,
        help="default: triton wherever it runs (on a CPU, its interpreter), else reference; auto: triton on CUDA, "
        "else reference; on the reference nothing is compared",
    )
    run.add_argument("--steps", type=POSITIVE, default=4, help="decode steps after the prefill")
    run.add_argument("--start-pos", type=NON_NEGATIVE, default=64, help="tokens prefilled before the first decode step")
    run.add_argument("--batch", type=POSITIVE, default=4, help="sequences per step")
    run.add_argument("--seq", type=POSITIVE, default=2, help="new tokens per sequence per decode step")
    run.add_argument("--seed", type=SEED, default=0)
    run.add_argument("--device", type=device_arg, default=_default_device())
    run.set_defaults(func=_cmd_run)

    inspect = sub.add_parser("inspect", help="a checkpoint's layers, their kinds and one layer's attention tensors")
    inspect.add_argument("dir")
    inspect.add_argument("--layer", type=NON_NEGATIVE, help="the layer to list (default: the first ratio-4 layer)")
    inspect.add_argument(
        "--preset", type=_preset, help=f"check shapes against a preset, not config.json ({PRESET_HELP})"
    )
    inspect.add_argument("--prefix", default="layers.{layer}.", help="tensor name prefix of a layer")
    inspect.set_defaults(func=_cmd_inspect)

    info = sub.add_parser("info", help="versions, devices and available backends")
    info.set_defaults(func=_cmd_info)

    golden = sub.add_parser("golden", help="save reference cases to disk, or check a backend against them")
    gsub = golden.add_subparsers(dest="golden_command", required=True)
    save = gsub.add_parser("save", help="write a case's inputs and reference outputs (safetensors + JSON)")
    save.add_argument("dir")
    save.add_argument("--preset", default="tiny", type=_preset, help=PRESET_HELP)
    save.add_argument("--op", required=True, choices=op_names())
    save.add_argument("--mode", default="decode", choices=["decode", "prefill"])
    save.add_argument(
        "--kind", choices=LAYER_KINDS, help="the layer kind of an op that runs differently in each (default: CSA)"
    )
    save.add_argument("--seed", type=SEED, default=0)
    save.add_argument("--device", type=device_arg, default="cpu")
    save.set_defaults(func=_cmd_golden_save)
    chk = gsub.add_parser("check", help="replay every case in DIR on a backend and compare (spec §6)")
    chk.add_argument("dir")
    chk.add_argument(
        "--backend", choices=backends,
        help="default: triton wherever it runs (on a CPU, its interpreter), else reference",
    )  # fmt: skip
    chk.add_argument("--device", type=device_arg, default=_default_device())
    chk.set_defaults(func=_cmd_golden_check)

    from .bench.calls import BENCH_BACKENDS, GPU_BACKENDS

    bench = sub.add_parser(
        "bench",
        help="roofline benchmark: bytes model, GPU timings vs floor, CPU traffic counts",
        epilog="Every backend but the reference is checked against it first (the check column). Exit code 1 when "
        "a row's check is not ok (MISMATCH) or a row raised (error), after the table and files are written; 2 on "
        "a user error.",
    )
    bench.add_argument("--preset", default="flash", type=_preset, help=PRESET_HELP)
    bench.add_argument("--mode", default="decode", choices=["decode", "prefill", "all"])
    bench.add_argument("--cpu", action="store_true", help="run on the CPU: Triton traffic counts and reference timings")
    bench.add_argument(
        "--ops", type=names_in(op_names()), default=list(op_names()), help="comma-separated ops (default: all)"
    )
    bench.add_argument(
        "--shapes", type=_names_any, help="keep shapes whose op and label hold one of these (e.g. 'B=64', 'kind=hca')"
    )
    default_backends = f"{','.join(GPU_BACKENDS)} on a GPU; reference on a CPU"
    bench.add_argument("--backends", type=names_in(BENCH_BACKENDS), help=f"backends to time ({default_backends})")
    bench.add_argument("--model-only", action="store_true", help="bytes model and floors only: time and count nothing")
    bench.add_argument(
        "--reps",
        type=POSITIVE,
        default=100,
        help="repetitions per timing (fewer if over --budget-s), never fewer than 5 on a GPU, 3 on a CPU (a median "
        "and p10-p90 need a few samples); each timing in --json records the repetitions it ran",
    )
    bench.add_argument(
        "--budget-s", type=positive_float, default=2.0, help="seconds per timing at most (a few reps always run)"
    )
    bench.add_argument("--warm-l2", action="store_true", help="do not flush L2 between repetitions")
    bench.add_argument("--no-graph", action="store_true", help="time plain launches, no CUDA graph")
    bench.add_argument(
        "--no-kernel-split", action="store_true", help="skip each kernel's own time inside the timed call (profiler)"
    )
    bench.add_argument("--seed", type=SEED, default=0)
    bench.add_argument("--json", metavar="PATH", help="write every figure with device, versions, commit, command")
    bench.add_argument(
        "--plot",
        metavar="PATH.png",
        help="bar chart: %% of floor (GPU) or traffic ratios (CPU); needs matplotlib (the bench extra)",
    )
    bench.add_argument("--trace", metavar="PATH.json", help="Chrome/Perfetto trace of one decode step")
    bench.set_defaults(func=_cmd_bench)

    tune = sub.add_parser(
        "tune", help="time every kernel's declared launch candidates on this GPU and write its config file"
    )
    tune.add_argument(
        "--preset", type=_presets, default=["flash", "pro"], help=f"comma-separated (default flash,pro): {PRESET_HELP}"
    )
    tune.add_argument("--mode", default="all", choices=sorted(MODES_OF), help="decode and/or prefill shapes")
    tune.add_argument(
        "--ops",
        type=names_in(op_names("triton")),
        default=list(op_names("triton")),
        help="comma-separated ops (default: every op with a fused kernel)",
    )
    tune.add_argument("--kernels", type=_names_any, help="comma-separated kernels (default: all; --list names them)")
    tune.add_argument("--shapes", type=_names_any, help="keep shapes whose label holds one of these (e.g. 'B=64')")
    tune.add_argument("--budget-s", type=positive_float, default=600.0, help="seconds in all; saved as it goes")
    tune.add_argument(
        "--reps",
        type=POSITIVE,
        default=30,
        help="timed repetitions per candidate on the GPU, fewer if over --timing-s, never fewer than 5 (each variant "
        "in --json records how many ran)",
    )
    tune.add_argument("--timing-s", type=positive_float, default=0.25, help="seconds per candidate timing at most")
    tune.add_argument(
        "--json",
        metavar="PATH",
        help="every variant's µs and GB/s (default tune-<device>.json; a --dry-run writes none)",
    )
    tune.add_argument(
        "--config", metavar="PATH",
        help="the config file to write (default: the package's, per device; with --dry-run a fresh temporary one)",
    )  # fmt: skip
    tune.add_argument("--dry-run", action="store_true", help="the CPU interpreter, tiny preset: check the candidates")
    tune.add_argument(
        "--resume", action="store_true", help="leave out the buckets the config file it starts from already holds"
    )
    tune.add_argument("--list", action="store_true", help="print every kernel's parameters and candidates")
    tune.add_argument("--probe", action="store_true", help="the machine's limits instead (zero point, bandwidths, PDL)")
    tune.add_argument("--seed", type=SEED, default=0)
    tune.set_defaults(func=_cmd_tune)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _lighter_interpreter()
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError) as e:  # user errors (bad input, files); anything else is a bug
        return _error(args, str(e))
    except RuntimeError as e:  # memory a run asked for that the device or host does not have
        from .engine.attention import PartialCallError  # a chunked call's later step: the step's error its cause

        failed = e.__cause__ if isinstance(e, PartialCallError) else e
        if not (isinstance(failed, torch.OutOfMemoryError) or CPU_ALLOCATOR_FAILED in str(failed)):
            raise
        hint = "; try a smaller --batch, --seq or --start-pos" if args.command == "run" else ""
        return _error(args, f"out of memory ({str(e)[:300]}){hint}")


def _lighter_interpreter() -> None:
    """Where the kernels run through Triton's interpreter, it patches its language once a launch
    (``dsv4.kernels.interpreter_speed``): a CPU run of this command is faster, with the same bits."""
    if triton_missing() is None:  # imports the kernels, the interpreter chosen first
        from .kernels.interpreter_speed import patch_language_once_per_launch

        patch_language_once_per_launch()


CPU_ALLOCATOR_FAILED = "DefaultCPUAllocator: can't allocate memory"  # torch's RuntimeError for a failed host allocation


def _error(args: argparse.Namespace, message: str) -> int:
    message = " ".join(message.split())  # one line, whatever the message holds
    print(f"dsv4 {args.command}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

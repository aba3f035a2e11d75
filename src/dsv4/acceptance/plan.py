"""The steps of the acceptance run, most valuable first, as the commands a person would type.

Every step drives an existing command (``dsv4 bench``, ``pytest``, ``examples/decode_loop.py``,
``benchmarks/load_checkpoint.py``, ``ncu``) in its own process, so the run keeps working while the
package's internals change. ``GPU`` is the real run (``flash``, all backends); ``DRY`` runs the
same steps on the CPU with the ``tiny`` preset and a handful of repetitions, to check the run
itself in CI: its figures are CPU figures.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..ops import op_names

# every registered op with a fused kernel (the built-in ones are registered when dsv4.ops is imported);
# an op on the reference alone has nothing for the GPU run to measure yet
OPS = op_names("triton")
# Prefill in the order its figures are owed: the H200's step (90 s) timed qkv_proj_rope's three shapes and one
# of indexer_compressor's before its limit; the compressors' and the indexer's long-row steps changed since
PREFILL_OPS = tuple(sorted(OPS, key=lambda op: op == "qkv_proj_rope"))

# The GPU run's pytest selection: the op tests (every backend; on CUDA the compiled kernels),
# top-k, the decode step as a CUDA graph, the torch.library ops, the bad-input checks and the
# bench's CUDA-event timing.
GPU_TESTS = (
    "test_kernels_*.py", "test_indexer.py", "test_compressor.py", "test_paged_cache.py", "test_golden_vectors.py",
    "test_frontend.py", "test_library.py", "test_validation.py", "test_nonfinite.py", "test_decode_graph.py",
    "test_attention_ops.py", "test_attention_graph.py", "test_sparse_attn_write.py", "test_baseline.py",
    "test_device.py", "test_tensor_parallel.py", "test_timing.py",
)  # fmt: skip
# Left out of that selection: the sm_90 builds through tests/sm90.py's compile-only stand-in. They lower the
# same variants with the same Triton wherever they run (CI, any CPU), and on the GPU machine they compete for
# the cores the compiled op tests compile on (the H200's step: their three files, two compiler processes each,
# took 108 s of its workers' time, the slowest test 69 s).
GPU_TESTS_LEFT_OUT = ("test_kernels_compile.py", "test_kernels_*_compile.py")
# Triton compiles on the host, so the tests step is CPU-bound: a pytest-xdist worker per core but two
# (14 on the 16-core GPU machine; the H100 run kept 8 workers ~85% busy, 317 tests in 123 s)
XDIST_WORKERS = max(1, (os.cpu_count() or 4) - 2)
TEST_TIMEOUT_S = 120  # per test (pytest-timeout, where installed): one hung test cannot eat the step
# ncu: per-kernel DRAM and L2 bytes and duration, and what the warps wait for (a decode kernel that waits on
# chains of loads shows long-scoreboard stalls, one that waits on its block's barriers barrier stalls), for
# the Triton kernels only (their names start with "_"; PyTorch's own kernels, e.g. the reference run for the
# check, do not)
NCU_METRICS = (
    "dram__bytes_read.sum", "dram__bytes_write.sum", "lts__t_bytes.sum", "gpu__time_duration.sum",
    "launch__registers_per_thread", "sm__warps_active.avg.pct_of_peak_sustained_active",
    "smsp__issue_active.avg.pct_of_peak_sustained_active",
    "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",
    "smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio",
)  # fmt: skip
# the project's Triton kernels: unmangled names that begin with an underscore and a lower-case letter; a
# PyTorch kernel's mangled name begins with "_Z" (by function name, at::_assert_async_cuda_kernel matched)
NCU_KERNELS = "regex:^_[a-z]"
# the shapes ncu profiles: the deployment batch in every layer kind and the longest context, each kernel
# once per shape family (sparse_attn_write runs sparse_attn's kernel)
NCU_SHAPES = ("B=64", "cache=262144")
NCU_SHAPES_DRY = ("B=4",)  # tiny's decode batch: the dry run's bench must keep a shape where ncu exists
NCU_SKIP_OPS = ("sparse_attn_write",)
SANITIZER_EXIT = 86  # compute-sanitizer's exit on a finding: not dsv4 run's 1 for a failed check
CHECKPOINT_LAYER = 1  # a compress-ratio-4 layer of benchmarks/load_checkpoint.py's checkpoint
TUNED_CONFIG = "kernel-config.json"  # the tune step's config file, returned whole; its "device" names its home


@dataclass(frozen=True)
class Profile:
    """What differs between the GPU run and the CPU dry run."""

    name: str
    preset: str
    budget_s: float  # default total budget
    ops: tuple[str, ...]  # ops the bench steps time
    reps: int  # bench repetitions per timing (fewer when over budget_per_timing_s)
    budget_per_timing_s: float
    prefill_reps: int
    prefill_backends: str  # the prefill step's --backends
    tests: tuple[str, ...]  # pytest selection: globs under tests/
    decode_loop: tuple[str, ...]  # examples/decode_loop.py arguments
    attention_loop: tuple[str, ...]  # examples/attention_loop.py arguments
    device: str  # where the checkpoint is loaded
    checkpoint_experts: int  # routed-expert fillers per layer in the synthetic checkpoint
    checkpoint_backend: str  # dsv4 run --checkpoint --backend
    timeouts: dict[str, float]  # per step; each step also stops when the total budget is spent
    min_s: float  # a step is not started with less budget left than min(min_s, its timeout)
    tune: tuple[str, ...]  # dsv4 tune arguments (besides --json, --config and its budget)
    probe: tuple[str, ...]  # dsv4 tune --probe arguments (besides --json)
    rank: str  # one tensor-parallel rank of the preset ("flash/tp8"), timed and tuned at its own shapes
    fuzz: tuple[str, ...]  # benchmarks/fuzz_ops.py arguments
    ncu_shapes: tuple[str, ...] = NCU_SHAPES  # the shapes the ncu step profiles (dsv4 bench --shapes)
    dry_skips: dict[str, str] = field(default_factory=dict)  # step -> why the dry run leaves it out


# GPU: at most 100 repetitions or 1 s per timing (100 L2-flushed repetitions of a decode op take far less);
# even if every step before it runs to its timeout, 35 s of the 480 s budget are left to the decode graph,
# less the seconds a stopped step takes to stop (KILL_GRACE_S: at most 8 s a step, 1-4 s in the runs so far)
# (H200, 2026-12-04: the tests took 136 s, the probe 7 s).
# The probe and the tune come right after the decode figures: what they leave (the machine's limits, a
# tuned config file) lasts beyond the slice; the torch.compile baselines come last.
GPU = Profile(
    # 0.5 s a timing: 100 flushed reps of a fused op take a few ms; the eager reference and library rows
    # stop at their share (at 1 s the H200's decode bench spent 82 s on the first 6 of 14 shapes)
    name="gpu", preset="flash", budget_s=480, ops=OPS, reps=100, budget_per_timing_s=0.5, prefill_reps=20,
    # not the eager reference: at prefill it takes tens of ms a call (78 ms for indexer_compressor at
    # T=128 on the H200), and timing it left the step no time for the ops after the first two
    prefill_backends="triton,library",
    tests=GPU_TESTS,
    decode_loop=(
        "--preset", "flash", "--batch", "64", "--seq", "2", "--prefill", "4096", "--steps", "100", "--capture",
    ),
    attention_loop=(
        "--preset", "flash", "--kind", "csa", "--batch", "64", "--seq", "2", "--prefill", "2048", "--steps", "50",
        "--capture", "--back-to-back",
    ),
    device="cuda", checkpoint_experts=8, checkpoint_backend="triton",
    timeouts={
        "environment": 30, "tests": 165, "bench_decode": 110, "probe": 20, "tune": 120, "decode_graph": 90,
        "attention_graph": 90, "bench_decode_compile": 70, "bench_decode_compile_indexer": 90, "trace": 60, "ncu": 120,
        "bench_prefill": 90, "checkpoint": 90, "bench_rank": 60, "tune_rank": 60, "bench_prefill_compile": 120,
        "sanitize": 75, "initcheck": 75, "fuzz": 120,
    },
    min_s=30,
    # --resume: the buckets the device's committed config holds are left for a slice of their own; the
    # attention layer's ops first (the front end's B=64 buckets are in the H200's config; sparse_attn_write
    # runs sparse_attn's tuned kernel)
    tune=(
        "--preset", "flash,pro", "--resume",
        "--ops", "sparse_attn,o_proj,kv_compressor,window_kv_write,qkv_proj_rope,indexer_compressor,indexer",
    ),
    probe=(), rank="flash/tp8",
    # the deployment's widths, at the decode batches and the deployment's (64) and a ragged one in its bucket
    # (50: T = 100 of 128); stops drawing 30 s before the step's timeout, for the last case's compiles
    fuzz=(
        "--device", "cuda", "--preset", "flash", "--candidates", "--batches", "1,2,3,5,50,64", "--seconds", "90",
    ),
)  # fmt: skip
TUNE_MARGIN_S = 20  # the tune stops starting candidates this long before its step's timeout, and saves

# Dry run: qkv_proj_rope alone (each interpreted indexer shape adds ~15 s of traffic counting), 3 repetitions.
DRY = Profile(
    name="dry", preset="tiny", budget_s=300, ops=("qkv_proj_rope",), reps=3, budget_per_timing_s=0.05,
    prefill_reps=3, prefill_backends="reference", tests=("test_hadamard.py", "test_quant.py"),
    decode_loop=("--preset", "tiny", "--batch", "4", "--seq", "2", "--prefill", "16", "--steps", "3"),
    attention_loop=(
        "--preset", "tiny", "--batch", "2", "--seq", "2", "--prefill", "16", "--steps", "3", "--capture",
        "--back-to-back",
    ),
    device="cpu", checkpoint_experts=0, checkpoint_backend="reference",
    timeouts=dict.fromkeys(GPU.timeouts, 120), min_s=1,
    tune=("--dry-run", "--ops", "qkv_proj_rope", "--kernels", "qkv.rows,qkv.q_heads"), probe=("--dry-run",),
    rank="tiny/tp1",  # not run (below): the whole layer, as a rank of one
    fuzz=("--device", "cpu", "--preset", "tiny", "--ops", "qkv_proj_rope", "--candidates", "--seconds", "3"),
    ncu_shapes=NCU_SHAPES_DRY,
    dry_skips={
        **dict.fromkeys(
            ("bench_decode_compile", "bench_decode_compile_indexer", "bench_prefill_compile"),
            "dry run: torch.compile builds C++ on the CPU for tens of seconds (bench_decode runs the same dsv4 bench)",
        ),
        # a rank of tiny would split a 128-row scale block of wo_a (OL = 64), and flash dims under the interpreter
        # take minutes
        **dict.fromkeys(("bench_rank", "tune_rank"), "dry run: the tiny preset has no tensor-parallel rank"),
    },
)  # fmt: skip
# a rank's launches with heads of their own: its q heads, attention and output projection
RANK_OPS = ("qkv_proj_rope", "sparse_attn_write", "o_proj")
RANK_KERNELS = ("qkv.q_heads", "sparse_attn", "o_proj.wo_a", "o_proj.wo_b")
# the tune's: the deployment batch at the bench's cache (not the long caches, whose pools take the step's
# time to build), and the q heads of one sequence, where a rank's 8 heads are 16 programs of 2 tokens (its
# candidates split QL over programs)
RANK_SHAPES = "qkv_proj_rope decode B=64 S=2,o_proj decode B=64 S=2,B=64 S=2 cache=2048,qkv_proj_rope decode B=1 S=2"


@dataclass(frozen=True)
class Step:
    """One step: ``commands`` run in order (the step stops at the first that fails) under one
    timeout; ``parse`` names how its figures are read back (``results.PARSERS``)."""

    name: str
    title: str
    commands: tuple[tuple[str, ...], ...]
    timeout_s: float
    min_s: float
    parse: str | None = None
    files: dict[str, str] = field(default_factory=dict)  # role -> path the parser reads or writes
    covers: dict[str, object] = field(default_factory=dict)  # bench: the mode, ops and backends it times
    skip: str | None = None  # why the step does not run here


@dataclass(frozen=True)
class Paths:
    root: Path  # the repository checkout (tests/, examples/, benchmarks/)
    out: Path  # what comes back from the machine
    work: Path  # scratch: raw bench JSONs, the checkpoint, the uncompressed trace
    python: str


def _tests(profile: Profile, root: Path) -> list[str]:
    found: list[str] = []
    for pattern in profile.tests:
        found += sorted(
            str(p.relative_to(root))
            for p in (root / "tests").glob(pattern)
            if not any(p.match(left_out) for left_out in GPU_TESTS_LEFT_OUT)
        )
    return found


def _bench(
    paths: Paths,
    profile: Profile,
    mode: str,
    ops: tuple[str, ...],
    backends: str,
    json_name: str,
    *extra: str,
    reps: int | None = None,
    budget_s: float | None = None,
    preset: str | None = None,
) -> tuple[str, ...]:
    """``dsv4 bench`` of ``profile``'s preset (or ``preset``) with its repetitions and per-timing budget
    unless given."""
    reps = reps or (profile.reps if mode == "decode" else profile.prefill_reps)
    budget_s = profile.budget_per_timing_s if budget_s is None else budget_s
    return (
        paths.python, "-m", "dsv4", "bench", "--preset", preset or profile.preset, "--mode", mode,
        "--ops", ",".join(ops), "--backends", backends, "--reps", str(reps), "--budget-s", f"{budget_s:g}",
        "--json", str(paths.work / json_name), *extra,
    )  # fmt: skip


def build_plan(profile: Profile, paths: Paths) -> list[Step]:
    """The steps for ``profile`` in the order they run (most valuable first)."""
    py, out, work, t = paths.python, paths.out, paths.work, profile.timeouts
    steps: list[Step] = []

    def add(name: str, title: str, *commands: tuple[str, ...], **kw) -> None:
        skip = kw.pop("skip", None) or profile.dry_skips.get(name)
        steps.append(Step(name, title, tuple(commands), t[name], min(profile.min_s, t[name]), skip=skip, **kw))

    add(
        "environment", "versions, GPU, SMs, clocks",
        (py, "-m", "dsv4.acceptance.environment", str(work / "environment.json")),
        parse="environment", files={"json": str(work / "environment.json")},
    )  # fmt: skip

    tests = _tests(profile, paths.root)
    pytest = [py, "-m", "pytest", "-v", "--tb=short", "-rfE", "-p", "no:cacheprovider", f"--junitxml={out}/junit.xml"]
    if profile.name == "gpu" and importlib.util.find_spec("xdist"):
        pytest += ["-n", str(XDIST_WORKERS)]
    if profile.name == "gpu" and importlib.util.find_spec("pytest_timeout"):
        pytest += [f"--timeout={TEST_TIMEOUT_S}"]
    add(
        "tests", "kernel tests compiled on the device (op tests, top-k, decode-graph capture/replay)",
        tuple(pytest + tests), parse="tests", files={"junit": str(out / "junit.xml")},
        skip=None if tests else f"no test file matches {', '.join(profile.tests)} under tests/",
    )  # fmt: skip

    def bench_step(name: str, title: str, mode: str, ops: tuple[str, ...], backends: str, *extra: str) -> None:
        chosen = tuple(op for op in ops if op in profile.ops)
        json_name = name.replace("_", "-") + ".json"
        add(
            name, title, _bench(paths, profile, mode, chosen, backends, json_name, *extra),
            parse="bench", files={"json": str(work / json_name)},
            covers={"mode": mode, "ops": list(chosen), "backends": backends.split(",")},
            skip=None if chosen else f"{profile.name} run times {', '.join(profile.ops)} only",
        )  # fmt: skip

    bench_step(
        "bench_decode", "dsv4 bench decode: Triton, the eager reference and the library baseline", "decode", OPS,
        "triton,reference,library", "--plot", str(out / "bench-decode.png"),
    )  # fmt: skip
    add(
        "probe", "dsv4 tune --probe: zero point, copy and stream bandwidth, L2, prefetch, launch gaps with/without PDL",
        (py, "-m", "dsv4", "tune", "--probe", *profile.probe, "--json", str(work / "probe.json")),
        parse="probe", files={"json": str(work / "probe.json")},
    )  # fmt: skip
    tune_budget = max(1.0, t["tune"] - TUNE_MARGIN_S)
    add(
        "tune", "dsv4 tune: every kernel's candidates, deployment shapes first; the tuned config file comes back",
        (py, "-m", "dsv4", "tune", *profile.tune, "--budget-s", f"{tune_budget:g}", "--json", str(work / "tune.json"),
         "--config", str(out / TUNED_CONFIG)),
        parse="tune", files={"json": str(work / "tune.json"), "config": str(out / TUNED_CONFIG)},
    )  # fmt: skip
    add(
        "decode_graph", "decode step: one CUDA graph vs eager launches (examples/decode_loop.py)",
        (py, str(paths.root / "examples" / "decode_loop.py"), *profile.decode_loop), parse="decode_loop",
    )  # fmt: skip
    add(
        "attention_graph", "a CSA layer's whole attention step: one CUDA graph vs eager (examples/attention_loop.py)",
        (py, str(paths.root / "examples" / "attention_loop.py"), *profile.attention_loop), parse="decode_loop",
    )  # fmt: skip
    add(
        "trace", "torch.profiler trace of one decode step (dsv4 bench --trace)",
        (py, "-m", "dsv4", "bench", "--preset", profile.preset, "--mode", "decode", "--ops", "qkv_proj_rope",
         "--model-only", "--trace", str(work / "trace.json")),
        parse="trace", files={"raw": str(work / "trace.json"), "gz": str(out / "trace.json.gz")},
    )  # fmt: skip
    ncu = shutil.which("ncu")
    # plain launches, the fewest repetitions the bench takes (5; a per-timing budget of 1 ms keeps it at
    # that minimum), no per-kernel split (its 10 profiler runs would double the launches, and the PyTorch
    # profiler's CUPTI cannot run under ncu's): each kernel is profiled ~10 times per shape
    ncu_ops = tuple(op for op in profile.ops if op not in NCU_SKIP_OPS)
    profiled = _bench(
        paths, profile, "decode", ncu_ops, "triton", "ncu-bench.json", "--no-graph", "--no-kernel-split",
        "--shapes", ",".join(profile.ncu_shapes),
        reps=5, budget_s=1e-3,
    )  # fmt: skip
    add(
        "ncu", "ncu: DRAM and L2 bytes, registers, occupancy and stall reasons per Triton kernel at decode",
        (ncu or "ncu", "--target-processes", "all", "--clock-control", "none",  # the card's clocks as they are
         "--kernel-name-base", "mangled", "--kernel-name", NCU_KERNELS,
         "--metrics", ",".join(NCU_METRICS), "--csv", "--page", "raw", "--print-units", "base", *profiled),
        parse="ncu", files={"csv": str(out / "ncu.csv")},
        skip=None if ncu else "ncu not found on PATH",
    )  # fmt: skip
    bench_step(
        "bench_prefill", f"dsv4 bench prefill ({profile.prefill_backends})", "prefill", PREFILL_OPS,
        profile.prefill_backends,
    )  # fmt: skip
    ckpt = str(work / "checkpoint")
    script = str(paths.root / "benchmarks" / "load_checkpoint.py")
    add(
        "checkpoint", f"checkpoint loading on {profile.device} (benchmarks/load_checkpoint.py, dsv4 run --checkpoint)",
        (py, script, "write", ckpt, "--preset", profile.preset, "--experts", str(profile.checkpoint_experts)),
        (py, script, "load", ckpt, "--layer", str(CHECKPOINT_LAYER), "--device", profile.device),
        (py, "-m", "dsv4", "run", "--checkpoint", ckpt, "--layer", str(CHECKPOINT_LAYER),
         "--backend", profile.checkpoint_backend, "--device", profile.device, "--steps", "2"),
        parse="checkpoint",
    )  # fmt: skip
    # one tensor-parallel rank at the deployment batch: its ops at their floors, then its own buckets tuned
    # (the q heads' fewer-token M-tiles, and QL slices at one sequence; o_proj's K splits) into the same
    # config file as the tune step's
    rank_json = "bench-rank.json"
    add(
        "bench_rank", f"dsv4 bench decode of one tensor-parallel rank ({profile.rank}): Triton, B=64",
        _bench(paths, profile, "decode", RANK_OPS, "triton", rank_json, "--shapes", "B=64", preset=profile.rank),
        parse="bench", files={"json": str(work / rank_json)},
        covers={"mode": "rank", "ops": list(RANK_OPS), "backends": ["triton"]},
    )  # fmt: skip
    add(
        "tune_rank", f"dsv4 tune of one tensor-parallel rank's buckets ({profile.rank}, B=64 and qkv at B=1)",
        (py, "-m", "dsv4", "tune", "--preset", profile.rank, "--mode", "decode", "--shapes", RANK_SHAPES,
         "--ops", ",".join(RANK_OPS), "--kernels", ",".join(RANK_KERNELS),
         "--budget-s", f"{max(1.0, t['tune_rank'] - TUNE_MARGIN_S):g}", "--json", str(work / "tune-rank.json"),
         "--config", str(out / TUNED_CONFIG)),
        parse="tune", files={"json": str(work / "tune-rank.json"), "config": str(out / TUNED_CONFIG)},
    )  # fmt: skip
    # the torch.compile baselines last: each compiles for a minute or more (the H200's qkv_proj_rope and
    # compressor step ran out its 70 s and left no budget for the ncu, prefill and checkpoint steps)
    bench_step(
        "bench_decode_compile", "dsv4 bench decode: torch.compile of the reference (qkv_proj_rope, compressor)",
        "decode", ("qkv_proj_rope", "indexer_compressor"), "compile",
    )  # fmt: skip
    bench_step(
        "bench_decode_compile_indexer", "dsv4 bench decode: torch.compile of the reference (indexer)",
        "decode", ("indexer",), "compile",
    )  # fmt: skip
    bench_step("bench_prefill_compile", "dsv4 bench prefill: torch.compile of the reference", "prefill", OPS, "compile")
    # the device's own checks of what the CPU suite checks under the interpreter (no access outside a
    # tensor, no read of memory nothing wrote): every kernel of `dsv4 run`'s tiny calls, compiled
    # (PyTorch's caching allocator hands out blocks of its own pool, inside which the sanitizer sees no
    # bounds: off for these runs; each tool a step, so that one's finding does not stop the other)
    sanitizer = shutil.which("compute-sanitizer")
    run = (py, "-m", "dsv4", "run", "--device", profile.device, "--steps", "1")
    for name, tool, what in (
        ("sanitize", "memcheck", "out-of-bounds accesses"),
        ("initcheck", "initcheck", "reads of memory nothing wrote"),
    ):
        add(
            name, f"compute-sanitizer {tool} of dsv4 run: {what} (exit {SANITIZER_EXIT} on a finding)",
            ("env", "PYTORCH_NO_CUDA_MEMORY_CACHING=1", sanitizer or "compute-sanitizer", "--tool", tool,
             "--error-exitcode", str(SANITIZER_EXIT), *run),
            parse="sanitize", skip=None if sanitizer else "compute-sanitizer not found on PATH",
        )  # fmt: skip
    # random cases, each kernel at a tuning candidate drawn for its bucket: what a tuned file may hold, at shapes
    # the tune did not time; compiled, the candidates of warps, stages and PDL (the same program under the
    # interpreter) run too. Exit 1: a case raised, or failed at its candidates and passes at the defaults.
    add(
        "fuzz", "random cases at tuning candidates, compiled (benchmarks/fuzz_ops.py --candidates)",
        (py, str(paths.root / "benchmarks" / "fuzz_ops.py"), *profile.fuzz), parse="fuzz",
    )  # fmt: skip
    return steps


def injected_failure(paths: Paths) -> Step:
    """A step that fails on purpose (``--inject-failure``): the steps after it must still run."""
    code = "raise SystemExit('injected failure (--inject-failure): the steps after this one must still run')"
    return Step("injected_failure", "a step that fails on purpose", ((paths.python, "-c", code),), 30, 1)

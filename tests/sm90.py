"""Lower the kernel variants an H100 launch would run to sm_90 cubins, with the installed Triton: no GPU needed.

The interpreter runs kernel source as Python and accepts things the compiler rejects, so the
compile tests also lower every kernel, and they read the cubins' registers, local memory and
shared memory. Those figures belong to one *variant* of a kernel: Triton's JIT specializes each
launch on its arguments (every int divisible by 16 and every 16-byte-aligned pointer is marked
divisible by 16, an int equal to 1 becomes a constant), and that decides e.g. whether a loop's
loads are pipelined through shared memory. So the variants are not written down here: a plan
(op, preset, batch, seq, start position) is run through the public op at its real shapes and
every launch goes through the JIT's own ``run``, which specializes the real arguments by Triton's
own rule and compiles them for an sm_90 target, with ``warmup=True`` so nothing is launched.

What stands in for the H100 (``_on_h100``): Triton's driver reports an sm_90 device; CPU tensors
stand in for device memory (the CPU allocator aligns to 64 bytes, the CUDA one to 512, so every
alignment test comes out the same, views included); the launchers size their grids for the
H100's SMs, as they already do off-GPU, and every launcher that uses programmatic dependent launch
on an sm_90 GPU (qkv, the indexer's) uses it.

This runs in a subprocess (``python tests/sm90.py PLAN_JSON...``, one JSON line per compiled
variant) because kernels defined under ``TRITON_INTERPRET=1``, as in the test process, cannot be
compiled.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

H100_SHARED = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)
REGISTER_FILE = 65536  # 32-bit registers per SM
MAX_WARPS_PER_SM = 64
_PREFIX = "SM90 "


@dataclass(frozen=True)
class Plan:
    """One op call whose launches are compiled: ``make_case(get_config(preset), op, batch=, seq=,
    start_pos=, max_position=)``, with the weights named in ``fp32`` cast to fp32 (checkpoints
    may store norm gains either way)."""

    name: str
    op: str
    preset: str
    batch: int
    seq: int
    start_pos: int = 0
    max_position: int | None = None
    fp32: tuple[str, ...] = ()
    kind: str | None = None  # the layer kind of an op that runs differently in each (make_case's kind)


@dataclass(frozen=True)
class Variant:
    """One compiled kernel variant and what ptxas and the PTX say about it."""

    kernel: str
    hash: str  # Triton's key of the compiled kernel: source, specialization, options, target
    launches: tuple[tuple[str, tuple[int, ...]], ...]  # (plan, grid) of every launch that runs it
    constants: dict[str, Any]  # constexpr arguments and ints the JIT turned into constants (== 1)
    aligned: tuple[str, ...]  # arguments the JIT marked divisible by 16
    num_warps: int
    num_stages: int
    registers: int  # per thread
    local_bytes: int  # local memory per thread: the stack frame (where ptxas spills) and local arrays
    shared_bytes: int  # per block
    async_copies: int  # cp.async global -> shared copies (the software pipeliner's loads)
    tma_copies: int  # cp.async.bulk (TMA) copies
    mma: str  # the tensor-core instruction of its tl.dot: "wgmma" (Hopper), "mma.sync" (Ampere) or "-"
    fma: int  # fused multiply-adds (fma.rn) in the PTX
    fp_fusion: bool  # compiled with enable_fp_fusion (LLVM may contract a*b + c into an fma, ptxas too)
    sass: int  # SASS instructions of the whole kernel
    dependent_launch: bool  # griddepcontrol in the PTX: it waits on / releases a PDL neighbour
    l2_prefetches: int  # cp.async.bulk.prefetch.L2 in the PTX: bytes asked of L2 ahead of their loads
    pdl_order: tuple[str, ...]  # "prefetch", "launch_dependents", "wait" in the order they first appear in the PTX
    loads_before_wait: int  # global loads in the PTX before its griddepcontrol.wait: read while the launch before runs
    atomics: tuple[str, ...]  # the distinct atomic instructions in the PTX (``atom.*``, ``red.*``), qualifiers and all
    approx_math: tuple[
        str, ...
    ]  # the distinct not correctly rounded fp instructions in the PTX (``*.approx*``, ``div.full``)
    loop_waits: tuple[int, ...]  # ``num`` of each async_wait in a loop that issues async copies (TTGIR): the
    #                             copy groups left in flight; 0 is a wait for every copy
    ring: int  # buffers of the deepest multi-buffered 2-D shared-memory tile (TTGIR): the copy ring
    mma_loop_sass: int  # SASS instructions of the innermost loop holding the MMA (one iteration, one warp); 0: none
    mma_loop_branches: int  # branches inside that loop besides its back edge (0: a straight-line body)
    loop_load_chains: tuple[int, ...]  # per innermost loop that loads (TTGIR): the most global loads one
    #                                   iteration waits for one after another (a load needing another's value)

    @property
    def plans(self) -> set[str]:
        return {plan for plan, _ in self.launches}

    @property
    def pipelined(self) -> bool:
        """Its loop loads go global -> shared asynchronously (cp.async or TMA)."""
        return self.async_copies + self.tma_copies > 0

    def blocks_per_sm(self) -> int:
        """Resident blocks per SM by registers (allocated per warp in units of 256), shared memory
        (plus 1 KiB the driver reserves per block) and warps."""
        warp_regs = -(-self.registers * 32 // 256) * 256
        by_regs = REGISTER_FILE // (warp_regs * self.num_warps)
        by_shared = (H100_SHARED + 1024) // (self.shared_bytes + 1024)
        return min(by_regs, by_shared, MAX_WARPS_PER_SM // self.num_warps)


_FLOAT_ATOMIC = re.compile(r"\.(?:b?f16(?:x2)?|f32|f64)$")  # the operand type ends an atomic's qualifiers


def atomic_order_faults(variants: list[Variant], hand_offs: set[str]) -> list[str]:
    """What the compiled atomics of ``variants`` do against the kernels' contract, as readable lines:
    a floating-point atomic anywhere (its sum's rounding would follow the order the programs arrive
    in: no run-to-run determinism), a global atomic at ``cta`` scope (no order for programs on other
    SMs), and a variant of a ``hand_offs`` kernel with global atomics but none ``acq_rel`` at ``gpu``
    scope (the hand-off between its programs would be unordered; ``Launch.unordered`` checks the same
    under the interpreter, this that the compiler emitted it)."""
    faults = []
    for v in variants:
        faults += [f"{v.kernel}: {a}, a floating-point atomic" for a in v.atomics if _FLOAT_ATOMIC.search(a)]
        global_ = [a for a in v.atomics if ".global." in a]
        faults += [f"{v.kernel}: {a}, a global atomic at cta scope" for a in global_ if ".cta." in a]
        if v.kernel in hand_offs and global_ and not any(".acq_rel." in a and ".gpu." in a for a in global_):
            faults.append(f"{v.kernel}: no acq_rel atomic at gpu scope among {global_} ({v.launches})")
    return faults


# The only not correctly rounded instructions the kernels may use: the softmax exponentials (``tl.exp`` is
# ``ex2.approx`` of ``x * log2(e)``, within a few ulps), in the compressor's pooling and the attention's online
# softmax, whose spec tolerances hold them. Everything the spec rounds bit for bit (the RMSNorms, the quant
# scales ``127 / amax``, their inverses) uses ``div_rn``/``sqrt_rn``: a plain ``/`` compiles to ``div.full.f32``
# and ``tl.sqrt`` to ``sqrt.approx.f32``, where the interpreter divides and takes roots exactly.
APPROX_MATH = {k: ("ex2.approx.f32",) for k in ("_compressor_step_kernel", "_attn_kernel", "_combine_kernel")}


def approx_math_faults(variants: list[Variant]) -> list[str]:
    """Each not correctly rounded instruction in ``variants``' PTX that ``APPROX_MATH`` does not allow its
    kernel, as readable lines: there a GPU computes other numbers than the interpreter."""
    return [
        f"{v.kernel}: {op} ({v.launches[0][0]})"
        for v in variants
        for op in v.approx_math
        if op not in APPROX_MATH.get(v.kernel, ())
    ]


def fused_math_faults(variants: list[Variant]) -> list[str]:
    """Each variant compiled with floating-point contraction allowed, or with an ``fma`` in its PTX, as
    readable lines. Every launch passes ``enable_fp_fusion=False``, so that ``a*b + c`` rounds the product
    as the interpreter and the reference do (a contracted fma rounds once); Triton's default for it is
    not stable across releases."""
    faults = []
    for v in variants:
        why = [what for what, found in (("fp fusion on", v.fp_fusion), (f"{v.fma} fma", v.fma)) if found]
        if why:
            faults.append(f"{v.kernel}: {', '.join(why)} ({v.launches[0][0]})")
    return faults


def compile_plans(groups: list[list[Plan]], timeout: int = 900) -> list[Variant]:
    """Every kernel variant the launchers run for the plans on an H100, compiled for sm_90: one
    subprocess per group of plans, all at once (give plans that share variants to one group)."""
    import pytest

    from subprocesses import ROOT, run_python

    pytest.importorskip("triton.backends.nvidia", reason="Triton without its NVIDIA backend cannot target sm_90")

    def run(plans: list[Plan]) -> str:
        args = [json.dumps(dataclasses.asdict(p)) for p in plans]
        result = run_python([str(ROOT / "tests" / "sm90.py"), *args], timeout=timeout, TRITON_INTERPRET="0")
        assert result.returncode == 0, result.stderr[-4000:]
        return result.stdout

    with ThreadPoolExecutor(len(groups)) as pool:
        outputs = list(pool.map(run, groups))
    variants: dict[str, Variant] = {}
    for line in "\n".join(outputs).splitlines():
        if line.startswith(_PREFIX):
            fields = json.loads(line[len(_PREFIX) :])
            fields["launches"] = tuple((plan, tuple(grid)) for plan, grid in fields["launches"])
            fields["aligned"] = tuple(fields["aligned"])
            fields["pdl_order"] = tuple(fields["pdl_order"])
            fields["loop_waits"] = tuple(fields["loop_waits"])
            fields["loop_load_chains"] = tuple(fields["loop_load_chains"])
            fields["atomics"] = tuple(fields["atomics"])
            fields["approx_math"] = tuple(fields["approx_math"])
            v = Variant(**fields)
            if v.hash in variants:  # compiled by two groups: one variant, launched by both
                v = dataclasses.replace(v, launches=variants[v.hash].launches + v.launches)
            variants[v.hash] = v
    return list(variants.values())


# ----- below: the subprocess (TRITON_INTERPRET=0) -----


# Kernel modules whose launchers ask ``launch.pdl_supported`` (imported by name, so patched in each).
_PDL_LAUNCHERS = (
    "qkv_proj_rope", "q_heads_split", "index_front", "compressor", "index_score", "topk", "o_proj", "sparse_attn",
    "window_kv_write",
)  # fmt: skip


class _H100Driver:
    """What the JIT asks of its driver before it compiles: the current device, stream and target."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)


def _on_h100(launches: list) -> None:
    """From now on in this process, a launch compiles its variant for an H100 and appends ``(jit
    function, grid, compiled kernel)`` to ``launches`` instead of running (the module docstring says
    what stands in for the GPU)."""
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    import dsv4.kernels

    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        launches.append((self, grid, kernel))
        return kernel

    driver.set_active(_H100Driver())
    JITFunction.run = compile_only
    dsv4.kernels.unavailable_reason = lambda device: None
    for name in _PDL_LAUNCHERS:  # an sm_90 device: their dependent launches use PDL
        launcher: Any = importlib.import_module(f"dsv4.kernels.{name}")
        launcher.pdl_supported = lambda device: True


def _run_plan(plan: Plan) -> None:
    """Call ``plan``'s op on the Triton backend at its shapes (inputs on the CPU). Nothing runs, so a
    state's contents do not matter: a stateful op's case is drawn at position 0 (no history to write,
    seconds at 64 x 2048 keys) and then moved to the plan's start position."""
    import torch

    from dsv4 import ops
    from dsv4.harness.cases import make_case
    from dsv4.model.config import get_config

    # ops that take start positions; sparse_attn's pools are drawn at the position
    stateful = plan.op not in ("qkv_proj_rope", "o_proj", "sparse_attn", "sparse_attn_write")
    case = make_case(
        get_config(plan.preset), plan.op, batch=plan.batch, seq=plan.seq,
        start_pos=0 if stateful else plan.start_pos, max_position=plan.max_position, kind=plan.kind,
    )  # fmt: skip
    if stateful:
        case.args["start_pos"] = torch.full_like(case.args["start_pos"], plan.start_pos)
    if plan.fp32:
        w = case.args["w"]
        owner = w.compressor if plan.op == "indexer" else w
        changed = dataclasses.replace(owner, **{n: getattr(owner, n).to(torch.float32) for n in plan.fp32})
        case.args["w"] = dataclasses.replace(w, compressor=changed) if plan.op == "indexer" else changed
    getattr(ops, plan.op)(**case.args, backend="triton")


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """``cuobjdump --dump-resource-usage`` of one kernel's cubin: REG, STACK, SHARED, LOCAL, ..."""
    import triton

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    return {key: int(value) for key, value in re.findall(r"(\w+):(\d+)", out.split("Resource usage:")[-1])}


def _innermost_loops(ttgir: str) -> list[tuple[int, list[str]]]:
    """``(indent, lines of its body, nested regions included)`` of every innermost ``scf.for``, by
    indentation as the TTGIR is printed."""
    lines = [line for line in ttgir.splitlines() if line.strip()]
    loops = []
    for i, line in enumerate(lines):
        if "scf.for" not in line:
            continue
        indent = len(line) - len(line.lstrip())
        region = []
        for inner in lines[i + 1 :]:
            if len(inner) - len(inner.lstrip()) <= indent:
                break
            region.append(inner)
        if not any("scf.for" in op for op in region):
            loops.append((indent, region))
    return loops


def _loop_waits(ttgir: str) -> tuple[int, ...]:
    """The ``num`` of every ``ttg.async_wait`` directly in the body of an innermost loop that also
    issues async copies: the steady state of a software-pipelined loop (an outer loop's prologue and
    drain waits are not in it)."""
    waits = []
    for indent, region in _innermost_loops(ttgir):
        body = [op for op in region if len(op) - len(op.lstrip()) == indent + 2]
        if any("async_copy_global_to_local" in op or "async_tma_copy" in op for op in body):
            waits += [int(n) for op in body for n in re.findall(r"ttg\.async_wait\b.*\{num = (\d+)", op)]
    return tuple(waits)


_SSA = re.compile(r"%[\w.$-]+")
_LOAD = re.compile(r"\btt\.load\b")


def _load_chain(body: list[str]) -> int:
    """The longest chain of ``tt.load``s in ``body`` (a loop's lines, nested regions included, in
    order) in which each load's operands need the value of the one before: values from outside the
    body (the loop's carried values among them) start every chain at 0. A nested region's results
    (``scf.if``) take the chains of the values its ``scf.yield``s give."""
    depth: dict[str, int] = {}
    loads = [0]
    regions: list[tuple[int, list[str], list[int]]] = []  # (indent, results, chains its yields give)

    def close(indent: int) -> None:
        while regions and indent <= regions[-1][0]:
            _, results, given = regions.pop()
            depth.update(dict.fromkeys(results, max(given, default=0)))

    for line in body:
        indent = len(line) - len(line.lstrip())
        close(indent)
        lhs, eq, rhs = line.partition(" = ")
        names = _SSA.findall(lhs) if eq else []
        used = max((depth.get(v.split("#")[0], 0) for v in _SSA.findall(rhs if eq else line)), default=0)
        if "scf.yield" in line and regions:
            regions[-1][2].append(used)
        if eq and _LOAD.search(rhs):
            used += 1
            loads.append(used)
        depth.update(dict.fromkeys(names, used))
        if line.rstrip().endswith("{") and names:  # a region op: its results are set when it closes
            regions.append((indent, names, []))
    return max(loads)


def _loop_load_chains(ttgir: str) -> tuple[int, ...]:
    """``_load_chain`` of the body of every innermost ``scf.for`` that loads from global memory."""
    return tuple(_load_chain(region) for _, region in _innermost_loops(ttgir) if any(map(_LOAD.search, region)))


def _sass(cubin: bytes) -> tuple[list[str], dict[str, int]]:
    """The SASS instructions of ``cubin`` in order, and its labels (label -> index of the instruction after it)."""
    import triton

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run(
            [triton.knobs.nvidia.nvdisasm.path, "-c", f.name], capture_output=True, text=True, check=True
        ).stdout
    code: list[str] = []
    labels: dict[str, int] = {}
    for line in sass.splitlines():
        if label := re.match(r"^(\.L_x_\d+):", line):
            labels[label.group(1)] = len(code)
        elif re.match(r"^\s*/\*[0-9a-f]+\*/", line):
            code.append(line)
    return code, labels


def _mma_loop(code: list[str], labels: dict[str, int]) -> tuple[int, int]:
    """``(instructions, inner branches)`` of the smallest backward-branch span of the SASS that holds
    a tensor-core instruction (``GMMA``/``HMMA``/``IMMA``): one iteration of the MMA loop, one warp."""
    best = (0, 0)
    for end, ins in enumerate(code):
        target = re.search(r"\bBRA\b.*\((\.L_x_\d+)\)", ins)
        if not target or labels.get(target.group(1), end + 1) > end:
            continue
        body = code[labels[target.group(1)] : end + 1]
        if any(re.search(r"\b[HI]?GMMA\b|\bHMMA\b|\bIMMA\b", i) for i in body) and (not best[0] or len(body) < best[0]):
            best = (len(body), sum(bool(re.search(r"\bBRA\b", i)) for i in body) - 1)
    return best


def _ring(ttgir: str) -> int:
    """The leading dimension of the deepest multi-buffered 2-D shared-memory allocation (1: none)."""
    depths = re.findall(r"ttg\.local_alloc\s*:\s*\(\) -> !ttg\.memdesc<(\d+)x\d+x\d+x", ttgir)
    return max([int(n) for n in depths] or [1])


_PDL_STEPS = (
    ("cp.async.bulk.prefetch.L2", "prefetch"),
    ("prefetch.global.L2", "prefetch"),
    ("griddepcontrol.launch_dependents", "launch_dependents"),
    ("griddepcontrol.wait", "wait"),
)


def _pdl_order(ptx: str) -> list[str]:
    """The ``_PDL_STEPS`` in the PTX, in the order each first appears (both prefetch kinds are one)."""
    steps = sorted((ptx.find(instruction), name) for instruction, name in _PDL_STEPS if instruction in ptx)
    return list(dict.fromkeys(name for _, name in steps))


def _loads_before_wait(ptx: str) -> int:
    """Global loads (``ld.global``) above the first ``griddepcontrol.wait`` (all of them without one)."""
    wait = ptx.find("griddepcontrol.wait")
    return len(re.findall(r"\bld\.global", ptx if wait < 0 else ptx[:wait]))


def _variant(fn, kernel, launches: list[tuple[str, tuple[int, ...]]]) -> dict[str, Any]:
    """The fields of a ``Variant`` for ``kernel``, the compiled ``fn`` (keys of its specialization:
    ``(argument index,)``)."""
    src, ptx = kernel.src, kernel.asm["ptx"]
    usage = _resource_usage(kernel.asm["cubin"])
    code, labels = _sass(kernel.asm["cubin"])
    mma_loop = _mma_loop(code, labels)
    return {
        "kernel": fn.__name__,
        "hash": kernel.hash,
        "launches": launches,
        "constants": {
            fn.arg_names[i]: v if isinstance(v, (int, float, bool, type(None))) else str(v)
            for (i,), v in src.constants.items()
        },
        "aligned": sorted(fn.arg_names[i] for (i,), attr in src.attrs.items() if ["tt.divisibility", 16] in attr),
        "num_warps": kernel.metadata.num_warps,
        "num_stages": kernel.metadata.num_stages,
        "registers": usage["REG"],
        "local_bytes": usage["STACK"] + usage["LOCAL"],
        "shared_bytes": kernel.metadata.shared,
        "async_copies": len(re.findall(r"cp\.async\.c[ag]\.shared", ptx)),
        "tma_copies": ptx.count("cp.async.bulk.tensor"),
        "mma": "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "-",
        "fma": len(re.findall(r"\bfma\.rn", ptx)),
        "fp_fusion": kernel.metadata.enable_fp_fusion,
        "sass": len(code),
        "dependent_launch": "griddepcontrol" in ptx,
        "loop_waits": _loop_waits(kernel.asm["ttgir"]),
        "ring": _ring(kernel.asm["ttgir"]),
        "mma_loop_sass": mma_loop[0],
        "mma_loop_branches": mma_loop[1],
        "loop_load_chains": _loop_load_chains(kernel.asm["ttgir"]),
        "l2_prefetches": ptx.count("cp.async.bulk.prefetch.L2"),
        "pdl_order": _pdl_order(ptx),
        "loads_before_wait": _loads_before_wait(ptx),
        "atomics": sorted(set(re.findall(r"\b(?:atom|red)\.[\w.]+", ptx))),
        "approx_math": sorted(set(re.findall(r"\b[a-z0-9]+\.(?:approx|full)[\w.]*", ptx))),
    }


def main(argv: list[str]) -> None:
    plans = [Plan(**{**fields, "fp32": tuple(fields["fp32"])}) for fields in map(json.loads, argv)]
    compiled: dict[str, tuple[Any, Any, list]] = {}  # kernel hash -> (jit function, kernel, launches)
    launches: list = []
    _on_h100(launches)
    for plan in plans:
        launches.clear()
        _run_plan(plan)
        for fn, grid, kernel in launches:
            compiled.setdefault(kernel.hash, (fn, kernel, []))[2].append((plan.name, tuple(grid)))
    for fn, kernel, runs in compiled.values():
        print(_PREFIX + json.dumps(_variant(fn, kernel, runs)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

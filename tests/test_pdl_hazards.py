"""What each launch touches before its programmatic-dependent-launch wait races with no launch that may
still be running, in every op and across the ops of a whole attention step (``tests/pdl_hazards.py``).

The interpreter runs the launches one after another and without PDL, so a kernel that read its
predecessor's output before ``gdc_wait`` would pass every other test and race on sm_90. Here the
kernels run their sm_90 code paths (PDL on) under the interpreter, their waits and triggers marked:
the bytes each launch reads or writes before its wait must not be written by a launch that may still
be running (nor, where it writes them, read). The checker itself is tested first, on kernels made to
race.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

import dsv4
from conftest import DEVICE, FULL
from dsv4.bench.interp_traffic import count_traffic, mark_launch_dependents, mark_wait
from dsv4.harness.cases import make_case, run_case
from dsv4.harness.golden import bit_identical
from dsv4.kernels import tuning
from dsv4.kernels.interpreter import interpreted
from dsv4.kernels.o_proj import o_proj as fused_o_proj
from dsv4.kernels.workspace import Workspace
from dsv4.model.weights import synthetic_o_proj
from frontends import tiny_frontend
from op_cases import SPLIT_O_PROJ, split_o_proj
from pdl_hazards import hazards, pdl_interpreted

pytestmark = pytest.mark.skipif(not interpreted(), reason="marks the waits of interpreted launches")

TINY = dsv4.get_config("tiny")
N = 64  # values a test kernel touches
BYTES = f"{4 * N} B before its wait that launch 0 (_write)"  # a race's line, after its launch and verb
READ_BY_0 = f"{4 * N} B before its wait that launch 0 (_touch)"  # which reads them


@triton.jit
def _write(buf, value, WRITE_EARLY: tl.constexpr, N: tl.constexpr):
    """A predecessor: lets its dependents start at once, then writes ``buf`` after its wait (or, with
    ``WRITE_EARLY``, before it)."""
    mark_launch_dependents()
    if not WRITE_EARLY:
        mark_wait()
    tl.store(buf + tl.arange(0, N), tl.full((N,), value, tl.float32))
    if WRITE_EARLY:
        mark_wait()


@triton.jit
def _touch(buf, out, READ_EARLY: tl.constexpr, WRITE_EARLY: tl.constexpr, TRIGGER_EARLY: tl.constexpr, N: tl.constexpr):
    """A dependent: reads or writes ``buf`` before or after its wait; lets its own dependents start
    before its wait (``TRIGGER_EARLY``) or after it."""
    offs = tl.arange(0, N)
    if TRIGGER_EARLY:
        mark_launch_dependents()
    if READ_EARLY:
        tl.store(out + offs, tl.load(buf + offs))
    if WRITE_EARLY:
        tl.store(buf + offs, tl.zeros((N,), tl.float32))
    mark_wait()
    if not TRIGGER_EARLY:
        mark_launch_dependents()
    tl.store(out + offs, tl.load(buf + offs) + 1.0)


def _launches(*steps: tuple[str, dict]) -> list:
    """Launches of the test kernels on one buffer (or, ``elsewhere``, another), each dependent writing an
    output of its own, their bytes kept."""
    buf, other = torch.zeros(N, device=DEVICE), torch.zeros(N, device=DEVICE)
    with count_traffic(addresses=True) as log:
        for kind, kw in steps:
            pdl = kw.pop("pdl", True)
            if kind == "write":
                _write[(1,)](buf, 1.0, WRITE_EARLY=kw.pop("early", False), N=N, launch_pdl=pdl)
            else:
                target = other if kw.pop("elsewhere", False) else buf
                flags = {"READ_EARLY": False, "WRITE_EARLY": False, "TRIGGER_EARLY": True, **kw}
                _touch[(2,)](target, torch.zeros(N, device=DEVICE), N=N, launch_pdl=pdl, **flags)
    return log.launches


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        ((("write", {}), ("touch", {"READ_EARLY": True})), [f"launch 1 (_touch) reads {BYTES}"]),
        ((("write", {"early": True}), ("touch", {"READ_EARLY": True})), [f"launch 1 (_touch) reads {BYTES}"]),
        ((("write", {}), ("touch", {"WRITE_EARLY": True})), [f"launch 1 (_touch) writes {BYTES}"]),
        ((("touch", {}), ("touch", {"WRITE_EARLY": True})), [f"launch 1 (_touch) writes {READ_BY_0}"]),
        ((("write", {}), ("touch", {})), []),
        ((("write", {}), ("touch", {"READ_EARLY": True, "pdl": False})), []),
        ((("write", {}), ("touch", {"elsewhere": True}), ("touch", {"READ_EARLY": True})),
         [f"launch 2 (_touch) reads {BYTES}"]),
        ((("write", {}), ("touch", {"elsewhere": True, "TRIGGER_EARLY": False}), ("touch", {"READ_EARLY": True})), []),
    ],
    ids=[
        "read-early", "predecessor-writes-before-its-wait", "write-early", "write-what-it-reads", "after-the-wait",
        "not-pdl", "two-back", "two-back-trigger-late",
    ],
)  # fmt: skip
def test_checker_finds_the_races(steps: tuple, expected: list[str]) -> None:
    """Each race the checker is for, and its absence: the dependent reads (or writes) the predecessor's
    bytes before its wait (whether the predecessor wrote them after its own wait or before it), or writes
    bytes the predecessor reads; after it; a dependent not launched with PDL; two launches back, reached
    only while the launch between lets its dependents start before its own wait."""
    found = hazards(_launches(*[(k, dict(kw)) for k, kw in steps]))
    assert [line.split(", which")[0] for line in found] == expected, found


@triton.jit
def _read_own_half_early(buf, out, N: tl.constexpr):
    """A dependent whose two programs each read their own half of ``buf`` before their waits."""
    offs = tl.program_id(0) * (N // 2) + tl.arange(0, N // 2)
    tl.store(out + offs, tl.load(buf + offs))
    mark_wait()


def test_every_program_reads_before_its_own_wait() -> None:
    """Each program of a launch starts before its wait, whatever the programs run before it did: the
    second program's early read of its half races as the first's does, so the race covers all of
    ``buf``."""
    buf = torch.zeros(N, device=DEVICE)
    with count_traffic(addresses=True) as log:
        _write[(1,)](buf, 1.0, WRITE_EARLY=False, N=N, launch_pdl=True)
        _read_own_half_early[(2,)](buf, torch.zeros(N, device=DEVICE), N=N, launch_pdl=True)
    found = hazards(log.launches)
    assert [line.split(", which")[0] for line in found] == [f"launch 1 (_read_own_half_early) reads {BYTES}"], found


@triton.jit
def _first_program_triggers_early():
    """Program 0 lets the next launch start before its wait; program 1 only after its own."""
    if tl.program_id(0) == 0:
        mark_launch_dependents()
    mark_wait()
    if tl.program_id(0) != 0:
        mark_launch_dependents()


def test_one_program_triggering_before_its_wait_marks_the_launch() -> None:
    """A launch lets its dependents start before its wait when any of its programs does, whatever the
    programs run after it do (``Launch.triggers_before_wait``, which reaches two launches back)."""
    with count_traffic(addresses=True) as log:
        _first_program_triggers_early[(2,)](launch_pdl=True)
    assert log.launches[0].triggers_before_wait


@pytest.mark.parametrize("mode", ["decode", "prefill"])
@pytest.mark.parametrize("op", dsv4.ops.op_names())
def test_op_launches_race_with_nothing(op: str, mode: str) -> None:
    """Each op's launches, as sm_90 runs them: every launch a PDL launch that waits, nothing touched
    before a wait that a launch beside it writes, and the same bits as without PDL."""
    case = make_case(TINY, op, mode=mode, seed=3, device=DEVICE)
    want = run_case(case, "triton")
    with pdl_interpreted() as log:
        got = run_case(case, "triton")
    assert log.launches and all(launch.pdl and launch.waits for launch in log.launches), log.launches
    assert hazards(log.launches) == []
    assert got.keys() == want.keys() and all(bit_identical(got[k], want[k], k) for k in want)


@pytest.mark.parametrize(("op", "kind"), [("sparse_attn", "csa"), ("sparse_attn_write", "csa"), ("sparse_attn", "hca")])
def test_key_split_attention_races_with_nothing(op: str, kind: str) -> None:
    """``sparse_attn`` with its keys split in two (``tiny``'s steps split none; at flash widths the
    default splits B=2's): the combine launch reads the splits' partials only after its wait, nothing
    touched before a wait races, and the bits are those without PDL."""
    case = make_case(TINY, op, mode="decode", seed=3, device=DEVICE, kind=kind)
    with tuning.forced("sparse_attn", {"splits": 2}):
        want = run_case(case, "triton")
        with pdl_interpreted() as log:
            got = run_case(case, "triton")
    assert [launch.kernel for launch in log.launches] == ["_attn_kernel", "_combine_kernel"], log.launches
    assert all(launch.pdl and launch.waits for launch in log.launches), log.launches
    assert hazards(log.launches) == []
    assert got.keys() == want.keys() and all(bit_identical(got[k], want[k], k) for k in want)


def _attention_steps(kind: str) -> list:
    """A tiny ``DecodeAttention`` layer of ``kind``, Triton backend: a 9-token prefill, then steps of 2
    and 1 tokens; the launches of the three calls, as sm_90 runs them, in order."""
    layer = {"swa": 0, "csa": 1, "hca": 2}[kind]
    w = dsv4.synthetic_weights(TINY, seed=0, device=DEVICE, layer=layer)
    rope = dsv4.layer_rope_table(TINY, layer, 128, DEVICE)
    m = dsv4.DecodeAttention(w, rope, TINY, batch=3, max_position=128, backend="triton", block_size=16)
    with pdl_interpreted() as log:
        for s, seed in ((9, 1), (2, 2), (1, 3)):
            m(dsv4.synthetic_activations((3, s, TINY.hidden_size), seed=seed, device=DEVICE))
    return log.launches


@pytest.mark.parametrize("kind", ["csa", pytest.param("swa", marks=FULL), pytest.param("hca", marks=FULL)])
def test_attention_step_launches_race_with_nothing(kind: str) -> None:
    """The whole attention step of a layer, one op's first launch overlapping the last of the op
    before (and the step after the step before): nothing touched before a wait that a launch beside
    it writes."""
    launches = _attention_steps(kind)
    assert len({launch.kernel for launch in launches}) >= 7, [launch.kernel for launch in launches]
    assert hazards(launches) == []


def test_front_end_steps_race_with_nothing() -> None:
    """``DecodeFrontEnd``'s steps (``qkv_proj_rope``, then the indexer with its compressor): a 9-token
    prefill, then steps of 2 and 1 tokens, nothing touched before a wait that a launch beside it writes."""
    m = tiny_frontend("triton", 3, 256)
    with pdl_interpreted() as log:
        for s in (9, 2, 1):
            m(dsv4.synthetic_activations((3, s, TINY.hidden_size), seed=s, device=DEVICE))
    assert {launch.kernel for launch in log.launches} >= {"_q_heads_kernel", "_score_kernel", "_compressor_step_kernel"}
    assert hazards(log.launches) == []


def test_q_heads_split_over_ql_race_with_nothing() -> None:
    """``DecodeFrontEnd``'s steps with the q heads' ``splits`` candidate (QL slices, then a launch that
    finishes each head, on the step's workspace): nothing touched before a wait that a launch beside it
    writes, the finish reading the slices only after its wait."""
    m = tiny_frontend("triton", 3, 256)
    with tuning.forced("qkv.q_heads", {"splits": 2, "block_k": 32}), pdl_interpreted() as log:
        for s in (9, 2, 1):
            m(dsv4.synthetic_activations((3, s, TINY.hidden_size), seed=s, device=DEVICE))
    assert {launch.kernel for launch in log.launches} >= {"_q_slices_kernel", "_q_finish_kernel"}
    assert "_q_heads_kernel" not in {launch.kernel for launch in log.launches}
    assert hazards(log.launches) == []


def test_split_o_proj_calls_on_one_workspace_race_with_nothing() -> None:
    """Two ``o_proj`` calls on one workspace, both GEMMs split in two (``tiny`` splits neither): the
    second call's activation-quant launch zeroes the split counters that the first call's ``wo_b``
    launch counts on, so it must do so after its wait."""
    g = torch.Generator().manual_seed(5)
    o = torch.randn(5, SPLIT_O_PROJ.num_attention_heads, SPLIT_O_PROJ.head_dim, generator=g).to(torch.bfloat16)
    o, w = o.to(DEVICE), synthetic_o_proj(SPLIT_O_PROJ, 5).to(DEVICE)
    ws = Workspace()
    with split_o_proj():
        want = fused_o_proj(o, w, ws=ws).y
        with pdl_interpreted() as log:
            first, second = fused_o_proj(o, w, ws=ws).y.clone(), fused_o_proj(o, w, ws=ws).y
    assert [launch.kernel for launch in log.launches] == ["_wo_a_kernel", "_act_quant_kernel", "_wo_b_kernel"] * 2
    assert hazards(log.launches) == []
    assert bit_identical(first, want, "y") and bit_identical(second, want, "y")

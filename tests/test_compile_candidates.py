"""``benchmarks/compile_candidates.py``: every declared candidate of a kernel compiled for sm_90 on the CPU,
one row each, as a user runs the script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dsv4.kernels import tuning

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "compile_candidates.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


def test_names_every_tuned_kernel() -> None:
    """The script's kernels are the tuned ones: a kernel that declares candidates has its rows."""
    code = "import compile_candidates, json; print(json.dumps(sorted(compile_candidates.KERNELS)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=SCRIPT.parent, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[-1]) == sorted(tuning.TUNABLES)


def test_a_row_for_each_candidate_as_it_compiled(tmp_path: Path) -> None:
    """``window_kv_write`` at flash decode (64 slots, S=2): the defaults, then each declared candidate,
    each row the launch that candidate made (its grid, warps and dependent launch)."""
    pytest.importorskip("triton.backends.nvidia", reason="Triton without its NVIDIA backend cannot target sm_90")
    out = tmp_path / "rows.json"
    done = _run("--kernels", "window_kv_write", "--json", str(out))
    assert done.returncode == 0, done.stderr[-4000:]
    got = json.loads(out.read_text())
    rows = got["rows"]
    tunable = tuning.TUNABLES["window_kv_write"]
    assert {row["bucket"] for row in rows} == {"B=64,S=2"}
    candidates = tunable.candidate_configs(tunable.parse_bucket("B=64,S=2"))
    assert [row["changed"] for row in rows] == [
        {k: v for k, v in cfg.items() if v != tunable.default[k]} for cfg in candidates
    ]
    assert rows[0]["changed"] == {} and len(rows) >= 4
    for row in rows:
        cfg = {**tunable.default, **row["changed"]}
        assert "error" not in row, row
        assert row["function"] == "_window_kv_write_kernel" and row["fits"] and row["registers"] > 0
        assert row["grid"] == [64, -(-2 // cfg["block_t"])], row  # a program per slot and block of tokens
        assert row["num_warps"] == cfg["num_warps"] and row["dependent_launch"] == cfg["pdl"], row
    assert [json.loads(line) for line in done.stdout.splitlines()] == rows
    assert got["meta"]["command"] == f"python benchmarks/compile_candidates.py --kernels window_kv_write --json {out}"


@pytest.mark.parametrize(
    "args, message",
    [
        (("--kernels", "window_kv_write", "--preset", "tiny"), "--preset tiny: 4096 positions, fewer than the 8192"),
        (("--kernels", "topk.select_chunks", "--preset", "demo"), "fewer than the 262144 that topk.select_chunks"),
        (("--kernels", "o_proj.quant,qkv.heads"), "--kernels: no tuned kernel qkv.heads"),
        (("--preset", "flash/tp3"), "--preset: world: flash splits"),
    ],
)
def test_refuses_what_it_cannot_compile_before_compiling(args: tuple[str, ...], message: str) -> None:
    """A kernel it does not know, or a preset whose positions end before a plan's step, exits 2 naming it."""
    done = _run(*args)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
    assert done.stdout == ""

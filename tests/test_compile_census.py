"""``benchmarks/compile_census.py``: the sm_90 variants a test selection compiles, counted as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from compile_census import census, modeled_step  # noqa: E402


def _census(tmp_path: Path, *selection: str) -> tuple[dict, str]:
    """``compile_census.py`` over ``selection`` in one process -> (its JSON, its stdout)."""
    pytest.importorskip("triton.backends.nvidia", reason="Triton without its NVIDIA backend cannot target sm_90")
    out = tmp_path / "census.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "compile_census.py"), "--workers", "0", "--json", str(out), "--", *selection],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text()), done.stdout


def test_a_variant_counts_once_at_its_compile() -> None:
    """A variant launched by two tests (or built by two workers at once) is one variant, timed by its
    compile, not by the cached launches after it; modules are charged the compiles they made."""
    records = [
        ("tests/test_a.py::one", "_k", "h1", 2.0),
        ("tests/test_b.py::two", "_k", "h1", 1e-5),  # the same variant, from the JIT's cache
        ("tests/test_b.py::two", "_k", "h2", 3.0),
        ("tests/test_b.py::three", "_j", "h3", 0.5),
    ]
    got = census(records)
    assert got["variants"] == 3 and got["seconds"] == 5.5
    assert got["kernels"] == {"_k": {"variants": 2, "seconds": 5.0}, "_j": {"variants": 1, "seconds": 0.5}}
    assert got["modules"] == {"tests/test_b.py": 3.5, "tests/test_a.py": 2.0}


def test_the_model_compiles_a_variant_again_only_while_its_first_compile_runs() -> None:
    """Two workers: tests side by side that need one variant both compile it; a test after its compile
    ended finds it in the cache."""
    records = [("t1", "_k", "h", 5.0), ("t2", "_k", "h", 4.0), ("t3", "_j", "g", 5.0), ("t4", "_k", "h", 1e-5)]
    assert modeled_step(records, ["t1", "t2", "t3", "t4"], workers=2, test_s=0.0) == 10.0  # t2 builds h again
    assert modeled_step(records, ["t1", "t3", "t2", "t4"], workers=2, test_s=0.0) == 5.0
    assert modeled_step(records, ["t1", "t3", "t2", "t4"], workers=1, test_s=1.0) == 14.0


def test_counts_the_variants_of_a_test_file(tmp_path: Path) -> None:
    """``window_kv_write``'s op tests compiled for sm_90 (no GPU): its kernel's variants, each timed."""
    got, stdout = _census(tmp_path, "tests/test_kernels_window_kv_write.py")
    row = got["kernels"]["_window_kv_write_kernel"]
    assert row["variants"] >= 2 and row["seconds"] > 0  # decode (S=2) and a longer step at least
    assert list(got["modules"]) == ["tests/test_kernels_window_kv_write.py"]
    assert f"{got['variants']} variants" in stdout
    model = got["model"]
    assert model["workers"] == 14 and model["in_turns_s"] > 0 and model["collection_order_s"] > 0


def test_the_groups_of_a_capped_selection_run_one_variant(tmp_path: Path) -> None:
    """The long-row top-k with its candidate buffer capped launches its rows in groups (row0 = 0, 2, 4),
    and with the whole launch all run one compiled ``_select_chunks_kernel``: the group's first row is
    not specialized on (it was 2 variants, about 8 s of compile each)."""
    got, _ = _census(tmp_path, "tests/test_kernels_topk.py::test_topk_candidate_buffer_is_capped[hist]")
    assert got["kernels"]["_select_chunks_kernel"]["variants"] == 1

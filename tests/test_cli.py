"""The ``dsv4`` command end to end: ``run``, ``info``, ``golden save|check``, exit codes.

``dsv4 run`` runs as the console command (a fresh interpreter); the rest through ``main`` in this
process (``test_cli_errors.py`` runs user errors both ways)."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsv4.reference
from conftest import DEVICE
from dsv4.cli import main
from dsv4.model.structs import QKV
from dsv4.ops import get_op, op_names
from subprocesses import run_dsv4


def test_run_prints_table_and_passes() -> None:
    """By default the fused kernels run (on a CPU through Triton's interpreter), each call checked."""
    proc = run_dsv4("run", "--steps", "2", "--start-pos", "6", "--batch", "2")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "backend=triton" in lines[0]
    assert any(line.split()[:3] == ["prefill", "qkv_proj_rope", "triton"] for line in lines)
    decode = [line for line in lines if line.startswith("decode")]
    assert len(decode) == 4 and all("ok (vs reference" in line for line in decode)  # 2 steps x 2 ops
    assert "all checks passed" in lines[-1]


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_run_on_the_reference_says_nothing_was_compared(backend: str, capsys: pytest.CaptureFixture) -> None:
    """``--backend auto`` on a CPU is the reference, which compares nothing: the header names the backend
    that ran and the last line says nothing was compared (not "all checks passed"); exit 0, as asked."""
    argv = ["run", "--backend", backend, "--steps", "1", "--start-pos", "0", "--batch", "1", "--seq", "1"]
    assert main([*argv, "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "backend=reference" in lines[0] and "backend=auto" not in lines[0]
    rows = lines[2:-1]  # under the header: step (13 wide), op (17), backend (9), ...
    assert len(rows) == 10 and all(row[32:41] == "reference" and "is the reference" in row for row in rows)
    assert "all checks passed" not in lines[-1]
    assert re.fullmatch(r"10 op calls in [\d.]+ s; on the reference alone: nothing compared .*", lines[-1])


@pytest.mark.parametrize("device", ["cpu", "cpu:0"])
def test_run_header_says_triton_is_interpreted_on_any_cpu_device(
    device: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The header of a Triton run on the CPU says the interpreter runs it, ``cpu:0`` as ``cpu`` (the run
    itself stubbed: the header is printed before it)."""
    import dsv4.harness.run

    monkeypatch.setattr(dsv4.harness.run, "run_front_end", lambda *args, **kwargs: [])
    assert main(["run", "--backend", "triton", "--steps", "1", "--device", device]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert f"device={device} backend=triton (Triton's interpreter on the CPU)" in header


def test_info_lists_backends(capsys: pytest.CaptureFixture) -> None:
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "backend reference available" in out


def test_golden_save_then_check(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for op in ("qkv_proj_rope", "indexer_compressor", "indexer"):
        assert main(["golden", "save", str(tmp_path), "--op", op, "--seed", "3"]) == 0
    assert main(["golden", "save", str(tmp_path), "--op", "indexer", "--mode", "prefill"]) == 0
    assert len(list(tmp_path.glob("*.json"))) == 4
    prefill = json.loads((tmp_path / "indexer-tiny-prefill-seed0.json").read_text())
    assert prefill["meta"]["mode"] == "prefill" and set(prefill["meta"]["start_pos"]) == {0}  # --mode taken
    capsys.readouterr()
    check = ["golden", "check", str(tmp_path), "--backend", "reference", "--device", "cpu"]
    code, out = main(check), capsys.readouterr().out
    assert code == 0, out
    assert "4/4 golden cases passed" in out

    # tamper with one expected output: the check must fail and say where
    path = tmp_path / "qkv_proj_rope-tiny-decode-seed3.expected.safetensors"
    expected = load_file(str(path))
    expected["kv"] = (expected["kv"].float() * 1.05).to(torch.bfloat16)
    save_file(expected, str(path))
    code, out = main(check), capsys.readouterr().out
    assert code == 1
    assert "3/4 golden cases passed" in out and "kv            FAIL" in out


def test_golden_check_runs_the_kernels_unless_told_otherwise(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Without ``--backend`` the check replays the cases on Triton wherever it runs (on a CPU, its
    interpreter), as ``dsv4 run`` does, and the last line names the backend that ran, not ``auto``
    (which on a CPU is the reference that made the cases)."""
    assert main(["golden", "save", str(tmp_path), "--op", "qkv_proj_rope"]) == 0
    capsys.readouterr()
    assert main(["golden", "check", str(tmp_path), "--device", "cpu"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "1/1 golden cases passed on backend triton"
    assert main(["golden", "check", str(tmp_path), "--device", "cpu", "--backend", "auto"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "1/1 golden cases passed on backend reference"


def test_golden_save_then_check_the_attention_ops(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The attention ops' records (pools of FP8 rows, the compressor's ring) are saved and checked by
    their §8 rules; a changed byte of a pool row the op does not write fails the check."""
    ops = ("kv_compressor", "window_kv_write", "sparse_attn", "o_proj")
    for op in ops:
        assert main(["golden", "save", str(tmp_path), "--op", op, "--seed", "3"]) == 0
    check = ["golden", "check", str(tmp_path), "--backend", "reference", "--device", "cpu"]
    assert main(check) == 0
    assert "4/4 golden cases passed" in capsys.readouterr().out
    path = tmp_path / "window_kv_write-tiny-decode-seed3.expected.safetensors"
    expected = load_file(str(path))
    expected["pool.scale"][0, 0, 0] += 1
    save_file(expected, str(path))
    assert main(check) == 1
    out = capsys.readouterr().out
    assert "3/4 golden cases passed" in out and "window_kv_write: FAIL" in out


def test_golden_save_takes_the_layer_kind(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``--kind`` saves an op's HCA or SWA case beside its CSA one, under a name of its own; the check
    replays each in its kind."""
    for op, kind in (("sparse_attn", None), ("sparse_attn", "hca"), ("sparse_attn", "swa"), ("kv_compressor", "hca")):
        assert main(["golden", "save", str(tmp_path), "--op", op] + (["--kind", kind] if kind else [])) == 0
    names = sorted(p.stem for p in tmp_path.glob("*.json"))
    assert names == [
        "kv_compressor-tiny-decode-hca-seed0", "sparse_attn-tiny-decode-hca-seed0", "sparse_attn-tiny-decode-seed0",
        "sparse_attn-tiny-decode-swa-seed0",
    ]  # fmt: skip
    manifest = json.loads((tmp_path / "sparse_attn-tiny-decode-swa-seed0.json").read_text())
    assert manifest["meta"]["kind"] == manifest["scalars"]["kind"] == "swa"
    assert "compressed_pool.nope" not in manifest["inputs"]
    check = ["golden", "check", str(tmp_path), "--backend", "reference", "--device", "cpu"]
    assert main(check) == 0
    assert "4/4 golden cases passed" in capsys.readouterr().out


def test_golden_case_with_an_int_start_pos(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """An int ``start_pos`` (every row at that position; the ops take an int or a ``[B]`` tensor) is
    saved among the manifest's scalars and read back as that int; a start the op cannot take (a
    float) is refused before anything is written, not saved into a file ``load`` would refuse."""
    from dsv4.harness.cases import make_case, run_case
    from dsv4.io import golden_io

    case = make_case(dsv4.get_config("tiny"), "indexer", "decode", 0, start_pos=100)
    case.args["start_pos"] = 100
    path = golden_io.save(case, run_case(case, "reference"), tmp_path / "cases")
    assert json.loads(path.read_text())["scalars"]["start_pos"] == 100
    loaded, _ = golden_io.load(path)
    assert loaded.args["start_pos"] == 100 and type(loaded.args["start_pos"]) is int
    assert main(["golden", "check", str(tmp_path / "cases"), "--backend", "reference", "--device", "cpu"]) == 0
    assert "1/1 golden cases passed" in capsys.readouterr().out
    case.args["start_pos"] = 100.0
    with pytest.raises(ValueError, match=r"scalars\.start_pos must be a int, got 100\.0"):
        golden_io.save(case, run_case(make_case(dsv4.get_config("tiny"), "indexer"), "reference"), tmp_path / "f")
    assert not (tmp_path / "f").exists()


def test_golden_check_empty_folder(tmp_path: Path) -> None:
    assert main(["golden", "check", str(tmp_path), "--backend", "reference", "--device", "cpu"]) == 2


def test_run_exits_nonzero_on_mismatch(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """A backend whose q is 2% off must make ``dsv4 run`` report a mismatch and exit 1."""

    def qkv_proj_rope(*args, **kwargs):
        out = dsv4.reference.qkv_proj_rope(*args, **kwargs)
        return QKV((out.q.float() * 1.02).to(torch.bfloat16), out.kv, out.qr, out.qr_scale)

    # the "triton" backend of every op replaced: qkv_proj_rope broken, the others the reference
    monkeypatch.setitem(get_op("qkv_proj_rope")._impls, "triton", qkv_proj_rope)
    monkeypatch.setitem(get_op("indexer")._impls, "triton", dsv4.reference.indexer)
    monkeypatch.setitem(get_op("indexer_compressor")._impls, "triton", dsv4.reference.indexer_compressor)
    code = main(["run", "--backend", "triton", "--steps", "1", "--start-pos", "0", "--device", DEVICE.type])
    out = capsys.readouterr().out
    assert code == 1
    assert "MISMATCH q:" in out and "1 MISMATCH(ES)" in out
    indexer = [line for line in out.splitlines() if line.split()[2:6] == ["indexer", "triton", "B=4", "S=2"]]
    assert indexer and all("ok (vs reference" in line for line in indexer)


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_run_exits_1_when_a_layers_output_is_not_finite(bad: str, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Each step's ``y`` of a layer's whole attention must be finite: an HCA layer whose output holds NaN
    (or infinities, no NaN) is a MISMATCH row, and ``dsv4 run`` exits 1 (here on the reference, which
    compares nothing else)."""
    from dsv4.harness import run

    real = run.DecodeAttention

    def nan_in_hca(*args, **kwargs):
        module = real(*args, **kwargs)
        if module.kind == "hca":
            forward = module.forward
            monkeypatch.setattr(module, "forward", lambda x, *a: forward(x, *a) + float(bad))
        return module

    monkeypatch.setattr(run, "DecodeAttention", nan_in_hca)
    argv = ["run", "--backend", "reference", "--steps", "1", "--start-pos", "0", "--batch", "1", "--seq", "1"]
    assert main([*argv, "--device", "cpu"]) == 1
    lines = capsys.readouterr().out.splitlines()
    kinds = {line.split()[3]: line for line in lines if "attention" in line}  # "L2 decode 1 hca attention ..."
    assert "MISMATCH y holds NaN or inf" in kinds["hca"]
    assert "y finite" in kinds["swa"] and "y finite" in kinds["csa"]
    assert lines[-1].endswith("1 MISMATCH(ES)")


def _reference_as_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every op's "triton" backend replaced by its reference (a run as fast as the reference's, still checked)."""
    for op in op_names():
        impls = get_op(op)._impls
        if "triton" in impls:
            monkeypatch.setitem(impls, "triton", impls["reference"])


def test_run_judges_an_indexer_step_against_the_pool_before_it(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """A backend whose decode step also changes a key it must not write (row 0, written by the prefill) is a
    MISMATCH: the reference runs the step on a copy of the state taken before the backend's step."""

    def scribbling_indexer(*args, **kwargs):
        out = dsv4.reference.indexer(*args, **kwargs)
        call = inspect.signature(dsv4.reference.indexer).bind(*args, **kwargs).arguments
        if int(call["pos"].start.max()) > 0:  # a decode step: the prefill wrote row 0
            state = call["state"]
            state.keys[int(state.block_table[0, 0]), 0, :4] += 1
        return out

    _reference_as_triton(monkeypatch)
    monkeypatch.setitem(get_op("indexer")._impls, "triton", scribbling_indexer)
    argv = ["run", "--backend", "triton", "--steps", "1", "--start-pos", "8", "--batch", "1", "--seq", "1"]
    assert main([*argv, "--device", "cpu"]) == 1
    rows = {tuple(line.split()[:3]): line for line in capsys.readouterr().out.splitlines()}
    assert "ok (vs reference" in rows[("prefill", "indexer", "triton")]
    assert "MISMATCH" in rows[("decode", "1", "indexer")]


def test_run_calls_the_other_ops_at_the_runs_start(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """The "one call" rows run at the first decode step's positions (``--start-pos``), not at a case's
    random ones: a start at a block boundary is the boundary they are run at."""
    from dsv4.harness import run

    starts = []
    real = run.make_case

    def recorded(*args, **kwargs):
        case = real(*args, **kwargs)
        starts.append(case.meta["start_pos"])
        return case

    monkeypatch.setattr(run, "make_case", recorded)
    argv = ["run", "--backend", "reference", "--steps", "1", "--start-pos", "252", "--batch", "3", "--seq", "4"]
    assert main([*argv, "--device", "cpu"]) == 0
    assert len(starts) == len(op_names()) - 3 and all(s == [252, 252, 252] for s in starts)


def test_golden_case_names_of_a_rank_preset_are_file_stems() -> None:
    """A rank's preset (``demo/tp2``) names one file, not a folder."""
    from dsv4.harness.cases import Case
    from dsv4.io.golden_io import case_name

    case = Case("o_proj", {}, {"preset": "demo/tp2", "mode": "decode", "seed": 0})
    assert case_name(case) == "o_proj-demo-tp2-decode-seed0"

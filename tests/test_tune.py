"""``dsv4 tune --dry-run`` on the interpreter: every declared candidate of every kernel matches the
default configuration's output before a GPU ever sees it; the JSON and the config file it writes
are well formed. Also the probe's dry run (its kernels' checksums) and the CLI's refusals."""

from __future__ import annotations

import dataclasses
import functools
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from conftest import DEVICE, FULL
from dsv4.bench import probe, tune
from dsv4.bench.calls import bind
from dsv4.bench.runner import BenchShape
from dsv4.bench.tune import Tuner, Workload, _given, _op_workload, dry_workloads, passed, plan, run_tune
from dsv4.cli import main
from dsv4.harness.cases import make_case
from dsv4.kernels import tuning
from dsv4.kernels.qkv_proj_rope import Q_HEADS_TUNING
from dsv4.model.config import get_config
from dsv4.ops.registry import get_op, op_names

# the dry runs check candidates and probe kernels under Triton's CPU interpreter, which a process with a
# GPU does not select (its kernels compile for the GPU): they run where CI runs, without one
INTERPRETER_ONLY = pytest.mark.skipif(DEVICE.type == "cuda", reason="dry runs use Triton's CPU interpreter")


@pytest.fixture(scope="session")
def dry_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tune")
    t0 = time.perf_counter()
    result = run_tune(
        device="cpu", dry_run=True, json_path=folder / "tune.json", config_path=folder / "cpu.json", log=lambda _: None
    )
    print(f"dsv4 tune --dry-run: {time.perf_counter() - t0:.1f} s wall")
    return result, folder


@INTERPRETER_ONLY
def test_every_candidate_of_every_kernel_matches_the_default(dry_run) -> None:
    result, _ = dry_run
    assert result["stopped"] is None and all(w["status"] == "done" for w in result["workloads"])
    assert {b["kernel"] for b in result["buckets"]} == set(tuning.TUNABLES)
    assert len({(b["kernel"], b["bucket"]) for b in result["buckets"]}) == len(result["buckets"])  # each once
    for kind, kernels in (("hca", {"sparse_attn", "kv_compressor.step", "index.front"}), ("swa", {"sparse_attn"})):
        assert {b["kernel"] for b in result["buckets"] if b["workload"].endswith(f"kind={kind}")} == kernels
    for b in result["buckets"]:
        name = b["kernel"]
        tunable = tuning.TUNABLES[name]
        declared = [dict(c) for c in tunable.candidate_configs(tunable.parse_bucket(b["bucket"]))]
        assert [v["params"] for v in b["variants"]] == declared, name
        for v in b["variants"]:
            assert passed(v["check"]), (name, v)
            assert v["median_us"] > 0
            shared = v.get("same_run_as")
            if isinstance(shared, dict):  # shares a run only when the difference is invisible to the interpreter
                diff = {k for k in tunable.default if v["params"][k] != {**tunable.default, **shared}[k]}
                assert all(tunable.param(k).compiled_only for k in diff), (name, v)
            elif shared is not None:  # the op's run at every default
                assert all(tunable.param(k).compiled_only for k in v["changed"]), (name, v)
    ran = sum(1 for b in result["buckets"] for v in b["variants"] if "same_run_as" not in v)
    assert ran >= 12  # tiles, splits, pairing, programs per SM and chunk sizes ran for real


# Ragged rows: token counts inside a bucket below its power of two (9 of 16; 33 of 64, where tiny's q heads
# are offered M-tiles of 16 and 32 tokens; at a rank, 3 of 4, where its q heads are offered QL split in 2, 4
# and 8 slices, tiny's QL being one K step, so that its split runs one slice; and 100 of the deployment
# bucket's 128, B = 50, with M-tiles of 16, 32 and 64 tokens), starts one before and at block edges
RAGGED = {
    "tiny": ("tiny", None, ((3, 3, [61, 126, 15], None), (1, 33, [64], "qkv_proj_rope"))),
    "rank q heads": ("demo/tp8", ["qkv.q_heads"], ((1, 3, [255], "qkv_proj_rope"), (50, 2, None, "qkv_proj_rope"))),
}
# what each must have run (not only shared the default's run): a candidate at its bucket
RAGGED_RAN = {
    "tiny": {("qkv.q_heads", "T=64,H=4,QL=128", f'{{"tokens": {n}}}') for n in (16, 32)},
    "rank q heads": {
        *(("qkv.q_heads", "T=4,H=8,QL=1024", f'{{"splits": {n}}}') for n in (2, 4, 8)),
        *(("qkv.q_heads", "T=128,H=8,QL=1024", f'{{"tokens": {n}}}') for n in (16, 32, 64)),
    },
}


def _ragged_workload(
    preset: str, op: str, kind: str | None, batch: int, seq: int, starts: list[int] | None
) -> Workload:
    case = make_case(get_config(preset), op, "decode", 7, "cpu", 512, batch, seq, starts, kind)

    def make():
        call = bind(case, "triton")
        return call, call.outputs

    def reference():
        call = bind(case, "reference")
        return call.outputs(call())

    label = f"{preset} {op} decode B={batch} S={seq}" + (f" starts={starts}" if starts else "")
    label += f" kind={kind}" if kind else ""
    return Workload(label, op, make, case.compare_inputs(), None, kind, reference)


@INTERPRETER_ONLY
@FULL
@pytest.mark.parametrize("rows", sorted(RAGGED))
def test_every_candidate_matches_the_default_at_ragged_rows_of_its_bucket(rows: str, tmp_path) -> None:
    """A tuned file's entry runs at every shape of its bucket, not only the one the tune timed: the dry
    run's check (each candidate bit for bit against the op at every default where only exact parameters
    changed, else against the reference by the spec's rules) at rows that fill their buckets partly and
    start at block edges, every op in every layer kind, and a rank's q heads at the flash widths."""
    preset, kernels, shapes = RAGGED[rows]
    loads = [
        _ragged_workload(preset, op, kind, b, s, starts)
        for b, s, starts, only in shapes
        for op in ([only] if only else op_names("triton"))
        for kind in get_op(op).kinds or (None,)
    ]
    # not the dry run's one bucket a kernel: every bucket the rows look up
    tuner = Tuner(torch.device("cpu"), tmp_path / "cpu.json", None, "test", kernels_wanted=kernels, log=lambda _: None)
    result = tuner.run([functools.partial(_given, w) for w in loads], [w.label for w in loads])
    assert result["stopped"] is None and all(w["status"] == "done" for w in result["workloads"]), result["workloads"]
    variants = [(b["kernel"], b["bucket"], v) for b in result["buckets"] for v in b["variants"]]
    assert not [row for row in variants if not passed(row[2]["check"])]
    ran = {(k, bucket, json.dumps(v["changed"])) for k, bucket, v in variants if "same_run_as" not in v}
    assert RAGGED_RAN[rows] <= ran


@INTERPRETER_ONLY
def test_dry_run_files_are_well_formed(dry_run) -> None:
    result, folder = dry_run
    assert json.loads((folder / "tune.json").read_text()) == json.loads(json.dumps(result))
    table = tuning.load_config(folder / "cpu.json", "cpu")
    written = {(b["kernel"], b["bucket"]): b["winner"] for b in result["buckets"] if b["winner"]}
    assert {(k, bucket) for k, v in table.entries.items() for bucket in v} == set(written)
    for (kernel, bucket), params in written.items():
        assert dict(table.entries[kernel][bucket]) == params
    assert table.meta["made_by"].startswith("dsv4 tune") and table.meta["versions"]["torch"] == torch.__version__


def test_the_gpu_plan_puts_the_deployment_shapes_first() -> None:
    planned = plan(["flash", "pro"], ["decode", "prefill"], ["qkv_proj_rope", "indexer_compressor", "indexer"])
    labels = [f"{p} {s.op} {s.label}" for p, s in planned]
    assert labels[:5] == [
        "flash qkv_proj_rope decode B=64 S=2",
        "flash indexer_compressor decode B=64 S=2",
        "flash indexer decode B=64 S=2 cache=2048",
        "flash indexer decode B=1 S=2 cache=65536",
        "flash indexer decode B=1 S=2 cache=262144",
    ]
    for preset in ("flash", "pro"):
        mine = [label for label in labels if label.startswith(preset)]
        assert len(mine) == 3 * 2 + 9 + 3  # B in 1, 8, 64 for two ops, 3 x 3 indexer shapes, prefill of each op
        assert f"{preset} indexer prefill T=1024" in mine


def test_the_gpu_plan_tunes_a_tensor_parallel_rank() -> None:
    """``dsv4 tune --preset flash/tp8``: the flash shapes at one of 8 ranks, whose q heads look up their
    own bucket (8 heads) and are offered M-tiles of fewer tokens, and at one sequence QL split over
    programs, which fill more SMs."""
    planned = plan(["flash/tp8"], ["decode"], ["qkv_proj_rope", "o_proj"])
    assert [f"{p} {s.op} {s.label}" for p, s in planned][:2] == [
        "flash/tp8 qkv_proj_rope decode B=64 S=2",
        "flash/tp8 o_proj decode B=64 S=2",
    ]
    bucket = Q_HEADS_TUNING.parse_bucket("T=128,H=8,QL=1024")
    assert {c.tokens for c in Q_HEADS_TUNING.candidate_configs(bucket)} == {16, 32, 64, 128}
    one_sequence = Q_HEADS_TUNING.parse_bucket("T=2,H=8,QL=1024")  # B=1: QL over programs instead
    assert {c.splits for c in Q_HEADS_TUNING.candidate_configs(one_sequence)} == {1, 2, 4, 8}
    whole = Q_HEADS_TUNING.parse_bucket("T=128,H=64,QL=1024")  # a whole layer is offered neither
    assert {(c.tokens, c.splits) for c in Q_HEADS_TUNING.candidate_configs(whole)} == {(128, 1)}


def test_the_gpu_plan_tunes_every_layer_kind_of_the_attention_ops() -> None:
    """``kv_compressor`` and ``sparse_attn`` run other launches in HCA and SWA layers: the plan reaches
    them at the deployment and long-context shapes, each batch's other kinds after its default (CSA) shapes."""
    planned = plan(["flash"], ["decode", "prefill"], ["sparse_attn", "kv_compressor", "o_proj"])
    labels = [f"{s.op} {s.label}" for _, s in planned]
    assert labels[:6] == [
        "sparse_attn decode B=64 S=2 cache=2048",
        "kv_compressor decode B=64 S=2",
        "o_proj decode B=64 S=2",
        "sparse_attn decode B=64 S=2 cache=2048 kind=hca",
        "sparse_attn decode B=64 S=2 cache=2048 kind=swa",
        "kv_compressor decode B=64 S=2 kind=hca",
    ]
    for cache in (65536, 262144):
        csa = labels.index(f"sparse_attn decode B=1 S=2 cache={cache}")
        assert (
            csa
            < labels.index(f"sparse_attn decode B=1 S=2 cache={cache} kind=hca")
            < labels.index("sparse_attn decode B=1 S=2 cache=2048")
        )
        assert f"sparse_attn decode B=1 S=2 cache={cache} kind=swa" in labels
    assert not any("kind" in label for label in labels if "o_proj" in label or "prefill" in label or "B=8" in label)


def test_each_kind_of_a_tuned_shape_reaches_its_own_buckets() -> None:
    """The workloads of the plan's kinds run their own launches: their kernels look up buckets that the
    default kind's workload never does, so ``dsv4 tune`` tunes them (the tiny preset, on the test device)."""

    def buckets(op: str, kind: str | None) -> set[tuple[str, str]]:
        load = _op_workload("tiny", BenchShape(op, "decode", 1, 2, 62, kind), DEVICE, 0)
        assert load.label.endswith("" if kind is None else f"kind={kind}")
        with tuning.recording() as seen:
            call, outputs = load.make()
            assert outputs(call())
        return set(seen)

    csa, hca, swa = (buckets("sparse_attn", k) for k in (None, "hca", "swa"))
    assert {k for k, _ in csa} == {k for k, _ in hca} == {k for k, _ in swa} == {"sparse_attn"}
    assert len(csa | hca | swa) == 3  # three KEYS buckets
    csa, hca = buckets("kv_compressor", None), buckets("kv_compressor", "hca")
    assert {k for k, _ in csa} == {k for k, _ in hca} == {"index.front", "kv_compressor.step"}
    assert not csa & hca  # the front launch's columns and the step's ratio differ


@INTERPRETER_ONLY
def test_probe_dry_run_checks_its_kernels(tmp_path, capsys, monkeypatch) -> None:
    launched = []
    real = probe._stream

    def stream(src, out, programs, unroll, *args, **kwargs):
        launched.append((programs, unroll))
        return real(src, out, programs, unroll, *args, **kwargs)

    monkeypatch.setattr(probe, "_stream", stream)
    result = probe.dry_run_probe(log=lambda _: None)
    assert result["rows"] and all(r["check"] == "ok" for r in result["rows"])
    grids = [(r["programs"], r["unroll"]) for r in result["rows"] if r["name"] in ("stream", "l2")]
    assert launched == grids and {p for p, _ in grids} == {1, 3}  # each row's check ran the grid it names
    monkeypatch.undo()
    assert main(["tune", "--probe", "--dry-run", "--json", str(tmp_path / "probe.json")]) == 0
    assert json.loads((tmp_path / "probe.json").read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    assert main(["tune", "--probe", "--list"]) == 0
    assert "launch_gap" in capsys.readouterr().out


def test_cli_lists_and_refuses_without_a_gpu(capsys) -> None:
    assert main(["tune", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in tuning.TUNABLES)
    if not torch.cuda.is_available():
        assert main(["tune", "--kernels", "qkv.rows"]) == 2
        assert "--dry-run" in capsys.readouterr().err
    assert main(["tune", "--dry-run", "--kernels", "qkv.nope"]) == 2
    assert "unknown qkv.nope" in capsys.readouterr().err


@INTERPRETER_ONLY
def test_resume_leaves_out_the_buckets_its_config_file_holds(tmp_path) -> None:
    """``--resume`` goes on where a slice stopped: a kernel bucket the starting file holds is not tuned
    again and keeps its entry; without it every bucket is tuned."""
    args: dict[str, Any] = dict(device="cpu", dry_run=True, ops=["qkv_proj_rope"], kernels=["qkv.rows", "qkv.q_heads"])
    config = tmp_path / "cpu.json"
    held = {"T=2,H=4,QL=128": {"block_k": 64}}
    config.write_text(json.dumps({"schema": 1, "device": "cpu", "kernels": {"qkv.q_heads": held}}))
    result = run_tune(config_path=config, resume=True, log=lambda _: None, **args)
    assert [b["kernel"] for b in result["buckets"]] == ["qkv.rows"]
    assert json.loads(config.read_text())["kernels"]["qkv.q_heads"]["T=2,H=4,QL=128"]["block_k"] == 64  # kept
    result = run_tune(config_path=config, log=lambda _: None, **args)
    assert [b["kernel"] for b in result["buckets"]] == ["qkv.rows", "qkv.q_heads"]


@INTERPRETER_ONLY
def test_resume_of_a_config_file_that_holds_every_bucket_exits_0(tmp_path, capsys) -> None:
    """Nothing left to tune is where a resumed run ends, not "no bucket tuned" (exit 1)."""
    config = tmp_path / "cpu.json"
    config.write_text(json.dumps({"schema": 1, "device": "cpu", "kernels": {"qkv.q_heads": {"T=2,H=4,QL=128": {}}}}))
    argv = ["tune", "--dry-run", "--ops", "qkv_proj_rope", "--kernels", "qkv.q_heads", "--config", str(config)]
    assert main([*argv, "--resume"]) == 0
    assert "no bucket tuned" not in capsys.readouterr().out
    assert main(argv) == 0  # without --resume the bucket is tuned again


@INTERPRETER_ONLY
def test_a_bucket_cut_short_by_the_budget_keeps_its_entry(tmp_path) -> None:
    """The budget runs out after a bucket's first candidates: the entry the starting file holds for it
    was never timed against the rest, so it stays, and nothing else changed, so the file (and the run
    its entries came from) is not rewritten."""
    config = tmp_path / "cpu.json"
    held = {"T=2,H=4,QL=128": {"paired": False}}
    text = json.dumps({"schema": 1, "device": "cpu", "made_by": "an earlier run", "kernels": {"qkv.q_heads": held}})
    config.write_text(text)
    load = next(w for w in dry_workloads(["qkv_proj_rope"], torch.device("cpu"), 0))
    tuner: Tuner

    def cut(line: str) -> None:
        if line.startswith("  qkv.q_heads"):  # after the first candidate the budget is spent
            tuner.deadline = 0.0

    tuner = Tuner(torch.device("cpu"), config, None, "test", kernels_wanted=["qkv.q_heads"], dry_run=True, log=cut)
    result = tuner.run([functools.partial(_given, load)], [load.label])
    (bucket,) = result["buckets"]
    assert bucket["stopped"] == "budget spent" and bucket["winner"] is None
    candidates = Q_HEADS_TUNING.candidate_configs(Q_HEADS_TUNING.parse_bucket(bucket["bucket"]))
    assert len(bucket["variants"]) < len(candidates)
    assert config.read_text() == text


def test_a_candidate_that_raises_is_a_row_of_its_own_and_the_bucket_goes_on(tmp_path, monkeypatch) -> None:
    """A candidate whose run raises (on a GPU, one that does not compile or exceeds the shared memory) is
    its row's finding, named by the exception: the bucket's other candidates still run and pass, and
    the bucket is not stopped."""
    load = next(w for w in dry_workloads(["qkv_proj_rope"], torch.device("cpu"), 0))
    config = tmp_path / "cpu.json"
    tuner = Tuner(torch.device("cpu"), config, None, "test", kernels_wanted=["qkv.q_heads"], dry_run=True,
                  log=lambda _: None)  # fmt: skip
    real = tuner._run

    def run(load: Workload, kernel: str, cfg: tuning.Config, *args: Any) -> dict[str, Any]:
        if cfg["paired"] is False:
            raise RuntimeError("out of resources: Required: 262144, Hardware limit: 232448\nmore")
        return real(load, kernel, cfg, *args)

    monkeypatch.setattr(tuner, "_run", run)
    result = tuner.run([functools.partial(_given, load)], [load.label])
    (bucket,) = result["buckets"]
    failed = [v for v in bucket["variants"] if v["params"]["paired"] is False]
    others = [v for v in bucket["variants"] if v["params"]["paired"] is not False]
    assert failed and others and "stopped" not in bucket and not result["stopped"]
    assert {v["check"] for v in failed} == {
        "error: RuntimeError: out of resources: Required: 262144, Hardware limit: 232448"
    }
    assert all(passed(v["check"]) for v in others), [v["check"] for v in others]


Q_HEADS_BUCKET = "T=2,H=4,QL=128"  # the dry run's q heads (tiny, one decode row of S=2)


def _config(path, params) -> None:
    """A config file of the CPU holding ``params`` for the q heads' dry-run bucket."""
    path.write_text(json.dumps({"schema": 1, "device": "cpu", "kernels": {"qkv.q_heads": {Q_HEADS_BUCKET: params}}}))


def test_a_candidate_is_written_only_when_it_beats_the_default_by_min_gain(tmp_path) -> None:
    """A bucket's fastest candidate is written when its median is at least 2% (``MIN_GAIN``) below the
    default's; when the default wins (again), the bucket's entry from an earlier run is dropped, so the
    bucket holds no entry."""
    config = tmp_path / "cpu.json"
    _config(config, {"paired": False})
    tuner = Tuner(torch.device("cpu"), config, None, "test", dry_run=True, log=lambda _: None)
    default = Q_HEADS_TUNING.default
    faster = {**default, "num_warps": 16}

    def choose(default_us: float, candidate_us: float) -> tuple:
        entry = {"kernel": "qkv.q_heads", "bucket": Q_HEADS_BUCKET}
        variants = [
            {"params": dict(default), "changed": {}, "check": "bit-identical", "median_us": default_us},
            {"params": faster, "changed": {"num_warps": 16}, "check": "bit-identical", "median_us": candidate_us},
        ]
        tuner._choose(entry, variants, default)
        return entry["winner"], tuner.entries.get("qkv.q_heads", {}).get(Q_HEADS_BUCKET)

    assert choose(100.0, 99.0) == (None, None)  # 1% faster: run-to-run noise; the earlier entry goes
    tuner.save()  # and goes from the file too, though no candidate won
    assert Q_HEADS_BUCKET not in tuning.load_config(config, "cpu").entries.get("qkv.q_heads", {})
    assert choose(100.0, 97.0) == (faster, faster)
    tuner.save()
    assert dict(tuning.load_config(config, "cpu").entries["qkv.q_heads"][Q_HEADS_BUCKET]) == faster


def test_a_tune_goes_on_from_its_own_config_file_before_the_packages(tmp_path, monkeypatch) -> None:
    """A run starts from the config file it writes when there is one (an earlier run's), else from the
    package's file for the device."""
    package = tmp_path / "configs"
    package.mkdir()
    _config(package / "cpu.json", {"paired": False})
    monkeypatch.setattr(tuning, "CONFIG_DIR", package)
    own = tmp_path / "own.json"
    tuner = Tuner(torch.device("cpu"), own, None, "test", dry_run=True, log=lambda _: None)
    assert tuner.entries["qkv.q_heads"][Q_HEADS_BUCKET]["paired"] is False
    _config(own, {"block_k": 64})
    tuner = Tuner(torch.device("cpu"), own, None, "test", dry_run=True, log=lambda _: None)
    assert tuner.entries["qkv.q_heads"][Q_HEADS_BUCKET] == {**Q_HEADS_TUNING.default, "block_k": 64}


def test_a_shape_is_started_with_5_s_of_the_budget_left_on_a_gpu_and_any_left_in_a_dry_run(tmp_path) -> None:
    """``MIN_WORKLOAD_S``: a GPU tune (any run but the dry run) starts no new shape with less than 5 s of the
    budget left (building a case takes seconds there); the dry run starts one while any budget is left."""

    def build():
        raise ValueError("built")

    for dry_run, status in ((True, "error: ValueError: built"), (False, "not run: budget spent")):
        tuner = Tuner(
            torch.device("cpu"), tmp_path / "c.json", None, "test", budget_s=3.0, dry_run=dry_run, log=lambda _: None
        )
        (record,) = tuner.run([build], ["a shape"])["workloads"]
        assert record["status"] == status


@INTERPRETER_ONLY
def test_a_dry_run_writes_no_file_into_the_package(tmp_path, monkeypatch) -> None:
    """Nothing a CPU times is a GPU figure: without ``--config`` the dry run's config file goes to a
    temporary folder, never the package's ``configs/``."""
    package = tmp_path / "configs"
    package.mkdir()
    monkeypatch.setattr(tuning, "CONFIG_DIR", package)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the dry run's own folder goes
    result = run_tune(device="cpu", dry_run=True, ops=["o_proj"], budget_s=1e-9, log=lambda _: None)
    assert Path(result["config_file"]).parent != package and not any(package.iterdir())


def test_a_tune_checks_its_config_file_and_filters_first(tmp_path) -> None:
    """A config file it cannot write and a --shapes filter that matches nothing are refused before any
    workload runs."""
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match="a-file.*--config"):
        run_tune(device="cpu", dry_run=True, config_path=tmp_path / "a-file" / "cpu.json", log=lambda _: None)
    with pytest.raises(ValueError, match="--config"):
        run_tune(device="cpu", dry_run=True, config_path=tmp_path, log=lambda _: None)  # a folder
    with pytest.raises(ValueError, match="--shapes B=46: matches none of the"):
        run_tune(device="cpu", dry_run=True, shapes=["B=46"], config_path=tmp_path / "c.json", log=lambda _: None)


@INTERPRETER_ONLY
def test_the_exit_status_says_when_nothing_was_tuned(tmp_path, capsys, monkeypatch) -> None:
    """``dsv4 tune`` exits 1 when a workload failed at its defaults (its buckets were never tuned) and
    when the chosen workloads launch none of --kernels."""
    config = str(tmp_path / "c.json")
    argv = ["tune", "--dry-run", "--ops", "window_kv_write", "--config", config, "--budget-s", "60"]
    assert main([*argv, "--kernels", "sparse_attn"]) == 1
    assert "launch none of --kernels" in capsys.readouterr().out

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("the op failed")

    monkeypatch.setattr(tune, "_given", lambda load: dataclasses.replace(load, make=broken))
    assert main(argv) == 1
    assert "failed at the defaults" in capsys.readouterr().out
    assert not (tmp_path / "c.json").exists()  # nothing tuned, nothing written


@INTERPRETER_ONLY
def test_a_budget_spent_before_the_first_candidate_exits_1(tmp_path, capsys) -> None:
    """``--budget-s`` that runs out before any candidate ran: nothing was tuned or checked, which is a
    failure (exit 1) that says so, not a run that passed; nothing is written."""
    argv = ["tune", "--dry-run", "--ops", "o_proj", "--config", str(tmp_path / "c.json"), "--budget-s", "1e-9"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "stopped: budget spent" in out
    assert (
        out.splitlines()[-1]
        == "dsv4 tune: --budget-s 1e-09 ran out before the first candidate: nothing tuned or checked"
    )
    assert not (tmp_path / "c.json").exists()


def test_a_probe_experiment_that_loses_the_cuda_context_keeps_the_rows_measured(monkeypatch) -> None:
    """After a sticky CUDA error (an illegal address) even the wait after the failed experiment raises:
    each later experiment becomes a row with its error, and the rows measured before are returned."""

    def lost(*args: object, **kwargs: object) -> list[dict[str, object]]:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(probe.torch.cuda, "get_device_properties", lambda _: SimpleNamespace(multi_processor_count=2))
    monkeypatch.setattr(probe.torch.cuda, "synchronize", lost)
    monkeypatch.setattr(probe, "probe_zero_point", lambda: [{"name": "zero_point", "us": 1.5}])
    for experiment in ("probe_copy", "probe_stream", "probe_l2", "probe_prefetch", "probe_launch_gap"):
        monkeypatch.setattr(probe, experiment, lost)
    monkeypatch.setattr(probe, "probe_flush_method", lambda *a, **k: [{"name": "flush_method", "us": 2.5}])
    rows = probe.run_probe(log=lambda _: None)["rows"]
    assert [r["name"] for r in rows] == [
        "zero_point",
        "copy",
        "stream",
        "l2",
        "l2_prefetch",
        "launch_gap",
        "flush_method",
    ]
    assert rows[0]["us"] == 1.5 and rows[-1]["us"] == 2.5 and "error" not in rows[0]
    assert all("illegal memory access" in r["error"] and "illegal" in r["sync_error"] for r in rows[1:-1])


def test_a_probe_dry_run_whose_check_fails_exits_1(monkeypatch, capsys) -> None:
    """``dsv4 tune --probe --dry-run`` exits 1 when a kernel's check says MISMATCH, as when an experiment raised."""
    rows = [{"name": "stream", "check": "ok"}, {"name": "launch_gap", "check": "MISMATCH chain 7 != 8"}]
    monkeypatch.setattr(probe, "dry_run_probe", lambda: {"dry_run": True, "rows": rows})
    assert main(["tune", "--probe", "--dry-run"]) == 1
    assert "MISMATCH chain 7 != 8" in capsys.readouterr().out
    monkeypatch.setattr(probe, "dry_run_probe", lambda: {"dry_run": True, "rows": rows[:1]})
    assert main(["tune", "--probe", "--dry-run"]) == 0
    raised = [rows[0], {"name": "l2", "error": "RuntimeError: no such eviction hint"}]  # an error, no check
    monkeypatch.setattr(probe, "dry_run_probe", lambda: {"dry_run": True, "rows": raised})
    assert main(["tune", "--probe", "--dry-run"]) == 1
    measured = [{"name": "copy", "gb_per_s": 3900.0}, {"name": "launch_gap", "us_per_launch": 2.1}]  # no check
    monkeypatch.setattr(probe, "dry_run_probe", lambda: {"dry_run": True, "rows": measured})
    assert main(["tune", "--probe", "--dry-run"]) == 0


@INTERPRETER_ONLY
def test_a_dry_run_writes_no_json_unless_asked(tmp_path, monkeypatch, capsys) -> None:
    """Without ``--json`` the dry run writes no ``tune-cpu.json`` where it runs (a GPU tune writes
    ``tune-<device>.json`` there)."""
    monkeypatch.chdir(tmp_path)
    main(["tune", "--dry-run", "--ops", "o_proj", "--config", str(tmp_path / "c.json"), "--budget-s", "1e-9"])
    assert "wrote" not in capsys.readouterr().out and list(tmp_path.iterdir()) == []


def test_a_tune_stopped_by_a_failed_cuda_context_exits_1(tmp_path, monkeypatch, capsys) -> None:
    """A tune stopped because a candidate left the CUDA context unusable (a device assert) exits 1 after its
    table: the buckets after it were never tuned."""
    failed = "error: RuntimeError: CUDA error: an illegal memory access was encountered"
    label = "flash qkv_proj_rope decode B=64 S=2"
    result = {
        "meta": {"device": "NVIDIA H200"}, "device_key": "h200-132", "config_file": "c.json", "elapsed_s": 1.0,
        "stopped": f"the CUDA context failed: {failed}", "workloads": [{"label": label, "status": "done"}],
        "buckets": [{"kernel": "qkv.rows", "bucket": "T=128,QL=1024,HD=512", "workload": label, "winner": None,
                     "variants": [{"params": {}, "changed": {"num_warps": 8}, "check": failed}]}],
    }  # fmt: skip
    monkeypatch.setattr(tune, "run_tune", lambda **kwargs: result)
    assert main(["tune", "--dry-run", "--config", str(tmp_path / "c.json")]) == 1
    assert "stopped: the CUDA context failed" in capsys.readouterr().out


def test_a_candidate_is_held_to_the_reference_not_to_the_default() -> None:
    """A candidate that drifts from the default by less than the tolerance but, with the default's own
    drift, leaves the reference by more fails its check: the tolerance is the spec's, against the
    reference, and two steps inside it do not add up to one step inside it."""
    load = _op_workload("tiny", BenchShape("qkv_proj_rope", "decode", 2, 2), torch.device("cpu"), 0)
    assert load.reference is not None
    expected = load.reference()
    scale = expected["qr_scale"]
    assert bool((scale > 0.01).all())  # where the rule is relative: rtol 0.005 over atol 2.5e-5
    base = {**expected, "qr_scale": scale * 1.004}  # 0.4% off the reference: within 0.5%
    got = {**expected, "qr_scale": scale * 1.004 * 1.004}  # 0.4% off the default, 0.8% off the reference
    assert tune._verdict(load, base, base, False, expected) == "bit-identical"
    assert passed(tune._verdict(load, expected, base, False, expected))
    assert not passed(tune._verdict(load, base, got, False, expected))
    assert passed(tune._verdict(load, base, got, False, None))  # what a check against the default says

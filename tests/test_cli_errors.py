"""Every user error of the ``dsv4`` command is one line on stderr and exit code 2: no traceback,
no silent exit 0, and nothing written (spec §7)."""

from __future__ import annotations

import functools
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

import dsv4
from bad_checkpoints import config_corruptions, digest, structure_corruptions, write_valid
from dsv4.cli import main
from subprocesses import run_dsv4, run_python

NO_CUDA = not torch.cuda.is_available()


def _run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int | str | None, str, str]:
    code: int | str | None
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_line_error(code: int | str | None, err: str, words: tuple[str, ...]) -> None:
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("dsv4") and "error:" in lines[0], err
    assert all(w in lines[0] for w in words), (words, err)


@pytest.fixture(scope="module")
def valid_dir(tmp_path_factory) -> Path:
    return write_valid(tmp_path_factory.mktemp("valid") / "ckpt")


# (argv, words of the error); {ckpt} is a valid checkpoint directory
ARGS = [
    (["run", "--start-pos", "-5"], ("--start-pos", "-5")),
    (["run", "--start-pos", "1.5"], ("--start-pos",)),
    (["run", "--start-pos", "5000"], ("max_position_embeddings",)),
    (["run", "--steps", "0"], ("--steps",)),
    (["run", "--steps", "-2"], ("--steps",)),
    (["run", "--batch", "0"], ("--batch",)),
    (["run", "--seq", "0"], ("--seq",)),
    (["run", "--seq", "4093", "--start-pos", "0", "--steps", "1", "--backend", "reference"], ("--seq", "at most 4092")),
    (["run", "--seed", "-1"], ("--seed",)),
    (["run", "--layer", "-1", "--checkpoint", "{ckpt}"], ("--layer",)),
    (["run", "--device", "bogus"], ("--device", "bogus")),
    (["run", "--device", ""], ("--device",)),
    (["run", "--device", "mps"], ("--device", "mps")),
    (["run", "--preset", "huge"], ("--preset",)),
    (["run", "--preset", "flash/tp3"], ("--preset", "H=64", "3 ranks")),
    (["run", "--preset", "tiny/tp2"], ("--preset", "128-row scale blocks")),
    (["run", "--preset", "flash/tp"], ("--preset", "/tpN")),
    (["bench", "--preset", "flash/tp0"], ("--preset", "world")),
    (["tune", "--preset", "flash,pro/tp32"], ("--preset", "G=16")),
    (["tune", "--preset", " , "], ("--preset", "a comma-separated list of presets")),
    (["tune", "--kernels", ","], ("--kernels", "a comma-separated list")),
    (["bench", "--shapes", ","], ("--shapes", "a comma-separated list")),
    (["run", "--checkpoint", "/nonexistent/ckpt", "--layer", "1", "--device", "cpu"], ("/nonexistent/ckpt",)),
    (["run", "--checkpoint", "{ckpt}", "--device", "cpu"], ("--layer",)),
    (["run", "--checkpoint", "{ckpt}", "--layer", "1", "--world", "2", "--device", "cpu"], ("world", "scale blocks")),
    (["run", "--checkpoint", "{ckpt}", "--layer", "1", "--rank", "1", "--device", "cpu"], ("rank", "[0, 1)")),
    (["run", "--world", "2"], ("--rank/--world", "--checkpoint", "tp2")),
    (["run", "--checkpoint", "{ckpt}", "--layer", "1", "--preset", "flash/tp8"], ("--preset", "--rank R --world W")),
    (["run", "--rank", "1"], ("--rank/--world", "--checkpoint", "NAME/tpW (W ranks)")),
    (["run", "--layer", "3"], ("--layer", "--checkpoint", "synthetic")),
    (["run", "--world", "0"], ("--world",)),
    (["run", "--rank", "-1"], ("--rank",)),
    (["run", "--checkpoint", "{ckpt}", "--layer", "7", "--device", "cpu"], ("layers.7.",)),
    (["inspect", "{ckpt}", "--prefix", "layers."], ("prefix", "{layer}")),
    (["inspect", "{ckpt}", "--prefix", "layers.{n}."], ("prefix", "{n}")),
    (["inspect", "{ckpt}", "--prefix", "layers.{layer}.{layer}."], ("prefix",)),
    (["inspect", "{ckpt}", "--prefix", "layers.{"], ("prefix",)),
    (["inspect", "{ckpt}", "--layer", "-1"], ("--layer",)),
    (["inspect", "/nonexistent/ckpt"], ("/nonexistent/ckpt",)),
    (["inspect", "{ckpt}", "--preset", "flash/tp8"], ("--preset", "whole layers", "--rank R --world W")),
    (["bench", "--budget-s", "nan"], ("--budget-s", "nan")),
    (["bench", "--budget-s", "inf"], ("--budget-s",)),
    (["bench", "--budget-s", "-1"], ("--budget-s",)),
    (["bench", "--budget-s", "0"], ("--budget-s",)),
    (["bench", "--budget-s", "two"], ("--budget-s",)),
    (["bench", "--reps", "0"], ("--reps",)),
    (["bench", "--seed", "-3"], ("--seed",)),
    (["bench", "--ops", "attention"], ("--ops",)),
    (["golden", "save", "{tmp}", "--op", "indexer", "--device", "bogus"], ("--device",)),
    (["golden", "save", "{tmp}", "--op", "indexer", "--seed", "-1"], ("--seed",)),
    (["golden", "save", "{tmp}", "--op", "o_proj", "--kind", "hca"], ("kind", "o_proj", "hca")),
    (["golden", "save", "{tmp}", "--op", "kv_compressor", "--kind", "swa"], ("kind", "kv_compressor", "swa")),
    (["golden", "save", "{tmp}", "--op", "sparse_attn", "--kind", "mla"], ("--kind", "mla")),
    (["golden", "check", "{tmp}", "--device", "bogus"], ("--device",)),
    (["run", "--device", "meta"], ("--device", "'meta'")),
    (["golden", "check", "{tmp}", "--device", "cpu"], ("no golden cases",)),
    ([], ("command",)),
    (["run", "--batch", "1000000000"], ("batch=1000000000", "GiB")),  # before any allocation
    (["run", "--batch", "100000", "--start-pos", "4000"], ("batch=100000", "GiB")),
    (["run", "--seed", str(2**70)], ("--seed",)),
    (["run", "--seed", str(2**64 - 1)], ("--seed",)),
    (["golden", "save", "{tmp}", "--op", "indexer", "--seed", str(2**70)], ("--seed",)),
    (["bench", "--seed", str(2**70)], ("--seed",)),
]
if NO_CUDA:  # on a CPU-only torch (or no GPU), asking for CUDA is a user error
    ARGS += [
        (["run", "--device", "cuda"], ("--device", "CUDA is not available")),
        (["run", "--device", "cuda:1"], ("--device", "CUDA is not available")),
        (["golden", "check", "{tmp}", "--device", "cuda"], ("--device", "CUDA")),
    ]


@pytest.mark.parametrize(("argv", "words"), ARGS, ids=[" ".join(a) or "(none)" for a, _ in ARGS])
def test_user_error_is_one_line_and_exit_2(argv, words, valid_dir, tmp_path, capsys, monkeypatch) -> None:
    argv = [a.replace("{ckpt}", str(valid_dir)).replace("{tmp}", str(tmp_path)) for a in argv]
    if argv[:1] == ["bench"]:  # refused before measuring: a bench that started would run for many minutes

        def started(*args, **kwargs):
            raise AssertionError("the bench started")

        monkeypatch.setattr("dsv4.bench.runner.run_bench", started)
    before = digest(valid_dir)
    code, out, err = _run(argv, capsys)
    _assert_one_line_error(code, err, words)
    assert "all checks passed" not in out
    assert digest(valid_dir) == before


@pytest.mark.parametrize(
    "argv", [["inspect", "{file}"], ["run", "--checkpoint", "{file}", "--layer", "1", "--device", "cpu"]]
)
def test_a_checkpoint_that_is_a_file_is_named_so(argv, tmp_path, capsys) -> None:
    """A file given as the checkpoint folder: "is not a directory", not "does not exist"."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")
    code, _, err = _run([a.replace("{file}", str(path)) for a in argv], capsys)
    _assert_one_line_error(code, err, (str(path), "is not a directory"))
    assert "does not exist" not in err


def test_golden_save_does_not_overwrite(tmp_path, capsys) -> None:
    argv = ["golden", "save", str(tmp_path), "--op", "qkv_proj_rope"]
    assert _run(argv, capsys)[0] == 0
    before = digest(tmp_path)
    code, _, err = _run(argv, capsys)
    _assert_one_line_error(code, err, ("already", "not overwritten"))
    assert digest(tmp_path) == before
    (manifest,) = tmp_path.glob("*.json")
    manifest.unlink()  # a tensor file of the case is still there: still refused, still nothing written
    before = digest(tmp_path)
    code, _, err = _run(argv, capsys)
    _assert_one_line_error(code, err, ("inputs.safetensors",))
    assert digest(tmp_path) == before


@pytest.mark.parametrize("which", ["json", "inputs.safetensors", "expected.safetensors"])
def test_golden_save_does_not_write_through_a_link(which, tmp_path, capsys) -> None:
    """A link to nothing named like a file of the case is there too: refused, nothing written
    (neither where it leads, outside the folder, nor the case's other files)."""
    folder, outside = tmp_path / "cases", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    link = folder / f"o_proj-tiny-decode-seed0.{which}"
    link.symlink_to(outside / "victim")
    code, out, err = _run(["golden", "save", str(folder), "--op", "o_proj"], capsys)
    _assert_one_line_error(code, err, ("already", str(link), "not overwritten"))
    assert "saved" not in out
    assert list(outside.iterdir()) == [] and list(folder.iterdir()) == [link]


@pytest.mark.parametrize("what", ["a file", "a link to nothing"])
@pytest.mark.parametrize("command", ["save", "check"])
def test_golden_folder_that_is_not_a_directory(command, what, tmp_path, capsys) -> None:
    """``golden save`` or ``check`` given a file (or a link to nothing) for its directory: one line
    naming it, not ``[Errno 17] File exists`` or ``no golden cases``; nothing written."""
    path = tmp_path / "afile"
    if what == "a file":
        path.write_text("mine\n")
    else:
        path.symlink_to(tmp_path / "nowhere")
    argv = ["golden", command, str(path)] + (["--op", "o_proj"] if command == "save" else ["--device", "cpu"])
    code, out, err = _run(argv, capsys)
    _assert_one_line_error(code, err, (f"{path}: is {what}, not a directory",))
    assert "saved" not in out and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    assert what != "a file" or path.read_text() == "mine\n"


ONE_LINE_CORRUPTIONS = [
    *structure_corruptions()[:3],
    *(c for c in structure_corruptions() + config_corruptions() if c.id.endswith("deeply-nested")),
    *(c for c in config_corruptions() if c.id in ("qk_rope_head_dim-odd", "rope_scaling-beta_fast-negative")),
]


@pytest.mark.parametrize("corruption", ONE_LINE_CORRUPTIONS, ids=lambda c: c.id)
def test_checkpoint_errors_are_one_line(corruption, valid_dir, tmp_path, capsys) -> None:
    directory = tmp_path / "ckpt"
    shutil.copytree(valid_dir, directory)
    corruption.apply(directory)
    for argv in (
        ["inspect", str(directory)],
        ["run", "--checkpoint", str(directory), "--layer", "1", "--device", "cpu"],
    ):
        code, out, err = _run(argv, capsys)
        _assert_one_line_error(code, err, (str(directory / corruption.file),))
        assert "check: ok" not in out and "all checks passed" not in out


@pytest.mark.parametrize(
    "argv",
    [["bench", "--budget-s", "nan"], ["run", "--device", "bogus"], ["run", "--start-pos", "-5"]],
    ids=lambda a: " ".join(a),
)
def test_the_command_itself(argv) -> None:
    """The console command (a fresh interpreter): the same one line, exit 2, no traceback."""
    proc = run_dsv4(*argv)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stdout == "", proc.stderr


def _partial(cause: Exception) -> dsv4.PartialCallError:
    """A chunked call's error for a later step that raised ``cause`` (its ``__cause__``, as ``raise ... from``)."""
    error = dsv4.PartialCallError(16, [16], cause)
    error.__cause__ = cause
    return error


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried ..."),
        _partial(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")),
    ],
    ids=["cuda", "cpu", "cuda-in-a-later-chunk"],
)
def test_an_allocation_that_fails_anyway_is_one_line(error, monkeypatch, capsys) -> None:
    """Memory the size check did not foresee (another process holds the GPU): one line, not a traceback;
    also where it failed in a later step of a chunked prefill (``PartialCallError``, the error its cause)."""

    def run_out_of_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr("dsv4.harness.run.run_front_end", run_out_of_memory)
    code, _, err = _run(["run", "--device", "cpu"], capsys)
    _assert_one_line_error(code, err, ("out of memory", "--batch"))


def test_an_allocation_that_fails_in_inspect_names_no_option_it_lacks(tmp_path, monkeypatch, capsys) -> None:
    """``dsv4 inspect`` has no ``--batch``, ``--seq`` or ``--start-pos``: its out-of-memory line names none."""

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 4398046511104 bytes")

    monkeypatch.setattr("dsv4.io.checkpoint_report.describe_checkpoint", out_of_memory)
    code, _, err = _run(["inspect", str(tmp_path)], capsys)
    _assert_one_line_error(code, err, ("dsv4 inspect: error: out of memory",))
    assert "--batch" not in err


def test_other_runtime_errors_still_show_their_traceback(monkeypatch) -> None:
    """Only allocation failures are user errors; any other RuntimeError is a bug and is not hidden."""

    def broken(*args, **kwargs):
        raise RuntimeError("an internal error")

    monkeypatch.setattr("dsv4.harness.run.run_front_end", broken)
    with pytest.raises(RuntimeError, match="an internal error"):
        main(["run", "--device", "cpu"])


# --- run_front_end (what dsv4 run calls): arguments checked before anything is allocated -------------

RUN_ARGS = [
    ("cfg", "tiny", TypeError), ("steps", 0, ValueError), ("steps", 2.0, TypeError), ("steps", True, TypeError),
    ("start_pos", -1, ValueError), ("start_pos", "64", TypeError), ("batch", 0, ValueError),
    ("batch", 10**9, ValueError), ("batch", 4.5, TypeError), ("seq", 0, ValueError), ("seq", None, TypeError),
    ("seed", -1, ValueError), ("seed", 2**70, ValueError), ("seed", 1.5, TypeError), ("device", "bogus", ValueError),
    ("device", 3.5, ValueError), ("device", "meta", ValueError), ("device", torch.int8, ValueError),
    ("device", f"cuda:{torch.cuda.device_count()}", ValueError), ("backend", "bogus", ValueError),
    ("log", "print", TypeError), ("weights", "weights", TypeError), ("start_pos", 5000, ValueError),
]  # fmt: skip


@pytest.mark.parametrize(("name", "value", "exc"), RUN_ARGS, ids=[f"{n}={v!r:.20}" for n, v, _ in RUN_ARGS])
def test_run_front_end_checks_its_arguments(name, value, exc) -> None:
    from dsv4.harness.run import run_front_end
    from dsv4.model.config import get_config

    kwargs = {"cfg": get_config("tiny"), "backend": "reference", "device": "cpu", name: value}
    with pytest.raises(exc) as info:
        run_front_end(**kwargs)
    assert name in str(info.value) or (name == "start_pos" and "max_position_embeddings" in str(info.value))


MAKE_CASE_ARGS = [
    ("batch", 0, ValueError), ("batch", -1, ValueError), ("batch", 2.5, TypeError), ("batch", True, TypeError),
    ("seq", 0, ValueError), ("seq", -2, ValueError), ("max_position", 0, ValueError), ("max_position", -8, ValueError),
    ("seed", -1, ValueError), ("seed", 2**70, ValueError), ("seed", 1.0, TypeError), ("start_pos", 2.5, TypeError),
    ("start_pos", [0, 1.5, 2, 3], TypeError), ("start_pos", -3, ValueError),
]  # fmt: skip


@pytest.mark.parametrize(("name", "value", "exc"), MAKE_CASE_ARGS, ids=[f"{n}={v!r:.20}" for n, v, _ in MAKE_CASE_ARGS])
def test_make_case_checks_its_sizes(name, value, exc, monkeypatch) -> None:
    """``make_case``'s sizes: 0 is refused, not taken as "the default" (None is), a negative size is a
    ValueError naming it, not torch's error from an empty shape; before anything is drawn."""
    from dsv4.harness import cases
    from dsv4.model.config import get_config

    def no_weights(*args, **kwargs):
        raise AssertionError("drawn before the arguments were checked")

    monkeypatch.setattr(cases, "synthetic_weights", no_weights)
    with pytest.raises(exc, match=f"^{name}: "):
        cases.make_case(get_config("tiny"), "o_proj", **{name: value})


def test_make_case_takes_none_as_the_default() -> None:
    from dsv4.harness.cases import DEFAULT_MAX_POSITION, make_case
    from dsv4.model.config import get_config, mode_shape

    tiny = get_config("tiny")
    meta = make_case(tiny, "o_proj", batch=None, seq=None, max_position=None).meta
    shape = mode_shape(tiny, "decode")
    assert (meta["batch"], meta["seq"]) == (shape.batch, shape.seq)
    assert meta["max_position"] == min(DEFAULT_MAX_POSITION, tiny.max_position_embeddings)
    assert make_case(tiny, "o_proj", batch=1, seq=1, max_position=8).meta["max_position"] == 8


def test_make_case_refuses_a_mode_it_has_no_shape_for() -> None:
    """``mode`` names one of the deployment shapes (decode, prefill): another name is refused listing them,
    not taken as either."""
    from dsv4.harness.cases import make_case
    from dsv4.model.config import get_config

    with pytest.raises(ValueError, match=r"^unknown mode 'warmup'; expected one of \['decode', 'prefill'\]$"):
        make_case(get_config("tiny"), "o_proj", mode="warmup")


def test_an_explicit_max_position_is_capped_at_the_configs() -> None:
    """A case never spans positions the model has no RoPE rows for: ``max_position`` past
    ``max_position_embeddings`` is taken as that."""
    from dsv4.harness.cases import make_case
    from dsv4.model.config import get_config

    tiny = get_config("tiny")
    case = make_case(tiny, "o_proj", batch=1, seq=1, max_position=tiny.max_position_embeddings + 64)
    assert case.meta["max_position"] == tiny.max_position_embeddings


def test_run_front_end_checks_the_room_of_its_cases_first(monkeypatch) -> None:
    """The other ops' cases (``make_case``) need 4 positions beyond a step, in whole compressed blocks of
    ``max_position_embeddings``: a ``seq`` or an end past that room is refused before anything runs,
    naming ``seq`` (not make_case's ``max_position``, after the front end ran)."""
    from dsv4.harness import run
    from dsv4.model.config import get_config

    def no_weights(*args, **kwargs):
        raise AssertionError("the run started")

    monkeypatch.setattr(run, "synthetic_weights", no_weights)
    front_end = functools.partial(run.run_front_end, backend="reference", device="cpu", steps=1, batch=1)
    with pytest.raises(ValueError, match=r"^seq: at most 4092 new tokens per step .* got 4093$"):
        front_end(get_config("tiny"), start_pos=0, seq=4093)  # max_position_embeddings 4096
    unaligned = get_config("tiny").replace(max_position_embeddings=4098)
    with pytest.raises(ValueError, match=r"^start_pos \+ steps\*seq = 4098 exceeds 4096 "):
        front_end(unaligned, start_pos=4096, seq=2)
    with pytest.raises(AssertionError, match="the run started"):  # the end at the room's last position
        front_end(unaligned, start_pos=4094, seq=2)
    with pytest.raises(ValueError, match=r"^seq: at most 4092 new tokens per step .* got 4093$"):  # whole blocks
        front_end(unaligned, start_pos=0, seq=4093)
    with pytest.raises(AssertionError, match="the run started"):  # seq at max_seq
        front_end(get_config("tiny"), start_pos=0, seq=4092)


def test_make_case_takes_the_last_start_and_the_least_room() -> None:
    """A case needs ``S + 4`` positions (a compressed block beyond its step); a row may start at
    ``max_position - S``, the last start whose step fits."""
    from dsv4.harness.cases import make_case
    from dsv4.model.config import get_config

    tiny = get_config("tiny")
    assert make_case(tiny, "o_proj", batch=1, seq=4, max_position=8).meta["max_position"] == 8
    with pytest.raises(ValueError, match="^max_position 8 too small for S=5$"):
        make_case(tiny, "o_proj", batch=1, seq=5, max_position=8)
    assert make_case(tiny, "o_proj", batch=2, seq=2, max_position=16, start_pos=14).meta["start_pos"] == [14, 14]
    with pytest.raises(ValueError, match=r"^start_pos: expected 2 values in \[0, 14\]"):
        make_case(tiny, "o_proj", batch=2, seq=2, max_position=16, start_pos=[3, 15])


def test_dsv4_run_hands_its_options_on_as_given(monkeypatch, capsys) -> None:
    """The largest ``--seed`` and ``--seq`` the preset allows reach the run unchanged."""
    from dsv4.model.weights import MAX_SEED

    calls = []

    def run_front_end(cfg, **kwargs):
        calls.append((cfg, kwargs))
        return []

    monkeypatch.setattr("dsv4.harness.run.run_front_end", run_front_end)
    argv = ["run", "--seed", str(MAX_SEED), "--seq", "4092", "--start-pos", "0", "--steps", "3", "--batch", "5"]
    assert main([*argv, "--backend", "reference", "--device", "cpu"]) == 0
    ((cfg, kwargs),) = calls
    assert cfg.name == "tiny" and kwargs["backend"] == "reference" and str(kwargs["device"]) == "cpu"
    assert (kwargs["seed"], kwargs["seq"], kwargs["start_pos"], kwargs["steps"], kwargs["batch"]) == (
        MAX_SEED,
        4092,
        0,
        3,
        5,
    )


@pytest.mark.parametrize("flag", ["--json", "--plot", "--trace"])
@pytest.mark.parametrize("where", ["a-directory", "in-a-missing-directory"])
def test_bench_output_paths_are_checked_before_measuring(flag, where, tmp_path, capsys) -> None:
    """``dsv4 bench --json DIR`` used to measure, then fail to write and leave ``DIR.partial`` behind."""
    target = tmp_path / "out"
    target.mkdir()
    path = target if where == "a-directory" else target / "missing" / "bench.out"
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, out, err = _run(["bench", "--cpu", "--model-only", "--preset", "tiny", flag, str(path)], capsys)
    _assert_one_line_error(code, err, (flag, str(path)))
    assert out == ""  # refused before anything was measured
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no stray .partial


@pytest.mark.parametrize(
    "argv", [["tune", "--dry-run", "--kernels", "o_proj.quant", "--ops", "o_proj"], ["tune", "--probe", "--dry-run"]],
    ids=["tune", "probe"],
)  # fmt: skip
@pytest.mark.parametrize("where", ["a-directory", "in-a-missing-directory"])
def test_tune_json_path_is_checked_before_tuning(argv, where, tmp_path, capsys) -> None:
    """``dsv4 tune --json`` into a missing folder used to tune a bucket first, then fail naming
    ``<path>.partial``, the bucket's config entry lost; now it is refused before anything runs."""
    target = tmp_path / "out"
    target.mkdir()
    path = target if where == "a-directory" else target / "missing" / "tune.json"
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, out, err = _run([*argv, "--config", str(tmp_path / "cpu.json"), "--json", str(path)], capsys)
    _assert_one_line_error(code, err, ("--json", str(path)))
    assert out == ""  # refused before anything ran
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no config file, no stray .partial


def test_bench_plot_without_matplotlib_is_refused_before_measuring(tmp_path, monkeypatch, capsys) -> None:
    """Installed without the bench extra (no matplotlib), ``--plot`` used to end in a traceback after the
    whole measurement; now one line naming the extra, before anything is measured or written."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises, as when it is not installed
    argv = ["bench", "--preset", "tiny", "--cpu", "--ops", "o_proj", "--reps", "2", "--budget-s", "0.1"]
    code, out, err = _run([*argv, "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png")], capsys)
    _assert_one_line_error(code, err, ("--plot", "matplotlib", 'pip install "dsv4-kernels[bench]"', '-e ".[bench]"'))
    assert out == "" and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["chart", "chart.svgx", "chart.png.txt"])
def test_bench_plot_of_a_format_matplotlib_cannot_write_is_refused_before_measuring(name, tmp_path, capsys) -> None:
    """``--plot chart`` used to be written as ``chart.png`` while saying ``wrote chart``, and an unknown
    suffix failed after the whole measurement, naming neither ``--plot`` nor the file, with ``--json``
    written and ``--trace`` not; now one line naming both, before anything is measured or written."""
    pytest.importorskip("matplotlib")
    argv = ["bench", "--preset", "tiny", "--cpu", "--ops", "o_proj", "--reps", "2", "--budget-s", "0.1"]
    code, out, err = _run([*argv, "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / name)], capsys)
    _assert_one_line_error(code, err, ("--plot", str(tmp_path / name), "image format", ".png", ".svg"))
    assert out == "" and list(tmp_path.iterdir()) == []


def test_write_json_leaves_no_partial_file(tmp_path) -> None:
    from dsv4.bench.report import write_json

    (tmp_path / "taken").mkdir()
    with pytest.raises(OSError):
        write_json({"a": 1}, tmp_path / "taken")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def _mains_without_triton(forms: list[list[str]], stream: str, installed: bool) -> list[tuple[int, str]]:
    """``main(argv)`` for each of ``forms`` in a fresh interpreter where ``import triton`` fails (this one
    has imported it) and, unless ``installed``, no Triton distribution gives a version -> each exit code
    and what it printed on ``stream`` (``"stdout"`` or ``"stderr"``)."""
    hide_version = (
        ""
        if installed
        else (
            "from importlib import metadata\n"
            "real = metadata.version\n"
            "def version(dist):\n"
            "    if dist == 'triton':\n"
            "        raise metadata.PackageNotFoundError(dist)\n"
            "    return real(dist)\n"
            "metadata.version = version\n"
        )
    )
    code = (
        "import contextlib, io, json, sys\n"
        "sys.modules['triton'] = None\n"
        f"{hide_version}"
        "from dsv4.cli import main\n"
        "results = []\n"
        f"for argv in {forms!r}:\n"
        "    text = io.StringIO()\n"
        f"    with contextlib.redirect_{stream}(text):\n"
        "        results.append([main(argv), text.getvalue()])\n"
        "print(json.dumps(results))\n"
    )
    done = run_python(["-c", code])
    assert done.returncode == 0, done.stderr
    return [(rc, text) for rc, text in json.loads(done.stdout.splitlines()[-1])]


def test_tune_without_triton_is_one_line_naming_the_extra() -> None:
    """Installed without the triton extra, every ``dsv4 tune`` form (``--list``, ``--dry-run``, ``--probe``)
    used to end in a ModuleNotFoundError traceback; now one line naming Triton and how to install it, exit 2.
    A fresh interpreter where ``import triton`` fails, as when it is not installed (this one has imported it)."""
    forms = [
        ["tune", "--list"],
        ["tune", "--dry-run", "--ops", "o_proj"],
        ["tune", "--probe"],
        ["tune", "--probe", "--list"],
    ]
    for argv, (rc, err) in zip(forms, _mains_without_triton(forms, "stderr", installed=True), strict=True):
        _assert_one_line_error(rc, err, ("dsv4 tune", "triton", 'pip install "dsv4-kernels[triton]"'))
        assert "Traceback" not in err, (argv, err)


def test_without_triton_installed_run_takes_the_reference_and_info_says_why() -> None:
    """Installed without the triton extra (no distribution to read a version from, ``import triton``
    failing): ``dsv4 info`` names the Triton backend unavailable and why, and ``dsv4 run`` runs on the
    reference, its header saying so and its last line that nothing was compared, exit 0."""
    run_argv = ["run", "--steps", "1", "--batch", "1", "--seq", "1", "--device", "cpu"]
    (info_rc, info), (run_rc, run) = _mains_without_triton([["info"], run_argv], "stdout", installed=False)
    assert info_rc == 0 and "backend reference available" in info
    assert re.search(r"backend triton\s+unavailable: cannot import dsv4\.kernels: .*triton", info), info
    lines = run.splitlines()
    assert run_rc == 0 and "backend=reference" in lines[0], run
    assert "all checks passed" not in lines[-1] and "nothing compared" in lines[-1], run


def test_tune_with_a_triton_too_old_is_one_line(monkeypatch, capsys) -> None:
    """An installed Triton older than the kernels run on: ``dsv4 tune`` refuses up front, naming the version."""
    from dsv4.ops import backends

    monkeypatch.setattr(backends.metadata, "version", lambda dist: "3.5.1")
    for argv in (["tune", "--list"], ["tune", "--probe", "--list"]):
        code, out, err = _run(argv, capsys)
        _assert_one_line_error(code, err, ("dsv4 tune", "Triton 3.5.1 is older than 3.6", "dsv4-kernels[triton]"))
        assert out == ""


@pytest.mark.parametrize(
    ("version", "too_old"), [("3.5.9", True), ("3.6.0", False), ("3.6.0+git1a2b3c", False), ("3.10.1", False)]
)
def test_triton_3_6_is_the_oldest_release_taken(monkeypatch, version: str, too_old: bool) -> None:
    """The kernels run on Triton 3.6 and later (the GPU machines' release among them); a 3.5 is refused
    by its release, not by its patch number."""
    from dsv4.ops import backends

    monkeypatch.setattr(backends.metadata, "version", lambda dist: version)
    reason = backends.unavailable_reason("triton", "cpu")
    assert (reason is not None and f"Triton {version} is older than 3.6" in reason) is too_old, reason

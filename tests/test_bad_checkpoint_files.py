"""Checkpoint and golden files that try to escape their directory or lie about their contents
(spec §7): each is refused with a ``CheckpointError``/``ValueError`` naming the file and the entry
or field, on the ``safetensors`` path and the raw-bytes path alike, and no file changes."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bad_checkpoints import (
    INDEX,
    LAYER,
    SHARDS,
    TINY,
    Corruption,
    config_corruptions,
    deep_in_object,
    digest,
    entry_corruptions,
    index_corruptions,
    structure_corruptions,
    tiling_corruptions,
    write_valid,
)
from dsv4 import CheckpointError, load_layer
from dsv4.cli import main
from dsv4.io.checkpoint import Checkpoint
from dsv4.io.safetensors_files import ShardedCheckpoint, read_header

FILE_CORRUPTIONS = [*structure_corruptions(), *entry_corruptions(), *tiling_corruptions()]


@pytest.fixture(scope="module")
def valid_dir(tmp_path_factory) -> Path:
    return write_valid(tmp_path_factory.mktemp("valid") / "ckpt")


def _broken_copy(valid_dir: Path, tmp_path: Path, corruption: Corruption) -> Path:
    directory = tmp_path / "ckpt"
    shutil.copytree(valid_dir, directory)
    corruption.apply(directory)
    return directory


def _assert_refused(directory: Path, corruption: Corruption, raw_bytes: bool | None = None) -> None:
    before = digest(directory)
    with pytest.raises(CheckpointError) as info, Checkpoint(directory, raw_bytes=raw_bytes) as ckpt:
        ckpt.load_layer(LAYER)
    message = str(info.value)
    missing = [w for w in corruption.message_words(directory) if w not in message]
    assert not missing, f"{message!r} lacks {missing}"
    assert digest(directory) == before, "a refused load changed a file"


def test_the_valid_checkpoint_loads(valid_dir) -> None:
    """The corruptions below each change one thing of this checkpoint, which loads on both read paths."""
    for raw_bytes in (None, True):
        with Checkpoint(valid_dir, raw_bytes=raw_bytes) as ckpt:
            assert ckpt.load_layer(LAYER).attn.wq_a.shape == (TINY.q_lora_rank, TINY.hidden_size)
    assert main(["inspect", str(valid_dir)]) == 0


@pytest.mark.parametrize("raw_bytes", [None, True], ids=["safetensors", "raw-bytes"])
@pytest.mark.parametrize("corruption", FILE_CORRUPTIONS, ids=[c.id for c in FILE_CORRUPTIONS])
def test_corrupt_safetensors_file_is_refused(corruption, raw_bytes, valid_dir, tmp_path) -> None:
    _assert_refused(_broken_copy(valid_dir, tmp_path, corruption), corruption, raw_bytes)


@pytest.mark.parametrize("corruption", FILE_CORRUPTIONS[:6] + tiling_corruptions(), ids=lambda c: c.id)
def test_inspect_refuses_the_same_files(corruption, valid_dir, tmp_path, capsys) -> None:
    directory = _broken_copy(valid_dir, tmp_path, corruption)
    assert main(["inspect", str(directory)]) == 2
    captured = capsys.readouterr()
    assert "check: ok" not in captured.out and str(directory / corruption.file) in captured.err


def test_shared_offsets_would_have_loaded_wrong_weights(valid_dir, tmp_path) -> None:
    """The reproducer of the issue: kv_norm pointing at q_norm's bytes (both [128] bf16) was loaded
    as gamma_ckv == gamma_cq. The premise: the two norms differ in the valid file."""
    with Checkpoint(valid_dir) as ckpt:
        layer = ckpt.load_layer(LAYER)
    assert not torch.equal(layer.attn.gamma_cq, layer.attn.gamma_ckv)
    corruption = tiling_corruptions()[0]
    _assert_refused(_broken_copy(valid_dir, tmp_path, corruption), corruption)


def test_safetensors_refusal_is_not_papered_over(tmp_path, monkeypatch) -> None:
    """The raw-bytes path is taken only for a file holding a dtype older safetensors releases do not
    know (F8_E8M0); any other refusal of ``safe_open`` is an error naming the file."""
    save_file({"a": torch.ones(4, dtype=torch.bfloat16)}, str(tmp_path / "model.safetensors"))

    def refuse(*args, **kwargs):
        raise RuntimeError("refused for a reason of its own")

    monkeypatch.setattr("dsv4.io.safetensors_files.safe_open", refuse)
    with ShardedCheckpoint(tmp_path) as ckpt:
        info = ckpt.info("a")
        assert info is not None
        with pytest.raises(CheckpointError, match=r"model\.safetensors: safetensors cannot open it .*of its own"):
            ckpt.rows(info)
        assert not ckpt.raw_reasons


def test_raw_bytes_of_a_dtype_they_do_not_decode_are_refused_naming_the_tensor(tmp_path) -> None:
    """``raw_bytes=True`` decodes the checkpoint dtypes (FP8, UE8M0, BF16, F32) itself: a tensor of another dtype
    is a ``CheckpointError`` naming it and its dtype, not bytes misread; ``safetensors`` reads it."""
    save_file({"a": torch.ones(4, dtype=torch.float16)}, str(tmp_path / "model.safetensors"))
    with ShardedCheckpoint(tmp_path, raw_bytes=True) as ckpt:
        info = ckpt.info("a")
        assert info is not None
        with pytest.raises(CheckpointError, match="^a: cannot decode dtype F16 from raw bytes$"):
            ckpt.rows(info)
    with ShardedCheckpoint(tmp_path) as ckpt:
        assert torch.equal(ckpt.rows(info), torch.ones(4, dtype=torch.float16))


@pytest.mark.parametrize("kind", ["directory", "missing"])
def test_a_safetensors_path_that_cannot_be_read_is_named(kind: str, tmp_path) -> None:
    """``read_header`` of a path that is a directory, or of nothing, is a ``CheckpointError`` naming the path,
    not an ``OSError``."""
    path = tmp_path / "model.safetensors"
    if kind == "directory":
        path.mkdir()
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: not a readable file"):
        read_header(path)


def test_raw_bytes_fallback_states_its_reason(valid_dir, monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise RuntimeError("unknown dtype F8_E8M0")

    monkeypatch.setattr("dsv4.io.safetensors_files.safe_open", refuse)
    with Checkpoint(valid_dir) as ckpt:
        ckpt.load_layer(LAYER)
        reasons = {p.name: r for p, r in ckpt.raw_reasons.items()}
    assert set(reasons) == set(SHARDS) and all("F8_E8M0" in r for r in reasons.values())


# --- shard names in the index: no escape ------------------------------------------------------------


@pytest.fixture()
def escape_dirs(valid_dir, tmp_path) -> tuple[Path, Path]:
    """``(checkpoint, outside)``: ``outside`` is a sibling holding a valid copy of shard 1, so a loader that
    followed an escaping name would load."""
    directory, outside = tmp_path / "ckpt", tmp_path / "outside"
    shutil.copytree(valid_dir, directory)
    outside.mkdir()
    shutil.copy(valid_dir / SHARDS[0], outside / SHARDS[0])
    return directory, outside


INDEX_IDS = [c.id for c in index_corruptions(Path("outside"))]


@pytest.mark.parametrize("which", range(len(INDEX_IDS)), ids=INDEX_IDS)
def test_index_shard_names_cannot_escape(which, escape_dirs, capsys) -> None:
    directory, outside = escape_dirs
    corruption = index_corruptions(outside)[which]
    corruption.apply(directory)
    _assert_refused(directory, corruption)
    for argv in (["inspect", str(directory)], ["run", "--checkpoint", str(directory), "--layer", str(LAYER)]):
        assert main([*argv, "--device", "cpu"] if argv[0] == "run" else argv) == 2
        err = capsys.readouterr().err
        assert str(directory / INDEX) in err and len(err.strip().splitlines()) == 1, err


def test_symlinked_shards_still_load(valid_dir, tmp_path) -> None:
    """Hub-cache snapshots are directories of symlinks into a blob store: names are checked as
    strings, not resolved."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshot"
    shutil.copytree(valid_dir, blobs)
    snapshot.mkdir()
    for f in blobs.iterdir():
        (snapshot / f.name).symlink_to(f)
    with Checkpoint(snapshot) as ckpt:
        assert ckpt.load_layer(LAYER).attn.wq_b.dtype == torch.int8


# --- config.json ----------------------------------------------------------------------------------


@pytest.mark.parametrize("corruption", config_corruptions(), ids=lambda c: c.id)
def test_config_fields_are_checked(corruption, valid_dir, tmp_path) -> None:
    _assert_refused(_broken_copy(valid_dir, tmp_path, corruption), corruption)


CONFIG_VALUES = [
    ("hidden_size", 0), ("hidden_size", 256.0), ("head_dim", -128), ("num_attention_heads", True),
    ("q_lora_rank", "128"), ("index_n_heads", None), ("index_topk", 0), ("sliding_window", -1),
    ("original_max_position_embeddings", -1), ("original_max_position_embeddings", 1.5),
    ("qk_rope_head_dim", 63), ("qk_rope_head_dim", 0), ("index_head_dim", 96), ("max_position_embeddings", 3),
    ("rope_theta", 1.0), ("compress_rope_theta", math.inf), ("rope_factor", 0.0), ("rope_factor", math.nan),
    ("beta_fast", -1e9), ("beta_slow", 0.0), ("rms_norm_eps", 0.0), ("rms_norm_eps", "1e-6"),
    ("rms_norm_eps", 1e-50), ("rms_norm_eps", 1e39),  # finite, but 0 and inf in fp32, where the norms add it
    ("rope_theta", 10**400), ("rms_norm_eps", 10**400),  # ints past a float's range: not an OverflowError
    ("compress_ratios", [0, 4]), ("compress_ratios", (0, -4)), ("compress_ratios", (0, True)),
    ("compress_ratios", (0, 4.0)),
]  # fmt: skip


@pytest.mark.parametrize(("field", "value"), CONFIG_VALUES, ids=[f"{f}={v!r}" for f, v in CONFIG_VALUES])
def test_config_refuses_values_no_model_can_have(field, value) -> None:
    """``DeepSeekV4Config`` itself (a preset changed with ``replace``, or built by hand): every field is
    checked, the error names it."""
    with pytest.raises(ValueError, match=f"^{field}:"):
        TINY.replace(**{field: value})


# --- layer and prefix arguments -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"layer": -1}, ("layer", "non-negative")),
        ({"layer": "1"}, ("layer",)),
        ({"layer": 1.0}, ("layer",)),
        ({"layer": True}, ("layer",)),
        ({"prefix": "layers."}, ("prefix", "{layer}")),
        ({"prefix": "layers.{layer}.{layer}."}, ("prefix", "{layer}")),
        ({"prefix": "layers.{n}."}, ("prefix", "{n}")),
        ({"prefix": "layers.{layer:02d}."}, ("prefix",)),
        ({"prefix": "layers.{"}, ("prefix",)),
        ({"prefix": None}, ("prefix",)),
    ],
    ids=lambda v: str(v),
)
def test_layer_and_prefix_arguments(kwargs, words, valid_dir) -> None:
    args = {"layer": LAYER, **kwargs}
    with pytest.raises(CheckpointError) as info:
        load_layer(valid_dir, args.pop("layer"), **args)
    assert all(w in str(info.value) for w in words), str(info.value)


# --- golden case manifests ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def golden_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("golden") / "cases"
    assert main(["golden", "save", str(directory), "--op", "indexer", "--seed", "1"]) == 0
    return directory


def _without(text: str, *fields: str) -> str:
    return json.dumps({k: v for k, v in json.loads(text).items() if k not in fields})


def _manifest_edits(outside: Path) -> list[tuple[str, object, tuple[str, ...]]]:
    """(id, how to change the manifest: a dict of fields or a whole JSON value, words of the error)."""
    return [
        ("name-dotdot", {"name": "../outside/case"}, ("name",)),
        ("name-absolute", {"name": str(outside / "case")}, ("name",)),
        ("name-backslash", {"name": "..\\outside\\case"}, ("name",)),
        ("name-dotdot-only", {"name": ".."}, ("name",)),
        ("name-empty", {"name": ""}, ("name",)),
        ("name-a-number", {"name": 5}, ("name",)),
        ("name-nul", {"name": "case\0"}, ("name",)),
        ("op-unknown", {"op": "attention"}, ("op",)),
        ("op-null", {"op": None}, ("op",)),
        ("scalars-a-list", {"scalars": [1]}, ("scalars",)),
        ("scalars-unknown-key", {"scalars": {"topk": 16, "path": "x"}}, ("scalars",)),
        ("scalars-topk-float", {"scalars": {"topk": 16.5}}, ("scalars.topk",)),
        ("scalars-topk-bool", {"scalars": {"topk": True}}, ("scalars.topk",)),
        ("scalars-offset-string", {"scalars": {"offset": "16"}}, ("scalars.offset",)),
        ("scalars-start-past-int64", {"scalars": {"start_pos": 2**63}}, ("scalars.start_pos", "int64")),
        ("scalars-start-below-int64", {"scalars": {"start_pos": -(2**63) - 1}}, ("scalars.start_pos", "int64")),
        ("meta-a-list", {"meta": []}, ("meta",)),
        ("inputs-a-list", {"inputs": [1]}, ("inputs must map tensor names to {shape, dtype}",)),
        ("expected-entry-without-shape", {"expected": {"score": {"dtype": "torch.float32"}}}, ("expected must map",)),
        ("manifest-a-list", [1, 2], ("JSON object",)),
        ("manifest-not-json", "{", ("not valid JSON",)),
        ("manifest-deeply-nested", "[" * 200_000 + "]" * 200_000, ("nested", "levels deep")),
        ("field-deeply-nested", lambda text: deep_in_object(text, "scalars"), ("nested", "levels deep")),
        ("no-scalars", lambda text: _without(text, "scalars"), ("missing field", "scalars")),
        ("key-twice", lambda text: text.replace('"offset": ', '"offset": 999, "offset": ', 1), ("'offset'", "twice")),
        ("no-meta", lambda text: _without(text, "meta"), ("missing field", "meta")),
        ("no-name-no-op", lambda text: _without(text, "name", "op"), ("missing field", "name, op")),
    ]


MANIFEST_IDS = [e[0] for e in _manifest_edits(Path("outside"))]


@pytest.mark.parametrize("which", range(len(MANIFEST_IDS)), ids=MANIFEST_IDS)
def test_golden_manifest_is_checked(which, golden_dir, tmp_path, capsys) -> None:
    """A manifest cannot make ``golden check`` read files outside its folder (``outside`` holds a
    valid copy of the case's tensors), nor crash it with a traceback."""
    from dsv4.io.golden_io import load

    folder, outside = tmp_path / "cases", tmp_path / "outside"
    shutil.copytree(golden_dir, folder)
    shutil.copytree(golden_dir, outside)
    for f in outside.glob("*.safetensors"):
        f.rename(outside / ("case" + f.name[f.name.index(".") :]))
    (manifest,) = folder.glob("*.json")
    _, edit, words = _manifest_edits(outside)[which]
    if callable(edit):
        text = edit(manifest.read_text())
    elif isinstance(edit, str):
        text = edit
    else:
        text = json.dumps({**json.loads(manifest.read_text()), **edit} if isinstance(edit, dict) else edit)
    manifest.write_text(text)
    before = digest(tmp_path)
    with pytest.raises(ValueError) as info:
        load(manifest)
    assert str(manifest) in str(info.value) and all(w in str(info.value) for w in words), str(info.value)
    assert main(["golden", "check", str(folder), "--backend", "reference", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert str(manifest) in err and len(err.strip().splitlines()) == 1, err
    assert digest(tmp_path) == before


@pytest.mark.parametrize("which", ["inputs", "expected"])
def test_golden_tensor_files_are_checked(which, golden_dir, tmp_path, capsys) -> None:
    folder = tmp_path / "cases"
    shutil.copytree(golden_dir, folder)
    (path,) = folder.glob(f"*.{which}.safetensors")
    path.write_bytes(path.read_bytes()[:-7])  # data cut short: safetensors' own error, as a ValueError
    assert main(["golden", "check", str(folder), "--backend", "reference", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and len(err.strip().splitlines()) == 1, err


def test_golden_inputs_missing_a_tensor(golden_dir, tmp_path) -> None:
    from dsv4.io.golden_io import load

    folder = tmp_path / "cases"
    shutil.copytree(golden_dir, folder)
    (path,) = folder.glob("*.inputs.safetensors")
    tensors = load_file(str(path))
    del tensors["qr_scale"]
    save_file(tensors, str(path))
    (manifest,) = folder.glob("*.json")
    data = json.loads(manifest.read_text())
    del data["inputs"]["qr_scale"]  # the manifest edited to match: the op's own need is what refuses it
    manifest.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"inputs\.safetensors: no tensor 'qr_scale'"):
        load(manifest)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.bool])
def test_golden_topk_indices_must_be_integers(dtype, golden_dir, tmp_path, capsys) -> None:
    """Expected ``topk_idxs`` stored as floats (which compare equal to the right integers) are refused."""
    from dsv4.io.golden_io import load

    folder = tmp_path / "cases"
    shutil.copytree(golden_dir, folder)
    (path,) = folder.glob("*.expected.safetensors")
    tensors = load_file(str(path))
    tensors["topk_idxs"] = tensors["topk_idxs"].to(dtype)
    save_file(tensors, str(path))
    (manifest,) = folder.glob("*.json")
    data = json.loads(manifest.read_text())
    data["expected"]["topk_idxs"]["dtype"] = str(dtype)  # the manifest edited to match
    manifest.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"expected\.safetensors: topk_idxs must hold integer indices"):
        load(manifest)
    assert main(["golden", "check", str(folder), "--backend", "reference", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and len(err.strip().splitlines()) == 1, err


def _golden_copy(golden_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "cases"
    shutil.copytree(golden_dir, folder)
    (manifest,) = folder.glob("*.json")
    return folder, manifest


def _check_golden(folder: Path) -> int:
    return main(["golden", "check", str(folder), "--backend", "reference", "--device", "cpu"])


@pytest.mark.parametrize("which", ["json", "inputs.safetensors", "expected.safetensors"])
def test_golden_files_that_are_links_are_refused(which, golden_dir, tmp_path, capsys) -> None:
    """A case file that is a symbolic link (to a valid copy outside the folder) is not read."""
    folder, manifest = _golden_copy(golden_dir, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    path = folder / f"{manifest.stem}.{which}"
    target = outside / path.name
    path.rename(target)
    path.symlink_to(target)
    assert _check_golden(folder) == 2
    err = capsys.readouterr().err
    assert "must be a regular file" in err and len(err.strip().splitlines()) == 1, err


@contextlib.contextmanager
def _unblocking_readers(path: Path) -> Iterator[None]:
    """While inside, another process opens the named pipe ``path`` for writing whenever a reader opens
    it, and closes it at once: the reader reads an empty file instead of waiting forever (a process,
    not a thread: safetensors waits in its open holding the GIL)."""
    if not path.is_fifo():
        yield
        return
    writer = subprocess.Popen(["sh", "-c", 'while :; do : > "$0"; done', str(path)])
    try:
        yield
    finally:
        writer.kill()
        writer.wait()


@pytest.mark.parametrize("which", ["json", "inputs.safetensors", "expected.safetensors"])
@pytest.mark.parametrize("kind", ["named pipe", "directory"])
def test_golden_files_that_are_not_regular_files_are_refused(which, kind, golden_dir, tmp_path, capsys) -> None:
    """A case file that is a named pipe is refused, not opened (the read would wait for a writer forever);
    a directory is refused the same way."""
    folder, manifest = _golden_copy(golden_dir, tmp_path)
    path = folder / f"{manifest.stem}.{which}"
    path.unlink()
    if kind == "named pipe":
        os.mkfifo(path)
    else:
        path.mkdir()
    with _unblocking_readers(path):  # a read of the pipe ends (in a wrong message) instead of hanging the test
        assert _check_golden(folder) == 2
    err = capsys.readouterr().err
    assert f"{path}: a golden file must be a regular file in {folder} (it is a {kind})" in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_golden_case_files_without_a_manifest_are_refused(golden_dir, tmp_path, capsys) -> None:
    """A case whose manifest is gone is not silently skipped beside the others."""
    folder, manifest = _golden_copy(golden_dir, tmp_path)
    for f in folder.glob(f"{manifest.stem}.*.safetensors"):
        shutil.copy(f, folder / f.name.replace(manifest.stem, "orphan"))
    assert _check_golden(folder) == 2
    assert "orphan.expected.safetensors: a golden tensor file no manifest" in capsys.readouterr().err


def test_golden_manifest_names_its_own_files(golden_dir, tmp_path, capsys) -> None:
    """A manifest whose name is another case's would have that case's tensors checked under its own."""
    from dsv4.io.golden_io import load

    folder, manifest = _golden_copy(golden_dir, tmp_path)
    other = manifest.rename(folder / "other.json")
    with pytest.raises(ValueError, match=f"name must be the manifest's own file stem 'other', got '{manifest.stem}'"):
        load(other)
    assert _check_golden(folder) == 2


def test_golden_manifest_that_lists_no_tensors_still_loads_and_checks(golden_dir, tmp_path, capsys) -> None:
    """A manifest without its ``inputs`` and ``expected`` listings (or with empty ones) has no names, shapes or
    dtypes to hold the tensor files to: the case loads from the files and ``golden check`` passes it."""
    from dsv4.io.golden_io import load

    folder, manifest = _golden_copy(golden_dir, tmp_path)
    data = json.loads(manifest.read_text())
    listed = set(data["expected"])
    unlisted = {k: v for k, v in data.items() if k not in ("inputs", "expected")}
    for edited in ({**unlisted, "inputs": {}, "expected": {}}, unlisted):
        manifest.write_text(json.dumps(edited))
        case, expected = load(manifest)
        assert case.op == "indexer" and set(expected) == listed
        assert _check_golden(folder) == 0, capsys.readouterr()


@pytest.mark.parametrize(("which", "edit"), [("expected", "dtype"), ("inputs", "shape"), ("expected", "extra")])
def test_golden_tensors_match_their_manifest(which, edit, golden_dir, tmp_path, capsys) -> None:
    folder, manifest = _golden_copy(golden_dir, tmp_path)
    path = folder / f"{manifest.stem}.{which}.safetensors"
    tensors = load_file(str(path))
    key = sorted(k for k, t in tensors.items() if t.is_floating_point())[0]
    if edit == "dtype":
        tensors[key] = tensors[key].double()
    elif edit == "shape":
        tensors[key] = tensors[key].reshape(-1)
    else:
        tensors["unlisted"] = torch.zeros(1)
    save_file(tensors, str(path))
    assert _check_golden(folder) == 2
    err = capsys.readouterr().err
    assert str(path) in err and f"the manifest's {which}" in err or "differ from the manifest" in err, err


@pytest.mark.parametrize("part", ["keys", "key_scale", "score"])
def test_golden_expected_missing_a_part_fails_by_name(part, golden_dir, tmp_path, capsys) -> None:
    """An expected file without a tensor a rule reads (the manifest edited to match) fails the check
    naming it, instead of passing or raising a KeyError."""
    folder, manifest = _golden_copy(golden_dir, tmp_path)
    path = folder / f"{manifest.stem}.expected.safetensors"
    tensors = load_file(str(path))
    del tensors[part]
    save_file(tensors, str(path))
    data = json.loads(manifest.read_text())
    del data["expected"][part]
    manifest.write_text(json.dumps(data))
    assert _check_golden(folder) == 1
    assert f"{part}: no expected" in capsys.readouterr().out


def test_golden_expected_keys_of_rows_the_step_does_not_write_are_checked(golden_dir, tmp_path, capsys) -> None:
    """The key cache rule holds the expected pool's unwritten rows to the pool before the step too."""
    folder, manifest = _golden_copy(golden_dir, tmp_path)
    path = folder / f"{manifest.stem}.expected.safetensors"
    tensors = load_file(str(path))
    (inputs,) = folder.glob("*.inputs.safetensors")
    before = load_file(str(inputs))["state.keys"]
    unwritten = (tensors["keys"] == before).all(-1).nonzero()[0].tolist()
    tensors["keys"][tuple(unwritten)] += 1
    save_file(tensors, str(path))
    assert _check_golden(folder) == 1
    assert "in the expected pool (a corrupt expected file)" in capsys.readouterr().out

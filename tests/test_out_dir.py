"""The acceptance run's ``OUT_DIR`` helpers (``dsv4.acceptance.out_dir``): a link at a name is never
written through, a file is replaced whole from a temp file beside it, and an earlier run's record of
any real size marks a directory the run may use again."""

from __future__ import annotations

import json
import os
import stat

import pytest

from dsv4.acceptance.out_dir import KIND, RECORD, OutDirError, open_nofollow, prepare_out_dir
from dsv4.io import atomic_write
from dsv4.io.atomic_write import write_atomic


def test_open_nofollow_refuses_a_link(tmp_path) -> None:
    target = tmp_path / "elsewhere.txt"
    target.write_text("theirs\n")
    (tmp_path / "log.txt").symlink_to(target)
    for append in (False, True):
        with pytest.raises(OSError):
            open_nofollow(tmp_path / "log.txt", append=append)
    assert target.read_text() == "theirs\n"


def test_write_atomic_renames_a_file_made_beside_its_target(tmp_path, monkeypatch) -> None:
    path = tmp_path / "summary.md"
    path.write_text("before\n")
    renamed = []
    real = os.replace

    def replace(src, dst):
        renamed.append((src, dst))
        real(src, dst)

    monkeypatch.setattr(atomic_write.os, "replace", replace)
    write_atomic(path, "after\n")
    ((src, dst),) = renamed
    assert os.path.dirname(src) == str(tmp_path) and dst == path and path.read_text() == "after\n"

    def fails(src, dst):
        raise OSError("no space left on device")

    monkeypatch.setattr(atomic_write.os, "replace", fails)
    with pytest.raises(OSError, match="no space"):
        write_atomic(path, "lost\n")
    assert path.read_text() == "after\n" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.md"]


def test_an_earlier_runs_record_of_a_megabyte_marks_the_directory(tmp_path) -> None:
    """A record holding a long log excerpt is still an earlier run's: its directory is used again."""
    out = tmp_path / "out"
    out.mkdir()
    (out / RECORD).write_text(json.dumps({"kind": KIND, "steps": [{"log": "x" * (1 << 20)}]}))
    (out / "summary.md").write_text("old summary\n")
    prepare_out_dir(out, ["summary.md"])
    assert sorted(p.name for p in out.iterdir()) == [RECORD]
    (out / RECORD).write_text(json.dumps({"kind": "something else"}))
    (out / "notes.txt").write_text("mine\n")
    with pytest.raises(OutDirError, match="not empty"):
        prepare_out_dir(out, ["summary.md"])


def test_a_record_that_is_a_link_does_not_mark_the_directory(tmp_path) -> None:
    """An ``acceptance.json`` linking to a real record elsewhere is not read through: the directory is
    refused as a user's, and nothing in it changes."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / RECORD).write_text(json.dumps({"kind": KIND}))
    out = tmp_path / "out"
    out.mkdir()
    (out / RECORD).symlink_to(elsewhere / RECORD)
    (out / "summary.md").write_text("mine\n")
    with pytest.raises(OutDirError, match="not empty"):
        prepare_out_dir(out, ["summary.md"])
    assert (out / "summary.md").read_text() == "mine\n" and (out / RECORD).is_symlink()


@pytest.mark.parametrize("writer", ["tune config", "bench json"])
def test_a_link_planted_at_the_old_temporary_name_is_not_written_through(writer, tmp_path) -> None:
    """The tune's config file and the bench's JSON went through ``<name>.tmp`` and ``<name>.partial``,
    fixed names a link could be planted at; now a random name beside the file, with the mode a plain
    ``open`` gives (0644 under umask 022), not ``mkstemp``'s 0600."""
    from dsv4.bench.report import write_json
    from dsv4.kernels import tuning

    target = tmp_path / "theirs.txt"
    target.write_text("theirs\n")
    path = tmp_path / "out.json"
    for suffix in (".tmp", ".partial"):
        path.with_name(path.name + suffix).symlink_to(target)
    old = os.umask(0o022)
    try:
        if writer == "tune config":
            tuning.write_config(path, "cpu", {"window_kv_write": {"B=1,S=2": {"num_warps": 4}}}, {})
            tuning.reload()
        else:
            write_json({"a": 1}, path)
    finally:
        os.umask(old)
    assert target.read_text() == "theirs\n" and json.loads(path.read_text())
    assert stat.S_IMODE(path.stat().st_mode) == 0o644

"""Launch choices as data (``dsv4.kernels.tuning``): device keys, the config file's checks, the
fallback to the defaults, one file per device, and a file entry reaching the launch."""

from __future__ import annotations

import json
import random
import re
import tomllib
from pathlib import Path

import pytest
import torch

from conftest import DEVICE
from dsv4.bench.calls import bind
from dsv4.cli import main
from dsv4.harness.cases import make_case
from dsv4.harness.golden import compare
from dsv4.kernels import Workspace, tuning
from dsv4.kernels.index_front import front
from dsv4.model.config import get_config
from dsv4.model.weights import synthetic_compressor
from dsv4.ops.validate import step_positions

ROOT = Path(__file__).resolve().parents[1]
TINY = get_config("tiny")
# tiny qkv_proj_rope at T=3: the projection's bucket; the split policy gives 4 K-slices there
PROJECTION_BUCKET = "T=4,D=256,N=256"
ONE_SLICE = {"qkv.projection": {PROJECTION_BUCKET: {"splits": 1}}}


@pytest.fixture(autouse=True)
def _fresh_tables(monkeypatch):
    monkeypatch.delenv(tuning.ENV, raising=False)
    tuning.reload()
    yield
    tuning.reload()


def _file(path: Path, kernels: dict, device: str = "cpu", **extra) -> Path:
    path.write_text(json.dumps({"schema": 1, "device": device, **extra, "kernels": kernels}))
    return path


@pytest.mark.parametrize(
    "name, key",
    [
        ("NVIDIA H200", "h200"),
        ("NVIDIA H100 80GB HBM3", "h100-sxm"),  # the SXM part names no form factor
        ("NVIDIA H100 NVL", "h100-nvl"),
        ("NVIDIA H100 PCIe", "h100-pcie"),
        ("NVIDIA A100-SXM4-80GB", "a100-sxm4"),
        ("NVIDIA GeForce RTX 4090", "geforce-rtx-4090"),
        ("NVIDIA H200 141GB HBM3e", "h200"),
    ],
)
def test_device_names_normalize(name: str, key: str) -> None:
    assert tuning.normalize_device_name(name) == key


def test_cpu_key_and_defaults_without_a_file() -> None:
    assert tuning.device_key("cpu") == "cpu"
    assert not (tuning.CONFIG_DIR / "cpu.json").exists()
    proj = tuning.TUNABLES["qkv.projection"]
    assert proj.config(torch.device("cpu"), T=4, D=256, N=256) == proj.default
    assert "built-in defaults" in tuning.describe_active("cpu")


def test_every_kernel_declares_parameters_and_candidates() -> None:
    names = set(tuning.TUNABLES)
    assert names == {
        "qkv.projection", "qkv.rows", "qkv.q_heads", "index.front", "compressor.step", "index.score",
        "topk.select_row", "topk.select_chunks", "o_proj.wo_a", "o_proj.quant", "o_proj.wo_b", "window_kv_write",
        "kv_compressor.step", "sparse_attn",
    }  # fmt: skip
    for t in tuning.TUNABLES.values():
        for bucket in (dict.fromkeys(t.dims, 128), dict.fromkeys(t.dims, 1024)):
            configs = t.candidate_configs(bucket)
            assert configs[0] == t.default and len(configs) >= 2, t.name
            assert len({tuple(c.items()) for c in configs}) == len(configs)


def test_a_file_entry_reaches_the_launch(tmp_path, monkeypatch) -> None:
    """A config entry for the tiny T=3 bucket sets the projection's K split (1 slice instead of the
    policy's 4); another bucket keeps the defaults; the op still matches the reference."""
    monkeypatch.setenv(tuning.ENV, str(_file(tmp_path / "c.json", ONE_SLICE)))
    tuning.reload()
    case = make_case(TINY, "qkv_proj_rope", batch=3, seq=1, device=DEVICE)
    slices = {}
    for name, env in (("file", None), ("defaults", "none")):
        if env:
            monkeypatch.setenv(tuning.ENV, env)
        ws = Workspace()
        call = bind(case, "triton")
        with tuning.recording() as seen:
            got = call.outputs(call.fn(*call.args, ws=ws))
        slices[name] = ws._buffers["projection.partial"].shape[0]
        expected = bind(case, "reference")
        assert compare("qkv_proj_rope", got, expected.outputs(expected()), {}), name
    assert slices == {"file": 1, "defaults": 4}
    assert ("qkv.projection", PROJECTION_BUCKET) in seen and len(seen) == 3  # one lookup per launch


def test_forced_config_wins_and_ends_with_the_block(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(tuning.ENV, str(_file(tmp_path / "c.json", ONE_SLICE)))
    proj = tuning.TUNABLES["qkv.projection"]
    with tuning.forced("qkv.projection", {"splits": 2}), tuning.recording() as seen:
        assert proj.config(torch.device("cpu"), T=4, D=256, N=256).splits == 2
    assert seen == [("qkv.projection", "T=4,D=256,N=256")]  # a forced lookup is a lookup all the same
    with tuning.forced("qkv.projection", {"splits": 2}), tuning.defaults_only():
        assert proj.config(torch.device("cpu"), T=4, D=256, N=256).splits == 2  # forced still wins
    with tuning.defaults_only():
        assert proj.config(torch.device("cpu"), T=4, D=256, N=256).splits is None
    assert proj.config(torch.device("cpu"), T=4, D=256, N=256).splits == 1


def test_a_nested_forcing_of_the_same_kernel_gives_the_outer_one_back(tmp_path, monkeypatch) -> None:
    """``tuning.forced`` of a kernel already forced: the inner block's config inside it, the outer block's
    again after it, the file's after both."""
    monkeypatch.setenv(tuning.ENV, str(_file(tmp_path / "c.json", ONE_SLICE)))
    proj = tuning.TUNABLES["qkv.projection"]

    def splits() -> int | None:
        return proj.config(torch.device("cpu"), T=4, D=256, N=256).splits

    with tuning.forced("qkv.projection", {"splits": 2}):
        with tuning.forced("qkv.projection", {"splits": 4}):
            assert splits() == 4
        assert splits() == 2
    assert splits() == 1


def test_a_lookup_by_dims_other_than_the_declared_is_refused() -> None:
    """A launch looks its bucket up by the kernel's dims in their declared order: a dim missing, one more or
    the same dims in another order are refused naming the kernel and both lists, not looked up as another
    bucket."""
    proj = tuning.TUNABLES["qkv.projection"]
    assert proj.dims == ("T", "D", "N")
    for dims in ({"T": 4, "D": 256}, {"T": 4, "D": 256, "N": 256, "H": 4}, {"D": 256, "T": 4, "N": 256}):
        words = f"kernel 'qkv.projection': bucket dims {tuple(dims)} != declared {proj.dims}"
        with pytest.raises(ValueError, match=f"^{re.escape(words)}$"):
            proj.config(torch.device("cpu"), **dims)


def test_a_param_whose_default_is_not_among_its_choices_is_refused() -> None:
    """A declared default must be one a config file could hold: another value, a bool, or the same number of
    another type (``4.0`` for ``4``) is refused naming the parameter."""
    assert tuning.Param("num_warps", 4, (2, 4, 8), "warps").default == 4
    for default in (16, True, 4.0):
        with pytest.raises(ValueError, match=rf"^num_warps: default {default!r} is not among \(2, 4, 8\)$"):
            tuning.Param("num_warps", default, (2, 4, 8), "warps")


def test_a_config_is_read_only_and_names_a_parameter_it_lacks() -> None:
    """A resolved ``Config`` reads its parameters as attributes or items; a parameter it lacks is an
    ``AttributeError`` naming it, and no attribute can be set (a launch cannot change a shared config)."""
    cfg = tuning.TUNABLES["qkv.projection"].resolve({"splits": 2})
    assert cfg.splits == cfg["splits"] == 2
    assert repr(cfg) == f"Config({dict(cfg)})" and "'splits': 2" in repr(cfg)
    with pytest.raises(AttributeError, match="^num_stages_x$"):
        _ = cfg.num_stages_x
    for name in ("splits", "anything"):
        with pytest.raises(AttributeError, match="^Config is read-only$"):
            setattr(cfg, name, 4)
    assert cfg.splits == 2 and "anything" not in cfg


def test_a_tunable_declared_wrongly_or_twice_is_refused_and_not_registered(monkeypatch) -> None:
    """A ``Tunable`` whose ``pow2_dims`` are not among its dims, or of a name another kernel already declares,
    is refused naming the kernel; the registry keeps what it had."""
    monkeypatch.setattr(tuning, "TUNABLES", dict(tuning.TUNABLES))
    before = dict(tuning.TUNABLES)
    warps = (tuning.Param("num_warps", 4, (2, 4, 8), "warps"),)
    words = "kernel 'test.kernel': pow2_dims ('K',) are not among its dims ('T', 'D')"
    with pytest.raises(ValueError, match=f"^{re.escape(words)}$"):
        tuning.Tunable("test.kernel", "a test kernel", ("T", "D"), warps, pow2_dims=("K",))
    with pytest.raises(ValueError, match="^kernel 'qkv.projection' already declares its launch parameters$"):
        tuning.Tunable("qkv.projection", "a second declaration", ("T",), warps)
    assert before == tuning.TUNABLES and tuning.TUNABLES["qkv.projection"] is before["qkv.projection"]


def test_a_draw_is_a_candidate_of_the_bucket_and_defaults_only_overrides_it() -> None:
    """A drawn launch is what a file may hold: a candidate of the case's bucket (T=17 looks up T=32,
    whose candidates omit the 8 QL splits that 17 tokens alone would offer); inside ``defaults_only``
    every kernel is at its defaults, even within a ``drawn`` block."""
    cpu = torch.device("cpu")
    heads = tuning.TUNABLES["qkv.q_heads"]
    raw, bucket = dict(T=17, H=8, QL=1536), dict(T=32, H=8, QL=1536)
    offered = [c for c in heads.candidate_configs(raw) if c not in heads.candidate_configs(bucket)]
    assert offered  # a candidate the raw token count offers and the bucket does not
    drawn_here = set()
    for seed in range(40):
        with tuning.drawn(random.Random(seed)):
            cfg = heads.config(cpu, **raw)
            assert cfg in heads.candidate_configs(bucket)
            drawn_here.add(tuple(sorted(cfg.items())))
            with tuning.defaults_only():
                assert heads.config(cpu, **raw) == heads.default
                proj = tuning.TUNABLES["qkv.projection"]
                assert proj.config(cpu, T=17, D=256, N=256) == proj.default
    assert len(drawn_here) > 1


def test_forcing_a_kernel_that_declares_no_parameters_is_refused_naming_it() -> None:
    forcing = tuning.forced("window_kv_writ", {})
    with pytest.raises(ValueError, match=r"kernel: expected one of .*qkv\.q_heads.*, got 'window_kv_writ'"):
        forcing.__enter__()


def test_drawn_candidates_are_declared_kept_per_bucket_and_written_as_a_file(tmp_path, monkeypatch) -> None:
    """``tuning.drawn``: each bucket's launch is one of its declared candidates, the same at every later
    lookup; a forced kernel keeps its config; the block ends with the file's choices back; the draws
    that differ from the defaults, written as a config file, launch the same candidates again."""
    monkeypatch.setenv(tuning.ENV, str(_file(tmp_path / "c.json", ONE_SLICE)))
    cpu = torch.device("cpu")
    proj, heads = tuning.TUNABLES["qkv.projection"], tuning.TUNABLES["qkv.q_heads"]
    buckets = [dict(T=t, D=256, N=256) for t in (1, 2, 4, 8, 16, 32, 64, 128)]
    seen: set[tuple] = set()
    for seed in range(8):
        with tuning.drawn(random.Random(seed)) as drawn:
            got = [proj.config(cpu, **b) for b in buckets]
            assert [proj.config(cpu, **b) for b in buckets] == got  # kept, as a file's entry is
            for b, cfg in zip(buckets, got, strict=True):
                assert cfg in proj.candidate_configs(b)
            q_bucket = dict(T=2, H=4, QL=128)  # tiny at one sequence: QL split over programs offered
            assert heads.config(cpu, **q_bucket) in heads.candidate_configs(q_bucket)
            with tuning.forced("qkv.projection", {"splits": 2}):
                assert proj.config(cpu, **buckets[2]).splits == 2
        seen.update(tuple(sorted(c.items())) for c in got)
        changes = drawn.changes()
        assert set(drawn.entries["qkv.projection"]) == {proj.bucket_key(b) for b in buckets}
        for kernel, entries in changes.items():
            for key, diff in entries.items():
                assert diff and tuning.TUNABLES[kernel].resolve(diff) == drawn.entries[kernel][key]
        path = tmp_path / f"drawn-{seed}.json"
        tuning.write_config(path, "cpu", changes, {})
        monkeypatch.setenv(tuning.ENV, str(path))
        tuning.reload()
        assert [proj.config(cpu, **b) for b in buckets] == got
        monkeypatch.setenv(tuning.ENV, str(tmp_path / "c.json"))
        tuning.reload()
    assert len(seen) > 3  # the draws reach more than the default and one candidate
    assert proj.config(cpu, T=4, D=256, N=256).splits == 1  # the file's again


@pytest.mark.parametrize(
    "data, message",
    [
        ([], "expected a JSON object"),
        ({"schema": 2, "device": "cpu", "kernels": {}}, "schema must be 1"),
        ({"schema": 1, "kernels": {}}, "'device' must name the device"),
        ({"schema": 1, "device": "cpu", "kernels": []}, "'kernels' must be an object"),
        ({"schema": 1, "device": "cpu", "kernels": {"qkv.nope": {}}}, "unknown kernel 'qkv.nope'"),
        ({"schema": 1, "device": "cpu", "kernels": {"qkv.rows": []}}, "kernels.qkv.rows must be an object of bucket"),
        (
            {"schema": 1, "device": "cpu", "kernels": {"qkv.rows": {"T=2,QL=128,HD=128": [["num_warps", 8]]}}},
            r"kernels.qkv.rows\['T=2,QL=128,HD=128'\] must be an object of parameters",
        ),
        ({"schema": 1, "device": "cpu", "kernels": {"qkv.rows": {"T=128": {}}}}, "is not of the form 'T=<int>,QL"),
        (
            {"schema": 1, "device": "cpu", "kernels": {"qkv.rows": {"T=2,QL=128,HD=128": {"warps": 4}}}},
            r"kernels.qkv.rows\['T=2,QL=128,HD=128'\]: unknown parameter 'warps'",
        ),
        (
            {"schema": 1, "device": "cpu", "kernels": {"qkv.projection": {PROJECTION_BUCKET: {"block_n": 96}}}},
            r"block_n must be one of \[16, 32, 64, 128\], got 96",
        ),
        (
            {"schema": 1, "device": "cpu", "kernels": {"qkv.rows": {"T=2,QL=128,HD=128": {"pdl": 1}}}},
            r"pdl must be one of \[False, True\], got 1",  # an int is not a bool
        ),
        (
            {"schema": 1, "device": "cpu", "kernels": {"index.score": {"B=1,S=2,N=16": {"num_warps": True}}}},
            "num_warps must be one of",  # a bool is not an int
        ),
        ({"schema": True, "device": "cpu", "kernels": {}}, "schema must be 1"),  # True == 1, but not an int
        # buckets no launch looks up: a token count launches round to a power of two, a leading zero, other digits
        (
            {"schema": 1, "device": "cpu", "kernels": {"qkv.rows": {"T=100,QL=128,HD=128": {}}}},
            "T must be a power of two",
        ),
        ({"schema": 1, "device": "cpu", "kernels": {"qkv.rows": {"T=0128,QL=128,HD=128": {}}}}, "is not of the form"),
        ({"schema": 1, "device": "cpu", "kernels": {"qkv.rows": {"QL=128,T=2,HD=128": {}}}}, "is not of the form"),
        (
            {"schema": 1, "device": "cpu", "kernels": {"qkv.rows": {"T=\u0661\u0662,QL=128,HD=128": {}}}},
            "is not of the form",
        ),
        # a dim past any launch's (Python refuses to read an int of more than 4300 digits, naming no entry)
        (
            {"schema": 1, "device": "cpu", "kernels": {"qkv.rows": {f"T=1,QL={'9' * 5000},HD=128": {}}}},
            "kernel 'qkv.rows': bucket 'T=1,QL=999.* is not of the form",
        ),
        (
            {"schema": 1, "device": "cpu", "kernels": {"qkv.rows": {f"T=1,QL={10**18},HD=128": {}}}},
            "is not of the form",
        ),
    ],
)
def test_malformed_files_are_named_errors(tmp_path, data, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message) as info:
        tuning.load_config(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"schema": 1, "device": "cpu", "kernels": {"qkv.rows": {}, "qkv.rows": {}}}', "key 'qkv.rows' appears twice"),
        ("[" * 100_000 + "]" * 100_000, "nested 100000 levels deep"),
    ],
)
def test_malformed_text_is_a_named_error(tmp_path, text: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        tuning.load_config(path)
    assert str(info.value).startswith(f"kernel config {path}")
    path.write_bytes(b'{"schema": 1, "device": "\xff"}')
    with pytest.raises(ValueError, match="not valid JSON"):
        tuning.load_config(path)
    with pytest.raises(ValueError, match="not a readable file"):
        tuning.load_config(tmp_path / "absent.json")


def test_a_malformed_file_fails_the_launch_not_silently(tmp_path, monkeypatch) -> None:
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    monkeypatch.setenv(tuning.ENV, str(path))
    with pytest.raises(ValueError, match=f"kernel config .*broken.json: not valid JSON.*{tuning.ENV}"):
        tuning.TUNABLES["qkv.rows"].config(torch.device("cpu"), T=2, QL=128, HD=128)


def test_one_file_per_device(tmp_path, monkeypatch, capsys) -> None:
    """The package's folder holds ``<device key>.json`` files whose ``device`` is their name; the file
    of the device in use is the one read, and ``dsv4 info`` names it. The folder ships with the package."""
    for shipped in tuning.CONFIG_DIR.glob("*.json"):
        assert tuning.load_config(shipped, expect_device=shipped.stem).device == shipped.stem
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "configs/*.json" in package_data["dsv4.kernels"]

    monkeypatch.setattr(tuning, "CONFIG_DIR", tmp_path)
    _file(tmp_path / "h200-132.json", {"qkv.rows": {"T=2,QL=128,HD=128": {"num_warps": 8}}}, device="h200-132")
    assert tuning.config_path("cpu") is None  # another device's file is not this one's
    cpu = _file(tmp_path / "cpu.json", {"qkv.rows": {"T=2,QL=128,HD=128": {"num_warps": 8}}})
    tuning.reload()
    assert tuning.config_path("cpu") == cpu
    assert tuning.TUNABLES["qkv.rows"].config(torch.device("cpu"), T=2, QL=128, HD=128).num_warps == 8
    assert main(["info"]) == 0
    assert f"kernel configs: {cpu} (1 tuned bucket(s) of 1 kernel(s))" in capsys.readouterr().out
    _file(tmp_path / "cpu.json", {}, device="h200-132")  # a file under another device's name
    tuning.reload()
    with pytest.raises(ValueError, match="the file of device 'cpu' says 'device': 'h200-132'"):
        tuning.TUNABLES["qkv.rows"].config(torch.device("cpu"), T=2, QL=128, HD=128)


def test_the_file_dsv4_kernel_config_names_sets_every_device(tmp_path, monkeypatch) -> None:
    """``DSV4_KERNEL_CONFIG=PATH``: that file for every device, whatever device its ``device`` names (a GPU's
    tuned file runs on the CPU interpreter too)."""
    rows = {"qkv.rows": {"T=2,QL=128,HD=128": {"num_warps": 8}}}
    monkeypatch.setenv(tuning.ENV, str(_file(tmp_path / "h200.json", rows, device="h200-132")))
    assert tuning.TUNABLES["qkv.rows"].config(torch.device("cpu"), T=2, QL=128, HD=128).num_warps == 8


def test_a_lookup_after_a_write_reads_the_file_written(tmp_path, monkeypatch) -> None:
    """``write_config`` replaces the file a launch reads: the next lookup in the same process sees the new
    entry, not the table read before the write."""
    path = tmp_path / "cpu.json"
    tuning.write_config(path, "cpu", {"qkv.rows": {"T=2,QL=128,HD=128": {"num_warps": 8}}}, {})
    monkeypatch.setenv(tuning.ENV, str(path))
    rows = tuning.TUNABLES["qkv.rows"]
    assert rows.config(torch.device("cpu"), T=2, QL=128, HD=128).num_warps == 8
    tuning.write_config(path, "cpu", {"qkv.rows": {"T=2,QL=128,HD=128": {"num_warps": 2}}}, {})
    assert rows.config(torch.device("cpu"), T=2, QL=128, HD=128).num_warps == 2


def test_write_then_read(tmp_path) -> None:
    path = tmp_path / "sub" / "cpu.json"
    tuning.write_config(path, "cpu", {"topk.select_row": {"R=2,N=16,K=16": {"num_warps": 4}}}, {"made_by": "test"})
    table = tuning.load_config(path, "cpu")
    assert table.entries["topk.select_row"]["R=2,N=16,K=16"].num_warps == 4 and table.meta["made_by"] == "test"
    with pytest.raises(ValueError, match="num_warps must be one of"):
        tuning.write_config(path, "cpu", {"topk.select_row": {"R=2,N=16,K=16": {"num_warps": 3}}}, {})
    assert tuning.load_config(path, "cpu").entries["topk.select_row"]["R=2,N=16,K=16"].num_warps == 4  # not overwritten


def test_each_front_launch_geometry_has_its_own_bucket() -> None:
    """The front launch's bucket names its x-projection's columns (``N``: 2 x the compressor's ``2*HID`` or
    ``COFF*HD``, plus the indexer's ``HI`` head weights), so a split tuned for one compressor is never
    applied to another's tiles (at flash: 4 column tiles for the indexer's, 16 for CSA, 8 for HCA)."""
    a = make_case(TINY, "indexer", seed=0, device=DEVICE).args
    b, s = a["x"].shape[:2]
    pos = step_positions(a["start_pos"], b, s, DEVICE)
    csa, hca = synthetic_compressor(TINY, 4).to(DEVICE), synthetic_compressor(TINY, 16).to(DEVICE)
    launches = {
        "indexer_compressor": (a["w"].compressor, 0, lambda: front(a["x"], a["w"].compressor, pos)),
        "kv_compressor csa": (csa, 0, lambda: front(a["x"], csa, pos)),
        "kv_compressor hca": (hca, 0, lambda: front(a["x"], hca, pos)),
        "indexer": (
            a["w"].compressor, a["w"].weights_proj.shape[0],
            lambda: front(a["x"], a["w"].compressor, pos, a["w"], a["qr"], a["qr_scale"], a["rope"]),
        ),
    }  # fmt: skip
    keys = {}
    for name, (w, hi, launch) in launches.items():
        with tuning.recording() as seen:
            launch()
        keys[name] = [key for kernel, key in seen if kernel == "index.front"]
        t, d = a["x"].shape[0] * a["x"].shape[1], a["x"].shape[2]
        assert keys[name] == [f"T={tuning.pow2_bucket(t)},D={d},N={2 * w.wkv.shape[0] + hi},HI={hi}"], (name, keys)
    assert keys["kv_compressor csa"] != keys["kv_compressor hca"]


def test_compressor_step_and_topk_buckets_name_their_launch_geometry() -> None:
    """The compressor step sums other K-slices of other columns for ``indexer_compressor`` (the kv and
    gate projections) than for the indexer (plus the head weights), and the top-k kernels tile the
    padded top-k: each launch looks up a bucket of its own (``N``, ``K``), not the first tuned one."""
    steps, selects = {}, {}
    for op in ("indexer_compressor", "indexer"):
        case = make_case(TINY, op, batch=2, seq=2, start_pos=61, device=DEVICE)
        with tuning.recording() as seen:
            bind(case, "triton")()
        steps[op] = [key for kernel, key in seen if kernel == "compressor.step"]
        width = 4 * TINY.index_head_dim + (TINY.index_n_heads if op == "indexer" else 0)
        assert len(steps[op]) == 1 and f",N={width},K=" in steps[op][0], (op, steps)
    assert steps["indexer_compressor"] != steps["indexer"]
    for topk in (16, 32):
        case = make_case(TINY.replace(index_topk=topk), "indexer", batch=2, seq=2, start_pos=61, device=DEVICE)
        with tuning.recording() as seen:
            bind(case, "triton")()
        selects[topk] = [key for kernel, key in seen if kernel.startswith("topk.")]
        assert len(selects[topk]) == 1 and selects[topk][0].endswith(f",K={topk}"), (topk, selects)


def test_sparse_attn_buckets_name_the_keys_a_token_walks() -> None:
    """``sparse_attn``'s key split is tuned per walk: a CSA token's list, an HCA slot's compressed rows and
    SWA's window alone look up buckets by that count (``KEYS``), not one bucket for the three kinds."""
    keys = {}
    for kind in ("csa", "hca", "swa"):
        case = make_case(TINY, "sparse_attn", batch=2, seq=2, start_pos=61, max_position=512, device=DEVICE, kind=kind)
        a = case.args
        b, s, h = a["q"].shape[:3]
        pool = a.get("compressed_pool")
        walked = 0 if pool is None else pool.block_table.shape[1] * pool.block_size  # HCA: every compressed row
        walked = a["topk_idxs"].shape[2] if kind == "csa" else walked  # CSA: the token's list
        with tuning.recording() as seen:
            bind(case, "triton")()
        keys[kind] = [key for kernel, key in seen if kernel == "sparse_attn"]
        bucket = f"B={b},S={s},H={tuning.pow2_bucket(h)},KEYS={tuning.pow2_bucket(walked)}"
        assert (a["kind"], a["compress_ratio"]) == (kind, TINY.kind_ratio(kind))
        assert keys[kind] == [bucket], (kind, keys)
    assert len({key for k in keys.values() for key in k}) == 3


def test_o_proj_gemms_look_up_buckets_of_their_own_widths() -> None:
    """``o_proj``'s two GEMMs are tuned per shape: ``wo_a`` reduces over a group's heads (``K = HG*HD``)
    into ``N = G*OL``, ``wo_b`` over ``G*OL`` into ``D``; at ``tiny`` (256 and 128) a lookup by the other
    GEMM's width finds another bucket."""
    case = make_case(TINY, "o_proj", batch=3, seq=1, device=DEVICE)
    t, h, hd = case.args["o"].shape
    g, ol, d = TINY.o_groups, TINY.o_lora_rank, TINY.hidden_size
    assert h * hd // g != g * ol
    with tuning.recording() as seen:
        bind(case, "triton")()
    keys = {kernel: key for kernel, key in seen if kernel.startswith("o_proj.wo_")}
    tb = tuning.pow2_bucket(t)
    assert keys == {"o_proj.wo_a": f"T={tb},K={h * hd // g},N={g * ol}", "o_proj.wo_b": f"T={tb},K={g * ol},N={d}"}


def test_the_docs_table_lists_every_kernel_its_dims_and_parameters() -> None:
    """docs/PERFORMANCE.md's table of tunable kernels, row by row, against the declarations."""
    text = (ROOT / "docs" / "PERFORMANCE.md").read_text()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 5 and cells[0].strip("`") in tuning.TUNABLES:
            rows[cells[0].strip("`")] = cells

    def names(cell: str) -> list[str]:
        return [] if cell == "-" else [c.strip().strip("`") for c in cell.split(",")]

    assert sorted(rows) == sorted(tuning.TUNABLES)
    for name, (_, _, rounded, exact, params) in rows.items():
        t = tuning.TUNABLES[name]
        assert names(rounded) == list(t.pow2_dims), name
        assert names(exact) == [d for d in t.dims if d not in t.pow2_dims], name
        assert names(params) == [p.name for p in t.params], name

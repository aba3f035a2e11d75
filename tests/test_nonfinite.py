"""NaN and infinity stay visible (spec §7): a non-finite input gives non-finite outputs on every
backend exactly where the reference has them, and a checkpoint tensor holding one is refused by name.

The Triton kernels' ``tl.maximum``/``tl.minimum``/``tl.max`` drop NaN (IEEE maxNum) on GPUs and in
the interpreter alike, and rounding a NaN's bits to bf16 can carry its payload into the sign bit: the
cases below put a NaN, an infinity or a NaN with a full payload (``0x7FFFFFFF``, the NaN NVIDIA GPUs
produce) into one element of one input at a time.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl
from safetensors.torch import load_file, save_file

import dsv4
from bad_checkpoints import LAYER, PREFIX, SHARDS, digest, write_valid
from conftest import DEVICE
from dsv4 import CheckpointError
from dsv4.cli import main
from dsv4.harness.cases import Case, make_case, run_case
from dsv4.harness.golden import compare
from dsv4.io.checkpoint import Checkpoint
from dsv4.kernels import epilogue
from dsv4.kernels.epilogue import quantize_int8_rows
from dsv4.kernels.topk import select_topk
from dsv4.model.quant import quantize_int8_per_row
from dsv4.model.structs import MASKED_SCORE as MASKED
from dsv4.ops.validate import step_positions
from dsv4.reference.indexer import select_topk as reference_select_topk
from op_cases import case_at
from test_attention_bad_input import _args as attention_args
from test_validation import _get, _set

CFG = dsv4.get_config("tiny")
HID = CFG.index_head_dim
START = [10, 14]  # S=2: row 0 closes block 2 (positions 8..11), row 1 closes block 3 (12..15)


def payload_nan(dtype: torch.dtype) -> float | torch.Tensor:
    """A quiet NaN with every payload bit set (0x7FFFFFFF in fp32, 0x7FFF in bf16)."""
    bits = {torch.float32: (0x7FFFFFFF, torch.int32), torch.bfloat16: (0x7FFF, torch.int16)}[dtype]
    return torch.tensor([bits[0]], dtype=bits[1]).view(dtype)[0]


VALUES = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}


def bad_value(value: str, dtype: torch.dtype) -> float | torch.Tensor:
    """The element ``value`` names (a key of ``VALUES`` or ``"payload-nan"``) for a tensor of ``dtype``."""
    return payload_nan(dtype) if value == "payload-nan" else VALUES[value]


# (op, argument path, element index, value): one element that reaches the outputs of the step
CASES = [
    ("qkv_proj_rope", "x", (1, 7), "nan"),
    ("qkv_proj_rope", "x", (2, 0), "-inf"),
    ("qkv_proj_rope", "x", (3, 5), "payload-nan"),
    ("qkv_proj_rope", "w.wq_a", (0, 0), "nan"),
    ("qkv_proj_rope", "w.gamma_cq", (3,), "+inf"),
    ("qkv_proj_rope", "w.wq_b_scale", (5,), "payload-nan"),
    ("qkv_proj_rope", "w.wkv", (2, 1), "nan"),
    ("qkv_proj_rope", "w.gamma_ckv", (100,), "payload-nan"),
    ("qkv_proj_rope", "rope.cos", (START[0], 3), "nan"),
    ("qkv_proj_rope", "rope.sin", (START[1] + 1, 0), "+inf"),
    ("indexer", "x", (0, 1, 4), "nan"),
    ("indexer", "x", (1, 0, 9), "+inf"),
    ("indexer", "qr_scale", (1, 0), "nan"),
    ("indexer", "qr_scale", (2, 0), "+inf"),
    ("indexer", "w.wq_b_scale", (3,), "payload-nan"),
    ("indexer", "w.weights_proj", (0, 0), "nan"),
    ("indexer", "w.compressor.wkv", (0, 0), "nan"),
    ("indexer", "w.compressor.wgate", (HID, 3), "+inf"),
    ("indexer", "w.compressor.ape", (2, HID), "payload-nan"),
    ("indexer", "w.compressor.norm_w", (0,), "nan"),
    ("indexer", "state.kv_state", (0, 4, 0), "payload-nan"),  # slots 4..7 first half: block 1, row 0's close reads it
    ("indexer", "state.score_state", (0, 5, 0), "nan"),
    ("indexer", "state.key_scale", (0, 5), "nan"),
    ("indexer", "state.key_scale", (1, 1), "payload-nan"),
    ("indexer", "rope.cos", (START[0], 1), "nan"),
]


def _poisoned(op: str, path: str, index: tuple[int, ...], value: str) -> Case:
    case = case_at(CFG, op, batch=2, seq=2, start=START, max_position=64)
    args = dict(case.args)
    if op == "qkv_proj_rope":  # the same positions as the indexer case: rows at 10 and 14
        args["positions"] = torch.tensor([10, 11, 14, 15], device=args["positions"].device)
    t = _get(args, path).clone()
    t[index] = bad_value(value, t.dtype)
    if path.startswith("state."):
        field = path.split(".")[1]
        args["state"] = dsv4.IndexerState(**{**args["state"].tensors(), field: t})
    elif path.startswith("rope."):
        field = path.split(".")[1]
        other = "sin" if field == "cos" else "cos"
        args["rope"] = dsv4.RopeTable(**{field: t, other: getattr(args["rope"], other)})
    else:
        _set(args, path, t)
    return Case(op, args, case.meta)


def _nonfinite(t: torch.Tensor) -> torch.Tensor:
    return ~torch.isfinite(t.float())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (the interpreter) on NaN/inf arithmetic
@pytest.mark.parametrize(("op", "path", "index", "value"), CASES, ids=[f"{c[0]}-{c[1]}-{c[3]}" for c in CASES])
def test_nonfinite_input_stays_visible_on_every_backend(op, path, index, value) -> None:
    case = _poisoned(op, path, index, value)
    want = run_case(case, "reference")
    got = run_case(case, "triton")
    assert any(_nonfinite(t).any() for t in want.values()), "premise: the reference's outputs show the NaN/inf"
    for name, w in want.items():
        if w.is_floating_point():
            bad_w, bad_g = _nonfinite(w), _nonfinite(got[name])
            assert torch.equal(bad_g, bad_w), (
                f"{name}: non-finite at {bad_w.sum()} elements on the reference, {bad_g.sum()} on Triton "
                f"({(bad_w & ~bad_g).sum()} hidden)"
            )
    if "qr" in want:  # rows with a NaN/inf scale quantize to 0, as the reference's NaN -> int8 does
        rows = _nonfinite(want["qr_scale"]).view(-1)
        assert torch.equal(got["qr"][rows], want["qr"][rows])
    if "topk_idxs" in want:  # NaN scores rank first (torch's descending sort), ties by lower index
        rows = _nonfinite(want["score"]).any(-1)
        assert torch.equal(got["topk_idxs"][rows], want["topk_idxs"][rows])


# --- a non-finite entry in a column RoPE leaves alone -------------------------------------------------

NOPE = 7  # a column of a head's first R-chunk (tiny: head_dim 128, rope 64), not rotated; pair partner 6


def _nope_case(op: str, value: float) -> Case:
    """``qkv_proj_rope`` with ``gamma_ckv[NOPE] = value`` (kv's column ``NOPE`` is ``+-value`` or NaN for
    every token), or ``sparse_attn`` with every key's column ``NOPE`` at ``value`` and head 0's q 0 (all
    its scores 0, so its ``o[..., NOPE]`` sums the keys' ``value``: +inf past fp32 for 3e38)."""
    if op == "qkv_proj_rope":
        case = case_at(CFG, op, batch=2, seq=2, start=START, max_position=64)
        args = dict(case.args)
        gamma = args["w"].gamma_ckv.clone()
        gamma[NOPE] = value
        _set(args, "w.gamma_ckv", gamma)
    else:
        case = make_case(CFG, op, seed=0, device=DEVICE, batch=2, seq=2, max_position=64, start_pos=[6, 14], kind="swa")
        args = dict(case.args)
        kv, q = args["kv"].clone(), args["q"].clone()
        kv[..., NOPE] = value
        q[:, :, 0, :] = 0
        args["kv"], args["q"] = kv, q
    return Case(op, args, case.meta)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize(
    ("op", "out", "value"),
    [("qkv_proj_rope", "kv", v) for v in (float("inf"), float("-inf"), float("nan"))] + [("sparse_attn", "o", 3e38)],
)
def test_a_nonfinite_entry_rope_leaves_alone_keeps_its_pair_partner(op: str, out: str, value: float) -> None:
    """The RoPE epilogue rotates only a row's last R columns: an infinity or NaN in another column stays
    there, and its pair partner keeps its value (rotating it with cos=1, sin=0 would give ``inf*0``, NaN)."""
    case = _nope_case(op, value)
    want, got = run_case(case, "reference"), run_case(case, "triton")
    w = want[out].float()
    assert not torch.isfinite(w[..., NOPE]).all() and torch.isfinite(w[..., NOPE - 1]).any(), "premise"
    for name, wt in want.items():
        if wt.is_floating_point():
            wf, gf = wt.float(), got[name].float()
            assert torch.equal(wf.isnan(), gf.isnan()), name
            inf = wf.isinf()
            assert torch.equal(inf, gf.isinf()) and torch.equal(wf[inf], gf[inf]), name

    # the finite values within spec §6's rule, every non-finite entry set to 0 on both sides
    def finite(outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: t.masked_fill(~torch.isfinite(t), 0) if t.is_floating_point() else t for n, t in outputs.items()}

    report = compare(op, finite(got), finite(want), case.compare_inputs())
    assert report, str(report)


# --- top-k of non-finite scores ---------------------------------------------------------------------

NEG_NAN = torch.tensor([-4194304], dtype=torch.int32).view(torch.float32)[0].item()  # 0xFFC00000, x86's NaN
INF = float("inf")
# start 14, S=2: token 0 sees 3 keys, token 1 four; columns past those hold what a token cannot see
PLANTED = [
    [-INF, NEG_NAN, 1.0, INF, float("nan"), 5.0, MASKED, -INF],
    [MASKED, -INF, INF, float("nan"), float("nan"), INF, 7.0, 0.0],
]
# by hand: NaN first (any sign), then descending, a visible -inf last; nothing past vis
EXPECTED = {16: [[1, 2, 0], [3, 2, 0, 1]], 2: [[1, 2], [3, 2]]}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("topk", sorted(EXPECTED))
def test_topk_of_nonfinite_scores_never_selects_a_hidden_column(backend: str, topk: int) -> None:
    """Visible NaN, +-inf and the mask value itself, and +inf/NaN in columns a token cannot see."""
    pos = step_positions(14, 1, 2, DEVICE)
    score = torch.tensor([PLANTED], device=DEVICE)
    select = reference_select_topk if backend == "reference" else select_topk
    got = select(score, pos, topk, 128).cpu()
    want = torch.full((1, 2, topk), -1, dtype=torch.int32)
    for s, idx in enumerate(EXPECTED[topk]):
        want[0, s, : len(idx)] = torch.tensor(idx) + 128
    assert torch.equal(got, want), got.tolist()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nonfinite_key_pool_selects_the_same_visible_rows_on_every_backend() -> None:
    """+-inf and NaN key scales in rows each token sees and in pool rows past the cache (never read):
    both backends select the same indices, all of them visible, k = min(topk, vis) of them."""
    case = case_at(CFG, "indexer", batch=2, seq=2, start=START, max_position=64)
    state = case.args["state"]
    for b, bad in enumerate(([-INF, INF], [-INF, float("nan"), INF])):
        for row, value in enumerate(bad):
            block, offset = state.row_location(b, row)
            state.key_scale[block, offset] = value
        for row in range(5, 16):  # past the cache after the step: never read
            block, offset = state.row_location(b, row)
            state.key_scale[block, offset] = (INF, float("nan"))[row % 2]
            state.keys[block, offset] = 127
    want, got = run_case(case, "reference"), run_case(case, "triton")
    assert torch.equal(got["topk_idxs"], want["topk_idxs"])
    offset, topk = case.args["offset"], case.args["topk"]
    for b, p in enumerate(START):
        for s in range(2):
            vis = (p + s + 1) // 4
            idx = want["topk_idxs"][b, s].tolist()
            assert sorted(i - offset for i in idx if i >= 0) == list(range(min(vis, topk)))
            assert idx[min(vis, topk) :] == [-1] * (topk - min(vis, topk))


# One e4m3 NaN code (0x7F) among the finite codes of its block: the reference decodes it as NaN, as does a GPU.
# The interpreter decodes it as 480 (and 0xFF as -480), so there the Triton kernels' outputs stay finite:
# their check is the compiled one.
NAN_CODE = 0x7F
COMPILED_ONLY = pytest.mark.skipif(
    DEVICE.type != "cuda", reason="the interpreter decodes the e4m3 NaN code 0x7F as 480: the check is compiled"
)


def _with_nan_code(op: str, where: str) -> tuple[dict, torch.Tensor]:
    """A tiny case of ``op`` (B=2, S=2 from position 6) with one NaN code at ``where``, and the outputs
    the spec makes NaN: a key row slot 0's tokens both see (every head of theirs), a row of ``wo_a``
    (its block of ``r`` in every token, so every ``y``), or an element of ``wo_b`` (one column of ``y``)."""
    args = attention_args(op)
    if where == "window_pool.nope":
        pool = args["window_pool"]
        p = 3  # a window row below the start: both tokens (positions 6, 7) see it
        block, offset = int(pool.block_table[0, p // pool.block_size]), p % pool.block_size
        pool.nope.view(torch.uint8)[block, offset, 7] = NAN_CODE
        nan = torch.zeros(args["q"].shape, dtype=torch.bool, device=DEVICE)
        nan[0] = True
        return args, nan
    name = where.removeprefix("w.")
    weight = getattr(args["w"], name).clone()
    weight.view(torch.uint8)[5, 7] = NAN_CODE
    args["w"] = dataclasses.replace(args["w"], **{name: weight})
    t, d = args["o"].shape[0], args["w"].wo_b.shape[0]
    nan = torch.zeros((t, d), dtype=torch.bool, device=DEVICE)
    nan[:, 5 if name == "wo_b" else slice(None)] = True
    return args, nan


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=COMPILED_ONLY)])
@pytest.mark.parametrize(
    ("op", "where"), [("sparse_attn", "window_pool.nope"), ("o_proj", "w.wo_a"), ("o_proj", "w.wo_b")]
)
def test_one_fp8_nan_code_in_a_finite_block_is_nan(op: str, where: str, backend: str) -> None:
    """Spec §7 for an FP8 code rather than a whole NaN block (scale byte 255, `test_attention_bad_input.py`):
    NaN exactly in the outputs that read it."""
    args, nan = _with_nan_code(op, where)
    out = getattr(dsv4, op)(**args, backend=backend)
    got = out.o if op == "sparse_attn" else out.y
    assert torch.equal(got.isnan(), nan), (int(got.isnan().sum()), int(nan.sum()))


@triton.jit
def _quantize_rows_kernel(v_ptr, q_ptr, s_ptr, N: tl.constexpr):
    rows = tl.arange(0, 4)[:, None]
    cols = tl.arange(0, N)[None, :]
    q, s = quantize_int8_rows(tl.load(v_ptr + rows * N + cols))
    tl.store(q_ptr + rows * N + cols, q)
    tl.store(s_ptr + tl.arange(0, 4), s)


# On a CPU both branches of the row maximum run (through the interpreter); on a GPU the kernel is
# compiled with ``INTERPRETED`` false, read once when it compiles: the compiled branch alone, unpatched.
QUANTIZER_BRANCHES = ["compiled"] if DEVICE.type == "cuda" else ["interpreter", "compiled"]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("branch", QUANTIZER_BRANCHES)
@pytest.mark.parametrize("value", ["nan", "+inf", "-inf", "payload-nan"])
def test_int8_quantizer_of_a_nonfinite_row(value, branch, monkeypatch) -> None:
    """The Triton quantizer alone, on rows with one non-finite element: bit for bit the reference's
    ``quantize_int8_per_row`` (scale NaN or infinite, q 0 in such a row); finite rows unchanged.
    ``branch``: the row maximum as the interpreter computes it, or the source a GPU compiles (a
    NaN-keeping ``tl.reduce``), on a CPU run through the interpreter too."""
    if DEVICE.type != "cuda":  # a constexpr, as the kernels' branch reads it
        monkeypatch.setattr(epilogue, "INTERPRETED", tl.constexpr(branch == "interpreter"))
    g = torch.Generator().manual_seed(0)
    v = torch.randn(4, 32, generator=g)
    v[1, 5] = bad_value(value, torch.float32)
    v[3] = 0.0  # the 1e-4 floor
    q, s = torch.empty(4, 32, dtype=torch.int8, device=DEVICE), torch.empty(4, device=DEVICE)
    _quantize_rows_kernel[(1,)](v.to(DEVICE), q, s, N=32)
    q, s = q.cpu(), s.cpu()
    q_ref, s_ref = quantize_int8_per_row(v)
    assert torch.equal(q, q_ref)
    assert torch.equal(s.view(torch.int32)[[0, 2, 3]], s_ref.view(-1).view(torch.int32)[[0, 2, 3]])
    assert not torch.isfinite(s[1]) and (torch.isnan(s[1]) == torch.isnan(s_ref[1, 0]))


# --- checkpoint tensors ---------------------------------------------------------------------------

PLAIN = [  # every bf16/fp32 tensor the front end loads, and the shard that holds it
    ("attn.q_norm.weight", SHARDS[0]),
    ("attn.kv_norm.weight", SHARDS[0]),
    ("attn.indexer.weights_proj.weight", SHARDS[1]),
    ("attn.indexer.compressor.wkv.weight", SHARDS[1]),
    ("attn.indexer.compressor.wgate.weight", SHARDS[1]),
    ("attn.indexer.compressor.ape", SHARDS[1]),
    ("attn.indexer.compressor.norm.weight", SHARDS[1]),
]
FP8 = [("attn.wq_a.weight", SHARDS[0]), ("attn.wq_b.weight", SHARDS[0]), ("attn.wkv.weight", SHARDS[0]),
       ("attn.indexer.wq_b.weight", SHARDS[1])]  # fmt: skip


@pytest.fixture(scope="module")
def valid_dir(tmp_path_factory) -> Path:
    return write_valid(tmp_path_factory.mktemp("valid") / "ckpt")


def _with_value(valid_dir: Path, tmp_path: Path, name: str, shard: str, value: str) -> Path:
    directory = tmp_path / "ckpt"
    shutil.copytree(valid_dir, directory)
    tensors = load_file(str(directory / shard))
    t = tensors[PREFIX + name].clone()
    if t.dtype == torch.float8_e4m3fn:
        t.view(torch.uint8).view(-1)[3] = 0x7F  # the e4m3 NaN byte
    else:
        t.view(-1)[3] = bad_value(value, t.dtype)
    tensors[PREFIX + name] = t
    save_file(tensors, str(directory / shard))
    return directory


# float8_e4m3fn has no infinity: its one non-finite value is NaN
BAD_VALUES = [(n, s, v) for n, s in PLAIN for v in ("nan", "+inf", "-inf")] + [(n, s, "nan") for n, s in FP8]


# every FP8 weight of the layer, and the shard that holds it: kept in FP8 (wo_a, wo_b) or dequantized at load
SCALED = [(n.removesuffix(".weight"), s) for n, s in FP8] + [("attn.wo_a", SHARDS[0]), ("attn.wo_b", SHARDS[0])]


@pytest.mark.parametrize(("name", "shard"), SCALED, ids=[n for n, _ in SCALED])
def test_a_weight_its_block_scales_take_past_fp32_is_refused(name, shard, valid_dir, tmp_path, capsys) -> None:
    """Scales of 2^127 (UE8M0 byte 254) are finite, but a code of 2 or more times one is not: the weight
    holds infinities after dequantization and is refused naming it, whether the loader dequantizes it or
    keeps its codes and scales apart for the kernels (``wo_a``, ``wo_b``)."""
    directory = tmp_path / "ckpt"
    shutil.copytree(valid_dir, directory)
    tensors = load_file(str(directory / shard))
    scale = tensors[f"{PREFIX}{name}.scale"]
    tensors[f"{PREFIX}{name}.scale"] = torch.full(scale.shape, 254, dtype=torch.uint8).view(scale.dtype)
    save_file(tensors, str(directory / shard))
    with pytest.raises(CheckpointError, match=f"{PREFIX}{name}.weight: rows 0..[0-9]+ hold (NaN or )?infinite values"):
        dsv4.load_layer(directory, LAYER)
    assert main(["inspect", str(directory)]) == 1
    assert "check: ok" not in capsys.readouterr().out


@pytest.mark.parametrize(("name", "shard", "value"), BAD_VALUES, ids=[f"{n}-{v}" for n, _, v in BAD_VALUES])
def test_checkpoint_tensor_with_nonfinite_value_is_refused(name, shard, value, valid_dir, tmp_path, capsys) -> None:
    directory = _with_value(valid_dir, tmp_path, name, shard, value)
    before = digest(directory)
    for raw_bytes in (None, True):
        with pytest.raises(CheckpointError) as info, Checkpoint(directory, raw_bytes=raw_bytes) as ckpt:
            ckpt.load_layer(LAYER)
        assert PREFIX + name in str(info.value) and ("NaN" in str(info.value) or "infinite" in str(info.value))
    assert main(["inspect", str(directory)]) == 1
    out = capsys.readouterr().out
    assert "check: ok" not in out and "check: headers and shapes ok, but load_layer refuses" in out
    assert PREFIX + name in out.splitlines()[-1]
    assert digest(directory) == before

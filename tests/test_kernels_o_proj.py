"""The fused output projection (``wo_a`` GEMM, FP8 activation quant, ``wo_b`` GEMM with the split
counter) against the reference with attention spec §8's ``y`` rule: odd token counts, more tokens
than one tile, an output width that the column tiles do not divide, every K split against the
unsplit launch, NaN and infinities in ``o``, scratch reused from a workspace, and the flash dims."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import dsv4
from conftest import DEVICE, FULL
from dsv4.bench.interp_traffic import count_traffic
from dsv4.harness.golden import bit_identical, compare
from dsv4.kernels import tuning
from dsv4.kernels.o_proj import o_proj as fused_o_proj
from dsv4.kernels.workspace import Workspace
from dsv4.model.weights import synthetic_o_proj
from program_order import in_order, program_orders

TINY = dsv4.get_config("tiny")  # G=2, OL=64: a 128-block of r spans both groups
WIDE = dataclasses.replace(TINY, o_lora_rank=128)  # two 128-blocks in wo_b's reduction axis: wo_b splits in two


def _inputs(cfg: dsv4.DeepSeekV4Config, t: int, seed: int) -> tuple[torch.Tensor, dsv4.OProjWeights]:
    g = torch.Generator().manual_seed(seed)
    o = torch.randn(t, cfg.num_attention_heads, cfg.head_dim, generator=g).to(torch.bfloat16)
    return o.to(DEVICE), synthetic_o_proj(cfg, seed).to(DEVICE)


def _check(o: torch.Tensor, w: dsv4.OProjWeights) -> torch.Tensor:
    got = dsv4.o_proj(o, w, backend="triton").y
    report = compare("o_proj", {"y": got}, {"y": dsv4.o_proj(o, w, backend="reference").y})
    assert report, str(report)
    return got


@pytest.mark.parametrize("cfg", [TINY, WIDE], ids=["OL64", "OL128"])
@pytest.mark.parametrize("t", [1, 3, 5, 130])
def test_tokens(cfg: dsv4.DeepSeekV4Config, t: int) -> None:
    """Odd T, and T=130: two token tiles of the GEMMs (128 + a masked 2), five of the quant."""
    _check(*_inputs(cfg, t, seed=t))


def test_output_width_not_a_multiple_of_the_tile() -> None:
    """D=200: the last column tile of wo_b is masked, and its scale row is the partial 128-block."""
    _check(*_inputs(dataclasses.replace(WIDE, hidden_size=200), 3, seed=7))


@pytest.mark.parametrize("factor", [1.1, 3.0])
def test_scales_not_powers_of_two(factor: float) -> None:
    """wo_a's block scales times 1.1 or 3: code x scale is then no bf16 value, and the dequantized weight is
    bf16(code x scale) (``dequantize_fp8_weight``) on every backend."""
    o, w = _inputs(TINY, 5, seed=5)
    _check(o, dataclasses.replace(w, wo_a_scale=w.wo_a_scale * factor))


def test_scales_with_subnormal_products() -> None:
    """wo_a's scales at 2^-127 (UE8M0's smallest): code x scale lies in bf16's subnormal range, rounded there."""
    o, w = _inputs(TINY, 5, seed=5)
    o = (o.float() * 2.0**120).to(torch.bfloat16)
    _check(o, dataclasses.replace(w, wo_a_scale=torch.full_like(w.wo_a_scale, 2.0**-127)))


@pytest.mark.parametrize(
    ("kernel", "params"),
    [
        ("o_proj.wo_a", {"splits": 1}),
        ("o_proj.wo_a", {"splits": 2, "block_n": 16}),
        ("o_proj.wo_b", {"splits": 1}),
        ("o_proj.wo_b", {"splits": 2, "block_n": 32}),
    ],
)
def test_split_and_unsplit_agree(kernel: str, params: dict) -> None:
    """Every K split and column tile against the unsplit launches, and each against the reference."""
    o, w = _inputs(WIDE, 5, seed=11)
    with tuning.forced("o_proj.wo_a", {"splits": 1}), tuning.forced("o_proj.wo_b", {"splits": 1}):
        unsplit = dsv4.o_proj(o, w, backend="triton").y
    with tuning.forced(kernel, params):
        got = _check(o, w)
    assert compare("o_proj", {"y": got}, {"y": unsplit})


def test_uneven_slices_and_groups_across_blocks() -> None:
    """OL=192: column tiles of 64 (three per group), the second 128-block of r straddles the groups, and
    wo_b's three 128-blocks split in two slices of 1 and 2 blocks."""
    o, w = _inputs(dataclasses.replace(TINY, o_lora_rank=192), 3, seed=13)
    _check(o, w)
    with tuning.forced("o_proj.wo_b", {"splits": 2}):
        _check(o, w)


def test_each_column_tile_takes_its_own_row_of_weight_scales() -> None:
    """wo_a's rows of 128x128 scale blocks told apart (row i times 2^i; the synthetic scales are one value
    a matrix): at OL=192 a group's third column tile lies in another block row than its first, and the
    second group starts inside a block row."""
    o, w = _inputs(dataclasses.replace(TINY, o_lora_rank=192), 3, seed=13)
    rows = torch.arange(w.wo_a_scale.shape[0], device=w.wo_a_scale.device, dtype=torch.float32)
    assert rows.numel() == 3
    _check(o, dataclasses.replace(w, wo_a_scale=w.wo_a_scale * (2.0**rows)[:, None]))


@pytest.mark.parametrize(
    ("heads", "groups", "splits"), [(4, 1, 3), (6, 2, 2)], ids=["4-steps-in-3-slices", "3-steps-in-2-slices"]
)
def test_wo_a_slices_of_uneven_length_cover_every_k_step(heads: int, groups: int, splits: int) -> None:
    """``wo_a``'s reduction axis (HG*HD: four 128-steps for one group of 4 heads, three for groups of 3)
    in slices of uneven length (1, 1, 2 steps; 1, 2): every step is in exactly one slice."""
    cfg = dataclasses.replace(WIDE, num_attention_heads=heads, o_groups=groups)
    o, w = _inputs(cfg, 3, seed=23)
    assert (w.wo_a.shape[1] // 128) % splits != 0, "the slices are of uneven length"
    with tuning.forced("o_proj.wo_a", {"splits": splits}):
        _check(o, w)


@pytest.mark.parametrize(("groups", "rank"), [(3, 64), (0, 64), (2, 0)])
def test_synthetic_o_proj_refuses_groups_that_cannot_split_the_heads(groups: int, rank: int) -> None:
    """A group holds ``H/G`` whole heads (attention spec §6): 3 groups of 4 heads, no group or a rank of 0
    cannot size ``wo_a``, a ``ValueError`` naming ``cfg`` (not weights of 1 head a group)."""
    cfg = dataclasses.replace(TINY, num_attention_heads=4, o_groups=groups, o_lora_rank=rank)
    with pytest.raises(ValueError, match="cfg: .* needs o_groups >= 1 dividing H=4"):
        synthetic_o_proj(cfg)


def test_split_counters_of_a_grid_that_is_not_square() -> None:
    """``wo_b`` in two slices over 4 column tiles (64 wide) x 2 token tiles (T=130): each tile has its own
    split counter (a counter indexed as if the grid were square would be shared by two tiles, and the
    second tile's arrival would finish the first before its slices are in)."""
    o, w = _inputs(WIDE, 130, seed=29)
    with tuning.forced("o_proj.wo_b", {"splits": 2, "block_n": 64}):
        _check(o, w)


def test_more_output_tiles_than_sms_run_in_one_slice() -> None:
    """A prefill's ``wo_b``: 16 column tiles (16 wide) x 9 token tiles (T=1030) are more programs than an
    H100 has SMs, so the default split is one slice (not none): every tile of ``y`` is computed."""
    o, w = _inputs(WIDE, 1030, seed=31)
    with tuning.forced("o_proj.wo_b", {"block_n": 16}):
        _check(o, w)


@pytest.mark.parametrize("t", [5, 130])
def test_split_counters_independent_of_program_order(t: int) -> None:
    """The ``wo_a`` and ``wo_b`` K-slices in any order of their programs: whichever slice of a tile counts
    last adds all of them in slice order, so the bits are those of grid order (where the last slice is
    always the last to come); under the interpreter, shuffled orders; T=130: two M-tiles' counters."""
    o, w = _inputs(WIDE, t, seed=17)
    with tuning.forced("o_proj.wo_a", {"splits": 2}), tuning.forced("o_proj.wo_b", {"splits": 2}):
        want = _check(o, w)
        for order in program_orders()[1:]:
            with in_order(order):
                assert bit_identical(dsv4.o_proj(o, w, backend="triton").y, want, f"y (order {order})")


def test_three_slices_are_summed_in_slice_order_in_any_program_order() -> None:
    """OL=192 (K=384) with wo_b in three slices, whose sum's order shows in its bits (two fp32 values add
    alike either way round, three may not): whichever slice of a tile counts last adds slice 0, then 1,
    then 2. On random inputs another order moves an fp32 sum by an ulp, which the bf16 ``y`` seldom
    shows, so here slices 0 and 1 cancel exactly (r's K block 1 repeats block 0, against wo_b codes of
    the opposite sign) and slice 2 is 2^-20 of their size: in slice order ``(s0 + s1) + s2`` is ``s2``
    exactly, the ``y`` of the same inputs with wo_b's blocks 0 and 1 zeroed, in every program order;
    adding ``s2`` to either first would round most of it away."""
    cfg = dataclasses.replace(TINY, o_lora_rank=192)
    o, w = _inputs(cfg, 5, seed=19)
    o[:, 2:] = o[:, :2]  # group 1's heads are group 0's
    wo_a, wo_a_scale = w.wo_a.clone(), w.wo_a_scale.clone()
    wo_a[128:256], wo_a_scale[1] = wo_a[:128], wo_a_scale[0]  # r[:, 128:256] (both groups) repeats r[:, :128]
    codes, wo_b_scale = w.wo_b.view(torch.uint8).clone(), w.wo_b_scale.clone()
    codes[:, 128:256], wo_b_scale[:, 1] = codes[:, :128] ^ 0x80, wo_b_scale[:, 0]  # the sign bit flipped
    wo_b_scale[:, 2] *= 2.0**-20
    cancelling = dsv4.OProjWeights(wo_a, wo_a_scale, codes.view(torch.float8_e4m3fn), wo_b_scale)
    codes = codes.clone()
    codes[:, :256] = 0
    alone = dsv4.OProjWeights(wo_a, wo_a_scale, codes.view(torch.float8_e4m3fn), wo_b_scale)
    with tuning.forced("o_proj.wo_b", {"splits": 3}):
        want = _check(o, alone)
        ws = Workspace()
        assert bit_identical(fused_o_proj(o, alone, ws=ws).y, want)
        assert ws._buffers["o_proj.y_part"].shape[0] == 3, "wo_b ran in three slices"
        for order in program_orders():
            with in_order(order):
                assert bit_identical(dsv4.o_proj(o, cancelling, backend="triton").y, want, f"y (order {order})")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_o_spoils_only_its_token(bad: float) -> None:
    """A NaN or an infinity in one token's o: its group's r blocks quantize to NaN codes with the NaN
    scale, so that token's whole y row is NaN (as the reference); the other tokens are untouched."""
    o, w = _inputs(WIDE, 5, seed=3)
    o[2, 3, 17] = bad  # token 2, a head of group 1
    got = dsv4.o_proj(o, w, backend="triton").y
    expected = dsv4.o_proj(o, w, backend="reference").y
    assert got[2].isnan().all() and expected[2].isnan().all()
    keep = [0, 1, 3, 4]
    assert not got[keep].isnan().any() and compare("o_proj", {"y": got[keep]}, {"y": expected[keep]})


def test_workspace_reused_and_out() -> None:
    """Scratch from one workspace across calls (the split counters are zeroed each step): the second
    call gives the same bits; ``out`` is written and returned."""
    o, w = _inputs(WIDE, 3, seed=5)
    ws = Workspace()
    first = fused_o_proj(o, w, ws=ws).y.clone()
    buffers = [t.data_ptr() for t in ws.tensors()]
    out = dsv4.OProjOut(torch.full_like(first, float("nan")))
    assert fused_o_proj(o, w, out=out, ws=ws) is out
    assert bit_identical(out.y, first) and [t.data_ptr() for t in ws.tensors()] == buffers
    assert ws.tensors()[-2].numel() == 2 and bit_identical(dsv4.o_proj(o, w, backend="triton").y, first)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="counts the interpreter's traffic")
def test_each_weight_byte_is_read_once() -> None:
    """Every launch asks for exactly what its layout says (``WIDE``, T=3: 2 column tiles x 2 K-slices in
    each GEMM): each FP8 weight byte and its scale once, ``o`` once (a column tile is a whole group), the K-slices
    written once and read back once, the split counters once, ``y`` once."""
    t = 3
    o, w = _inputs(WIDE, t, seed=2)
    n, inner = w.wo_a.shape
    d, k = w.wo_b.shape
    with count_traffic() as log:
        dsv4.o_proj(o, w, backend="triton")
    wo_a, quant, wo_b = log.launches
    assert (wo_a.kernel, wo_a.grid, quant.grid, wo_b.grid) == ("_wo_a_kernel", (2, 1, 2), (2, 1, 1), (2, 1, 2))
    steps_a, steps_b = inner // 128, k // 128  # scale loads: one per tile and 128-step of K
    assert wo_a.load_bytes == w.wo_a.numel() + 2 * steps_a * 4 + o.numel() * 2  # each tile its group's half of o
    assert wo_a.store_bytes == 2 * t * n * 4
    assert quant.load_bytes == 2 * t * n * 4
    assert quant.store_bytes == t * n + t * (n // 128) * 4 + 2 * 4  # codes, exponents, 2 counters zeroed
    slices = 2 * t * d * 4
    activations = 2 * (t * k + t * steps_b * 4)  # codes and exponents once per column tile
    counter = 4 * 4  # one int32 atomic per program: 4 B loaded and 4 B stored
    assert wo_b.load_bytes == w.wo_b.numel() + 2 * steps_b * 4 + activations + counter + slices
    assert wo_b.store_bytes == slices + counter + t * d * 2


def test_one_slice_quantizes_in_the_wo_a_launch() -> None:
    """One K-slice and 128-column tiles (``WIDE``: OL 128): each ``wo_a`` program's tile is a whole
    activation block, rounded and quantized in its epilogue, so the quant launch is skipped; ``y`` equals
    the three-launch path's (64-column tiles, one slice) and the reference's."""
    o, w = _inputs(WIDE, 5, seed=17)
    with tuning.forced("o_proj.wo_a", {"splits": 1, "block_n": 64}):
        three = _check(o, w)
    with tuning.forced("o_proj.wo_a", {"splits": 1}):
        two = _check(o, w)
    assert bit_identical(two, three)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="counts the interpreter's traffic")
def test_one_slice_writes_no_partials() -> None:
    """The two-launch path's ``wo_a`` stores the activation codes, exponents and zeroed counters, no fp32
    slices."""
    t = 5
    o, w = _inputs(WIDE, t, seed=17)
    n = w.wo_a.shape[0]
    with tuning.forced("o_proj.wo_a", {"splits": 1}), count_traffic() as log:
        dsv4.o_proj(o, w, backend="triton")
    assert [launch.kernel for launch in log.launches] == ["_wo_a_kernel", "_wo_b_kernel"]
    assert log.launches[0].store_bytes == t * n + t * (n // 128) * 4 + 2 * 4  # codes, exponents, 2 counters


@FULL
def test_flash_dims() -> None:
    """D 4096, H 64, HD 512, G 8, OL 1024 at T=2 (flash decode of one sequence pair)."""
    _check(*_inputs(dsv4.get_config("flash"), 2, seed=1))

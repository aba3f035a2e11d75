"""``qkv_proj_rope`` with ``backend="triton"`` against the reference (spec §3), spec §6 tolerances.

Without a GPU the kernels run through Triton's interpreter, so full-size dims appear in one default
case (decode) and one ``full`` case (prefill); the ``tiny`` preset and dims of no preset carry the
sweep over token counts and tilings.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
import triton
import triton.language as tl

import dsv4
from conftest import BACKENDS, DEVICE, FULL, INTERPRETER_TRAFFIC
from dsv4.bench.interp_traffic import count_traffic
from dsv4.harness.golden import compare, ratio_allclose, tolerance
from dsv4.kernels import tuning
from dsv4.kernels.epilogue import rms_inv_of_sumsq, rms_scale
from dsv4.kernels.interpreter import interpreted
from dsv4.kernels.launch import H100_SMS
from dsv4.kernels.projection import projection_tiles
from dsv4.kernels.qkv_proj_rope import Q_HEADS_TUNING, launch_q_heads, pair_words, park_shape, q_heads_tiles
from dsv4.kernels.split_k import BLOCK_K
from dsv4.model.config import DeepSeekV4Config, get_config
from dsv4.model.rope import RopeTable, rope_table
from dsv4.model.weights import AttnWeights, synthetic_activations, synthetic_weights
from dsv4.reference.common import rms_norm
from launches import kernels_of
from program_order import in_order, program_orders

TINY = get_config("tiny")
# Dims of no preset: odd head count, a q LoRA rank that is not a power of two (as in ``pro``) and a
# hidden size that is not one either; the kernels must take every dimension from the tensors.
ODD = TINY.replace(name="odd", hidden_size=384, num_attention_heads=3, q_lora_rank=192)
# Too many heads for half-head pairs in one wave of SMs at T > 128 (2 M-tiles x 2 x 34 > 132): one
# program per head and 64-token tiles, the q heads' plan of a full-size prefill chunk.
MANY_HEADS = TINY.replace(name="many-heads", num_attention_heads=34)
# Half heads of 128 columns, the RoPE ones the last 64 of the second (at tiny, a half is all one or the other).
HD256 = TINY.replace(name="hd256", head_dim=256)


def decode_positions(t: int, table: int, seed: int) -> torch.Tensor:
    """Scattered positions, as a decode batch of sequences at different lengths has, including the
    last row of the table and the first."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, table, (t,), generator=g)
    pos[0] = table - 1
    if t > 2:
        pos[t // 2] = 0
        pos[-1] = table - 2
    return pos


DIFFER_MAX = 0.02  # of the bf16 outputs of a check that may differ by a rounding step


def qkv_inputs(
    cfg: DeepSeekV4Config, positions: torch.Tensor, table: int, seed: int, outliers: int = 0
) -> tuple[torch.Tensor, AttnWeights, torch.Tensor, RopeTable]:
    """``(x, w, positions, rope)`` on the test device: weights from ``seed``, activations from ``seed + 1``."""
    w = synthetic_weights(cfg, seed=seed).attn.to(DEVICE)
    x = synthetic_activations((positions.numel(), cfg.hidden_size), seed=seed + 1, outliers=outliers, device=DEVICE)
    rope = rope_table(cfg, "compressed", max_position=table, device=DEVICE)
    return x, w, positions.to(DEVICE), rope


def check(cfg: DeepSeekV4Config, positions: torch.Tensor, table: int, seed: int, outliers: int) -> None:
    """Run both backends on the same seeded inputs and hold the Triton outputs to spec §6."""
    x, w, positions, rope = qkv_inputs(cfg, positions, table, seed, outliers)
    expected = dsv4.qkv_proj_rope(x, w, positions, rope, backend="reference")
    out = dsv4.qkv_proj_rope(x, w, positions, rope, backend="triton")
    report = compare("qkv_proj_rope", out._asdict(), expected._asdict())
    assert report, str(report)
    # Stricter than §6, which admits one bf16 step everywhere: both sides round fp32 to bf16 to
    # nearest even, so only values next to a rounding boundary may come out differently. Both sides'
    # fp32 sums (x @ W over D, on a GPU in the order of cuBLAS on one side and the tiles on the other)
    # put a few percent at most there: 1.10% of q on an H100 for the 160-token demo chunk below.
    for name in ("q", "kv"):
        differ = (getattr(out, name) != getattr(expected, name)).float().mean().item()
        assert differ < DIFFER_MAX, f"{name}: {differ:.2%} of the bf16 values differ from the reference"


def test_the_outlier_activations_these_cases_ask_for_are_there() -> None:
    """``synthetic_activations(outliers=k)``: the same draw as without, k entries a row (fewer where two
    picks coincide) 20x larger before the rows are RMS-normalized; the cases above rely on them to reach
    the large-activation channels."""
    plain = dsv4.synthetic_activations((6, 256), seed=3).double()
    spiky = dsv4.synthetic_activations((6, 256), seed=3, outliers=4).double()
    for row in range(6):
        torch.testing.assert_close(spiky[row].pow(2).mean(), torch.tensor(1.0, dtype=torch.float64), rtol=0.02, atol=0)
        ratio = spiky[row] / plain[row]
        calm = ratio.median()
        big = (ratio / calm - 20).abs() < 0.5
        # 4 picks a row, fewer where two coincide; none 20x larger means the outliers were not scaled
        assert 1 <= int(big.sum()) <= 4, row
        torch.testing.assert_close(ratio[~big], torch.full_like(ratio[~big], float(calm)), rtol=0.01, atol=0)


@pytest.mark.parametrize("outliers", [0, 4], ids=["uniform", "outliers4"])
@pytest.mark.parametrize("t", [1, 2, 3, 17, 64, 128, 130])
def test_tiny_token_counts(t: int, outliers: int) -> None:
    table = 1024
    positions = decode_positions(t, table, seed=t)
    if t % 2:  # both accepted position dtypes
        positions = positions.to(torch.int32)
    check(TINY, positions, table, seed=t, outliers=outliers)


@pytest.mark.parametrize("t", [1, 33])
def test_dims_of_no_preset(t: int) -> None:
    check(ODD, decode_positions(t, 512, seed=5), 512, seed=5, outliers=2)


@pytest.mark.parametrize("t", [1, 3, 200])
def test_a_kv_width_with_a_smaller_tile_than_the_q_lora_rank(t: int) -> None:
    """HD 64 (R 32) beside QL 128: the projection's column tiles divide both widths (64 columns), so no
    tile straddles ``wq_a`` and ``wkv`` and every kv column is computed; at T=200, in two token tiles of
    128 rows, tiles of another width than their rows (the second tile's rows past 64 of it are its own)."""
    check(TINY.replace(name="hd64", head_dim=64, qk_rope_head_dim=32), decode_positions(t, 256, seed=3), 256, 3, 0)


@pytest.mark.parametrize("t", [2, 4])
def test_hidden_size_not_a_multiple_of_the_k_step(t: int) -> None:
    """hidden_size 208: the projection's reduction over D ends in a 16-wide partial block of its
    64-wide steps, masked and still summed, in whichever K-slice holds it."""
    check(TINY.replace(name="d208", hidden_size=208), decode_positions(t, 256, seed=3), 256, seed=3, outliers=2)


def test_tiny_prefill_from_a_block_boundary() -> None:
    """A prompt chunk continuing at position 128 and running to the end of the table."""
    check(TINY, torch.arange(128, 256 + 64), 256 + 64, seed=11, outliers=2)


def test_demo_decode() -> None:
    """Full-size dims (demo = flash dims, 4096 positions) at the deployment decode shape T=128."""
    cfg = get_config("demo")
    table = cfg.max_position_embeddings
    check(cfg, decode_positions(128, table, seed=1), table, seed=1, outliers=0)


def test_unpaired_q_heads_in_64_token_tiles() -> None:
    """A 130-token prompt chunk with 34 heads: two M-tiles in the projection (128 + 2 rows) and three
    in the q heads (64 + 64 + 2), the last partly masked, one program per head (the tiling of
    ``test_demo_prefill``, at tiny dims)."""
    assert q_heads_tiles(130, MANY_HEADS.num_attention_heads, H100_SMS) == (64, False)
    check(MANY_HEADS, torch.arange(1000, 1130), 1024 + 256, seed=2, outliers=4)


@FULL
def test_demo_prefill() -> None:
    """Full-size dims, a 160-token prompt chunk at positions 1000.. with outlier activations: two
    M-tiles in the projection (128 + 32 rows) and three in the q heads (64 + 64 + 32), the last
    partly masked."""
    cfg = get_config("demo")
    check(cfg, torch.arange(1000, 1160), cfg.max_position_embeddings, seed=2, outliers=4)


@pytest.mark.parametrize("t", [3, 64])
def test_repeatable_bit_for_bit(t: int) -> None:
    """The split-K partial sums are added in a fixed order and a head's halves combine their sums of
    squares in a fixed order: two runs agree exactly (both T split D into every one of its K blocks)."""
    x, w, positions, rope = qkv_inputs(TINY, decode_positions(t, 256, seed=3), 256, seed=3, outliers=4)
    splits = projection_tiles(t, TINY.hidden_size, TINY.q_lora_rank, TINY.head_dim, H100_SMS).splits
    assert splits == TINY.hidden_size // BLOCK_K
    first = dsv4.qkv_proj_rope(x, w, positions, rope, backend="triton")
    for _ in range(2):
        again = dsv4.qkv_proj_rope(x, w, positions, rope, backend="triton")
        for name, a, b in zip(first._fields, first, again, strict=True):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("cfg", [TINY, HD256], ids=["tiny", "hd256"])
@pytest.mark.parametrize("huge", [False, True], ids=["plain", "huge-half-heads"])
@pytest.mark.parametrize("t", [5, 130])
def test_paired_halves_compute_the_same_bits(t: int, huge: bool, cfg: DeepSeekV4Config) -> None:
    """The GPU's paired q-heads path (a program per half head), both ways a pair can meet. (1) The
    exchange words as the rows kernel leaves them (-1) and no wait (``spins=0``): a pair's first half
    parks its values and leaves, and the second finishes both halves (under the interpreter, which runs
    programs one at a time, every pair; compiled, every pair whose partner had not arrived). (2) Every
    pair's arrival word at "one half waits" and the sums already published (as (1) leaves them): each
    half finds its partner's sums and finishes its own. Both give the one-program-per-head path's ``q``
    bit for bit, every element written, in any order of the programs (under the interpreter: grid order,
    where a pair's first half is half 0, and shuffled orders, where it may be half 1). ``huge``: half
    heads whose squares overflow fp32, so the pairs swap scaled sums. ``hd256``: a half of 128 columns
    whose last 64 are the RoPE ones (tiny's halves are all NOPE or all RoPE)."""
    x, w, positions, rope = qkv_inputs(cfg, decode_positions(t, 256, seed=7), 256, seed=7, outliers=2)
    if huge:
        w = _huge_half_heads(w)
    expected = dsv4.qkv_proj_rope(x, w, positions, rope, backend="triton")
    h, hd = cfg.num_attention_heads, expected.q.shape[2]
    block_m, paired = q_heads_tiles(t, h, H100_SMS)
    assert paired
    words = torch.full((pair_words(t, h),), -1, dtype=torch.int64, device=DEVICE)
    park = torch.full(park_shape(t, h, hd, block_m), float("nan"), device=DEVICE)
    arrivals = words[2 * h * t : 2 * h * t + triton.cdiv(t, block_m) * h]
    for order, meeting in itertools.product(program_orders(), ("first half parks", "partner waits")):
        words.fill_(-1)
        if meeting == "partner waits":
            # the sums as the first way left them, and every pair's word at "one half waits"
            launch_q_heads(expected.qr, expected.qr_scale, w, positions, rope, cfg.rms_norm_eps,
                           torch.empty_like(expected.q), words, park, block_m, True, spins=0)  # fmt: skip
            arrivals.fill_(1)
        q = torch.full_like(expected.q, float("nan"))
        with in_order(order):
            launch_q_heads(expected.qr, expected.qr_scale, w, positions, rope, cfg.rms_norm_eps, q, words, park,
                           block_m, True, spins=0 if meeting == "first half parks" else None)  # fmt: skip
        assert torch.equal(q, expected.q), (meeting, order)
        if meeting == "first half parks" and interpreted():
            assert bool((arrivals == 3).all()), "every first half handed its values over"
        else:  # compiled, the halves of a pair run at once and mostly meet (2); any may have parked (3)
            assert set(arrivals.tolist()) <= {2, 3}, meeting


@pytest.mark.parametrize("tokens", [16, 32])
def test_few_heads_in_smaller_m_tiles(tokens: int) -> None:
    """The ``tokens`` candidate, offered where few heads leave most SMs idle (a tensor-parallel rank): the
    pairs in M-tiles of fewer tokens, at T=40 three of 16 (the last holding 8 rows) or two of 32. The
    paired path at those tiles (its first halves handing over, ``spins=0``) and the op with the candidate
    give the default's ``q``: bit for bit under the interpreter, where a row's values do not depend on
    its tile; compiled within spec §6, since a half's sums are reduced over its tile's layout."""
    t, h, hd = 40, TINY.num_attention_heads, TINY.head_dim
    for bucket, offered in (({"T": 64, "H": h, "QL": 128}, True), ({"T": 128, "H": 64, "QL": 1024}, False)):
        assert (tokens in {c.tokens for c in Q_HEADS_TUNING.candidate_configs(bucket)}) == offered, bucket
    x, w, positions, rope = qkv_inputs(TINY, decode_positions(t, 256, seed=9), 256, seed=9, outliers=2)
    expected = dsv4.qkv_proj_rope(x, w, positions, rope, backend="triton")
    assert q_heads_tiles(t, h, H100_SMS) == (64, True)
    block_m, paired = q_heads_tiles(t, h, H100_SMS, tokens=tokens)
    assert (block_m, paired) == (tokens, True)
    words = torch.full((pair_words(t, h),), -1, dtype=torch.int64, device=DEVICE)
    park = torch.full(park_shape(t, h, hd, block_m), float("nan"), device=DEVICE)
    q = torch.full_like(expected.q, float("nan"))
    launch_q_heads(expected.qr, expected.qr_scale, w, positions, rope, TINY.rms_norm_eps, q, words, park, block_m,
                   True, spins=0)  # fmt: skip
    with tuning.forced("qkv.q_heads", {"tokens": tokens}):
        again = dsv4.qkv_proj_rope(x, w, positions, rope, backend="triton")
    for got in (q, again.q):
        if interpreted():
            assert torch.equal(got, expected.q)
        t_q = tolerance("q")
        check = ratio_allclose(got, expected.q, t_q.atol, t_q.rtol, t_q.max_error_ratio, "q")
        assert check, check.detail
    for name in ("kv", "qr", "qr_scale"):
        assert torch.equal(getattr(again, name), getattr(expected, name)), name


@pytest.mark.parametrize(
    ("cfg", "t", "splits"), [(TINY, 1, 4), (ODD, 5, 4), (TINY, 40, 2), (TINY, 17, 8)], ids=["1", "odd-5", "40", "17"]
)
def test_q_heads_with_ql_split_over_programs(cfg: DeepSeekV4Config, t: int, splits: int) -> None:
    """The ``splits`` candidate (``q_heads_split.py``), offered for few heads at a few tokens: QL in
    slices of int32 partial sums, then a launch that finishes each head. With 32-wide K steps tiny's QL
    (128) is 4 steps, so 8 slices are clipped to 4, and ``ODD``'s (192, 3 heads) is 6, in uneven slices
    (1 + 2 + 1 + 2); T=40 is three M-tiles, the last partly masked. The default's ``q`` bit for bit under
    the interpreter (the same int32 sums and epilogue), compiled within spec §6 (its sums of squares may
    reduce over another layout); ``kv``, ``qr`` and ``qr_scale`` are untouched."""
    x, w, positions, rope = qkv_inputs(cfg, decode_positions(t, 256, seed=t), 256, seed=t, outliers=2)
    expected = dsv4.qkv_proj_rope(x, w, positions, rope, backend="triton")
    with tuning.forced("qkv.q_heads", {"splits": splits, "block_k": 32}):
        got = dsv4.qkv_proj_rope(x, w, positions, rope, backend="triton")
        launched = kernels_of(lambda: dsv4.qkv_proj_rope(x, w, positions, rope, backend="triton"))
    assert launched == ["_split_k_projection_kernel", "_qr_kv_rows_kernel", "_q_slices_kernel", "_q_finish_kernel"]
    if interpreted():
        assert torch.equal(got.q, expected.q)
    t_q = tolerance("q")
    check = ratio_allclose(got.q, expected.q, t_q.atol, t_q.rtol, t_q.max_error_ratio, "q")
    assert check, check.detail
    for name in ("kv", "qr", "qr_scale"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
    report = compare("qkv_proj_rope", got._asdict(), dsv4.qkv_proj_rope(x, w, positions, rope)._asdict())
    assert report, str(report)


@pytest.mark.parametrize("t", [5, 130])
def test_pairs_in_many_waves_compute_the_same_bits(t: int) -> None:
    """The ``pair_waves`` "many" plan (prefill): a program per half head at any T, in M-tiles of up to 128
    tokens (T=130: two, the second holding 2 rows), a pair's halves neighbours in the grid. (1) Nothing
    published and no wait (``spins=0``): a half that finds no sums of its partner computes them itself,
    then its own values again (under the interpreter, every first half of a pair; compiled, a half
    whose partner had not started). (2) Every sum already published: each half takes its partner's.
    Both give the one-program-per-head ``q`` bit for bit, in any order of the programs (shuffled under
    the interpreter, so that half 1 may be the one that computes its partner's sums), and so does the
    op with the candidate."""
    x, w, positions, rope = qkv_inputs(TINY, decode_positions(t, 256, seed=8), 256, seed=8, outliers=2)
    expected = dsv4.qkv_proj_rope(x, w, positions, rope, backend="triton")
    h = TINY.num_attention_heads
    block_m, paired = q_heads_tiles(t, h, 1, many_waves=True)  # pairs even where one wave holds one program
    assert paired and block_m == min(128, triton.next_power_of_2(max(t, 16)))
    cfg = tuning.Config({**Q_HEADS_TUNING.default, "pair_waves": "many", "num_stages": 2})
    words = torch.full((pair_words(t, h),), -1, dtype=torch.int64, device=DEVICE)
    sums = words[: 2 * h * t].view(h, 2, t)
    for order in program_orders():
        words.fill_(-1)
        for published in (False, True):
            q = torch.full_like(expected.q, float("nan"))
            with in_order(order):
                launch_q_heads(expected.qr, expected.qr_scale, w, positions, rope, TINY.rms_norm_eps, q, words,
                               torch.empty(1, device=DEVICE), block_m, True, cfg, spins=0)  # fmt: skip
            assert torch.equal(q, expected.q), f"published={published}, order {order}"
            assert bool((sums >= 0).all()), "every half published its sums"
    with tuning.forced("qkv.q_heads", {"pair_waves": "many", "num_stages": 2}):
        again = dsv4.qkv_proj_rope(x, w, positions, rope, backend="triton")
    for name, a, b in zip(expected._fields, expected, again, strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("t", [4, 5])
def test_rows_kernel_resets_the_whole_exchange_buffer(t: int) -> None:
    """A reused workspace's exchange buffer holds stale words (here a garbage pattern, positive as a
    published word is): the rows kernel sets every one of a token's ``3H`` words back to -1 before the
    "many" plan's pairs read them. The halves' sums end published, the arrival words that plan never
    writes stay -1, and the outputs are the one-program-per-head plan's bit for bit."""
    from dsv4.kernels.qkv_proj_rope import qkv_proj_rope
    from dsv4.kernels.workspace import Workspace

    x, w, positions, rope = qkv_inputs(TINY, decode_positions(t, 256, seed=t), 256, seed=t, outliers=2)
    expected = dsv4.qkv_proj_rope(x, w, positions, rope, backend="triton")
    h = TINY.num_attention_heads
    ws = Workspace()
    words = ws.empty("qkv.sumsq", (pair_words(t, h),), torch.int64, DEVICE)
    words.fill_(0x7F7F7F7F7F7F7F7F)
    with tuning.forced("qkv.q_heads", {"pair_waves": "many", "num_stages": 2}):
        got = qkv_proj_rope(x, w, positions, rope, TINY.rms_norm_eps, ws=ws)
    assert ws._buffers["qkv.sumsq"] is words, "the paired plan ran on the pre-filled buffer"
    assert bool((words[: 2 * h * t] != 0x7F7F7F7F7F7F7F7F).all() and (words[: 2 * h * t] >= 0).all())
    assert bool((words[2 * h * t :] == -1).all()), "every arrival word reset"
    for name, a, b in zip(expected._fields, expected, got, strict=True):
        assert torch.equal(a, b), name


_HELD_SMS = """
import torch, triton, triton.language as tl, dsv4
from dsv4.harness.cases import make_case
from dsv4.model.config import get_config

@triton.jit
def hold(flag_ptr):  # keeps its SM until the flag is set
    seen = tl.load(flag_ptr, volatile=True)
    while seen == 0:
        seen = tl.load(flag_ptr, volatile=True)

@triton.jit
def release(flag_ptr):
    tl.store(flag_ptr, 1)

a = make_case(get_config("flash"), "qkv_proj_rope", "decode", 0, device="cuda").args
alone = dsv4.qkv_proj_rope(a["x"], a["w"], a["positions"], a["rope"], backend="triton")
torch.cuda.synchronize()
flag = torch.zeros(1, dtype=torch.int32, device="cuda")
held, mine = torch.cuda.Stream(), torch.cuda.Stream()
mine.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(held):
    hold[(48,)](flag, num_warps=1)
with torch.cuda.stream(mine):
    beside = dsv4.qkv_proj_rope(a["x"], a["w"], a["positions"], a["rope"], backend="triton")
    release[(1,)](flag)
torch.cuda.synchronize()
assert all(torch.equal(x, y) for x, y in zip(beside, alone)), "not the same bits"
print("DONE")
"""


@pytest.mark.skipif(DEVICE.type != "cuda", reason="kernels on two streams at once need a GPU")
def test_paired_heads_finish_while_other_kernels_hold_sms(tmp_path) -> None:
    """At flash decode the q heads run as 128 paired programs, each a whole SM's registers. With 48
    programs of another stream's kernel holding SMs until ``qkv_proj_rope`` is done (a kernel that
    waits for a flag set after it), fewer than 128 SMs are left: pairs that cannot meet hand over
    (``_meet_partner``) and the op ends, with the bits of a run alone. A pair waiting without end
    would hang: the child process is given a time limit."""
    from subprocesses import run_python

    script = tmp_path / "held_sms.py"  # a file: Triton reads a @triton.jit function's source from it
    script.write_text(_HELD_SMS)
    proc = run_python([str(script)], timeout=120)
    assert proc.returncode == 0 and "DONE" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]


@INTERPRETER_TRAFFIC
def test_whole_head_programs_read_qr_once() -> None:
    """A q-head program that computes both halves of its head reads each ``qr`` tile once for both
    (the interpreter's plan; on a GPU the plan past one wave of pairs): the launch asks for ``wq_b``
    and its scales once, per head program ``qr``, ``qr_scale``, the positions and the cos/sin rows once,
    and writes ``q`` once: not a byte more."""
    t = 17
    x, w, positions, rope = qkv_inputs(TINY, decode_positions(t, 256, seed=4), 256, seed=4)
    h, ql, r = TINY.num_attention_heads, TINY.q_lora_rank, rope.rope_dim
    with count_traffic() as log:
        out = dsv4.qkv_proj_rope(x, w, positions, rope, backend="triton")
    (launch,) = [v for v in log.launches if v.kernel == "_q_heads_kernel"]
    assert launch.grid == (1, h, 1)  # one 32-token tile of whole heads
    per_head = t * ql + t * 4 + t * positions.element_size() + 2 * t * (r // 2) * 4
    assert launch.load_bytes == w.wq_b.numel() + w.wq_b_scale.numel() * 4 + h * per_head
    assert launch.store_bytes == out.q.numel() * 2


# --- RMSNorm of very large finite values (spec §2, any finite input) -------------------------------

BF16_MAX = torch.finfo(torch.bfloat16).max


@triton.jit
def _rms_rows_kernel(v_ptr, out_ptr, plain_ptr, eps, N: tl.constexpr):
    rows = tl.arange(0, 8)[:, None]
    cols = tl.arange(0, N)[None, :]
    v = tl.load(v_ptr + rows * N + cols)
    scale, inv = rms_scale(v, N, eps)
    tl.store(out_ptr + rows * N + cols, (v * scale) * inv)
    tl.store(plain_ptr + rows * N + cols, v * rms_inv_of_sumsq(tl.sum(v * v, axis=1), N, eps))  # unguarded


def _spec_rms(v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The spec's RMSNorm in float64 (no overflow for any fp32 input)."""
    v = v.double()
    return v / torch.sqrt(v.square().mean(-1, keepdim=True) + eps)


def _large_rows(n: int) -> torch.Tensor:
    """8 rows: values of 1e30; near the bf16 maximum; one near-maximum entry among unit values; amax
    2^48 (the first scaled) and just below it (the plain formula); the fp32 maximum; two ordinary rows."""
    g = torch.Generator().manual_seed(3)
    v = torch.randn(8, n, generator=g)
    v[0] *= 1e30
    v[1] = v[1].sign() * BF16_MAX * (1 - torch.rand(n, generator=g) / 64)
    v[2, 5] = -BF16_MAX
    v[3] = v[3] / v[3].abs().max() * 2.0**48
    v[4] = v[4] / v[4].abs().max() * 2.0**48 * (1 - 2.0**-24)
    v[5, :3] = torch.finfo(torch.float32).max
    return v.to(DEVICE)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy: the unguarded formula's squares overflow
@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_of_large_finite_rows_is_the_spec_value(backend: str) -> None:
    """RMSNorm (every norm of both ops goes through one of these two helpers) of rows whose squares
    overflow fp32: the float64 value of the spec, to fp32 accuracy; ordinary rows and those below
    2^48 are bit for bit the unguarded formula's."""
    n = 64
    v = _large_rows(n)
    if backend == "reference":
        got = rms_norm(v, None, 1e-6)
        plain = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6)
    else:
        got, plain = torch.empty_like(v), torch.empty_like(v)
        _rms_rows_kernel[(1,)](v, got, plain, 1e-6, N=n)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), _spec_rms(v), rtol=4e-7, atol=1e-37)
    assert torch.equal(got[4:].view(torch.int32)[[0, 2, 3]], plain[4:].view(torch.int32)[[0, 2, 3]])
    assert not plain[:3].any() or not torch.isfinite(plain[:3]).all()  # premise: the plain formula fails


def _spec_qkv(x: torch.Tensor, w: AttnWeights, positions: torch.Tensor, rope: RopeTable, qr, qr_scale) -> dict:
    """Spec §3 in float64 from ``x`` (``q`` from the given ``qr``/``qr_scale``, as the backends' own)."""
    hd = w.wkv.shape[0]
    r = rope.rope_dim

    def rope64(u: torch.Tensor) -> torch.Tensor:
        cos, sin = rope.cos[positions].double(), rope.sin[positions].double()
        while cos.dim() < u.dim():
            cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        u0, u1 = u[..., 0::2], u[..., 1::2]
        return torch.stack((u0 * cos - u1 * sin, u0 * sin + u1 * cos), dim=-1).flatten(-2)

    x64 = x.double()
    c = _spec_rms(x64 @ w.wq_a.double().T) * w.gamma_cq.double()
    qp = (qr.double() @ w.wq_b.double().T) * qr_scale.double() * w.wq_b_scale.double()
    qn = _spec_rms(qp.view(x.shape[0], -1, hd))
    k = _spec_rms(x64 @ w.wkv.double().T) * w.gamma_ckv.double()
    qn[..., -r:], k[..., -r:] = rope64(qn[..., -r:]), rope64(k[..., -r:])
    return {"q": qn, "kv": k, "qr_scale": c.abs().amax(-1, keepdim=True).clamp_min(1e-4) / 127}


def _huge_half_heads(w: AttnWeights) -> AttnWeights:
    """``wq_b_scale`` times 1e25 on half 0 of head 0 and half 1 of head 1: those halves' squares
    overflow fp32, the other half of each head stays ordinary."""
    hd = w.wkv.shape[0]
    scale = w.wq_b_scale.clone()
    scale[: hd // 2] *= 1e25
    scale[hd + hd // 2 : 2 * hd] *= 1e25
    return dataclasses.replace(w, wq_b_scale=scale)


def _unevenly_scaled_halves(w: AttnWeights) -> AttnWeights:
    """``wq_b_scale`` of head 0 times 2^52 on half 0 and 2^46 on half 1: half 0's values reach about 2^53,
    past the ``2^48`` from which a row is scaled before squaring, half 1's about 2^47, below it, so the
    head's norm adds two sums of squares taken at different scales."""
    hd = w.wkv.shape[0]
    scale = w.wq_b_scale.clone()
    scale[: hd // 2] *= 2.0**52
    scale[hd // 2 : hd] *= 2.0**46
    return dataclasses.replace(w, wq_b_scale=scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("what", ["x-1e30", "huge-half-heads", "unevenly-scaled-halves"])
def test_very_large_finite_activations(backend: str, what: str) -> None:
    """x = 1e30 (the q-LoRA and kv norms' squares overflow fp32), q heads of 1e25 (the per-head norm's),
    or a head whose halves are scaled by different powers of two before squaring: ``q``, ``kv`` and
    ``qr_scale`` are the float64 spec's, finite, not zeros."""
    x, w, positions, rope = qkv_inputs(TINY, decode_positions(3, 64, seed=9), 64, seed=9)
    if what == "x-1e30":
        x = (x.float() * 1e30).to(torch.bfloat16)
    else:
        w = _huge_half_heads(w) if what == "huge-half-heads" else _unevenly_scaled_halves(w)
    out = dsv4.qkv_proj_rope(x, w, positions, rope, backend=backend)
    want = _spec_qkv(x, w, positions, rope, out.qr, out.qr_scale)
    for name, e in want.items():
        got = getattr(out, name)
        assert torch.isfinite(got.float()).all(), name
        t = tolerance(name)
        check = ratio_allclose(got.float(), e, t.atol, t.rtol, 0.0, name)
        assert check, f"{name}: {check.detail}"


def test_writes_into_out() -> None:
    """``out=`` buffers are filled in place (no copy through temporaries) and returned."""
    x, w, positions, rope = qkv_inputs(TINY, decode_positions(17, 256, seed=6), 256, seed=6)
    plain = dsv4.qkv_proj_rope(x, w, positions, rope, backend="triton")
    out = dsv4.QKV(*(torch.full_like(t, 7) for t in plain))
    pointers = [t.data_ptr() for t in out]
    assert dsv4.qkv_proj_rope(x, w, positions, rope, backend="triton", out=out) is out
    assert [t.data_ptr() for t in out] == pointers
    for name, a, b in zip(plain._fields, out, plain, strict=True):
        assert torch.equal(a, b), name


def test_flash_decode_tiles() -> None:
    """At flash decode (T=128) on an H100 every weight byte is read once (one M-tile in the projection
    and in the q heads), the projection's K split fills one wave of the SMs (132 programs: its 12
    column tiles x 11 K-slices) and the q heads pair up in one wave of SMs."""
    cfg = get_config("flash")
    t, d, ql, hd, h = 128, cfg.hidden_size, cfg.q_lora_rank, cfg.head_dim, cfg.num_attention_heads
    tiles = projection_tiles(t, d, ql, hd, H100_SMS)
    n_tiles, m_tiles, splits = tiles.grid(t, ql + hd)
    assert (n_tiles, m_tiles, splits) == (12, 1, 11)
    assert H100_SMS - n_tiles < n_tiles * m_tiles * splits <= H100_SMS
    assert q_heads_tiles(t, h, H100_SMS) == (128, True)
    assert q_heads_tiles(129, h, H100_SMS) == (64, False)  # two M-tiles of pairs would need 256 SMs
    assert q_heads_tiles(129, h, H100_SMS, many_waves=True) == (128, True)  # the pair_waves "many" plan
    assert q_heads_tiles(129, h, H100_SMS, pair=False, many_waves=True) == (64, False)


def test_shapes_the_kernels_do_not_take_are_named() -> None:
    """Dims the reference takes but the Triton tiles do not: a ValueError naming the weight, before any launch."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 64, generator=g).to(torch.bfloat16).to(DEVICE)
    rope = dsv4.rope_table(dsv4.get_config("tiny"), max_position=16, device=DEVICE)
    wq_b, wq_b_scale = dsv4.quantize_weight_int8(torch.randn(2 * 96, 48, generator=g))

    def weights(hd: int, ql: int, wq_b, wq_b_scale) -> dsv4.AttnWeights:
        return dsv4.AttnWeights(
            torch.randn(ql, 64, generator=g).to(torch.bfloat16), torch.ones(ql), wq_b, wq_b_scale,
            torch.randn(hd, 64, generator=g).to(torch.bfloat16), torch.ones(hd),
        ).to(DEVICE)  # fmt: skip

    positions = torch.arange(3, device=DEVICE)
    with pytest.raises(ValueError, match="w.wkv"):  # HD=96 is not a power of two
        dsv4.qkv_proj_rope(x, weights(96, 48, wq_b, wq_b_scale), positions, rope, backend="triton")
    dsv4.qkv_proj_rope(x, weights(96, 48, wq_b, wq_b_scale), positions, rope, backend="reference")
    wq_b, wq_b_scale = dsv4.quantize_weight_int8(torch.randn(128, 48, generator=g))
    with pytest.raises(ValueError, match="w.wq_a"):  # QL=48 is not a multiple of 32
        dsv4.qkv_proj_rope(x, weights(128, 48, wq_b, wq_b_scale), positions, rope, backend="triton")

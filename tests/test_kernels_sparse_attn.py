"""The Triton ``sparse_attn`` beyond the op matrix of ``test_attention_ops``: its key split (partials
combined in order in a second launch) against the single launch, non-finite inputs (NaN where the
reference has NaN, and nowhere else: a key one token sees must not reach the other token of its
block), the tiles of the tuning candidates, the order of the programs, and the full-size (``demo``) dims."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import pytest
import torch
import triton
import triton.language as tl

import dsv4
from conftest import DEVICE, FULL
from dsv4.harness.cases import make_case
from dsv4.harness.golden import bit_identical, compare
from dsv4.kernels import Workspace, tuning
from dsv4.kernels.sparse_attn import KEYS, _program_rows, key_splits
from dsv4.kernels.sparse_attn import sparse_attn as triton_sparse_attn
from dsv4.ops import get_op
from op_cases import assert_matches_reference
from test_attention_ops import W, attn_setup, expected_o, on_device, one_token_step


def run(args: dict, backend: str = "triton") -> torch.Tensor:
    return dsv4.sparse_attn(**on_device(args), backend=backend).o.cpu()


def launch(args: dict, ws: Workspace) -> Any:
    """The Triton launcher on the op's ``args`` (validated), its scratch (the splits' partials) in ``ws``."""
    launcher: Callable[..., Any] = triton_sparse_attn  # the backend's positional arguments, then ``ws``
    return launcher(*get_op("sparse_attn").backend_args(args), ws=ws)


@triton.jit
def _rows_of_each_program(out_ptr, S, H, TOKENS: tl.constexpr, HEADS: tl.constexpr):
    b, s0, h0 = _program_rows(S, H, TOKENS, HEADS)
    out = out_ptr + tl.program_id(0) * 3
    tl.store(out, b)
    tl.store(out + 1, s0)
    tl.store(out + 2, h0)


@pytest.mark.parametrize("b,s,h,tokens,heads", [(2, 3, 20, 2, 8), (3, 2, 64, 1, 16), (1, 5, 4, 4, 4)])
def test_programs_that_share_key_rows_are_neighbours(b: int, s: int, h: int, tokens: int, heads: int) -> None:
    """Program ids run over a token block's head blocks first, then over the slot's token blocks, then
    over the slots (ragged last blocks included), so the programs reading one slot's key rows are
    dispatched together; every (slot, token block, head block) is some program's, once."""
    programs = b * triton.cdiv(s, tokens) * triton.cdiv(h, heads)
    out = torch.full((programs, 3), -1, dtype=torch.int32, device=DEVICE)
    _rows_of_each_program[(programs,)](out, s, h, TOKENS=tokens, HEADS=heads)
    expected = list(itertools.product(range(b), range(0, s, tokens), range(0, h, heads)))
    assert [tuple(row) for row in out.cpu().tolist()] == expected


@pytest.mark.parametrize("kind,seq,k", [("hca", 2, 16), ("csa", 2, 64)])
def test_a_key_split_matches_one_launch(kind: str, seq: int, k: int) -> None:
    """Splits of the compressed keys (some of them empty at the short starts, where a token sees fewer
    tiles than splits; CSA's lists of 4 tiles) combined in order: within §8's rule of the single launch and
    of the expectation, and the same bits on every run."""
    args = attn_setup(kind, seq, seed=5, k=k)
    with tuning.forced("sparse_attn", {"splits": 1}):
        whole = run(args)
    with tuning.forced("sparse_attn", {"splits": 4}):
        split = run(args)
        again = run(args)
        ws = Workspace()  # the split path's partials live in the workspace
        launch(on_device(args), ws)
    assert {t.shape[0] for t in ws.tensors()} == {4}
    assert bit_identical(split, again)
    assert compare("sparse_attn", {"o": split}, {"o": whole})
    assert compare("sparse_attn", {"o": split}, {"o": expected_o(args)})


@pytest.mark.parametrize("k", [5, 21])
def test_lists_counted_from_row_zero_end_inside_a_key_tile(k: int) -> None:
    """``topk_offset = 0`` (entries are compressed rows themselves) and a list that ends inside a key
    tile: the tile's places past the list are no entries, not row 0 (with the window's offset, a place
    taken as entry 0 is a row below the offset and ignored either way)."""
    args = attn_setup("csa", 2, seed=7, k=k, offset=0)
    assert args["topk_offset"] == 0 and k % KEYS
    report = compare("sparse_attn", {"o": run(args)}, {"o": expected_o(args)})
    assert report, str(report)


@pytest.mark.parametrize(
    "programs,key_tiles,sms,splits",
    [
        (4, 512, 132, 32),  # B=1 S=2 HCA at 1M tokens (8192 rows): 32 splits, 128 programs
        (8, 512, 132, 16),  # the same with 16 heads a program
        (2, 8192, 132, 32),  # no more than MAX_SPLITS
        (64, 512, 132, 2),  # B=8 S=2: 132 // 64 = 2
        (24, 512, 132, 4),  # B=6 S=1: 132 // 24 = 5, down to a power of two
        (512, 512, 132, 1),  # B=64 S=2 (flash decode): a wave already
        (32768, 8192, 132, 1),  # a prefill of 8192 tokens: never
        (8, 32, 132, 2),  # a CSA list of 512 entries: 16 tiles a split at least
        (8, 31, 132, 1),
        (40, 34, 132, 2),  # the tiny HCA pools (34 tiles) at 8 slots of 19 tokens (5 blocks of 4)
    ],
)
def test_default_splits_fill_the_gpu_where_keys_are_many(programs: int, key_tiles: int, sms: int, splits: int) -> None:
    assert key_splits(programs, key_tiles, sms) == splits


def test_default_split_at_long_context_matches_one_launch() -> None:
    """Two slots in a table with a 1M-token HCA pool's capacity (8192 rows, 512 tiles), two programs:
    32 splits by default. Each split takes its share of a token's own tiles: at start 8192 (512 rows,
    32 tiles) every split sees keys; at start 100 (6 rows, one tile) only split 31 and split 0 (the
    window) do, and the 30 others store no ``acc`` and the combine reads none: with the scratch NaN
    before the call, ``o`` keeps its bits and the NaN stays there. Within §8's rule of the single
    launch and of the expectation."""
    args = attn_setup("hca", 2, seed=8, start=[100, 8192])
    cmp = args["compressed_pool"]
    table = torch.full((2, 8192 // cmp.block_size), -1, dtype=cmp.block_table.dtype)
    table[:, : cmp.block_table.shape[1]] = cmp.block_table
    args["compressed_pool"] = dataclasses.replace(cmp, block_table=table)
    ws = Workspace()
    o = launch(on_device(args), ws).o.cpu()
    m, l, acc = ws.tensors()
    assert acc.shape[0] == 32
    short, long = slice(0, acc.shape[1] // 2), slice(acc.shape[1] // 2, None)  # the slots' (token, head) rows
    assert (m[:, long] > float("-inf")).all()
    assert (m[1:31, short] == float("-inf")).all() and (m[31, short] > float("-inf")).all()
    acc.fill_(float("nan"))
    again = launch(on_device(args), ws).o.cpu()
    assert bit_identical(again, o) and not o.isnan().any()
    assert acc[1:31, short].isnan().all() and not acc[31, short].isnan().any() and not acc[:, long].isnan().any()
    with tuning.forced("sparse_attn", {"splits": 1}):
        whole = run(args)
    assert compare("sparse_attn", {"o": o}, {"o": whole})
    assert compare("sparse_attn", {"o": o}, {"o": expected_o(args)})


@pytest.mark.parametrize("kind,k,splits", [("hca", 16, 2), ("csa", 64, 4)])
def test_a_tokens_split_partials_do_not_depend_on_its_program(kind: str, k: int, splits: int) -> None:
    """A step of 19 tokens (4 a program) and 19 one-token steps leave each token's fp32 partials
    ``(m, l, acc)`` bit-identical in every split (``acc`` where a row saw a key: only there is it
    stored): a split's share follows each token's own tiles (HCA: its visible rows; CSA: its list),
    not those of its program's last token. At start 256 (ratio 16) tokens 12-14 see one compressed tile
    and token 15 two; the bf16 outputs seldom show a change of grouping, the partials always do."""
    args = on_device(attn_setup(kind, 19, seed=4, k=k, start=[256]))
    h = args["q"].shape[2]
    with tuning.forced("sparse_attn", {"splits": splits}):
        ws = Workspace()
        launch(args, ws)
        m, l, acc = (t.cpu() for t in ws.tensors())
        for s in range(19):
            one = one_token_step(args, s)
            ws_one = Workspace()
            launch(one, ws_one)
            m1, l1, acc1 = (t.cpu() for t in ws_one.tensors())
            rows = slice(s * h, (s + 1) * h)
            assert torch.equal(m1, m[:, rows]) and torch.equal(l1, l[:, rows]), f"token {s}"
            saw = (m1 > float("-inf")) | (l1 != 0)  # the rows whose acc a split stores (the others' is 0)
            assert saw[0].all(), "split 0 holds the window"
            assert torch.equal(acc1[saw], acc[:, rows][saw]), f"token {s}"
            dsv4.window_kv_write(one["kv"], args["window_pool"], one["start_pos"], window=W)


@pytest.mark.parametrize(
    "params", [{"tokens": 2, "heads": 8}, {"key_tile": 32, "heads": 16}, {"key_tile": 64, "heads": 32, "tokens": 2}]
)
def test_other_tiles_match_the_expectation(params: dict) -> None:
    args = attn_setup("csa", 2, seed=6)
    with tuning.forced("sparse_attn", params):
        o = run(args)
    assert compare("sparse_attn", {"o": o}, {"o": expected_o(args)})


@pytest.mark.parametrize("kind", ["swa", "csa", "hca"])
def test_every_head_block_takes_its_own_heads_sinks(kind: str) -> None:
    """20 heads in blocks of 8 (the last one partial), each head with a sink of its own: every block's
    program reads its heads' queries and sinks, not the first block's (at ``tiny``'s 4 heads one block
    holds them all)."""
    args = attn_setup(kind, 2, seed=8)
    g = torch.Generator().manual_seed(8)
    b, s, _, hd = args["q"].shape
    args["q"] = torch.randn(b, s, 20, hd, generator=g).to(torch.bfloat16)
    args["attn_sink"] = torch.linspace(-3.0, 3.0, 20)
    with tuning.forced("sparse_attn", {"heads": 8}):
        o = run(args)
    assert compare("sparse_attn", {"o": o}, {"o": expected_o(args)})


@pytest.mark.parametrize("kind,tokens", [("swa", 1), ("csa", 2), ("hca", 1), ("hca", 2)])
def test_nan_goes_where_the_reference_puts_it(kind: str, tokens: int) -> None:
    """NaN in one head of one query, in this call's last row of a slot (seen by its last token only)
    and in its first row (seen by both tokens): NaN exactly where the reference has it, every other
    output within the rule, with a program per token and per token pair."""
    args = attn_setup(kind, 2, seed=7)
    args["q"][0, 1, 2, 5] = float("nan")
    args["kv"][1, 1, 3] = float("nan")  # an FP8 block of token 1's row: all of it NaN once stored
    args["kv"][2, 0, -1] = float("nan")  # the bf16 rope tail of token 0's row
    with tuning.forced("sparse_attn", {"tokens": tokens, "heads": 16 // tokens}):
        o = run(args)
    ref = run(args, "reference")
    assert ref.isnan().any(dim=-1).sum() > 0
    assert torch.equal(o.isnan(), ref.isnan())
    assert not o[1, 0].isnan().any()  # token 0 does not see token 1's row
    finite = ~ref.isnan()
    assert compare("sparse_attn", {"o": torch.where(finite, o, 0)}, {"o": torch.where(finite, ref, 0)})


def _same_non_finite(o: torch.Tensor, ref: torch.Tensor) -> None:
    """``o`` is NaN and infinite exactly where ``ref`` is, and within §8's rule elsewhere."""
    assert torch.equal(o.isnan(), ref.isnan()) and torch.equal(o.isinf(), ref.isinf())
    finite = ref.isfinite()
    assert compare("sparse_attn", {"o": torch.where(finite, o, 0)}, {"o": torch.where(finite, ref, 0)})


@pytest.mark.parametrize("kind,tokens", [("swa", 1), ("csa", 2), ("hca", 1)])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_an_infinite_key_goes_where_the_reference_puts_it(kind: str, tokens: int, sign: float) -> None:
    """An infinity in a key's bf16 rope tail (stored as it is) gives each row that sees it ``z = +-inf``
    by the sign of its query there: ``+inf`` makes the head NaN, ``-inf`` gives ``e = 0`` and NaN only in
    that column (``0 * inf``) and its rope partner; every other entry of the head stays finite."""
    args = attn_setup(kind, 2, seed=7)
    hd = args["q"].shape[-1]
    args["kv"][1, 0, hd - 3] = sign * float("inf")  # token 0's own row: both tokens see it
    args["window_pool"].rope[..., 5] = sign * float("inf")  # every window row of the pool
    if args["compressed_pool"] is not None:
        args["compressed_pool"].rope[..., 9] = sign * float("inf")
    with tuning.forced("sparse_attn", {"tokens": tokens, "heads": 16 // tokens}):
        o = run(args)
    ref = run(args, "reference")
    heads = ref.isnan().all(dim=-1)
    assert heads.any() and (ref.isnan().any(dim=-1) & ~heads).any()  # both outcomes occur
    _same_non_finite(o, ref)


def test_a_split_whose_keys_all_score_minus_inf_keeps_its_nan_columns() -> None:
    """HCA split in two over one compressed tile: split 1 holds every compressed row and no window.
    With ``+inf`` in one rope column of every compressed row, a head whose query is negative there scores
    them all ``-inf``: the split's ``m`` stays ``-inf`` while its ``acc`` holds NaN in that column, which
    the combine must still take (the reference: ``0 * inf``)."""
    args = attn_setup("hca", 2, seed=9, start=[40, 70])
    args["compressed_pool"].rope[..., 9] = float("inf")
    with tuning.forced("sparse_attn", {"splits": 2}):
        o = run(args)
    ref = run(args, "reference")
    assert (ref.isnan().any(dim=-1) & ~ref.isnan().all(dim=-1)).any()
    _same_non_finite(o, ref)


def test_a_head_whose_every_score_is_minus_inf_is_nan() -> None:
    """A query of ``-inf`` against keys all positive in that entry scores every key ``-inf``: the
    reference's ``exp(-inf - -inf)`` is NaN, not the sink's 0."""
    args = attn_setup("swa", 1, seed=3, start=[0])
    args["kv"][0, 0, 0] = 1.0  # at start 0 a token's only key is its own row
    args["q"][0, 0, 1, 0] = float("-inf")
    o, ref = run(args), run(args, "reference")
    assert ref[0, 0, 1].isnan().all()
    _same_non_finite(o, ref)


@FULL
def test_demo_decode() -> None:
    """Full-size dims (H 64, HD 512, NOPE 448: seven FP8 blocks and the rope tail), a CSA decode step."""
    cfg = dsv4.get_config("demo")
    case = make_case(cfg, "sparse_attn", seed=2, device=DEVICE, batch=2, seq=2)
    assert_matches_reference(case)

"""The lightning indexer (spec §5): scores, causal visibility, top-k, padding and offset."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import dsv4
from conftest import BACKENDS, DEVICE
from dsv4.harness.cases import clone_args, make_case
from dsv4.harness.golden import ratio_allclose, tolerance
from op_cases import case_at

CFG = dsv4.get_config("tiny")
MASKED = torch.finfo(torch.float32).min  # -3.4028235e38


def pool_keys(state: dsv4.IndexerState, b: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``k8 [b, rows, HID]``, ``ks [b, rows]``: each slot's first ``rows`` keys through the block table
    (rows a slot does not have are zero)."""
    j = torch.arange(rows, device=state.keys.device)
    blocks = state.block_table[:b, j // state.block_size].long()
    held = blocks >= 0
    k8 = torch.where(held[..., None], state.keys[blocks.clamp(min=0), j % state.block_size], 0)
    return k8, torch.where(held, state.key_scale[blocks.clamp(min=0), j % state.block_size], 0.0)


def spec_scores(args: dict, state: dsv4.IndexerState) -> torch.Tensor:
    """Spec §5 steps 1-5 written out with einsum, from the post-compressor key pool."""
    x, qr, qr_scale, w, rope = args["x"], args["qr"], args["qr_scale"], args["w"], args["rope"]
    b, s, _ = x.shape
    hi, hid, r = w.weights_proj.shape[0], w.compressor.norm_w.shape[0], rope.rope_dim
    start = torch.as_tensor(args["start_pos"], device=x.device).reshape(-1).expand(b)
    p = start[:, None] + torch.arange(s, device=x.device)  # [B, S]
    qh = torch.einsum("tk,nk->tn", qr.double(), w.wq_b.double()).float() * qr_scale * w.wq_b_scale
    qh = qh.view(b, s, hi, hid)
    rot = torch.complex(rope.cos[p], rope.sin[p])[:, :, None, :]  # [B, S, 1, R/2]
    tail = torch.view_as_complex(qh[..., -r:].reshape(b, s, hi, r // 2, 2).contiguous())
    qh[..., -r:] = torch.view_as_real(tail * rot).flatten(-2)
    qh = torch.einsum("bshi,ij->bshj", qh.to(torch.bfloat16).float(), dsv4.hadamard_matrix(hid, device=x.device))
    weights = torch.einsum("bsd,hd->bsh", x.float(), w.weights_proj.float()) * hid**-0.5 * hi**-0.5
    n = int(((start + s) // 4).max())
    q8, qs = dsv4.quantize_int8_per_row(qh)
    k8, ks = pool_keys(state, b, n)
    dots = torch.einsum("bshi,bji->bshj", q8.double(), k8.double()).float()
    logits = torch.relu(dots * qs)
    score = torch.einsum("bshj,bsh->bsj", logits, weights) * ks[:, None, :]  # the key scale after the head sum
    vis = (p + 1) // 4
    return score.masked_fill(torch.arange(n, device=x.device) >= vis[..., None], MASKED)


def _run(case, backend: str):
    args = clone_args(case.args)
    out = dsv4.indexer(**args, backend=backend)
    return args, out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["decode", "prefill"])
def test_score_equals_spec_einsum(backend: str, mode: str) -> None:
    case = make_case(CFG, "indexer", mode, seed=11, device=DEVICE, max_position=512)
    args, out = _run(case, backend)
    want = spec_scores(args, args["state"])
    t = tolerance("score")
    assert out.score.shape == want.shape and out.score.dtype == torch.float32
    check = ratio_allclose(out.score, want, t.atol, t.rtol, t.max_error_ratio)
    assert check, check.detail


def _step(batch: int, seq: int, start: list[int] | int, topk: int = 8, seed: int = 0):
    """A case with explicit start positions (each row prefilled to its start)."""
    case = case_at(CFG, "indexer", batch, seq, start, seed, max_position=256)
    case.args["topk"] = topk
    return case


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_does_not_see_block_closed_by_its_successor(backend: str) -> None:
    """S=2 from position 6: token 1 (position 7) closes block 1; token 0 (position 6) sees only block 0."""
    case = _step(batch=1, seq=2, start=6)
    _, out = _run(case, backend)
    assert out.score.shape == (1, 2, 2)
    assert out.score[0, 0, 1].item() == MASKED and out.score[0, 1, 1].item() != MASKED
    assert out.score[0, 0, 0].item() != MASKED
    assert out.topk_idxs[0, 0].tolist() == [case.args["offset"]] + [-1] * 7
    assert sorted(out.topk_idxs[0, 1, :2].tolist()) == [case.args["offset"], case.args["offset"] + 1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_k_and_offset(backend: str) -> None:
    """Rows at different positions: vis = (p+1)//4 decides k = min(topk, vis); the rest is -1 / masked."""
    starts = [0, 5, 13, 40]
    case = _step(batch=4, seq=3, start=starts, topk=8, seed=1)
    case.args["offset"] = 1000
    _, out = _run(case, backend)
    n = max((p + 3) // 4 for p in starts)
    assert out.score.shape == (4, 3, n) and out.topk_idxs.shape == (4, 3, 8)
    assert out.topk_idxs.dtype == torch.int32
    for b, p0 in enumerate(starts):
        for s in range(3):
            vis = (p0 + s + 1) // 4
            k = min(8, vis)
            row = out.topk_idxs[b, s]
            assert (row[k:] == -1).all() and (row[:k] >= 1000).all() and (row[:k] < 1000 + vis).all()
            assert (out.score[b, s, vis:] == MASKED).all() and (out.score[b, s, :vis] > MASKED).all()
            chosen = out.score[b, s, (row[:k] - 1000).long()]
            assert (chosen[:-1] >= chosen[1:]).all(), "descending score order"
            if vis > k:  # nothing left out scores higher than the last one chosen
                rest = torch.ones(vis, dtype=torch.bool, device=DEVICE)
                rest[(row[:k] - 1000).long()] = False
                assert out.score[b, s, :vis][rest].max() <= chosen[-1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_start_pos_int_equals_tensor(backend: str) -> None:
    a = _step(batch=3, seq=2, start=17, seed=2)
    b = _step(batch=3, seq=2, start=[17, 17, 17], seed=2)
    (_, oa), (_, ob) = _run(a, backend), _run(b, backend)
    assert torch.equal(oa.score, ob.score) and torch.equal(oa.topk_idxs, ob.topk_idxs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_is_filled_in_place_and_returned(backend: str) -> None:
    """``out=`` (a ``score`` wider than the cache) is written in place and is what the call returns, as the
    op's docstring says; its values are the plain call's, masked past it."""
    case = _step(batch=2, seq=2, start=[37, 200], topk=16, seed=5)
    plain = dsv4.indexer(**clone_args(case.args), backend=backend)
    n = plain.score.shape[-1]
    score = torch.full((2, 2, n + 3), 7.0, device=DEVICE)
    out = dsv4.IndexerOut(score, torch.full((2, 2, 16), 7, dtype=torch.int32, device=DEVICE))
    assert dsv4.indexer(**clone_args(case.args), backend=backend, out=out) is out
    assert torch.equal(out.score[..., :n], plain.score) and torch.equal(out.topk_idxs, plain.topk_idxs)
    assert (out.score[..., n:] == MASKED).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (the interpreter) on inf arithmetic
def test_head_weight_times_query_scale_past_fp32_scores_and_selects_as_the_reference() -> None:
    """Every input finite, one head whose weight (~1e30) times its query scale (1e12) passes fp32's max: a key
    whose dot is <= 0 scores ``relu(dot * qs) * w = 0`` (spec §5 step 5's order), not NaN, so the top-k is the
    reference's (+inf keys first, then zeros by index), never the zero keys a NaN would rank first."""
    case = make_case(CFG.replace(name="one-head", index_n_heads=1), "indexer", seed=0, device=DEVICE, batch=1, seq=1,
                     start_pos=400)  # fmt: skip
    args = case.args
    args["w"] = dataclasses.replace(args["w"], weights_proj=torch.full_like(args["w"].weights_proj, 1e30))
    args["qr_scale"] = torch.full_like(args["qr_scale"], 1e12)
    args["x"] = args["x"].abs()  # the head weight x @ weights_proj.T * HID^-0.5 > 0
    args["topk"] = 16
    ref = dsv4.indexer(**clone_args(args), backend="reference")
    out = dsv4.indexer(**clone_args(args), backend="triton")
    vis = ref.score[0, 0, :100]  # (400 + 1) // 4 visible keys
    assert not vis.isnan().any() and (vis == float("inf")).any() and (vis == 0).sum() > 16, "not the overflow case"
    assert torch.equal(out.score, ref.score)
    assert torch.equal(out.topk_idxs, ref.topk_idxs)


def test_a_query_scale_whose_dot_overflows_scores_as_the_reference() -> None:
    """Every input finite, the query rows near 1e36 (``wq_b_scale`` times 1e36): ``qs`` near 2e34, so
    the spec's ``relu(dot * qs)`` passes fp32's max for large dots and the head sum gives ``inf``, ``-inf``
    or NaN, where folding ``w * qs`` first (``|w| < 1``) would keep a plausible finite score."""
    case = make_case(CFG, "indexer", seed=0, device=DEVICE, batch=2, seq=2, start_pos=[6, 14])
    args = case.args
    args["w"] = dataclasses.replace(args["w"], wq_b_scale=args["w"].wq_b_scale * 1e36)
    ref = dsv4.indexer(**clone_args(args), backend="reference")
    out = dsv4.indexer(**clone_args(args), backend="triton")
    assert (~ref.score.isfinite()).sum() > 0 and ref.score.isfinite().any(), "not the overflow case"
    assert torch.equal(out.score.isnan(), ref.score.isnan()) and torch.equal(out.score.isinf(), ref.score.isinf())
    assert torch.equal(out.score[out.score.isinf()], ref.score[ref.score.isinf()])
    finite = ref.score.isfinite()
    assert torch.allclose(out.score[finite], ref.score[finite], rtol=1e-5, atol=0)
    assert torch.equal(out.topk_idxs, ref.topk_idxs)


def test_reference_topk_order_and_tie_rule() -> None:
    """Descending score; equal scores (ReLU makes exact zeros common) by lower index first."""
    case = _step(batch=2, seq=1, start=[200, 150], topk=16, seed=3)
    _, out = _run(case, "reference")
    for b, p in enumerate([200, 150]):
        scores = out.score[b, 0].tolist()
        order = sorted(range((p + 1) // 4), key=lambda j: (-scores[j], j))[:16]
        assert out.topk_idxs[b, 0].tolist() == [j + case.args["offset"] for j in order]

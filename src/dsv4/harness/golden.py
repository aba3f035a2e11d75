"""Comparators of spec §6: does a backend's output match the reference within tolerance?

``ratio_allclose`` and ``topk_allclose`` compare one output; ``compare`` applies the spec's table
to every output of an op and returns a readable ``Report``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..model.config import COMPRESS_RATIO
from ..model.fp8_row import ROW_BLOCK, SCALE_BIAS, dequantize_fp8_rows
from ..model.state import IndexerState
from ..model.structs import MASKED_SCORE
from ..ops.registry import Output, Tolerance, get_op, op_names

_MASK_LIKE = -1e38  # anything below this counts as "masked" (-inf or the most negative finite)


def tolerance(output: str, op: str | None = None) -> Tolerance:
    """The spec §6 tolerance of ``op``'s output called ``output``; without ``op``, of the registered ops'
    output of that name, which must then be the same for each of them (``kv_state``, ``score_state`` and
    ``pool`` are not: name the op)."""
    found = {
        name: o.tolerance for name in ([op] if op is not None else op_names()) for o in get_op(name).outputs
        if o.name == output
    }  # fmt: skip
    if not found:
        raise KeyError(f"{op} has no output {output!r}" if op else f"no registered op has an output {output!r}")
    if len(set(found.values())) > 1:
        raise ValueError(f"op: the output {output!r} has different tolerances in {', '.join(sorted(found))}")
    return next(iter(found.values()))


@dataclass
class Check:
    """The verdict on one output. Truthy when it passed."""

    name: str
    passed: bool
    rule: str
    max_abs: float = 0.0
    max_rel: float = 0.0
    violation_ratio: float = 0.0
    detail: str = ""

    def __bool__(self) -> bool:
        return self.passed


def _fail(name: str, rule: str, detail: str) -> Check:
    return Check(name, False, rule, float("nan"), float("nan"), 1.0, detail)


def ratio_allclose(
    actual: torch.Tensor,
    expected: torch.Tensor,
    atol: float,
    rtol: float,
    max_error_ratio: float = 0.005,
    name: str = "output",
) -> Check:
    """Pass when at most ``max_error_ratio`` of elements violate ``|a-e| <= atol + rtol*|e|``.

    NaN always violates; an infinity matches only the same infinity (``-inf`` where the reference
    has ``-inf``, enforced for every element). Shapes must match.
    """
    rule = str(Tolerance(atol, rtol, max_error_ratio))
    if actual.shape != expected.shape:
        return _fail(name, rule, f"shape {list(actual.shape)} != expected {list(expected.shape)}")
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    n = e.numel()
    if n == 0:
        return Check(name, True, rule)
    e_inf, a_inf = torch.isinf(e), torch.isinf(a)
    inf_mismatch = (e_inf | a_inf) & ~(a == e)
    finite = ~(e_inf | a_inf)
    err = torch.where(finite, (a - e).abs(), torch.zeros_like(a))
    bad = torch.isnan(a) | torch.isnan(e) | inf_mismatch | (err > atol + rtol * e.abs())
    rel = torch.where(finite & (e != 0), err / e.abs(), torch.zeros_like(a))
    count = int(bad.sum())
    ratio = count / n
    passed = ratio <= max_error_ratio and not bool(inf_mismatch.any())
    detail = ""
    if count:
        i = int(bad.flatten().nonzero()[0])
        idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), e.shape))
        detail = f"{count}/{n} off; first at {list(idx)}: got {a.flatten()[i]:.6g}, expected {e.flatten()[i]:.6g}"
    return Check(name, passed, rule, float(err.max()), float(rel.max()), ratio, detail)


def topk_allclose(
    actual: torch.Tensor,
    expected: torch.Tensor,
    ref_score: torch.Tensor,
    offset: int = 0,
    atol: float = 1e-4,
    rtol: float = 1 / 128,
    name: str = "topk_idxs",
    start_pos: int | torch.Tensor | None = None,
) -> Check:
    """Tie-tolerant top-k comparison (spec §6).

    ``actual``, ``expected``: ``[B, S, K]`` int indices (``+offset``, ``-1`` padded); ``ref_score``:
    the reference's ``[B, S, N]`` scores. Per token: the same number of valid entries, as a prefix;
    no duplicates; every index one the token can see; the reference scores at the chosen indices
    non-increasing and equal to the reference's own top-k scores position by position, both within
    the score tolerance — so only near-equal scores may swap. An infinite reference score matches
    only the same infinity, a NaN only a NaN.

    Token ``s`` of row ``b`` sees keys ``j < vis(b,s) = (start_pos[b] + s + 1) // 4`` (spec §5) when
    ``start_pos`` (an int for every row, or ``[B]``) is given; without it, those before the run of
    masked scores (``MASKED_SCORE``, which the reference writes at every ``j >= vis``) that ends the
    row, and at least those up to the reference's own choice.
    """
    rule = f"tie-tolerant, score atol={atol:g} rtol={rtol:g}"
    if actual.shape != expected.shape:
        return _fail(name, rule, f"shape {list(actual.shape)} != expected {list(expected.shape)}")
    for which, t in (("indices", actual), ("expected indices", expected)):
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            return _fail(name, rule, f"{which} are {str(t.dtype).removeprefix('torch.')}, not integers")
    a = actual.detach().to("cpu", torch.int64)
    e = expected.detach().to("cpu", torch.int64)
    sc = ref_score.detach().to("cpu", torch.float64)
    n = sc.shape[-1]
    vis = _visible(sc, e, offset, start_pos)
    worst = 0.0
    failures: list[str] = []
    rows = a.reshape(-1, a.shape[-1])
    for r in range(rows.shape[0]):
        b, s = divmod(r, a.shape[1])
        av, ev = rows[r], e[b, s]
        k = int((ev != -1).sum())
        where = f"[b={b}, s={s}]"
        if int((av != -1).sum()) != k or bool((av[:k] == -1).any()):
            failures.append(f"{where} {int((av != -1).sum())} valid entries, expected {k} as a prefix")
            continue
        got, ref = av[:k] - offset, ev[:k] - offset
        if k and (int(got.min()) < 0 or int(got.max()) >= n):
            failures.append(f"{where} index out of [offset, offset+{n})")
            continue
        if k and int(got.max()) >= int(vis[b, s]):
            failures.append(
                f"{where} index {int(got.max()) + offset} is a key the token cannot see (it sees {int(vis[b, s])})"
            )
            continue
        if torch.unique(got).numel() != k:
            failures.append(f"{where} duplicate indices")
            continue
        got_s, ref_s = sc[b, s, got], sc[b, s, ref]
        tol = atol + rtol * ref_s.abs()
        diff = (got_s - ref_s).abs()
        worst = max(worst, float(diff.nan_to_num(0.0).max()) if k else 0.0)
        # the same value (an infinity only the same infinity), a NaN for a NaN (NaNs rank first: spec
        # §6), or a finite reference score within the tolerance; anything else is a miss
        same = (got_s == ref_s) | (got_s.isnan() & ref_s.isnan())
        off = ~(same | (ref_s.isfinite() & (diff <= tol)))
        nan = got_s.isnan()
        prev = got_s[:-1]
        bound = torch.where(prev.isinf(), prev, prev + atol + rtol * prev.abs())  # an infinity's bound is itself
        if bool(off.any()):
            i = int(off.nonzero()[0])
            failures.append(
                f"{where} slot {i}: score {float(got_s[i]):.6g} where the reference's top-k has {float(ref_s[i]):.6g}"
            )
        elif k > 1 and (bool((got_s[1:] > bound).any()) or bool((nan[1:] & ~nan[:-1]).any())):
            failures.append(f"{where} scores not in descending order")
    ratio = len(failures) / max(1, rows.shape[0])
    detail = f"{len(failures)} token(s) off; first {failures[0]}" if failures else ""
    return Check(name, not failures, rule, worst, 0.0, ratio, detail)


def _visible(
    score: torch.Tensor, expected: torch.Tensor, offset: int, start_pos: int | torch.Tensor | None
) -> torch.Tensor:
    """``[B, S]`` int64: how many keys each token sees (see ``topk_allclose``), from ``start_pos``
    (an int or ``[B]``) or else from the reference's ``score [B, S, N]`` and ``expected`` indices."""
    batch, seq = expected.shape[:2]
    if start_pos is not None:
        start = torch.as_tensor(start_pos).detach().to("cpu", torch.int64).reshape(-1)
        if start.numel() not in (1, batch):
            raise ValueError(f"start_pos: expected an int or one value per row ({batch}), got {start.numel()} values")
        return (start.expand(batch)[:, None] + torch.arange(seq) + 1) // COMPRESS_RATIO
    n = score.shape[-1]
    shown = torch.where(score != MASKED_SCORE, torch.arange(1, n + 1), 0)
    chosen = torch.where(expected != -1, expected - offset + 1, 0)
    return torch.cat((shown, chosen, torch.zeros(batch, seq, 1, dtype=torch.int64)), -1).amax(-1)


def _written_slots(table: torch.Tensor, pool: torch.Size, start_pos: torch.Tensor, seq: int) -> torch.Tensor:
    """``[num_blocks, block_size]`` bool: the pool rows a step of ``seq`` tokens from ``start_pos``
    writes through the block ``table`` (rows in unallocated blocks are not written)."""
    mask = torch.zeros(pool, dtype=torch.bool)
    block_size = pool[1]
    for b, p in enumerate(start_pos.tolist()):
        rows = torch.arange(p // COMPRESS_RATIO, (p + seq) // COMPRESS_RATIO)
        blocks = table[b, rows // block_size].long()
        mask[blocks[blocks >= 0], (rows % block_size)[blocks >= 0]] = True
    return mask


def _check_keys(
    actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], inputs: Mapping[str, Any], tol: Tolerance
) -> Check:
    """The key pool (``keys`` with ``key_scale``, spec §6): rows the step wrote have every ``k8`` within ±1,
    at most ``tol.max_error_ratio`` (10%) of a row's ``k8`` different at all, and ``ks`` within ``tol.rtol``
    (a NaN or infinite scale where the reference's is the same); every other pool row is bit-identical to
    the pool before the step (when ``inputs`` give it; without, every row counts as written)."""
    k8, ks = actual["keys"].detach().cpu(), actual["key_scale"].detach().cpu()
    e8, es = expected["keys"].detach().cpu(), expected["key_scale"].detach().cpu()
    rule = f"k8 within ±1, at most {tol.max_error_ratio:.0%} of a row's k8 differing, ks rtol {tol.rtol:g}"
    for part, got, want in (("keys", k8, e8), ("key_scale", ks, es)):
        if got.shape != want.shape:
            return _fail("keys", rule, f"pool {part} shape {list(got.shape)} != expected {list(want.shape)}")
    written = torch.ones(ks.shape, dtype=torch.bool)
    if "keys" in inputs:
        start = torch.as_tensor(inputs["start_pos"])
        if start.dim() != 1:  # the rows a step writes are its rows': an int says not how many there are
            raise ValueError(
                f"inputs['start_pos']: expected one value per row of the step ([B], as compare_inputs() gives), "
                f"got {start.tolist()!r:.60}"
            )
        written = _written_slots(inputs["block_table"].cpu(), ks.shape, start, int(inputs["seq"]))
        rule += "; unwritten pool rows bit-identical"
    codes = (k8[written].int() - e8[written].int()).abs()  # [rows written, HID]
    a_s, e_s = ks[written].double(), es[written].double()
    same = (a_s == e_s) | (a_s.isnan() & e_s.isnan())  # an infinity or a NaN where the reference has it
    scale_off = ~(same | (e_s.isfinite() & ((a_s - e_s).abs() <= tol.rtol * e_s.abs())))
    differing = (codes > 0).double().mean(-1) if codes.numel() else torch.zeros(0, dtype=torch.float64)
    rel = torch.where(same, 0.0, torch.where(e_s.isfinite(), (a_s - e_s).abs() / e_s.abs(), torch.inf))
    check = Check(
        "keys", True, rule, float(codes.max()) if codes.numel() else 0.0,
        float(rel.max()) if rel.numel() else 0.0, float(differing.max()) if differing.numel() else 0.0,
    )  # fmt: skip
    problems = []
    if bool((codes > 1).any()):
        problems.append(f"{int((codes > 1).any(-1).sum())} written row(s) with k8 more than 1 off")
    if bool((differing > tol.max_error_ratio).any()):
        worst = int((codes > 0).sum(-1).max())
        problems.append(
            f"{int((differing > tol.max_error_ratio).sum())} written row(s) with more than "
            f"{tol.max_error_ratio:.0%} of their k8 differing (the most: {worst} of {codes.shape[-1]})"
        )
    if bool(scale_off.any()):
        problems.append(f"{int(scale_off.sum())} written row(s) with ks off")
    if "keys" in inputs:
        k_before, s_before = inputs["keys"].cpu(), inputs["key_scale"].cpu()
        for pool8, pool_s, what in ((k8, ks, ""), (e8, es, " in the expected pool (a corrupt expected file)")):
            changed = (pool8[~written] != k_before[~written]).any(-1) | (
                pool_s[~written].view(torch.int32) != s_before[~written].view(torch.int32)
            )
            if bool(changed.any()):
                problems.append(f"{int(changed.sum())} pool row(s) the step does not write changed{what}")
    if problems:
        check.passed = False
        check.detail = "; ".join(([check.detail] if check.detail else []) + problems)
    return check


def _check_score(actual: torch.Tensor, expected: torch.Tensor, tol: Tolerance) -> Check:
    a, e = actual.detach().cpu(), expected.detach().cpu()
    n = e.shape[-1]
    if a.shape[:-1] != e.shape[:-1] or a.shape[-1] < n:
        return _fail("score", str(tol), f"shape {list(a.shape)} does not cover expected {list(e.shape)}")
    masked_e = (e <= _MASK_LIKE) & e.isfinite()  # the reference's MASKED_SCORE; a visible -inf stays a score
    a_head = a[..., :n]
    extra_ok = bool((a[..., n:] <= _MASK_LIKE).all())
    mask_ok = bool((a_head[masked_e] <= _MASK_LIKE).all())
    check = ratio_allclose(
        torch.where(masked_e, 0.0, a_head),
        torch.where(masked_e, 0.0, e),
        tol.atol,
        tol.rtol,
        tol.max_error_ratio,
        "score",
    )
    check.rule += "; masked entries -inf-like"
    if not (extra_ok and mask_ok):
        check.passed = False
        check.detail = (check.detail + "; " if check.detail else "") + "a masked position holds a real score"
    return check


POOL_PARTS = ("nope", "rope", "scale")  # the row tensors of an FP8 KV pool (block_table aside)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bytes (uint8, one more axis), so equality is bitwise (NaN payloads and signed zeros included)."""
    t = t.detach().cpu().contiguous()
    return t.view(torch.uint8).view(*t.shape, t.element_size())


def bit_identical(actual: torch.Tensor, expected: torch.Tensor, name: str = "output") -> Check:
    """Pass when ``actual`` and ``expected`` have the same shape, dtype and bytes."""
    rule = "bit-identical"
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return _fail(
            name, rule, f"{actual.dtype} {list(actual.shape)} != expected {expected.dtype} {list(expected.shape)}"
        )
    differs = (_bytes(actual) != _bytes(expected)).any(-1)
    count = int(differs.sum())
    detail = ""
    if count:
        idx = [int(v) for v in differs.nonzero()[0]]
        detail = f"{count}/{differs.numel()} elements differ; first at {idx}"
    return Check(name, count == 0, rule, violation_ratio=count / max(1, differs.numel()), detail=detail)


def pool_tensors(tensors: Mapping[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The row tensors of the FP8 pool ``name`` among ``tensors`` (keys ``name.nope`` etc.), on the CPU."""
    return {part: tensors[f"{name}.{part}"].detach().cpu() for part in POOL_PARTS}


def changed_rows(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``[NB, bs]`` bool: the pool rows whose bytes differ between two states of a pool (parts by name)."""
    return torch.stack([(_bytes(before[p]) != _bytes(after[p])).flatten(2).any(-1) for p in POOL_PARTS]).any(0)


def e4m3_step(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """One e4m3 step at the expected value ``x`` of a block scaled by ``2^e`` (attention spec §8):
    ``2^(max(floor(log2(|x| / 2^e)), -6) - 3) * 2^e`` (float64; subnormal steps below ``2^-6``)."""
    scale = torch.exp2(e.to(torch.float64))
    exponent = torch.floor(torch.log2(x.to(torch.float64).abs() / scale)).clamp_min(-6)  # log2(0) = -inf -> -6
    return torch.exp2(exponent - 3) * scale


def fp8_rows_allclose(
    actual: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    tol: Tolerance,
    before: Mapping[str, torch.Tensor] | None = None,
    written: torch.Tensor | None = None,
    name: str = "pool",
) -> Check:
    """An FP8 KV pool (``nope``/``rope``/``scale`` by name) against the expected one (attention spec §8).

    Rows written (``written [NB, bs]`` bool; by default the rows where ``expected`` differs from
    ``before``, or every row without ``before``): decoded values within ``tol`` (``ratio_allclose``;
    NaN matches NaN), and every element beyond ``tol`` within one e4m3 step of the expected value
    (``e4m3_step`` with the expected block's exponent for a NOPE element, at ``e = 0`` for a rope
    element), scale bytes of the row's blocks equal or ±1 and those past them equal. Every other row
    bit-identical to ``before`` (and to ``expected``)."""
    rule = (
        f"written rows: deq {tol}, the rest within one e4m3 step, scale bytes ±1 (padding equal); "
        "other rows bit-identical"
    )
    shapes = {p: (list(actual[p].shape), list(expected[p].shape)) for p in POOL_PARTS}
    if any(a != e for a, e in shapes.values()):
        return _fail(name, rule, f"pool shapes {shapes} differ")
    if written is None:
        written = (
            changed_rows(before, expected)
            if before is not None
            else torch.ones(shapes["scale"][0][:2], dtype=torch.bool)
        )
    written = written.cpu()
    a = {p: actual[p][written] for p in POOL_PARTS}
    e = {p: expected[p][written] for p in POOL_PARTS}
    deq_a = dequantize_fp8_rows(a["nope"], a["scale"], a["rope"]).to(torch.float64)
    deq_e = dequantize_fp8_rows(e["nope"], e["scale"], e["rope"]).to(torch.float64)
    agree = (deq_a.isnan() & deq_e.isnan()) | (deq_a == deq_e)  # NaN where the reference has NaN; same infinity
    deq_a, deq_e = deq_a.masked_fill(agree, 0.0), deq_e.masked_fill(agree, 0.0)
    check = ratio_allclose(deq_a, deq_e, tol.atol, tol.rtol, tol.max_error_ratio, name)
    check.rule = rule
    problems = []
    nope = a["nope"].shape[-1]
    used = nope // ROW_BLOCK
    exps = (e["scale"][..., :used].to(torch.int32) - SCALE_BIAS).repeat_interleave(ROW_BLOCK, dim=-1)
    step = torch.cat(
        (e4m3_step(deq_e[..., :nope], exps), e4m3_step(deq_e[..., nope:], torch.zeros_like(deq_e[..., nope:]))), -1
    )
    diff = (deq_a - deq_e).abs()
    off = ~((diff <= step) | (diff <= tol.atol + tol.rtol * deq_e.abs()))
    if bool(off.any()):
        problems.append(
            f"{int(off.any(-1).sum())} written row(s) with an element beyond {tol} and more than one e4m3 step off"
        )
    scale_diff = (a["scale"].to(torch.int32) - e["scale"].to(torch.int32)).abs()
    scale_off = scale_diff[..., :used] > 1
    if bool(scale_off.any()):
        problems.append(f"{int(scale_off.any(-1).sum())} written row(s) with a scale byte more than 1 off")
    padding_off = scale_diff[..., used:] > 0  # the bytes past the row's blocks are written 0 (spec A2)
    if bool(padding_off.any()):
        problems.append(f"{int(padding_off.any(-1).sum())} written row(s) with a padding scale byte not as written")
    if before is not None:
        for part in POOL_PARTS:
            moved = (_bytes(actual[part]) != _bytes(before[part])).flatten(2).any(-1) & ~written
            if bool(moved.any()):
                problems.append(f"{int(moved.sum())} pool row(s) the step does not write changed ({part})")
                break
    if problems:
        check.passed = False
        check.detail = "; ".join(([check.detail] if check.detail else []) + problems)
    return check


def exact_outputs(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], name: str) -> Check:
    """The tensor ``name``, or every tensor under ``name.``, bit-identical to the expected one."""
    keys = [name] if name in expected else sorted(k for k in expected if k.startswith(name + "."))
    for key in keys:
        check = bit_identical(actual[key], expected[key], key)
        if not check:
            check.name = name
            return check
    return Check(name, True, "bit-identical")


@dataclass
class Report:
    """Verdicts on every output of one op call. Truthy when all passed."""

    op: str
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(self.checks)

    def __bool__(self) -> bool:
        return self.passed

    def failures(self) -> str:
        """The failed checks on one line, ``name: detail; ...`` (empty when all passed)."""
        return "; ".join(f"{c.name}: {c.detail}" for c in self.checks if not c.passed)

    def verdict(self) -> str:
        """``ok``, or ``MISMATCH`` and the failed checks on one line."""
        return "ok" if self.passed else "MISMATCH " + self.failures()

    @property
    def worst_violation_ratio(self) -> float:
        return max((c.violation_ratio for c in self.checks), default=0.0)

    def __str__(self) -> str:
        lines = [f"{self.op}: {'PASS' if self.passed else 'FAIL'}"]
        for c in self.checks:
            lines.append(
                f"  {c.name:<13} {'ok  ' if c.passed else 'FAIL'} max_abs={c.max_abs:<10.3g} "
                f"max_rel={c.max_rel:<10.3g} violations={c.violation_ratio:<8.3%} [{c.rule}]"
                + (f"  {c.detail}" if c.detail else "")
            )
        return "\n".join(lines)


def _check(
    out: Output, outputs: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], inputs: Mapping[str, Any]
) -> Check:
    """One output against the reference by its rule (see ``dsv4.ops.Output``)."""
    tol = out.tolerance
    if out.rule == "fp8_rows":
        before = inputs.get("before")
        return fp8_rows_allclose(
            pool_tensors(outputs, out.name), pool_tensors(expected, out.name), tol,
            pool_tensors(before, out.name) if before else None, inputs.get("written", {}).get(out.name), out.name,
        )  # fmt: skip
    if out.rule == "cache":
        return _check_keys(outputs, expected, inputs, tol)
    if out.rule == "exact":
        return exact_outputs(outputs, expected, out.name)
    actual = outputs[out.name]
    if out.rule == "topk":
        ref_score = expected["score"]
        offset, start = int(inputs.get("offset", 0)), inputs.get("start_pos")
        return topk_allclose(actual, expected[out.name], ref_score, offset, tol.atol, tol.rtol, start_pos=start)
    if out.rule == "score":
        return _check_score(actual, expected[out.name], tol)
    return ratio_allclose(actual, expected[out.name], tol.atol, tol.rtol, tol.max_error_ratio, out.name)


def compare(
    op: str,
    outputs: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    inputs: Mapping[str, Any] | None = None,
) -> Report:
    """Check every output of ``op`` against ``expected`` with the spec §6 rule its descriptor gives.

    ``inputs`` (optional) lets the stricter rules apply: ``offset`` for ``topk_idxs``, and
    ``start_pos`` (``[B]``) for the keys each token sees; the pre-step ``idx_kv_cache`` with
    ``start_pos`` and ``seq`` (S) so rows the step did not write must be bit-identical to before;
    for an FP8 pool, ``before`` (the tensors before the step, by output name) and optionally
    ``written`` (output name -> ``[NB, bs]`` bool of the rows written).
    """
    desc = get_op(op)
    inputs = inputs or {}
    report = Report(op)

    for out in desc.outputs:
        problem = _parts_problem(out, outputs, expected)
        report.checks.append(_fail(out.name, "-", problem) if problem else _check(out, outputs, expected, inputs))
    return report


def _parts(out: Output, outputs: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> list[str]:
    """The tensors the rule of ``out`` compares: a pool's every part, the key pool's codes and scales, a
    record's every tensor (in either mapping), else the output itself."""
    if out.rule == "fp8_rows":
        return [f"{out.name}.{p}" for p in POOL_PARTS]
    if out.rule == "cache":
        return ["keys", "key_scale"]
    if out.name in outputs or out.name in expected:
        return [out.name]
    return sorted({k for d in (outputs, expected) for k in d if k.startswith(out.name + ".")})


def _parts_problem(out: Output, outputs: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> str:
    """Why ``out`` cannot be judged: a part missing on either side, or held in another dtype than the
    expected one ('' when it can)."""
    parts = _parts(out, outputs, expected) or [out.name]
    needed = [(k, "missing from outputs", outputs) for k in parts] + [(k, "no expected value", expected) for k in parts]
    if out.rule == "topk":
        needed.append(("score", "no expected score (the top-k rule reads it)", expected))
    for key, missing, where in needed:
        if key not in where:
            return f"{key}: {missing}"
    for key in parts:
        a, e = outputs[key], expected[key]
        if a.dtype != e.dtype and not (out.rule == "topk" and not a.is_floating_point() and not e.is_floating_point()):
            return f"{key}: {str(a.dtype).removeprefix('torch.')}, expected {str(e.dtype).removeprefix('torch.')}"
    return ""


def step_inputs(
    x: torch.Tensor, start_pos: int | list[int] | torch.Tensor, before: IndexerState, offset: int = 0
) -> dict[str, Any]:
    """``compare``'s ``inputs`` for one step of a stateful op on ``x [B, S, D]``: ``start_pos`` per
    row (an int applies to every row), ``seq``, the key pool and block table from ``before`` the
    step, and the ``offset`` the indexer added. The tensors are copies on the CPU, so the step may
    then run on ``before`` itself."""
    b, s = x.shape[:2]

    def copy(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", copy=True)

    start = copy(torch.as_tensor(start_pos).reshape(-1)).expand(b)
    return {
        "offset": offset, "start_pos": start, "seq": s, "keys": copy(before.keys),
        "key_scale": copy(before.key_scale), "block_table": copy(before.block_table),
    }  # fmt: skip

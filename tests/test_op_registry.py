"""Adding an op is one descriptor, one reference and one kernel: this file adds a toy op (a gained
RMSNorm) and nothing else, and every harness picks it up — ``dsv4 run``, ``dsv4 bench --model-only``,
``dsv4 golden save/check`` and ``torch.ops.dsv4``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
import triton
import triton.language as tl

import dsv4
from conftest import DEVICE
from dsv4.cli import main
from dsv4.harness.golden import ratio_allclose
from dsv4.ops import OpDescriptor, Output, Tolerance, get_op, op_names, register_op, registry
from dsv4.ops.case_inputs import CaseInputs
from dsv4.ops.costs import BF16, OpCost
from dsv4.ops.validate import check_tensor

NAME = "toy_rms_norm"


@dataclass
class ToyWeights:
    """``gain [D] fp32``."""

    gain: torch.Tensor


class ToyOut(NamedTuple):
    y: torch.Tensor


def toy_reference(x: torch.Tensor, w: ToyWeights, eps: float, out: ToyOut | None = None) -> ToyOut:
    """``y = bf16(x * 1/sqrt(mean(x^2) + eps) * gain)``, rows of ``x [T, D] bf16``."""
    v = x.float()
    y = (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * w.gain).to(torch.bfloat16)
    if out is None:
        return ToyOut(y)
    out.y.copy_(y)
    return out


@triton.jit
def _toy_kernel(x_ptr, gain_ptr, y_ptr, eps, D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, D)
    v = tl.load(x_ptr + row * D + cols).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(v * v, 0) / D + eps)
    tl.store(y_ptr + row * D + cols, (v * inv * tl.load(gain_ptr + cols)).to(tl.bfloat16))


def toy_kernel(x: torch.Tensor, w: ToyWeights, eps: float, out: ToyOut | None = None) -> ToyOut:
    out = ToyOut(torch.empty_like(x)) if out is None else out
    _toy_kernel[(x.shape[0],)](x, w.gain, out.y, eps, D=x.shape[1])
    return out


def toy_rms_norm(
    x: torch.Tensor, w: ToyWeights, *, eps: float = 1e-6, backend: str = "auto", out: ToyOut | None = None
) -> ToyOut:
    """Gained RMSNorm: ``x [T, D] bf16``, ``w.gain [D] fp32`` -> ``ToyOut(y [T, D] bf16)``."""


def _validate(args: dict[str, Any], out: ToyOut | None) -> dict[str, Any]:
    x = check_tensor("x", args["x"], torch.bfloat16, (None, None), getattr(args["x"], "device", None))
    check_tensor("w.gain", args["w"].gain, torch.float32, (x.shape[1],), x.device)
    if out is not None:
        check_tensor("out.y", out.y, torch.bfloat16, tuple(x.shape), x.device)
    return {}


def _case_args(c: CaseInputs) -> dict[str, Any]:
    gain = 1.0 + 0.1 * torch.randn(c.cfg.hidden_size, generator=c.generator)
    return {"x": c.x.reshape(c.batch * c.seq, -1), "w": ToyWeights(gain.to(c.device))}


def _cost(cfg: dsv4.DeepSeekV4Config, start_pos: list[int], seq: int) -> OpCost:
    t, d = len(start_pos) * seq, cfg.hidden_size
    return OpCost(NAME, {"x": t * d * BF16, "gain": d * 4}, {"y": t * d * BF16}, {})


TOY = OpDescriptor(
    name=NAME,
    signature=toy_rms_norm,
    outputs=(Output("y", Tolerance(1e-4, 1 / 128)),),
    mutates=(),
    validate=_validate,
    case_args=_case_args,
    cost=_cost,
    fake_result=lambda args: ToyOut(torch.empty_like(args["x"])),
    implementations={"reference": f"{__name__}:toy_reference", "triton": f"{__name__}:toy_kernel"},
)


@pytest.fixture(scope="module", autouse=True)
def toy_op() -> Iterator[OpDescriptor]:
    """The toy op registered for this module's tests, and taken out of the registry after them
    (``torch.ops.dsv4.toy_rms_norm`` stays defined: torch.library has no undefine)."""
    if not hasattr(torch.ops.dsv4, NAME):  # first time in this process
        register_op(TOY)
    else:
        registry._REGISTRY[NAME] = TOY
    yield TOY
    registry._REGISTRY.pop(NAME)


def test_it_is_registered() -> None:
    assert get_op(NAME) is TOY and NAME in op_names()


def test_it_appears_in_dsv4_run(capsys: pytest.CaptureFixture) -> None:
    args = ["run", "--backend", "triton", "--steps", "1", "--start-pos", "4", "--batch", "1", "--device", DEVICE.type]
    assert main(args) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if NAME in line]
    assert len(rows) == 1 and "ok (vs reference" in rows[0], rows


def test_it_appears_in_bench_model_only(capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "--preset", "tiny", "--mode", "decode", "--model-only", "--cpu"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(NAME)]
    t, d = 4 * 2, dsv4.get_config("tiny").hidden_size  # tiny decode: B=4, S=2
    assert len(rows) == 1 and f"{(2 * t * d * 2 + 4 * d) / 1e6:.2f}" in rows[0], rows


def test_it_round_trips_through_golden_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["golden", "save", str(tmp_path), "--op", NAME, "--preset", "tiny", "--device", "cpu"]) == 0
    assert main(["golden", "check", str(tmp_path), "--backend", "triton", "--device", DEVICE.type]) == 0
    assert "1/1 golden cases passed on backend triton" in capsys.readouterr().out


def test_it_is_a_torch_custom_op() -> None:
    x = dsv4.synthetic_activations((5, 64), seed=3, device=DEVICE)
    w = ToyWeights(torch.linspace(0.5, 1.5, 64, device=DEVICE))
    expected = toy_reference(x, w, 1e-6).y
    y = torch.ops.dsv4.toy_rms_norm(x, w.gain, 1e-6, "triton")
    tol = TOY.output("y").tolerance
    assert ratio_allclose(y, expected, tol.atol, tol.rtol, tol.max_error_ratio), "the kernel, through torch.ops"
    out = ToyOut(torch.empty_like(x))
    torch.ops.dsv4.toy_rms_norm_out(x, w.gain, 1e-6, "reference", *out)
    assert torch.equal(out.y, expected)
    torch.library.opcheck(torch.ops.dsv4.toy_rms_norm.default, (x, w.gain, 1e-6, "reference"))

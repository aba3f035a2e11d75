"""RoPE tables (YaRN) and the interleaved rotation (spec §2)."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import pytest
import torch

import dsv4
from dsv4.reference.common import apply_rope
from golden_vectors import Vectors


def _yarn_table_float64(cfg: dsv4.DeepSeekV4Config, theta: float, yarn: bool, n: int) -> tuple[np.ndarray, np.ndarray]:
    """An independent scalar float64 computation of DeepSeek's YaRN-corrected table."""
    r = cfg.qk_rope_head_dim
    orig, factor = cfg.original_max_position_embeddings, cfg.rope_factor

    def dim_of(rotations: float) -> float:  # the rotary dim completing `rotations` turns over orig tokens
        return r * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    freqs = []
    for i in range(r // 2):
        f = 1.0 / theta ** (2 * i / r)
        if yarn and orig > 0:
            low, high = max(math.floor(dim_of(cfg.beta_fast)), 0), min(math.ceil(dim_of(cfg.beta_slow)), r - 1)
            ramp = min(max((i - low) / (high - low), 0.0), 1.0)  # 0: keep f, 1: interpolate f/factor
            f = f / factor * ramp + f * (1 - ramp)
        freqs.append(f)
    angles = np.arange(n, dtype=np.float64)[:, None] * np.array(freqs)[None, :]
    return np.cos(angles), np.sin(angles)


@pytest.mark.parametrize("preset", ["flash", "demo", "tiny"])
@pytest.mark.parametrize("kind", ["compressed", "window"])
def test_table_matches_float64(preset: str, kind: Literal["compressed", "window"]) -> None:
    cfg = dsv4.get_config(preset)
    theta = cfg.compress_rope_theta if kind == "compressed" else cfg.rope_theta
    cos, sin = _yarn_table_float64(cfg, theta, kind == "compressed", 4096)
    table = dsv4.rope_table(cfg, kind, max_position=4096)
    assert table.cos.dtype == torch.float32 and table.cos.shape == (4096, cfg.qk_rope_head_dim // 2)
    np.testing.assert_allclose(table.cos.double().numpy(), cos, rtol=0, atol=1e-7)
    np.testing.assert_allclose(table.sin.double().numpy(), sin, rtol=0, atol=1e-7)


@pytest.mark.parametrize("preset", ["pro", "tiny"])
def test_each_layer_takes_the_table_of_its_kind(preset: str) -> None:
    """Attention spec §1: a layer with a compressor (CSA ratio 4, HCA any other ratio) rotates with
    ``compress_rope_theta`` and YaRN, a sliding-window-only layer (ratio 0) with ``rope_theta``. Every
    layer of a preset, against the float64 tables; the pro preset starts with HCA layers, tiny's third
    layer is HCA at ratio 16."""
    cfg = dsv4.get_config(preset)
    compressed = _yarn_table_float64(cfg, cfg.compress_rope_theta, True, 64)
    window = _yarn_table_float64(cfg, cfg.rope_theta, False, 64)
    for layer, ratio in enumerate(cfg.compress_ratios):
        table = dsv4.layer_rope_table(cfg, layer, max_position=64)
        cos, sin = window if ratio == 0 else compressed
        np.testing.assert_allclose(table.cos.double().numpy(), cos, rtol=0, atol=1e-7, err_msg=f"layer {layer}")
        np.testing.assert_allclose(table.sin.double().numpy(), sin, rtol=0, atol=1e-7, err_msg=f"layer {layer}")


@pytest.mark.parametrize(
    ("layer", "error", "words"),
    [
        (4, ValueError, r"expected 0 <= layer < 4 \(tiny's compress_ratios\), got 4"),
        (-1, ValueError, r"expected 0 <= layer < 4 \(tiny's compress_ratios\), got -1"),
        (1.0, TypeError, "expected an int, got float"),
        (True, TypeError, "expected an int, got bool"),
    ],
    ids=["past-the-list", "negative", "float", "bool"],
)
def test_a_layer_the_config_does_not_list_has_no_table(layer: object, error: type, words: str) -> None:
    """A layer's table follows its kind in ``compress_ratios``: a layer past the list or before it, or one that
    is not an int (a float, a bool), is refused naming ``layer`` rather than given some other layer's kind."""
    with pytest.raises(error, match=f"^layer: {words}$"):
        dsv4.layer_rope_table(dsv4.get_config("tiny"), layer, max_position=64)  # type: ignore[arg-type]


def test_far_positions_keep_fp32_accuracy() -> None:
    """At 1M tokens an fp32 angle p*f would be off by ~0.06 rad; the table is computed in float64."""
    cfg = dsv4.get_config("flash")
    table = dsv4.rope_table(cfg, "compressed", max_position=cfg.max_position_embeddings)
    last = cfg.max_position_embeddings - 1
    cos1, sin1 = _yarn_table_float64(cfg, cfg.compress_rope_theta, True, 2)
    freqs = np.arctan2(sin1[1], cos1[1])  # angle at position 1 = the frequencies (all < pi)
    np.testing.assert_allclose(table.sin[last].double().numpy(), np.sin(last * freqs), atol=1e-6)
    np.testing.assert_allclose(table.cos[last].double().numpy(), np.cos(last * freqs), atol=1e-6)


def test_yarn_only_when_original_length_set() -> None:
    demo = dsv4.get_config("demo")  # original_max_position_embeddings = 0: plain theta
    plain = dsv4.rope_table(demo.replace(rope_factor=1.0), "compressed", max_position=64)
    assert torch.equal(dsv4.rope_table(demo, "compressed", max_position=64).cos, plain.cos)
    flash = dsv4.get_config("flash")
    yarn = dsv4.rope_table(flash, "compressed", max_position=64)
    no_yarn = dsv4.rope_table(flash.replace(original_max_position_embeddings=0), "compressed", max_position=64)
    assert not torch.equal(yarn.cos, no_yarn.cos)
    assert torch.equal(yarn.cos[:, 0], no_yarn.cos[:, 0])  # the fastest frequencies are not interpolated


def test_a_ramp_ending_past_the_last_frequency_matches_float64() -> None:
    """The YaRN ramp's upper end is clamped to ``R - 1`` (DeepSeek's ``min(high, dim - 1)``), not to the last
    of the ``R/2`` frequencies: with ``beta_slow`` 0.01 (a checkpoint's ``rope_scaling`` may say so) the
    ramp ends at dimension 38 of flash's 64, past the 31 the table has, so every frequency is only partly
    interpolated."""
    cfg = dsv4.get_config("flash").replace(beta_slow=0.01)
    cos, sin = _yarn_table_float64(cfg, cfg.compress_rope_theta, True, 4096)
    table = dsv4.rope_table(cfg, "compressed", max_position=4096)
    np.testing.assert_allclose(table.cos.double().numpy(), cos, rtol=0, atol=1e-7)
    np.testing.assert_allclose(table.sin.double().numpy(), sin, rtol=0, atol=1e-7)


def test_golden_vectors_use_this_table() -> None:
    v = Vectors("qkv_T7", torch.device("cpu"))
    table = dsv4.rope_table(dsv4.get_config("flash"), "compressed", max_position=v.t("rope_cos").shape[0])
    assert torch.equal(table.cos, v.t("rope_cos")) and torch.equal(table.sin, v.t("rope_sin"))


def test_interleaved_rope_is_complex_multiplication() -> None:
    g = torch.Generator().manual_seed(1)
    table = dsv4.rope_table(dsv4.get_config("tiny"), "compressed", max_position=512)
    u = torch.randn(9, 3, 64, generator=g)
    positions = torch.randint(0, 512, (9,), generator=g)
    got = apply_rope(u, positions, table)
    rot = torch.polar(torch.ones_like(table.cos[positions]), torch.atan2(table.sin[positions], table.cos[positions]))
    want = torch.view_as_real(torch.view_as_complex(u.view(9, 3, 32, 2)) * rot[:, None, :]).flatten(-2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_rotation_preserves_norm_and_position_zero_is_identity() -> None:
    g = torch.Generator().manual_seed(2)
    table = dsv4.rope_table(dsv4.get_config("flash"), "compressed", max_position=100_000)
    u = torch.randn(50, 64, generator=g)
    positions = torch.randint(0, 100_000, (50,), generator=g)
    y = apply_rope(u, positions, table)
    torch.testing.assert_close(y.norm(dim=-1), u.norm(dim=-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(apply_rope(u, torch.zeros(50, dtype=torch.long), table), u)


def test_rejects_bad_kind_and_size() -> None:
    cfg = dsv4.get_config("tiny")
    with pytest.raises(ValueError, match="kind"):
        dsv4.rope_table(cfg, "yarn")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_position"):
        dsv4.rope_table(cfg, max_position=0)
    for size in (10.7, True, torch.tensor(16)):  # not truncated to 10 rows, 1 row, or taken from a tensor
        with pytest.raises(TypeError, match="^max_position: expected an int or None"):
            dsv4.rope_table(cfg, max_position=size)  # type: ignore[arg-type]


def test_a_zero_width_yarn_ramp_gives_finite_frequencies() -> None:
    """``beta_fast`` and ``beta_slow`` whose correction dimensions round to the same one (here both below
    dimension 0: low == high == 0): the ramp is widened, as upstream does, instead of dividing by zero."""
    from dsv4.model.rope import _correction_dim, rope_frequencies

    beta = 65536 / (2 * math.pi) * 1.01  # a little over one rotation in the original context
    assert -1 < _correction_dim(beta, 64, 160000.0, 65536) < 0
    freqs = rope_frequencies(64, 160000.0, 16.0, 65536, beta_fast=beta, beta_slow=beta)
    assert freqs.isfinite().all() and freqs.gt(0).all()

"""``qkv_proj_rope`` with ``backend="triton"`` against the reference (spec §3), spec §6 tolerances.

Without a GPU the kernels run through Triton's interpreter, so full-size dims appear in two cases
only (one decode, one prefill); the ``tiny`` preset carries the sweep over token counts.
"""

from __future__ import annotations

import pytest
import torch

import dsv4
from conftest import DEVICE
from dsv4.harness.golden import compare
from dsv4.kernels.launch import H100_SMS
from dsv4.kernels.projection import projection_tiles
from dsv4.kernels.qkv_proj_rope import launch_q_heads, q_heads_tiles
from dsv4.model.config import DeepSeekV4Config, get_config
from dsv4.model.rope import RopeTable, rope_table
from dsv4.model.weights import AttnWeights, synthetic_activations, synthetic_weights

TINY = get_config("tiny")
# Dims of no preset: odd head count, a q LoRA rank that is not a power of two (as in ``pro``) and a
# hidden size that is not one either; the kernels must take every dimension from the tensors.
ODD = TINY.replace(name="odd", hidden_size=384, num_attention_heads=3, q_lora_rank=192)


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


def test_tiny_prefill_from_a_block_boundary() -> None:
    """A prompt chunk continuing at position 128 and running to the end of the table."""
    check(TINY, torch.arange(128, 256 + 64), 256 + 64, seed=11, outliers=2)


def test_demo_decode() -> None:
    """Full-size dims (demo = flash dims, 4096 positions) at the deployment decode shape T=128."""
    cfg = get_config("demo")
    table = cfg.max_position_embeddings
    check(cfg, decode_positions(128, table, seed=1), table, seed=1, outliers=0)


def test_demo_prefill() -> None:
    """Full-size dims, a 160-token prompt chunk at positions 1000.. with outlier activations: two
    M-tiles in the projection (128 + 32 rows) and three in the q heads (64 + 64 + 32), the last
    partly masked."""
    cfg = get_config("demo")
    check(cfg, torch.arange(1000, 1160), cfg.max_position_embeddings, seed=2, outliers=4)


@pytest.mark.parametrize("t", [3, 64])
def test_repeatable_bit_for_bit(t: int) -> None:
    """The split-K partial sums are added in a fixed order and a head's halves combine their sums of
    squares in a fixed order: two runs agree exactly (T=3 is split over K, T=64 is not)."""
    x, w, positions, rope = qkv_inputs(TINY, decode_positions(t, 256, seed=3), 256, seed=3, outliers=4)
    splits = projection_tiles(t, TINY.hidden_size, TINY.q_lora_rank, TINY.head_dim, H100_SMS).splits
    assert (splits > 1) == (t == 3)
    first = dsv4.qkv_proj_rope(x, w, positions, rope, backend="triton")
    for _ in range(2):
        again = dsv4.qkv_proj_rope(x, w, positions, rope, backend="triton")
        for name, a, b in zip(first._fields, first, again, strict=True):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("t", [5, 130])
def test_paired_halves_compute_the_same_bits(t: int) -> None:
    """The GPU's paired q-heads path (a program per half head, the two swapping their sums of squares)
    run through the interpreter, which runs programs one at a time: a first launch publishes every
    half's sums (the first half of each pair reads a placeholder 0 and stores garbage), a second
    launch finds its partner's sums already published. Its ``q`` equals the one-program-per-head path
    bit for bit."""
    x, w, positions, rope = qkv_inputs(TINY, decode_positions(t, 256, seed=7), 256, seed=7, outliers=2)
    expected = dsv4.qkv_proj_rope(x, w, positions, rope, backend="triton")
    block_m, paired = q_heads_tiles(t, TINY.num_attention_heads, H100_SMS)
    assert paired
    sumsq = torch.zeros(2 * TINY.num_attention_heads * t, dtype=torch.float32, device=DEVICE)
    q = torch.empty_like(expected.q)
    for _ in range(2):
        launch_q_heads(expected.qr, expected.qr_scale, w, positions, rope, TINY.rms_norm_eps, q, sumsq, block_m, True)
    assert torch.equal(q, expected.q)


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
    and in the q heads), the fp32 partials cost under half the projection's weight traffic, and the
    q heads pair up in one wave of SMs."""
    cfg = get_config("flash")
    t, d, ql, hd, h = 128, cfg.hidden_size, cfg.q_lora_rank, cfg.head_dim, cfg.num_attention_heads
    tiles = projection_tiles(t, d, ql, hd, H100_SMS)
    n_tiles, m_tiles, splits = tiles.grid(t, ql + hd)
    assert (n_tiles, m_tiles, splits) == (12, 1, 4)
    partial_traffic = 2 * splits * t * (ql + hd) * 4  # written once, read back once
    assert partial_traffic <= (ql + hd) * d * 2 / 2
    assert q_heads_tiles(t, h, H100_SMS) == (128, True)
    assert q_heads_tiles(129, h, H100_SMS) == (64, False)  # two M-tiles of pairs would need 256 SMs


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

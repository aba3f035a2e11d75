"""The bytes an op must move and the arithmetic it must do: the roofline's two numbers.

**Minimal bytes** are what a perfect fusion of the op moves through device memory:

- every input element the op needs is read once (weights, activations, per-token RoPE rows, the
  cache rows that exist before the step), every output element is written once;
- intermediates (projections, norms, unquantized queries, the INT8 copies of cache rows, this
  step's new cache rows when the same op scores them) stay on chip and cost nothing;
- caller-owned state costs what changes: the compressor ring (``kv_state``/``score_state``) is
  charged for the slot halves whose pre-step values the step uses (read) and the slot halves it
  changes (written), each once — see ``ring_traffic``; a cache row is charged when written;
- ``score`` is an output of the indexer, so it is written once (the whole ``[B, S, max cache_len]``
  tensor, masked entries included); top-k reads nothing more — a perfect fusion selects while it
  scores. A two-pass kernel (score, then select) pays one more read of ``score``; the bench
  reports that as traffic above the minimum, not as part of it.

Dtypes are the contract's: activations and projection weights bf16, INT8 weights and ``qr``, fp32
scales and state, RMSNorm gains bf16 (as ``dsv4.weights`` makes them), positions and ``start_pos``
int64 (as ``dsv4.cases`` passes them). A RoPE table row is one position's cos and sin: ``R/2`` fp32
each; one row is charged per token (per closed block for the compressed keys).

**FLOPs** count matmuls only, ``2*M*N*K``, split by operand type: ``bf16`` (bf16 operands), ``int8``
(INT8 x INT8 -> INT32) and ``fp32`` (the Hadamard rotations). Norms, RoPE, softmax, quantization
and top-k are elementwise or smaller and left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..model.config import COMPRESS_RATIO, DeepSeekV4Config
from ..model.state import STATE_SLOTS

BF16, FP32, INT8, INT32, INT64 = 2, 4, 1, 4, 8  # bytes per element


@dataclass(frozen=True)
class OpCost:
    """Minimal traffic (bytes per tensor, read and written) and matmul FLOPs of one op call."""

    op: str
    reads: dict[str, int] = field(default_factory=dict)
    writes: dict[str, int] = field(default_factory=dict)
    flops: dict[str, int] = field(default_factory=dict)

    @property
    def read_bytes(self) -> int:
        return sum(self.reads.values())

    @property
    def write_bytes(self) -> int:
        return sum(self.writes.values())

    @property
    def bytes(self) -> int:
        return self.read_bytes + self.write_bytes

    @property
    def total_flops(self) -> int:
        return sum(self.flops.values())

    def to_dict(self) -> dict:
        return {
            "op": self.op,
            "bytes": self.bytes,
            "read_bytes": self.read_bytes,
            "write_bytes": self.write_bytes,
            "flops": dict(self.flops),
            "reads": dict(self.reads),
            "writes": dict(self.writes),
        }


def _rope_row_bytes(cfg: DeepSeekV4Config) -> int:
    return 2 * (cfg.qk_rope_head_dim // 2) * FP32  # cos and sin of one position


def qkv_proj_rope_cost(cfg: DeepSeekV4Config, tokens: int) -> OpCost:
    """``qkv_proj_rope`` on ``tokens`` (T) tokens (spec §3)."""
    t, d, ql, hd = tokens, cfg.hidden_size, cfg.q_lora_rank, cfg.head_dim
    nq = cfg.num_attention_heads * hd
    reads = {
        "x": t * d * BF16,
        "positions": t * INT64,
        "rope rows": t * _rope_row_bytes(cfg),
        "wq_a": ql * d * BF16,
        "gamma_cq": ql * BF16,
        "wq_b": nq * ql * INT8,
        "wq_b_scale": nq * FP32,
        "wkv": hd * d * BF16,
        "gamma_ckv": hd * BF16,
    }
    writes = {"q": t * nq * BF16, "kv": t * hd * BF16, "qr": t * ql * INT8, "qr_scale": t * FP32}
    flops = {"bf16": 2 * t * d * ql + 2 * t * d * hd, "int8": 2 * t * ql * nq}
    return OpCost("qkv_proj_rope", reads, writes, flops)


def ring_traffic(start: int, seq: int) -> tuple[int, int, int]:
    """One batch row's compressor ring over a step of ``seq`` tokens from position ``start``.

    The ring is 8 slots x 2 halves (columns ``[0:HID)`` and ``[HID:2*HID)``) per state tensor.
    Returns ``(halves read, halves written, blocks closed)``: a half is read when the step needs
    its pre-step value (a closing block pools slots 0..3 first half and slots 4..7 second half, then
    shifts slots 4..7 into 0..3) and it is not already on chip (written or read earlier in the step);
    a half is written when the step changes it. Each half counts at most once.
    """
    half = COMPRESS_RATIO  # slots per block
    on_chip: set[tuple[int, int]] = set()
    read: set[tuple[int, int]] = set()
    written: set[tuple[int, int]] = set()

    def use(loc: tuple[int, int]) -> None:
        if loc not in on_chip:
            read.add(loc)
            on_chip.add(loc)

    def write(loc: tuple[int, int]) -> None:
        written.add(loc)
        on_chip.add(loc)

    closed = 0
    for p in range(start, start + seq):
        for h in (0, 1):
            write((half + p % half, h))
        if (p + 1) % half:
            continue
        closed += 1
        for i in range(half):
            use((i, 0))
            use((half + i, 1))
        for i in range(half):
            for h in (0, 1):
                use((half + i, h))
                write((i, h))
    assert all(0 <= s < STATE_SLOTS for s, _ in written | read)
    return len(read), len(written), closed


def indexer_compressor_cost(cfg: DeepSeekV4Config, start_pos: Sequence[int], seq: int) -> OpCost:
    """``indexer_compressor`` for batch rows starting at ``start_pos[b]`` with ``seq`` new tokens each (spec §4)."""
    b, d, hid = len(start_pos), cfg.hidden_size, cfg.index_head_dim
    half_bytes = hid * FP32  # one slot half of one state tensor
    ring = [ring_traffic(p, seq) for p in start_pos]
    halves_read = sum(r for r, _, _ in ring)
    halves_written = sum(w for _, w, _ in ring)
    closed = sum(c for _, _, c in ring)
    ape_rows = len({(p + s) % COMPRESS_RATIO for p in start_pos for s in range(seq)})
    reads = {
        "x": b * seq * d * BF16,
        "start_pos": b * INT64,
        "compressor.wkv": 2 * hid * d * BF16,
        "compressor.wgate": 2 * hid * d * BF16,
        "compressor.ape": ape_rows * 2 * hid * FP32,
        "compressor.norm_w": hid * BF16 if closed else 0,
        "rope rows (blocks)": closed * _rope_row_bytes(cfg),
        "kv_state + score_state": 2 * halves_read * half_bytes,
    }
    writes = {
        "kv_state + score_state": 2 * halves_written * half_bytes,
        "idx_kv_cache (new rows)": closed * hid * BF16,
    }
    flops = {"bf16": 2 * b * seq * d * 2 * hid * 2, "fp32": closed * 2 * hid * hid}
    return OpCost("indexer_compressor", reads, writes, flops)


def indexer_cost(cfg: DeepSeekV4Config, start_pos: Sequence[int], seq: int, topk: int | None = None) -> OpCost:
    """``indexer`` (compressor included) for batch rows starting at ``start_pos[b]`` (spec §5)."""
    topk = cfg.index_topk if topk is None else topk
    comp = indexer_compressor_cost(cfg, start_pos, seq)
    b, t = len(start_pos), len(start_pos) * seq
    d, ql, hi, hid = cfg.hidden_size, cfg.q_lora_rank, cfg.index_n_heads, cfg.index_head_dim
    cache_len = [(p + seq) // COMPRESS_RATIO for p in start_pos]
    old_rows = sum(p // COMPRESS_RATIO for p in start_pos)  # rows this step did not write
    visible = sum((p + s + 1) // COMPRESS_RATIO for p in start_pos for s in range(seq))
    reads = {
        **comp.reads,
        "qr": t * ql * INT8,
        "qr_scale": t * FP32,
        "wq_b": hi * hid * ql * INT8,
        "wq_b_scale": hi * hid * FP32,
        "weights_proj": hi * d * BF16,
        "rope rows (tokens)": t * _rope_row_bytes(cfg),
        "idx_kv_cache (old rows)": old_rows * hid * BF16,
    }
    writes = {**comp.writes, "score": b * seq * max(cache_len) * FP32, "topk_idxs": t * topk * INT32}
    flops = {
        "bf16": comp.flops["bf16"] + 2 * t * d * hi,
        "int8": 2 * t * ql * hi * hid + 2 * hi * hid * visible,
        "fp32": comp.flops["fp32"] + 2 * t * hi * hid * hid,
    }
    return OpCost("indexer", reads, writes, flops)


def op_cost(cfg: DeepSeekV4Config, op: str, start_pos: Sequence[int], seq: int) -> OpCost:
    """The cost of ``op`` for batch rows starting at ``start_pos`` with ``seq`` tokens each."""
    if op == "qkv_proj_rope":
        return qkv_proj_rope_cost(cfg, len(start_pos) * seq)
    if op == "indexer_compressor":
        return indexer_compressor_cost(cfg, start_pos, seq)
    if op == "indexer":
        return indexer_cost(cfg, start_pos, seq)
    raise ValueError(f"op: expected qkv_proj_rope, indexer_compressor or indexer, got {op!r}")

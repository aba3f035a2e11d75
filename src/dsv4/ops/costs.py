"""The bytes an op must move and the arithmetic it must do: the roofline's two numbers.

Each op's descriptor (``dsv4.ops.defs``) computes its ``OpCost`` with the rules below; this module
holds the record and the pieces the ops share.

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
int64 (as ``dsv4.cases`` passes them).

Two small tables are counted the same way in every op, once per op call:

- **RoPE rows**: a row is one position's cos and sin, ``R/2`` fp32 each; one row is charged per
  *distinct* position the op rotates at (its tokens' positions; a compressed row's block's first
  position, ``ratio * j``), however many tokens, slots or rows share it — see ``rope_rows_bytes``;
- **block-table entries** (int32): one per distinct pool block that the rows an op reads or writes
  in a slot span, per slot (each slot has its own table row), counted once even when the op both
  reads and writes rows of that block — see ``blocks_spanned``.

**FLOPs** count matmuls only, ``2*M*N*K``, split by operand type: ``bf16`` (bf16 operands), ``int8``
(INT8 x INT8 -> INT32) and ``fp32`` (the Hadamard rotations). Norms, RoPE, softmax, quantization
and top-k are elementwise or smaller and left out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ..model.config import COMPRESS_RATIO, DeepSeekV4Config

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


def rope_row_bytes(cfg: DeepSeekV4Config) -> int:
    return 2 * (cfg.qk_rope_head_dim // 2) * FP32  # cos and sin of one position


def rope_rows_bytes(cfg: DeepSeekV4Config, positions: Iterable[int]) -> int:
    """The RoPE table rows an op reads to rotate at ``positions``: one row per distinct position."""
    return len(set(positions)) * rope_row_bytes(cfg)


def closed_rows(start: int, seq: int, ratio: int) -> range:
    """The compressed rows (blocks ``j``) that ``seq`` tokens from ``start`` close: those whose last
    position ``ratio * j + ratio - 1`` is one of the step's."""
    return range(start // ratio, (start + seq) // ratio)


def blocks_spanned(lo: int, hi: int, block_size: int) -> int:
    """How many pool blocks of ``block_size`` rows the rows ``[lo, hi)`` of one slot span (0 when empty)."""
    return (hi - 1) // block_size - lo // block_size + 1 if hi > lo else 0


def ring_traffic(start: int, seq: int, ratio: int = COMPRESS_RATIO, coff: int = 2) -> tuple[int, int, int]:
    """One batch row's compressor ring over a step of ``seq`` tokens from position ``start``.

    The ring is ``coff * ratio`` slots x ``coff`` halves per state tensor (the indexer's: 8 slots x 2
    halves, columns ``[0:HID)`` and ``[HID:2*HID)``), position ``p`` in slot ``p % (coff * ratio)``
    (spec §4 v3, attention spec A3). Returns ``(halves read, halves written, blocks closed)``: a half
    is read when the step needs its pre-step value and it is not already on chip (written or read
    earlier in the step): block ``j`` closing pools, overlapping (``coff`` 2), the first halves of
    block ``j-1``'s slots ``ratio*((j-1)%2)..`` (none for ``j = 0``) and the second halves of its own,
    ``ratio*(j%2)..``; disjoint (``coff`` 1), its ``ratio`` slots. A half is written when the step
    changes it (a token writes every half of its slot). Each half counts at most once.
    """
    slots = coff * ratio
    on_chip: set[tuple[int, int]] = set()
    read: set[tuple[int, int]] = set()
    written: set[tuple[int, int]] = set()

    def use(loc: tuple[int, int]) -> None:
        if loc not in on_chip:
            read.add(loc)
            on_chip.add(loc)

    closed = 0
    for p in range(start, start + seq):
        for h in range(coff):
            written.add((p % slots, h))
            on_chip.add((p % slots, h))
        if (p + 1) % ratio:
            continue
        closed += 1
        j = p // ratio
        for i in range(ratio):
            if coff == 1:
                use((i, 0))
                continue
            if j:
                use((ratio * ((j - 1) % 2) + i, 0))
            use((ratio * (j % 2) + i, 1))
    return len(read), len(written), closed

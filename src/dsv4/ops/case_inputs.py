"""The seeded pieces every op's case is built from: one step of ``B`` rows x ``S`` tokens.

``dsv4.harness.cases.make_case`` draws them once per case (start positions, weights, RoPE table,
activations) and hands them to the op's descriptor, which picks its arguments from them; the
generator is passed on so an op can draw more (the indexer's ``qr``) in a fixed order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.config import COMPRESS_RATIO, DeepSeekV4Config
from ..model.rope import RopeTable
from ..model.state import IndexerState
from ..model.weights import IndexerWeights, LayerWeights


@dataclass
class CaseInputs:
    """``start [B] int64`` (CPU): each row's first position; ``x [B, S, D] bf16``; weights, the
    compressed-layer RoPE table (``max_position`` positions) and the case's generator, all for
    ``cfg`` in ``mode`` with ``seed``, on ``device``."""

    cfg: DeepSeekV4Config
    mode: str
    seed: int
    device: torch.device | str | None
    max_position: int
    start: torch.Tensor
    weights: LayerWeights
    rope: RopeTable
    x: torch.Tensor
    generator: torch.Generator

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    @property
    def seq(self) -> int:
        return self.x.shape[1]

    def positions(self) -> torch.Tensor:
        """``[B*S]`` int64 position of every token, row by row, on the case's device."""
        return (self.start[:, None] + torch.arange(self.seq)).reshape(-1).to(self.device)

    @property
    def indexer_weights(self) -> IndexerWeights:
        """The lightning indexer's weights (the case's front end is a CSA layer's)."""
        if self.weights.indexer is None:
            raise ValueError("weights: the case's layer holds no lightning indexer")
        return self.weights.indexer

    def prefilled_state(self) -> IndexerState:
        """The indexer state as if each row had already seen ``start[b]`` tokens (see ``prefilled_state``)."""
        return prefilled_state(self.cfg, self.batch, self.max_position, self.start, self.seed, self.device)


def prefilled_state(
    cfg: DeepSeekV4Config,
    batch: int,
    max_position: int,
    start_pos: torch.Tensor,
    seed: int,
    device: torch.device | str | None = None,
) -> IndexerState:
    """A dense-layout state as if each row had already seen ``start_pos[b]`` tokens (``fill_history``)."""
    state = IndexerState.empty(cfg, batch, max_position)
    fill_history(state, start_pos, seed)
    return state if device is None else state.to(device)


def fill_history(state: IndexerState, start_pos: torch.Tensor, seed: int) -> None:
    """Write the history of ``start_pos[b]`` tokens into slot ``b`` of ``state`` (any pool layout): the
    key rows of those blocks are unit-RMS bf16 rows, quantized into the pool as the compressor would;
    the compressor ring (addressed by position, spec §4 v3) holds projection-sized values at the slots
    ``q % 8`` of the positions ``q`` the next step can read (the last closed block and the open one),
    the same numbers at the same positions as before the ring was addressed by position; the open
    block's later slots get values the spec never reads (score_state -inf where a row has not written
    yet)."""
    g = torch.Generator().manual_seed(seed + 7919)
    hid = state.keys.shape[2]
    for b, p in enumerate(start_pos.tolist()):
        done, r = divmod(p, COMPRESS_RATIO)
        history = torch.randn(done, hid, generator=g, dtype=torch.float32).to(torch.bfloat16)
        state.write_keys(torch.full((done,), b), torch.arange(done), history.to(state.keys.device))
        prev = COMPRESS_RATIO * ((done - 1) % 2)  # the slots of block done-1 (positions 4*done-4 ..)
        cur = COMPRESS_RATIO * (done % 2)  # the slots of the open block done
        for t in (state.kv_state[b], state.score_state[b]):
            if done:
                t[prev : prev + COMPRESS_RATIO] = torch.randn(COMPRESS_RATIO, 2 * hid, generator=g, dtype=torch.float32)
                t[cur + r : cur + COMPRESS_RATIO] = t[prev + r : prev + COMPRESS_RATIO]  # never read
            t[cur : cur + r] = torch.randn(r, 2 * hid, generator=g, dtype=torch.float32)

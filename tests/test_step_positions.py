"""Where a step's rows start (``StepPositions``): what it says about the compressed cache after the
step, worked out here from the positions one by one."""

from __future__ import annotations

import pytest
import torch

from dsv4.model.config import COMPRESS_RATIO
from dsv4.model.structs import StepPositions


def _closed(p: int, s: int) -> int:
    """Blocks that tokens ``p .. p+s-1`` close: those whose last token is among them."""
    return sum((q + 1) % COMPRESS_RATIO == 0 for q in range(p, p + s))


@pytest.mark.parametrize("seq", [1, 2, 3, 4, 5, 7, 8, 9, 17])
def test_max_closing_blocks_bounds_the_blocks_any_start_closes(seq: int) -> None:
    pos = StepPositions(torch.tensor([0]), seq, 1)
    assert pos.max_closing_blocks == max(_closed(p, seq) for p in range(2 * COMPRESS_RATIO))


def test_host_positions_give_each_rows_cache_length_and_every_tokens_position() -> None:
    starts = (0, 3, 6, 14)  # the last row's step ends on a block's last token
    pos = StepPositions.from_host(torch.tensor(starts), starts, 2)
    assert pos.cache_lens == tuple(_closed(0, p + 2) for p in starts) == (0, 1, 2, 4)
    assert pos.max_cache_len == 4 and pos.batch == 4 and pos.start_host == starts
    assert pos.token_positions().tolist() == [[p, p + 1] for p in starts]


def test_cache_lens_of_a_captured_step_are_refused() -> None:
    """A captured step has no host positions: its cache lengths are on the device only."""
    pos = StepPositions(torch.tensor([5, 9]), 2, 8)
    with pytest.raises(ValueError, match="^cache_lens: the start positions are not known on the host"):
        _ = pos.cache_lens

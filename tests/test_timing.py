"""What the bench's CUDA-event timing leaves in and out of a figure, on a GPU (the acceptance run's
``tests`` step); the CPU's host-clock timing is in ``test_bench.py``."""

from __future__ import annotations

import pytest
import torch

from dsv4.bench.timing import time_cuda, zero_point

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA events time a GPU's work")


def test_the_zero_point_leaves_out_the_hosts_submission() -> None:
    """An empty graph's replay queued behind a spin costs the GPU next to nothing; on an idle GPU its
    events also held the host's submission of the replay (13.0 µs on the H200 of 2026-12-04)."""
    zero = zero_point(reps=50)
    assert zero["us"] is not None and zero["us"] < 8.0, zero


def test_a_warm_figure_is_the_gpus_time_not_the_hosts() -> None:
    """A one-kernel graph timed warm (no flush ahead) takes about what the zero point's one-kernel graph
    takes, not the ~15 µs of a replay's submission."""
    x = torch.zeros(1, device="cuda")
    warm = time_cuda(lambda: x.add_(1.0), reps=50, flush_l2=False)
    assert warm.launch == "cuda graph" and warm.median_us < 8.0, warm

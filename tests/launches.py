"""What a call runs on a GPU, from the profiler: Triton's interpreter counts a CPU run's launches
(``dsv4.bench.interp_traffic``), but a compiled kernel passes none of its hooks."""

from __future__ import annotations

from collections.abc import Callable

import torch


def device_launches(call: Callable[[], object]) -> list[str]:
    """Every kernel, memset and copy ``call`` runs on the GPU, by name in the order they started (a
    Triton kernel's name is its function's). ``call`` runs once before: its first call compiles the
    kernels."""
    from torch.profiler import ProfilerActivity, profile

    call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    on_device = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return [e.name for e in sorted(on_device, key=lambda e: e.time_range.start)]

"""What a call runs on a GPU, from the profiler: Triton's interpreter counts a CPU run's launches
(``dsv4.bench.interp_traffic``), but a compiled kernel passes none of its hooks."""

from __future__ import annotations

from collections.abc import Callable

import torch

from dsv4.bench.interp_traffic import count_traffic


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


def kernels_of(call: Callable[[], object]) -> list[str]:
    """The kernels ``call`` launches, in order: the profiler's on a GPU, the interpreter's count on a CPU."""
    if torch.cuda.is_available():
        return device_launches(call)
    with count_traffic() as log:
        call()
    return [launch.kernel for launch in log.launches]

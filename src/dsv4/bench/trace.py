"""A Chrome/Perfetto trace of one decode step (``qkv_proj_rope`` then ``indexer``) from the torch profiler."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from .. import ops
from ..harness.cases import make_case
from ..model.config import DeepSeekV4Config
from ..ops.backends import available_backends


def trace_decode_step(cfg: DeepSeekV4Config, path: str | Path, device: torch.device | str, seed: int = 0) -> str:
    """Profile one decode step of ``cfg`` on ``device`` and write the trace to ``path``.

    Runs the first backend (best first) that completes the step; one unprofiled step runs before
    (compilation, autotuning). Returns the backend used.
    """
    device = torch.device(device)
    qkv_case = make_case(cfg, "qkv_proj_rope", "decode", seed, device=device)
    idx_case = make_case(cfg, "indexer", "decode", seed, device=device)  # same seed: same x and start_pos
    idx = idx_case.args

    def step(backend: str) -> None:
        state = idx["state"].clone()
        with record_function("qkv_proj_rope"):
            qkv = ops.qkv_proj_rope(**qkv_case.args, backend=backend)
        with record_function("indexer"):
            ops.indexer(
                idx["x"], qkv.qr, qkv.qr_scale, idx["w"], state, idx["start_pos"], idx["offset"], idx["rope"],
                topk=idx["topk"], backend=backend,
            )  # fmt: skip
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    errors = []
    for backend in available_backends(device):
        try:
            step(backend)
        except Exception as e:  # this backend lacks a kernel: try the next one
            errors.append(f"{backend}: {type(e).__name__}: {e}")
            continue
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof, record_function(f"decode step ({backend})"):
            step(backend)
        prof.export_chrome_trace(str(path))
        return backend
    raise RuntimeError("no backend completed a decode step: " + "; ".join(errors))

"""The device a call's kernels launch on, and the numeric context its torch ops run in.

Triton launches a kernel on the *current* CUDA device and its current stream, whatever device the
tensors it is given live on; torch's own ops follow their tensors. An op called with tensors on
``cuda:1`` while ``cuda:0`` is current would launch on device 0 with pointers into device 1's
memory, outside the stream order of the tensors' device. Every entry that launches kernels (the
public ops, the captured steps) runs them under ``on_device(<its tensors' device>)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def on_device(device: torch.device | str) -> contextlib.AbstractContextManager[object]:
    """A context in which ``device`` is the current CUDA device (``torch.cuda.device``); on any other
    device type, or a CUDA device named without an index (already the current one), it does nothing."""
    device = torch.device(device)
    if device.type != "cuda" or device.index is None:
        return contextlib.nullcontext()
    return torch.cuda.device(device)


AUTOCAST_TYPES = ("cuda", "cpu")  # device types torch autocasts on that the ops run on


@contextlib.contextmanager
def spec_numerics(device: torch.device | str) -> Iterator[None]:
    """While an op runs, its torch ops compute as the spec says whatever the caller set: autocast off
    for ``device``'s type, and float32 matmuls at full float32 precision.

    Under a caller's ``torch.autocast`` the reference's fp32 matmuls would run in bf16 (other numbers:
    ``sparse_attn``'s ``o`` off by 8 at ``tiny``) or hand a bf16 result to an fp32 state (an error half
    way through it). Under a float32 matmul precision below IEEE (``torch.set_float32_matmul_precision``
    "high" or "medium", or ``torch.backends.*.fp32_precision``: TF32 on a GPU, which engines often
    set, bf16 where the CPU has it) they would round their operands: the Hadamard rotation's
    ``±2^-3.5`` entries are not exact in TF32. The precision is process-wide in torch: it is set for
    the call and put back after it. Triton kernels are neither autocast nor affected by it."""
    kind = torch.device(device).type
    autocast = torch.autocast(kind, enabled=False) if kind in AUTOCAST_TYPES else contextlib.nullcontext()
    with autocast, _ieee_fp32_matmul():
        yield


@contextlib.contextmanager
def _ieee_fp32_matmul() -> Iterator[None]:
    """Float32 matmuls on CUDA and the CPU (oneDNN) at IEEE precision inside the block, each backend's
    setting put back after it. Through the per-backend settings where torch has them (reading the
    legacy ``get_float32_matmul_precision`` raises once a caller has mixed the two APIs)."""
    backends: list[Any] = [
        m for m in (getattr(torch.backends.cuda, "matmul", None), getattr(torch.backends.mkldnn, "matmul", None))
        if hasattr(m, "fp32_precision")
    ]  # fmt: skip
    if not backends:  # torch before the per-backend settings
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(before)
        return
    saved = [b.fp32_precision for b in backends]
    inherited = getattr(torch.backends, "fp32_precision", "none")  # what "none" stands for
    if all((p if p != "none" else inherited) in ("none", "ieee") for p in saved):
        yield
        return
    for b in backends:
        b.fp32_precision = "ieee"
    try:
        yield
    finally:
        for b, p in zip(backends, saved, strict=True):
            b.fp32_precision = p

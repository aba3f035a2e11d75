"""The device a call's kernels launch on, and the numeric context its torch ops run in.

Triton launches a kernel on the *current* CUDA device and its current stream, whatever device the
tensors it is given live on; torch's own ops follow their tensors. An op called with tensors on
``cuda:1`` while ``cuda:0`` is current would launch on device 0 with pointers into device 1's
memory, outside the stream order of the tensors' device. Every entry that launches kernels (the
public ops, the captured steps) runs them under ``on_device(<its tensors' device>)``.
"""

from __future__ import annotations

import contextlib

import torch


def on_device(device: torch.device | str) -> contextlib.AbstractContextManager[object]:
    """A context in which ``device`` is the current CUDA device (``torch.cuda.device``); on any other
    device type, or a CUDA device named without an index (already the current one), it does nothing."""
    device = torch.device(device)
    if device.type != "cuda" or device.index is None:
        return contextlib.nullcontext()
    return torch.cuda.device(device)


AUTOCAST_TYPES = ("cuda", "cpu")  # device types torch autocasts on that the ops run on


def no_autocast(device: torch.device | str) -> contextlib.AbstractContextManager[object]:
    """Autocast off for ``device``'s type while an op runs: its torch ops compute in the dtypes the spec
    gives each step. Under a caller's ``torch.autocast`` the reference's fp32 matmuls would run in bf16
    (other numbers: ``sparse_attn``'s ``o`` off by 8 at ``tiny``) or hand a bf16 result to an fp32 state
    (an error half way through it). Triton kernels are not autocast."""
    kind = torch.device(device).type
    return torch.autocast(kind, enabled=False) if kind in AUTOCAST_TYPES else contextlib.nullcontext()

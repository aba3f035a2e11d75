"""The device a call's kernels launch on.

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

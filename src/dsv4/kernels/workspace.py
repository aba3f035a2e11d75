"""Scratch buffers that a repeated step reuses instead of allocating.

Eager calls pass no workspace and each launcher allocates its scratch. A captured decode step
(``DecodeFrontEnd.capture``) passes one ``Workspace``: the warm-up step allocates every buffer
once, and every later step with the same shapes gets the same tensors back, so the step itself
allocates nothing and a CUDA graph can replay it.
"""

from __future__ import annotations

import torch


class Workspace:
    """Named buffers: the same name, shape and dtype give the same tensor every time."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def empty(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or tuple(buf.shape) != tuple(shape) or buf.dtype != dtype or buf.device != device:
            buf = torch.empty(shape, dtype=dtype, device=device)
            self._buffers[name] = buf
        return buf

    def tensors(self) -> list[torch.Tensor]:
        return list(self._buffers.values())


def scratch(
    ws: Workspace | None, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """An uninitialized buffer: from ``ws`` when given, else freshly allocated."""
    if ws is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return ws.empty(name, shape, dtype, device)

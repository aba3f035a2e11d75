"""Backend registry: which implementations exist and which one ``backend="auto"`` picks.

A backend is a module with ``qkv_proj_rope``, ``indexer_compressor`` and ``indexer`` taking
already-validated arguments (see ``dsv4.reference`` for the signatures).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

BACKENDS = ("reference", "triton")
_MODULES = {"reference": "dsv4.reference", "triton": "dsv4.kernels"}


def _load(name: str) -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module(_MODULES[name]), None
    except ImportError as e:  # triton not installed, or the backend is not built
        return None, f"cannot import {_MODULES[name]}: {e}"


def unavailable_reason(name: str, device: torch.device | str) -> str | None:
    """Why ``name`` cannot run on ``device``, or None when it can."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)} or 'auto'"
    module, err = _load(name)
    if module is None:
        return err
    check = getattr(module, "unavailable_reason", None)
    return check(torch.device(device)) if check else None


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that can run on ``device``, best first."""
    return [n for n in reversed(BACKENDS) if unavailable_reason(n, device) is None]


def resolve(backend: str, device: torch.device | str) -> str:
    """The concrete backend name for ``backend`` on ``device``: ``auto`` is Triton on CUDA, else the reference."""
    device = torch.device(device)
    if backend == "auto":
        if device.type == "cuda" and unavailable_reason("triton", device) is None:
            return "triton"
        return "reference"
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise ValueError(f"backend: {backend!r} cannot run on {device}: {reason}")
    return backend


def get_backend(backend: str, device: torch.device | str) -> ModuleType:
    """The module implementing ``backend`` (``"reference"``, ``"triton"`` or ``"auto"``) on ``device``."""
    module, _ = _load(resolve(backend, device))
    assert module is not None
    return module

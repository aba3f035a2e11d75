"""Backends: which implementations exist, which can run where, and which one ``backend="auto"`` picks.

A backend is a package (the reference, or the Triton kernels); each op's descriptor names the
function that implements it in each backend (``OpDescriptor.implementations``).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from importlib import metadata
from typing import Any

import torch

from .registry import OpDescriptor

BACKENDS = ("reference", "triton")
_PACKAGES = {"reference": "dsv4.reference", "triton": "dsv4.kernels"}
# The oldest Triton the kernels run on: 3.5.1 emits PTX for the q heads kernel that ptxas refuses at
# sm_90 ("Arguments mismatch for instruction 'st'"), and Triton 3.0 (torch 2.4's) lacks the PDL calls.
TRITON_MIN = (3, 6)


def _old_triton() -> str | None:
    """Why the installed Triton is too old for the kernels, or None (also when it is not installed)."""
    try:
        version = metadata.version("triton")
    except metadata.PackageNotFoundError:
        return None
    release = tuple(int(n) for n in re.findall(r"\d+", version)[:2])
    if release >= TRITON_MIN:
        return None
    return f"Triton {version} is older than {'.'.join(map(str, TRITON_MIN))}, the oldest these kernels run on"


def triton_missing() -> str | None:
    """Why the installed Triton cannot run the kernels at all (not installed, or older than ``TRITON_MIN``),
    or None when it can: what a command that needs Triton itself (``dsv4 tune``) checks first."""
    old = _old_triton()
    if old is not None:
        return old
    try:  # the kernels package first: without CUDA it chooses the interpreter before Triton is loaded
        importlib.import_module(_PACKAGES["triton"])
    except ImportError as e:
        return f"cannot import triton: {e}"
    return None


def unavailable_reason(name: str, device: torch.device | str) -> str | None:
    """Why backend ``name`` cannot run on ``device``, or None when it can."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)} or 'auto'"
    if name == "triton" and (old := _old_triton()) is not None:
        return old
    try:
        package = importlib.import_module(_PACKAGES[name])
    except ImportError as e:  # triton not installed, or the backend is not built
        return f"cannot import {_PACKAGES[name]}: {e}"
    check = getattr(package, "unavailable_reason", None)
    return check(torch.device(device)) if check else None


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that can run on ``device``, best first (the first is what ``dsv4 run`` uses)."""
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


def implementation(desc: OpDescriptor, backend: str, device: torch.device | str) -> Callable[..., Any]:
    """The function implementing ``desc`` on ``backend`` (``"reference"``, ``"triton"`` or ``"auto"``) on
    ``device``. ``auto`` takes the reference for an op that has no implementation in the backend it
    would pick; a backend named explicitly that the op lacks is a ``ValueError`` naming both."""
    return desc.implementation(op_backend(desc, backend, device))


def op_backend(desc: OpDescriptor, backend: str, device: torch.device | str) -> str:
    """The backend ``implementation`` runs ``desc`` on for ``backend`` on ``device`` (``auto`` resolved)."""
    name = resolve(backend, device)
    return "reference" if backend == "auto" and name not in desc.implementations else name

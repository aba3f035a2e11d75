"""The one reading of a device a caller names (``dsv4.devices.check_device``): ``cpu`` or a ``cuda[:N]``
this machine has, as a string or a ``torch.device``; anything else a ``ValueError`` naming ``device``.
The count of CUDA devices is stood in for, so the CPU checks the CUDA rules too."""

from __future__ import annotations

import re

import pytest
import torch

from dsv4.devices import check_device


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), "cuda", "cuda:1", torch.device("cuda", 1)])
def test_a_device_this_machine_has_is_parsed(two_gpus: None, device: str | torch.device) -> None:
    assert check_device(device) == torch.device(device)


@pytest.mark.parametrize(
    ("device", "words"),
    [
        (0, "device: expected cpu or cuda[:N], got int 0"),
        (1.0, "device: expected cpu or cuda[:N], got float 1.0"),
        ("cuda:2", "device: 'cuda:2', but there are 2 CUDA device(s)"),
        (torch.device("cuda", 2), "device: device(type='cuda', index=2), but there are 2 CUDA device(s)"),
        ("meta", "device: expected cpu or cuda[:N], got 'meta'"),
        ("gpu", "device: expected cpu or cuda[:N], got 'gpu'"),
    ],
)
def test_anything_else_is_refused_naming_device(two_gpus: None, device: object, words: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(words)):
        check_device(device)


def test_cuda_without_cuda_is_refused_naming_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^device: 'cuda:0', but CUDA is not available"):
        check_device("cuda:0")

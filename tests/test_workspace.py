"""A ``Workspace`` hands a repeated step the same scratch tensors (what lets a CUDA graph replay the step):
the same name, shape, dtype and device give the same tensor; any of them changed gives a new tensor of
exactly what was asked. Without a workspace, every buffer is new."""

from __future__ import annotations

import torch

from dsv4.kernels.workspace import Workspace, scratch

CPU = torch.device("cpu")


def test_the_same_request_gets_the_same_tensor() -> None:
    ws = Workspace()
    a = ws.empty("partials", (4, 8), torch.float32, CPU)
    assert ws.empty("partials", (4, 8), torch.float32, CPU) is a
    assert scratch(ws, "partials", (4, 8), torch.float32, CPU) is a
    assert ws.tensors() == [a]


def test_another_shape_or_dtype_gets_a_new_tensor_of_it() -> None:
    ws = Workspace()
    first = ws.empty("partials", (4, 8), torch.float32, CPU)
    for shape, dtype in (((4, 8), torch.int32), ((2, 8), torch.int32), ((8, 4), torch.int32), ((8, 4), torch.float32)):
        buf = ws.empty("partials", shape, dtype, CPU)
        assert (tuple(buf.shape), buf.dtype, buf.device) == (shape, dtype, CPU)
        assert buf is not first
        first = buf
    assert len(ws.tensors()) == 1  # one buffer per name: the last asked for


def test_each_name_is_a_buffer_of_its_own() -> None:
    ws = Workspace()
    a = ws.empty("a", (16,), torch.float32, CPU)
    b = ws.empty("b", (16,), torch.float32, CPU)
    assert a.data_ptr() != b.data_ptr() and ws.tensors() == [a, b]


def test_without_a_workspace_every_buffer_is_new() -> None:
    a = scratch(None, "partials", (4, 8), torch.float32, CPU)
    b = scratch(None, "partials", (4, 8), torch.float32, CPU)
    assert a is not b and (tuple(b.shape), b.dtype) == ((4, 8), torch.float32)

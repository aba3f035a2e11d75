"""The public ops: validate every argument, pick the backend, run it.

Validation (spec §7) happens before anything is computed, so a call that raises leaves the
caller's state and caches untouched. ``call_op`` does this for any registered op; the functions
below are its typed, documented faces for the built-in ones, made from each op's signature stub
(``OpDescriptor.signature``): ``help(dsv4.indexer)`` shows the stub's signature and docstring.
"""

from __future__ import annotations

from typing import Any

import torch

from .backends import implementation
from .defs import (
    INDEXER,
    INDEXER_COMPRESSOR,
    KV_COMPRESSOR,
    O_PROJ,
    QKV_PROJ_ROPE,
    SPARSE_ATTN,
    SPARSE_ATTN_WRITE,
    WINDOW_KV_WRITE,
)
from .device import on_device, spec_numerics
from .registry import OpDescriptor, get_op, op_function
from .validate import tensors_of


def call_op(name: str, backend: str = "auto", out: Any = None, **args: Any) -> Any:
    """Run op ``name`` on its public ``args`` (by name; defaults as its signature has them): check
    them (and ``out``), then call ``backend``'s implementation on the device of the first tensor
    argument (made the current CUDA device while it runs: ``on_device``), with the spec's numerics
    whatever the caller set (autocast off, float32 matmuls at full precision: ``spec_numerics``) and
    without autograd (weights that require grad, ``nn.Parameter``s, would otherwise make the
    reference's outputs and the state it updates carry a graph that grows every step). Returns the
    op's result."""
    desc = get_op(name)
    if out is not None and desc.result is None:
        raise TypeError(f"out: {name} takes no out= (it updates its state in place)")
    call = desc.backend_args(args, out)
    check_writable(desc, args, out)
    device = next(v.device for v in call if isinstance(v, torch.Tensor))
    fn = implementation(desc, backend, device)
    with on_device(device), spec_numerics(device), torch.no_grad():  # no op has a backward
        return fn(*call) if desc.result is None else fn(*call, out=out)


def check_writable(desc: OpDescriptor, args: dict[str, Any], out: Any) -> None:
    """Outside ``torch.inference_mode``, no tensor the op writes in place (its state, ``out``) may be an
    inference tensor (one made under that mode): torch lets those be written only inside it, so the
    reference would raise half way through the state, where the Triton kernels would write them anyway."""
    if torch.is_inference_mode_enabled():
        return
    bound = desc.bind(args)
    written = tensors_of("out", out) if out is not None else {}
    for path in desc.mutates:
        of_head = tensors_of(path.partition(".")[0], bound[path.partition(".")[0]])
        written.update({k: t for k, t in of_head.items() if k == path or k.startswith(path + ".")})
    for path, t in written.items():
        if t.is_inference():
            raise ValueError(
                f"{path}: an inference tensor (made under torch.inference_mode), which {desc.name} writes in place; "
                f"torch allows that only inside inference mode: call {desc.name} there, or pass a tensor made "
                "outside it"
            )


qkv_proj_rope = op_function(QKV_PROJ_ROPE, call_op, __name__)
indexer_compressor = op_function(INDEXER_COMPRESSOR, call_op, __name__)
indexer = op_function(INDEXER, call_op, __name__)
kv_compressor = op_function(KV_COMPRESSOR, call_op, __name__)
window_kv_write = op_function(WINDOW_KV_WRITE, call_op, __name__)
sparse_attn = op_function(SPARSE_ATTN, call_op, __name__)
sparse_attn_write = op_function(SPARSE_ATTN_WRITE, call_op, __name__)
o_proj = op_function(O_PROJ, call_op, __name__)

"""The ops through ``torch.ops.dsv4``, with the dataclass arguments of ``dsv4``: what a model calls
inside ``torch.compile(fullgraph=True)`` or a captured CUDA graph.

``dsv4.library.indexer(...)`` takes the arguments of ``dsv4.indexer`` (same signature, defaults and
result, ``out=`` included) and runs the op as the custom op ``torch.ops.dsv4.indexer`` (or
``indexer_out``), which a compiled graph keeps whole; ``start_pos`` must be an int tensor ``[B]``
(an int would specialize the graph on every step). ``call`` does the same for any registered op by
name, ``tensors_of`` lists a dataclass argument's tensors in the custom ops' order, and
``library_function`` makes such a function for an op registered later (``dsv4.ops.register_op``).
The registration itself, schemas and fake implementations included, is ``dsv4.engine.custom_ops``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from .engine.custom_ops import call, tensors_of
from .ops.defs import (
    INDEXER,
    INDEXER_COMPRESSOR,
    KV_COMPRESSOR,
    O_PROJ,
    QKV_PROJ_ROPE,
    SPARSE_ATTN,
    SPARSE_ATTN_WRITE,
    WINDOW_KV_WRITE,
)
from .ops.registry import INT_OR_TENSOR, OpDescriptor, op_function

P = ParamSpec("P")
R = TypeVar("R")


def library_function(desc: OpDescriptor[P, R]) -> Callable[P, R]:
    """``desc``'s public function (signature and docstring of its stub) running through ``torch.ops.dsv4``."""
    tensors_only = [p.name for p in desc.params if p.kind == INT_OR_TENSOR]
    note = "".join(f"; ``{n}`` must be an int tensor ``[B]``" for n in tensors_only)
    doc = f"``dsv4.{desc.name}`` through ``torch.ops.dsv4.{desc.name}``{note}.\n\n"
    return op_function(desc, call, __name__, doc + inspect.cleandoc(desc.signature.__doc__ or ""))


qkv_proj_rope = library_function(QKV_PROJ_ROPE)
indexer_compressor = library_function(INDEXER_COMPRESSOR)
indexer = library_function(INDEXER)
kv_compressor = library_function(KV_COMPRESSOR)
window_kv_write = library_function(WINDOW_KV_WRITE)
sparse_attn = library_function(SPARSE_ATTN)
sparse_attn_write = library_function(SPARSE_ATTN_WRITE)
o_proj = library_function(O_PROJ)

__all__ = [
    "call", "indexer", "indexer_compressor", "kv_compressor", "library_function", "o_proj", "qkv_proj_rope",
    "sparse_attn", "sparse_attn_write", "tensors_of", "window_kv_write",
]  # fmt: skip

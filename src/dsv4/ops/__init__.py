"""The public ops (validation, backend choice), their descriptors and the backend registry."""

from .api import (
    call_op,
    indexer,
    indexer_compressor,
    kv_compressor,
    o_proj,
    qkv_proj_rope,
    sparse_attn,
    sparse_attn_write,
    window_kv_write,
)
from .registry import OpDescriptor, Output, Param, Tolerance, get_op, op_function, op_names, register_op

__all__ = [
    "OpDescriptor",
    "Output",
    "Param",
    "Tolerance",
    "call_op",
    "get_op",
    "indexer",
    "indexer_compressor",
    "kv_compressor",
    "o_proj",
    "op_function",
    "op_names",
    "qkv_proj_rope",
    "register_op",
    "sparse_attn",
    "sparse_attn_write",
    "window_kv_write",
]

"""The built-in ops' descriptors, registered on import (in this order)."""

from ..registry import register_op
from .indexer import INDEXER
from .indexer_compressor import INDEXER_COMPRESSOR
from .kv_compressor import KV_COMPRESSOR
from .o_proj import O_PROJ
from .qkv_proj_rope import QKV_PROJ_ROPE
from .sparse_attn import SPARSE_ATTN
from .sparse_attn_write import SPARSE_ATTN_WRITE
from .window_kv_write import WINDOW_KV_WRITE

for _desc in (
    QKV_PROJ_ROPE, INDEXER_COMPRESSOR, INDEXER, KV_COMPRESSOR, SPARSE_ATTN, WINDOW_KV_WRITE, SPARSE_ATTN_WRITE, O_PROJ,
):  # fmt: skip
    register_op(_desc)

__all__ = [
    "INDEXER", "INDEXER_COMPRESSOR", "KV_COMPRESSOR", "O_PROJ", "QKV_PROJ_ROPE", "SPARSE_ATTN", "SPARSE_ATTN_WRITE",
    "WINDOW_KV_WRITE",
]  # fmt: skip

"""The reference backend: spec §3-§5 and attention spec A3-A6 in plain fp32 PyTorch, written to be read. The golden."""

from .attention import sparse_attn, sparse_attn_write, window_kv_write
from .compressor import indexer_compressor, kv_compressor
from .indexer import indexer
from .o_proj import o_proj
from .qkv_proj_rope import qkv_proj_rope

__all__ = [
    "indexer", "indexer_compressor", "kv_compressor", "o_proj", "qkv_proj_rope", "sparse_attn", "sparse_attn_write",
    "window_kv_write",
]  # fmt: skip

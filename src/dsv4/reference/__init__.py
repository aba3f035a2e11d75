"""The reference backend: spec §3-§5 in plain fp32 PyTorch, written to be read. The golden."""

from .compressor import indexer_compressor
from .indexer import indexer
from .qkv_proj_rope import qkv_proj_rope

__all__ = ["indexer", "indexer_compressor", "qkv_proj_rope"]

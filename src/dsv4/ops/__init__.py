"""The public ops (validation, backend choice) and the backend registry."""

from .api import indexer, indexer_compressor, qkv_proj_rope

__all__ = ["indexer", "indexer_compressor", "qkv_proj_rope"]

"""The built-in ops' descriptors, registered on import (in this order)."""

from ..registry import register_op
from .indexer import INDEXER
from .indexer_compressor import INDEXER_COMPRESSOR
from .qkv_proj_rope import QKV_PROJ_ROPE

for _desc in (QKV_PROJ_ROPE, INDEXER_COMPRESSOR, INDEXER):
    register_op(_desc)

__all__ = ["INDEXER", "INDEXER_COMPRESSOR", "QKV_PROJ_ROPE"]

"""The Triton backend: fused kernels for every op, one module per kernel family.

On a machine without CUDA the same kernel source runs on the CPU through Triton's interpreter
(``interpreter.py``, imported first). Each op's descriptor (``dsv4.ops.defs``) names its launcher
here; the launchers take the reference's arguments plus ``out=`` and ``ws=`` (a ``Workspace`` for
scratch). The package exports what the captured decode step launches. An ImportError here (no
Triton) marks the backend unavailable.
"""

from . import interpreter  # noqa: F401  (first: chooses the interpreter before any kernel module imports Triton)
from .interpreter import interpreted, unavailable_reason
from .lightning_indexer import indexer
from .o_proj import o_proj
from .qkv_proj_rope import qkv_proj_rope
from .sparse_attn import sparse_attn, sparse_attn_write
from .window_kv_write import window_kv_write
from .workspace import Workspace

__all__ = [
    "Workspace",
    "indexer",
    "interpreted",
    "o_proj",
    "qkv_proj_rope",
    "sparse_attn",
    "sparse_attn_write",
    "unavailable_reason",
    "window_kv_write",
]

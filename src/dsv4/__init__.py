"""dsv4: fused kernels for the DeepSeek-V4 attention front end, with a spec-exact reference."""

from . import library  # registers torch.ops.dsv4.*
from .backends import BACKENDS, available_backends
from .checkpoint import CheckpointError, checkpoint_config, load_layer
from .config import PRESETS, DeepSeekV4Config, get_config
from .frontend import DecodeFrontEnd
from .hadamard import hadamard_matrix
from .ops import indexer, indexer_compressor, qkv_proj_rope
from .quant import quantize_int8_per_row, quantize_weight_int8
from .rope import RopeTable, rope_table
from .state import IndexerState
from .structs import QKV, IndexerOut
from .weights import (
    AttnWeights,
    CompressorWeights,
    IndexerWeights,
    LayerWeights,
    synthetic_activations,
    synthetic_weights,
)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "PRESETS",
    "QKV",
    "AttnWeights",
    "CheckpointError",
    "CompressorWeights",
    "DecodeFrontEnd",
    "DeepSeekV4Config",
    "IndexerOut",
    "IndexerState",
    "IndexerWeights",
    "LayerWeights",
    "RopeTable",
    "available_backends",
    "checkpoint_config",
    "get_config",
    "hadamard_matrix",
    "indexer",
    "indexer_compressor",
    "library",
    "load_layer",
    "qkv_proj_rope",
    "quantize_int8_per_row",
    "quantize_weight_int8",
    "rope_table",
    "synthetic_activations",
    "synthetic_weights",
]

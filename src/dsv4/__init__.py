"""dsv4: fused kernels for the DeepSeek-V4 attention front end, with a spec-exact reference."""

from . import library  # registers torch.ops.dsv4.*
from .engine.frontend import DecodeFrontEnd
from .harness import golden
from .io import golden_io
from .io.checkpoint import CheckpointError, checkpoint_config, load_layer
from .model.config import PRESETS, DeepSeekV4Config, get_config
from .model.hadamard import hadamard_matrix
from .model.quant import quantize_int8_per_row, quantize_weight_int8
from .model.rope import RopeTable, rope_table
from .model.state import IndexerState
from .model.structs import QKV, IndexerOut
from .model.weights import (
    AttnWeights,
    CompressorWeights,
    IndexerWeights,
    LayerWeights,
    synthetic_activations,
    synthetic_weights,
)
from .ops.api import indexer, indexer_compressor, qkv_proj_rope
from .ops.backends import BACKENDS, available_backends
from .version import __version__ as __version__

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
    "golden",
    "golden_io",
    "library",
    "load_layer",
    "qkv_proj_rope",
    "quantize_int8_per_row",
    "quantize_weight_int8",
    "rope_table",
    "synthetic_activations",
    "synthetic_weights",
]

"""dsv4: fused kernels for the DeepSeek-V4 attention front end, with a spec-exact reference."""

from . import library  # registers torch.ops.dsv4.*
from .engine.attention import DecodeAttention, PartialCallError
from .engine.frontend import DecodeFrontEnd
from .harness import golden
from .io import golden_io
from .io.checkpoint import CheckpointError, checkpoint_config, load_layer
from .model.attention_state import AttentionState, CompressorState, KVPool
from .model.config import PRESETS, DeepSeekV4Config, get_config
from .model.fp8_row import dequantize_fp8_rows, fp8_act_quant, fp8_rows
from .model.hadamard import hadamard_matrix
from .model.quant import quantize_int8_per_row, quantize_weight_int8
from .model.rope import RopeTable, layer_rope_table, rope_table
from .model.state import IndexerState
from .model.structs import QKV, AttnOut, IndexerOut, OProjOut
from .model.weights import (
    AttnWeights,
    CompressorWeights,
    IndexerWeights,
    LayerWeights,
    OProjWeights,
    synthetic_activations,
    synthetic_weights,
)
from .ops.api import (
    indexer,
    indexer_compressor,
    kv_compressor,
    o_proj,
    qkv_proj_rope,
    sparse_attn,
    sparse_attn_write,
    window_kv_write,
)
from .ops.backends import BACKENDS, available_backends
from .version import __version__ as __version__

__all__ = [
    "BACKENDS",
    "PRESETS",
    "QKV",
    "AttentionState",
    "AttnOut",
    "AttnWeights",
    "CheckpointError",
    "CompressorState",
    "CompressorWeights",
    "DecodeAttention",
    "DecodeFrontEnd",
    "DeepSeekV4Config",
    "IndexerOut",
    "IndexerState",
    "IndexerWeights",
    "KVPool",
    "LayerWeights",
    "OProjOut",
    "OProjWeights",
    "PartialCallError",
    "RopeTable",
    "available_backends",
    "checkpoint_config",
    "dequantize_fp8_rows",
    "fp8_act_quant",
    "fp8_rows",
    "get_config",
    "hadamard_matrix",
    "indexer",
    "indexer_compressor",
    "golden",
    "golden_io",
    "kv_compressor",
    "layer_rope_table",
    "library",
    "load_layer",
    "o_proj",
    "qkv_proj_rope",
    "quantize_int8_per_row",
    "quantize_weight_int8",
    "rope_table",
    "sparse_attn",
    "sparse_attn_write",
    "synthetic_activations",
    "synthetic_weights",
    "window_kv_write",
]

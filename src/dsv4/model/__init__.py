"""The model's data: dimensions (``config``), RoPE tables, weights, the indexer state, result records."""

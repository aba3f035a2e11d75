"""The README's API snippets ("The API in ten lines" and "The rest of the layer"), verbatim, as one
script: `mypy` checks them as a caller's code (it checks examples/), and tests/test_repo.py checks
that the README still holds them and runs this file. `python examples/readme_api.py` runs them on
the default backend (the reference on a CPU, Triton on a GPU)."""

# ruff: noqa: E401, I001
# fmt: off
import torch, dsv4

cfg = dsv4.get_config("tiny")                       # or "demo", "flash", "pro"
w = dsv4.synthetic_weights(cfg, seed=0)             # dsv4.LayerWeights(attn, indexer), [out, in] layout
rope = dsv4.rope_table(cfg, "compressed", max_position=4096)
state = dsv4.IndexerState.empty(cfg, batch=4, max_position=4096)   # caller-owned; an engine prefills it
x = dsv4.synthetic_activations((4, 2, cfg.hidden_size))            # [B, S, D] bf16, S=2 tokens per step
positions = (100 + torch.arange(2)).repeat(4)                       # [T] token positions
q, kv, qr, qr_scale = dsv4.qkv_proj_rope(x.view(8, -1), w.attn, positions, rope)
assert w.indexer is not None                                        # CSA layers' weights hold one, the rest None
score, topk_idxs = dsv4.indexer(x, qr, qr_scale, w.indexer, state, 100, cfg.sliding_window, rope, topk=cfg.index_topk)

layer = 1                                                # tiny: 0 SWA, 1 CSA, 2 HCA (ratio 16), 3 MTP (SWA)
w = dsv4.synthetic_weights(cfg, seed=0, layer=layer)    # + compressor, attn_sink, o_proj (FP8 wo_a/wo_b, block scales)
rope = dsv4.layer_rope_table(cfg, layer, max_position=4096)
st = dsv4.AttentionState.empty(cfg, layer, batch=4, max_position=4096)  # window pool, compressor ring + pool, indexer
assert w.compressor is not None and w.attn_sink is not None and w.o_proj is not None  # None where a layer lacks them
assert st.compressor is not None                         # an SWA layer's state has no compressor
# q, kv, qr, qr_scale from qkv_proj_rope; topk_idxs from indexer(..., st.indexer, ...) as above
dsv4.kv_compressor(x, w.compressor, st.compressor, 100, rope)          # closes compressed rows (FP8)
o = dsv4.sparse_attn(q.view(4, 2, *q.shape[1:]), kv.view(4, 2, -1), 100, st.window, w.attn_sink, rope,
                     kind="csa", window=cfg.sliding_window, compress_ratio=4, compressed_pool=st.compressor.pool,
                     topk_idxs=topk_idxs, topk_offset=cfg.sliding_window).o       # [B, S, H, HD] bf16
dsv4.window_kv_write(kv.view(4, 2, -1), st.window, 100, window=cfg.sliding_window)
# or both in one op (one launch on Triton): o = dsv4.sparse_attn_write(<sparse_attn's arguments>).o
y = dsv4.o_proj(o.view(8, *o.shape[2:]), w.o_proj).y                             # [T, D] bf16

print(f"score {tuple(score.shape)}, o {tuple(o.shape)}, y {tuple(y.shape)} {y.dtype}")

"""RMSNorm's ``eps`` sits inside the root, ``v / sqrt(mean(v^2) + eps)`` (spec §2), on rows whose mean
square is near ``eps``. At the unit-RMS rows of the other tests ``eps`` (1e-6) moves no bf16 output, so
``rsqrt(mean(v^2)) + eps`` passed them all; on rows of RMS 1e-3 the two differ by a factor near
``sqrt(2)``. Expected values in float64 from the op's inputs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import dsv4
from conftest import DEVICE, backends_of

CFG = dsv4.get_config("tiny")
F64 = torch.float64


def _rms(v: torch.Tensor, eps: float) -> torch.Tensor:
    return v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("backend", backends_of("qkv_proj_rope"))
def test_rows_of_mean_square_near_eps(backend: str) -> None:
    """``kv``'s unrotated entries are ``bf16(rms(x @ wkv.T) * gamma_ckv)``; each head of ``q`` is
    ``rms(qr @ wq_b.T * qr_scale * wq_b_scale)`` (no gain). ``x`` of RMS 1e-3 brings ``x @ wkv.T`` to a
    mean square near 1e-6, ``wq_b_scale`` times 1e-3 the query heads (``qr`` is normed first, so ``x``'s
    size does not reach them; ``qr`` and its scale are the op's, checked by the golden vectors)."""
    eps = CFG.rms_norm_eps
    w = dsv4.synthetic_weights(CFG, seed=3)
    attn = dataclasses.replace(w.attn, wq_b_scale=w.attn.wq_b_scale * 1e-3)
    x = (dsv4.synthetic_activations((3, CFG.hidden_size), seed=4).float() * 1e-3).to(torch.bfloat16)
    positions = torch.tensor([0, 5, 17])
    rope = dsv4.rope_table(CFG, "compressed", max_position=32)
    out = dsv4.qkv_proj_rope(
        x.to(DEVICE), attn.to(DEVICE), positions.to(DEVICE), rope.to(DEVICE), eps=eps, backend=backend
    )
    nope = CFG.qk_nope_head_dim

    k = x.to(F64) @ attn.wkv.to(F64).T
    assert 0.2 < float(k.pow(2).mean(-1).min()) / eps < 5  # eps matters: the mean square is near it
    want_kv = _rms(k, eps) * attn.gamma_ckv.to(F64)
    got_kv = out.kv.cpu().to(F64)
    torch.testing.assert_close(got_kv[:, :nope], want_kv[:, :nope], rtol=2**-7, atol=0)

    qr, qr_scale = out.qr.cpu().to(F64), out.qr_scale.cpu().to(F64)
    qp = (qr @ attn.wq_b.to(F64).T * qr_scale * attn.wq_b_scale.to(F64)).view(3, CFG.num_attention_heads, -1)
    assert 0.2 < float(qp.pow(2).mean(-1).min()) / eps < 5
    want_q = _rms(qp, eps)
    torch.testing.assert_close(out.q.cpu().to(F64)[..., :nope], want_q[..., :nope], rtol=2**-7, atol=0)

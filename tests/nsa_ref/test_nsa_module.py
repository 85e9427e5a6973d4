"""NSAAttention: shapes, gradients to every parameter, varlen, both compressors."""
from __future__ import annotations

import pytest
import torch

from nsa_ref import NSAAttention, NSAConfig, nsa_attention
from nsa_ref_testkit import LENGTHS, SMALL, assert_close, cu_of


def _module(compress: str, hq: int, hkv: int, backend: str = "reference"):
    torch.manual_seed(0)
    cfg = SMALL.model_copy(update={"compress": compress})
    return NSAAttention(16, hq, hkv, head_dim=6, v_head_dim=4, cfg=cfg, backend=backend).double()


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("hq, hkv", [(2, 2), (4, 2)], ids=["G1", "G2"])
@pytest.mark.parametrize("compress", ["mean", "mlp"])
def test_forward_backward_shapes(compress, hq, hkv, backend):
    mod = _module(compress, hq, hkv, backend)
    x = torch.randn(sum(LENGTHS), 16, dtype=torch.float64, requires_grad=True)
    y = mod(x, cu_of(LENGTHS))
    assert y.shape == x.shape, f"NSAAttention: (T, d_model) -> (T, d_model), got {tuple(y.shape)}"
    y.pow(2).sum().backward()
    assert torch.isfinite(x.grad).all(), "no NaN/inf in dx"
    for name, p in mod.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"parameter {name} must get a finite gradient"
    if compress == "mlp":
        assert mod.k_compressor.pos_emb.grad.abs().sum() > 0, "the MLP compressor must be trained through cmp"


def test_mean_module_is_projections_around_nsa_attention():
    mod = _module("mean", 4, 2)
    x = torch.randn(30, 16, dtype=torch.float64)
    q = mod.q_proj(x).view(30, 4, 6)
    k = mod.k_proj(x).view(30, 2, 6)
    v = mod.v_proj(x).view(30, 2, 4)
    gates = torch.sigmoid(mod.gate_proj(x)).view(30, 4, 3)
    want = mod.o_proj(nsa_attention(q, k, v, gates, mod.cfg, backend="reference").reshape(30, -1))
    assert_close(mod(x), want, "module = o_proj(nsa_attention(q, k, v, sigmoid gates))")


def test_packed_sequences_do_not_interact():
    mod = _module("mlp", 4, 2)
    x = torch.randn(sum(LENGTHS), 16, dtype=torch.float64)
    cu = cu_of(LENGTHS)
    packed = mod(x, cu)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if b > a:
            assert_close(packed[a:b], mod(x[a:b]), f"varlen: sequence [{a}, {b}) alone == packed")


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="n_heads must be a positive multiple of n_kv_heads, got 3 and 2"):
        NSAAttention(16, 3, 2, 4)
    mod = NSAAttention(16, 2, 1, 4, cfg=NSAConfig(block_len=8, block_stride=4, sel_block=8, n_sel=3))
    with pytest.raises(ValueError, match=r"x must be \(T, d_model=16\)"):
        mod(torch.zeros(5, 15))

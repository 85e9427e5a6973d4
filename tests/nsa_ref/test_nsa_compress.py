"""Mean compression: shapes, values, varlen packing with empty sequences, the MLP phi."""
from __future__ import annotations

import pytest
import torch

from nsa_ref import compress
from nsa_ref.compress import MLPCompressor, gather_cmp_blocks
from nsa_ref_testkit import LENGTHS, ODD, SMALL, assert_close, cu_of, qkv


def _loop_mean(x: torch.Tensor, cfg) -> torch.Tensor:
    blocks = [x[i : i + cfg.block_len].mean(0) for i in range(0, x.shape[0] - cfg.block_len + 1, cfg.block_stride)]
    return torch.stack(blocks) if blocks else x.new_zeros((0, *x.shape[1:]))


@pytest.mark.parametrize("cfg", [SMALL, ODD], ids=["small", "odd"])
@pytest.mark.parametrize("T", [0, 1, 7, 8, 11, 12, 40])
def test_single_sequence_shape_and_values(cfg, T):
    _, k, _, _ = qkv(T, 2, 2)
    k_cmp, cu_cmp = compress(k, cfg)
    tc = cfg.num_cmp_blocks(T)
    assert k_cmp.shape == (tc, 2, 5), f"Tc = floor((T - l)/d) + 1 (0 if T < l): T={T}, got {tuple(k_cmp.shape)}"
    assert cu_cmp.dtype == torch.int32 and cu_cmp.tolist() == [0, tc], f"cu_seqlens_cmp for T={T}: {cu_cmp.tolist()}"
    assert_close(k_cmp, _loop_mean(k, cfg), f"k_cmp[i] = mean k[i*d : i*d + l], T={T}", atol=1e-15)


def test_varlen_with_empty_sequences_packs_per_sequence():
    cu = cu_of(LENGTHS)
    _, _, v, _ = qkv(sum(LENGTHS), 2, 1)
    v_cmp, cu_cmp = compress(v, SMALL, cu)
    want = torch.cat([_loop_mean(v[a:b], SMALL) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])
    tcs = [SMALL.num_cmp_blocks(n) for n in LENGTHS]
    assert cu_cmp.tolist() == cu_of(tcs).tolist(), f"cu_seqlens_cmp for lengths {LENGTHS}: {cu_cmp.tolist()}"
    assert_close(v_cmp, want, f"compression per sequence, lengths {LENGTHS}", atol=1e-15)


def test_compress_is_differentiable():
    _, k, _, _ = qkv(20, 2, 2, grad=True)
    compress(k, SMALL)[0].sum().backward()
    covered = torch.zeros(20)
    for i in range(SMALL.num_cmp_blocks(20)):
        covered[i * 4 : i * 4 + 8] += 1 / 8
    assert_close(k.grad[:, 0, 0], covered.double(), "d sum(k_cmp) / dk = number of blocks covering the token / l")


def test_functional_compress_refuses_mlp():
    with pytest.raises(ValueError, match="cfg.compress='mlp'"):
        compress(torch.zeros(10, 1, 4), SMALL.model_copy(update={"compress": "mlp"}))


def test_mlp_compressor_shapes_and_position_embedding():
    _, k, _, _ = qkv(40, 2, 3, dk=6)
    phi = MLPCompressor(SMALL.block_len, 6, hidden=7).double()
    blocks = gather_cmp_blocks(k, SMALL, cu_of([10, 30]))
    assert blocks.shape == (SMALL.num_cmp_blocks(10) + SMALL.num_cmp_blocks(30), 8, 3, 6)
    out = phi(blocks)
    assert out.shape == (blocks.shape[0], 3, 6), f"MLP phi: (Nb, l, H, D) -> (Nb, H, D), got {tuple(out.shape)}"
    with torch.no_grad():
        phi.pos_emb.normal_()
    assert not torch.allclose(phi(blocks), out), "the intra-block position embedding must reach the output"

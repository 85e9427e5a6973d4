"""The fused decode append (nsa_ref.triton_kernels.decode_append) against append_static's torch ops.

Pins, on twin caches stepped together (fp64 and fp32, interpreter on the CPU): the raw pages,
the compressed pages (blocks emitted on the way, including a block that ends at the first
token a sequence receives and sequences below l), both device cache_seqlens: equal after every
step for ragged batches (lengths 0, below l, across page and block boundaries) in the
preallocated and paged layouts (pages of 5 and 16 tokens, paged compressed store); and that a
learned phi keeps the torch path (refusal names it).
"""
from __future__ import annotations

import pytest
import torch
from test_triton_decode_select import ODD, TINY, _cache

from nsa_ref.decode_graph import append_static

pytestmark = pytest.mark.usefixtures("interpret_env")

LAYOUTS = [pytest.param("contiguous", id="prealloc"), pytest.param(("paged", 5), id="page5"),
           pytest.param(("paged", 16, 4), id="page16-cmp-paged")]


def _twins(lengths, cfg, layout, dtype, device):
    return (_cache(lengths, 2, 8, cfg, layout, 96, dtype, device, seed=3) for _ in range(2))


@pytest.mark.parametrize("dtype", [pytest.param(torch.float64, id="fp64"), pytest.param(torch.float32, id="fp32")])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cfg", [pytest.param(TINY, id="tiny"), pytest.param(ODD, id="odd")])
def test_fused_append_equals_torch_ops(kdev, cfg, layout, dtype):
    from nsa_ref.triton_kernels.decode_append import refusal

    lengths = [0, 3, cfg.block_len - 1, 40]
    fused, ref = _twins(lengths, cfg, layout, dtype, kdev)
    assert refusal(fused, fused.raw.k_pages[:1, 0]) is None
    g = torch.Generator().manual_seed(7)
    tol = 0 if dtype == torch.float64 else 1e-6
    for step in range(cfg.block_len + 2 * cfg.block_stride + 1):
        k = torch.randn(4, 2, 8, generator=g, dtype=dtype).to(kdev)
        v = torch.randn(4, 2, 8, generator=g, dtype=dtype).to(kdev)
        append_static(fused, k, v)
        append_static(ref, k, v, fused="torch")
        for name in ("cache_seqlens",):
            assert torch.equal(getattr(fused.raw, name), getattr(ref.raw, name)), f"step {step}: raw {name}"
            assert torch.equal(getattr(fused.cmp, name), getattr(ref.cmp, name)), f"step {step}: cmp {name}"
        for b, n in enumerate(ref.raw.cache_seqlens.tolist()):
            nc = ref.cmp.cache_seqlens[b].item()
            fr, rr = fused.raw.view(), ref.raw.view()
            pos = torch.arange(n, device=kdev)
            for x, y in zip(fr.gather(torch.tensor(b), pos, pos >= 0), rr.gather(torch.tensor(b), pos, pos >= 0)):
                assert torch.equal(x, y), f"step {step}: raw tokens of sequence {b}"
            i = torch.arange(nc, device=kdev)
            for x, y in zip(fused.cmp.view().gather(torch.tensor(b), i, i >= 0), ref.cmp.view().gather(torch.tensor(b), i, i >= 0)):
                err = (x - y).abs().max().item() if x.numel() else 0.0
                assert err <= tol, f"step {step}: compressed blocks of sequence {b} differ by {err:.3g}"


def test_learned_phi_keeps_the_torch_path(kdev):
    from nsa_ref.compress import MLPCompressor
    from nsa_ref.kv_cache import NSAKVCache
    from nsa_ref.triton_kernels.decode_append import refusal

    cfg = TINY.model_copy(update={"compress": "mlp"})
    phi_k, phi_v = MLPCompressor(cfg.block_len, 8).double(), MLPCompressor(cfg.block_len, 8).double()
    cache = NSAKVCache.allocate(2, 32, 2, 8, cfg, dtype=torch.float64, device=kdev, phi_k=phi_k, phi_v=phi_v)
    assert "learned phi" in refusal(cache, cache.raw.k_pages[:1, 0])
